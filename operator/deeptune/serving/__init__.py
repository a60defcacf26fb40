"""Serving fine-tuned models on Triton Inference Server: the model repository and server command line
the operator writes for a ModelDeployment (`repository`). The code that runs inside the serving
container is the serving image's own package, `serving-image/deeptune_serving`."""
