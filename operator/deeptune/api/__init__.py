"""Pydantic models of the DeepTune resources: shared by the operator, the trainer and the CRDs.

This package imports neither kopf nor the Kubernetes client, so the trainer image can use it.
"""

from deeptune.api.base import API_VERSION, GROUP, VERSION, describe_validation_error

__all__ = ["API_VERSION", "GROUP", "VERSION", "describe_validation_error"]
