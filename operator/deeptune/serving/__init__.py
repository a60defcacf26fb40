"""Serving fine-tuned models on Triton Inference Server.

`repository` writes the Triton model repository and the server's command line from a ModelDeployment;
`model` is the Triton Python-backend model and `generation` the text generation it runs. The last two
are copied into the repository and run inside Triton, so they import nothing else from DeepTune and
this package imports nothing here.
"""
