"""Errors the trainer reports to the user instead of a traceback."""

from __future__ import annotations


class TrainerInputError(Exception):
    """Bad input (spec, dataset, model): retrying cannot help, so the run fails with this message.

    `reason` is a CamelCase word for status and events (e.g. `InvalidDataset`); the message names
    the field, column or row and says what to do.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
