"""What runs inside the serving container: the Triton Python-backend model and the OpenAI frontend.

The serving image installs this package alone (not the operator's); the model repository the operator
writes only names `deeptune_serving.triton_model` from its `model.py`.
"""
