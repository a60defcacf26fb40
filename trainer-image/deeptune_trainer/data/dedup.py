"""Duplicate detection: exact (hash of the normalized text) and near (MinHash with LSH banding).

Near-dedup compares each row only with the earlier rows that share an LSH band bucket with it, so
the cost grows about linearly with the number of rows instead of with its square.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np
import numpy.typing as npt

NUM_PERM = 128
"""MinHash signature length: the Jaccard estimate's standard error is at most sqrt(0.25/128) ≈ 0.044."""
SIGNATURE_SEED = 20240601
_CHUNK = 4096
_U64 = np.uint64
_PRIME = _U64(1_000_003)

U64Array = npt.NDArray[np.uint64]
U32Array = npt.NDArray[np.uint32]
U16Array = npt.NDArray[np.uint16]


def exact_key(text: str) -> bytes:
    """A compact fingerprint, so remembering a million rows costs megabytes, not the rows' size."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def _mix(values: U64Array) -> U64Array:
    # splitmix64's finalizer: spreads the polynomial hashes over all 64 bits.
    values = values ^ (values >> _U64(30))
    values = values * _U64(0xBF58476D1CE4E5B9)
    values = values ^ (values >> _U64(27))
    values = values * _U64(0x94D049BB133111EB)
    return values ^ (values >> _U64(31))


def shingle_hashes(text: str, ngram: int) -> U64Array:
    """Distinct 64-bit hashes of the text's character n-grams (characters, so Chinese needs no
    word segmentation); a text shorter than n is one shingle."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    width = min(ngram, len(codes))
    count = len(codes) - width + 1
    hashes = np.zeros(count, dtype=np.uint64)
    for offset in range(width):
        hashes = hashes * _PRIME + codes[offset : offset + count]
    return np.unique(_mix(hashes))


class MinHasher:
    """MinHash signatures with multiply-shift hashing: h(x) = (a·x + b) mod 2^64 >> 32, a odd."""

    def __init__(self, ngram: int, num_perm: int = NUM_PERM, seed: int = SIGNATURE_SEED) -> None:
        rng = np.random.default_rng(seed)
        self.ngram = ngram
        self._a = (rng.integers(0, 2**63, size=num_perm, dtype=np.uint64) << _U64(1)) | _U64(1)
        self._b = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)

    def signature(self, text: str) -> U32Array:
        shingles = shingle_hashes(text, self.ngram)
        minimum = np.full(len(self._a), np.iinfo(np.uint64).max, dtype=np.uint64)
        for start in range(0, len(shingles), _CHUNK):
            chunk = shingles[start : start + _CHUNK]
            hashed = np.outer(self._a, chunk) + self._b[:, None]
            minimum = np.minimum(minimum, hashed.min(axis=1))
        return (minimum >> _U64(32)).astype(np.uint32)

    def signatures(self, texts: Sequence[str]) -> list[U32Array]:
        """One signature per text; short texts are hashed together, in one product (every text has
        at least one shingle, so each is a non-empty run of columns)."""
        shingles = [shingle_hashes(text, self.ngram) for text in texts]
        sizes = [len(part) for part in shingles]
        if sum(sizes) > _CHUNK:
            return [self.signature(text) for text in texts]
        hashed = np.outer(self._a, np.concatenate(shingles)) + self._b[:, None]
        starts = np.cumsum([0, *sizes[:-1]])
        minimum = np.minimum.reduceat(hashed, starts, axis=1)
        return list((minimum.T >> _U64(32)).astype(np.uint32))


@cache
def lsh_bands(threshold: float, num_perm: int = NUM_PERM) -> tuple[int, int]:
    """Bands and rows per band whose S-curve best separates similarities below and above the
    threshold. Missed pairs are weighed twice as heavily as extra candidates, because every
    candidate is checked against the threshold anyway (extra ones only cost a comparison)."""
    similarity = np.linspace(0.0, 1.0, 201)
    below, above = similarity < threshold, similarity >= threshold
    best: tuple[float, int, int] | None = None
    for bands in range(1, num_perm + 1):
        for rows in range(1, num_perm // bands + 1):
            candidate = 1.0 - (1.0 - similarity**rows) ** bands
            extra = float(candidate[below].mean()) * threshold if below.any() else 0.0
            missed = float((1.0 - candidate[above]).mean()) * (1.0 - threshold)
            error = extra + 2.0 * missed
            if best is None or error < best[0]:
                best = (error, bands, rows)
    assert best is not None
    return best[1], best[2]


@dataclass(frozen=True)
class NearMatch:
    """An indexed row that a new one nearly repeats."""

    position: int
    """The indexed row's position, in the order rows were admitted."""
    similarity: float
    """The lowest estimated Jaccard similarity over the parts compared."""


class NearDuplicateIndex:
    """Rows seen so far, bucketed by LSH band. A row is a near duplicate of an indexed one when every
    part of it (e.g. what was asked, and what was answered) nearly repeats the same part of that row:
    rows that share a long context or instruction but answer differently are not duplicates.

    Banding uses the signature of all parts together (the element-wise minimum of the parts'
    signatures: MinHash of the union of their shingles); each part's signature is kept in 16 bits
    per hash for the check (a chance agreement of 1 in 65,536 hardly moves the estimate), so a row
    costs as many bytes as one 32-bit signature would.
    """

    def __init__(self, threshold: float, ngram: int, num_perm: int = NUM_PERM) -> None:
        self.threshold = threshold
        self.bands, self.rows = lsh_bands(threshold, num_perm)
        self._hasher = MinHasher(ngram, num_perm)
        self._buckets: list[dict[bytes, list[int]]] = [{} for _ in range(self.bands)]
        self._signatures: list[U16Array] = []
        self.comparisons = 0
        """Candidate pairs whose signatures were compared (the cost LSH keeps far below n²/2)."""

    def __len__(self) -> int:
        """Rows indexed so far."""
        return len(self._signatures)

    def _band_keys(self, signature: U32Array) -> list[bytes]:
        return [signature[band * self.rows : (band + 1) * self.rows].tobytes() for band in range(self.bands)]

    def match(self, parts: Sequence[str]) -> NearMatch | None:
        """The indexed row this one nearly repeats, part for part; None after indexing this row.
        Rows with no text at all are never indexed nor matched."""
        if not any(parts):
            return None
        signatures = self._hasher.signatures(parts)
        keys = self._band_keys(np.minimum.reduce(signatures))
        checked = np.stack([(signature >> np.uint32(16)).astype(np.uint16) for signature in signatures])
        candidates: set[int] = set()
        for buckets, key in zip(self._buckets, keys, strict=True):
            candidates.update(buckets.get(key, ()))
        for index in sorted(candidates):
            self.comparisons += 1
            similarity = float((self._signatures[index] == checked).mean(axis=1).min())
            if similarity >= self.threshold:
                return NearMatch(index, similarity)
        position = len(self._signatures)
        self._signatures.append(checked)
        for buckets, key in zip(self._buckets, keys, strict=True):
            buckets.setdefault(key, []).append(position)
        return None
