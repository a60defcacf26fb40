"""DeepTune: fine-tune and serve DeepSeek-family language models on Kubernetes."""

__version__ = "0.1.0"
