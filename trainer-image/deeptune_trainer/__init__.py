"""The DeepTune trainer: data → fine-tuning → evaluation → artifacts, for one FineTuneJob."""
