"""Duplicate detection: exact (hash of the normalized text) and near (MinHash with LSH banding).

Near-dedup compares each row only with the earlier rows that share an LSH band with it, so the cost
grows about linearly with the number of rows instead of with its square; those candidates are then
checked by their exact Jaccard similarity. The index holds, per band and row, a 32-bit hash and the
row's place in the band's sorted order, and a reference to the row, not signatures: a million rows
cost ~120 MiB (measured), not gigabytes.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Generic, TypeVar

import numpy as np
import numpy.typing as npt

NUM_PERM = 128
"""MinHash signature length: the Jaccard estimate's standard error is at most sqrt(0.25/128) ≈ 0.044."""
SIGNATURE_SEED = 20240601
_CHUNK = 512
"""Shingles hashed in one (num_perm × chunk) product: 512 KB of uint64 at 128 permutations, which
stays in a core's cache (measured: 34 µs a row at 512, 43 µs at 4096)."""
_ROWS_AT_ONCE = 4096
"""Rows whose parts are put into text and signed together (their texts exist only meanwhile)."""
_SHINGLE_CACHE = 4096
"""Indexed rows whose shingles are kept between comparisons (the first row of a cluster of near
duplicates is compared with each of them)."""
_U64 = np.uint64
_PRIME = _U64(1_000_003)

U64Array = npt.NDArray[np.uint64]
U32Array = npt.NDArray[np.uint32]
I64Array = npt.NDArray[np.int64]
I32Array = npt.NDArray[np.int32]
Row = TypeVar("Row")


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


def window_hashes(text: str, ngram: int) -> U64Array:
    """64-bit hashes of the text's character n-grams, repeats included (characters, so Chinese needs
    no word segmentation); a text shorter than n is one shingle."""
    codes = _codes(text)
    return _mix(_rolling(codes, min(ngram, len(codes))))


def _codes(text: str) -> U64Array:
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)


def _rolling(codes: U64Array, width: int) -> U64Array:
    """The polynomial hash of every run of `width` codes (one, of nothing, when width is 0)."""
    count = max(len(codes) - width + 1, 0)
    hashes = np.zeros(count, dtype=np.uint64)
    for offset in range(width):
        hashes = hashes * _PRIME + codes[offset : offset + count]
    return hashes


def texts_window_hashes(texts: Sequence[str], ngram: int) -> tuple[U64Array, I64Array]:
    """`window_hashes` of many texts at once, one run after another, and how many each has: one
    rolling hash over all the texts joined, keeping the windows that lie within one text (a text
    shorter than n is one window, of its whole length). One call for thousands of texts, where
    `window_hashes`' own numpy calls would cost ~20 µs a text."""
    lengths = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
    codes = _codes("".join(texts))
    rolling = _rolling(codes, ngram)
    starts = np.cumsum(lengths) - lengths
    sizes = np.maximum(lengths - ngram + 1, 1)
    ends = np.cumsum(sizes)
    # Where each window starts in the joined text: a run per text, from the text's own start.
    source = np.repeat(starts - (ends - sizes), sizes) + np.arange(ends[-1] if len(ends) else 0)
    hashes = np.zeros(len(source), dtype=np.uint64)
    full = np.repeat(lengths >= ngram, sizes)
    hashes[full] = rolling[source[full]]
    for text_index in np.flatnonzero(lengths < ngram):  # short texts: one window of their own length
        start, length = starts[text_index], lengths[text_index]
        hashes[ends[text_index] - 1] = _rolling(codes[start : start + length], int(length))[0]
    return _mix(hashes), sizes


def shingle_hashes(text: str, ngram: int) -> U64Array:
    """The distinct shingles of the text, sorted: the set Jaccard similarity is computed on."""
    return np.unique(window_hashes(text, ngram))


def jaccard(a: U64Array, b: U64Array) -> float:
    """Jaccard similarity of two shingle sets (sorted, distinct)."""
    shared = len(np.intersect1d(a, b, assume_unique=True))
    return shared / (len(a) + len(b) - shared)


class MinHasher:
    """MinHash signatures with multiply-shift hashing: h(x) = (a·x + b) mod 2^64 >> 32, a odd."""

    def __init__(self, ngram: int, num_perm: int = NUM_PERM, seed: int = SIGNATURE_SEED) -> None:
        rng = np.random.default_rng(seed)
        self.ngram = ngram
        self._a = (rng.integers(0, 2**63, size=num_perm, dtype=np.uint64) << _U64(1)) | _U64(1)
        self._b = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)

    def _minimum(self, shingles: U64Array) -> U64Array:
        minimum = np.full(len(self._a), np.iinfo(np.uint64).max, dtype=np.uint64)
        for start in range(0, len(shingles), _CHUNK):
            chunk = shingles[start : start + _CHUNK]
            minimum = np.minimum(minimum, (np.outer(self._a, chunk) + self._b[:, None]).min(axis=1))
        return minimum

    def signature(self, text: str) -> U32Array:
        return (self._minimum(window_hashes(text, self.ngram)) >> _U64(32)).astype(np.uint32)

    def union_signatures(self, rows: Sequence[Sequence[str]]) -> U32Array:
        """One signature per row (rows × num_perm) of the union of its texts' shingles: the MinHash of
        all its parts together. Rows are hashed many at a time, in products of about _CHUNK shingles
        (a row's shingles are a run of columns; a longer row is hashed alone)."""
        hashes, text_sizes = texts_window_hashes([text for row in rows for text in row], self.ngram)
        text_rows = np.repeat(np.arange(len(rows)), [len(row) for row in rows])
        offsets = np.concatenate(
            [[0], np.cumsum(np.bincount(text_rows, text_sizes, len(rows)).astype(np.int64))]
        )
        minimum = np.empty((len(rows), len(self._a)), dtype=np.uint64)
        start = 0
        while start < len(rows):
            end = max(start + 1, int(np.searchsorted(offsets, offsets[start] + _CHUNK, side="right")) - 1)
            columns = hashes[offsets[start] : offsets[end]]
            if end - start == 1:
                minimum[start] = self._minimum(columns)
            else:
                hashed = np.multiply.outer(self._a, columns)
                hashed += self._b[:, None]
                minimum[start:end] = np.minimum.reduceat(
                    hashed, offsets[start:end] - offsets[start], axis=1
                ).T
            start = end
        return (minimum >> _U64(32)).astype(np.uint32)


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
    """The lowest Jaccard similarity over the parts compared."""


@dataclass
class _BatchBands:
    """Where each row of a batch meets other rows in some band: earlier batches' rows with the same
    band hash (a slice of the band's sorted order), and its group of equal hashes in the batch. Kept
    in 32 bits (bands × rows of each): at a million rows, what near dedup holds beyond the rows."""

    earlier_from: I32Array
    earlier_to: I32Array
    group: I32Array
    in_group: npt.NDArray[np.bool_]
    """Whether the row's group in that band has other rows of the batch."""
    shared: npt.NDArray[np.bool_]
    """Per row: whether any band meets another row at all (most rows: no)."""


class NearDuplicateIndex(Generic[Row]):
    """Rows seen so far, banded by LSH. A row is a near duplicate of an indexed one when every part of
    it (e.g. what was asked, and what was answered) nearly repeats the same part of that row: rows that
    share a long context or instruction but answer differently are not duplicates.

    Banding uses the signature of all parts together (MinHash of the union of their shingles), so a
    candidate shares at least one band with the row; each candidate is then checked part for part
    by exact Jaccard similarity, computed from the rows themselves (`parts` gives a row's texts).
    Rows are admitted a batch at a time, in order: a row repeating an earlier row of its own batch
    or of an earlier batch is not admitted.
    """

    def __init__(
        self, threshold: float, ngram: int, parts: Callable[[Row], Sequence[str]], num_perm: int = NUM_PERM
    ) -> None:
        self.threshold = threshold
        self.ngram = ngram
        self.bands, self.rows = lsh_bands(threshold, num_perm)
        self._parts = parts
        self._hasher = MinHasher(ngram, num_perm)
        rng = np.random.default_rng(SIGNATURE_SEED + 1)
        self._band_mix = (rng.integers(0, 2**63, size=self.rows, dtype=np.uint64) << _U64(1)) | _U64(1)
        self._indexed: list[Row] = []
        self._keys = np.empty((self.bands, 0), dtype=np.uint32)
        """Band hashes of the indexed rows, by band and position."""
        self._order = np.empty((self.bands, 0), dtype=np.int32)
        """Per band, the positions sorted by their band hash."""
        self._shingles: dict[int, list[U64Array]] = {}
        self.comparisons = 0
        """Candidate pairs compared (the cost LSH keeps far below n²/2)."""

    def __len__(self) -> int:
        """Rows indexed so far."""
        return len(self._indexed)

    def row(self, position: int) -> Row:
        """The row indexed at `position`."""
        return self._indexed[position]

    def _band_keys(self, rows: Sequence[Row]) -> tuple[U32Array, npt.NDArray[np.bool_]]:
        """(bands × rows) 32-bit hashes of each band of each row's union signature, and which rows have
        any text. 32 bits, as a chance collision only adds a candidate, which is checked anyway."""
        keys = np.empty((self.bands, len(rows)), dtype=np.uint32)
        has_text = np.empty(len(rows), dtype=np.bool_)
        for start in range(0, len(rows), _ROWS_AT_ONCE):
            chunk = [self._parts(row) for row in rows[start : start + _ROWS_AT_ONCE]]
            has_text[start : start + len(chunk)] = [any(parts) for parts in chunk]
            signatures = self._hasher.union_signatures(chunk)[:, : self.bands * self.rows].astype(np.uint64)
            banded = signatures.reshape(len(chunk), self.bands, self.rows) * self._band_mix
            keys[:, start : start + len(chunk)] = (_mix(banded.sum(axis=2, dtype=np.uint64)) >> _U64(32)).T
        return keys, has_text

    def _meetings(self, keys: U32Array) -> _BatchBands:
        # Before the first batch, nothing is earlier: empty slices everywhere, in no memory.
        earlier_from = np.broadcast_to(np.int32(0), keys.shape)
        earlier_to = earlier_from
        if len(self._indexed):
            earlier_from, earlier_to = np.empty(keys.shape, np.int32), np.empty(keys.shape, np.int32)
        group = np.empty(keys.shape, dtype=np.int32)
        in_group = np.empty(keys.shape, dtype=np.bool_)
        for band in range(self.bands):
            if len(self._indexed):
                indexed = self._keys[band, self._order[band]]
                earlier_from[band] = np.searchsorted(indexed, keys[band], side="left")
                earlier_to[band] = np.searchsorted(indexed, keys[band], side="right")
            _, inverse, counts = np.unique(keys[band], return_inverse=True, return_counts=True)
            group[band] = inverse
            in_group[band] = (counts > 1)[inverse]
        shared = in_group.any(axis=0) | (earlier_to > earlier_from).any(axis=0)
        return _BatchBands(earlier_from, earlier_to, group, in_group, shared)

    def _indexed_shingles(self, position: int) -> list[U64Array]:
        if position not in self._shingles:
            if len(self._shingles) >= _SHINGLE_CACHE:
                self._shingles.clear()
            parts = self._parts(self._indexed[position])
            self._shingles[position] = [shingle_hashes(text, self.ngram) for text in parts]
        return self._shingles[position]

    def _similarity(self, shingles: list[U64Array], position: int) -> float:
        other = self._indexed_shingles(position)
        if len(other) != len(shingles):
            return 0.0
        return min(jaccard(a, b) for a, b in zip(shingles, other, strict=True))

    def _match(self, row: Row, candidates: set[int]) -> NearMatch | None:
        shingles = [shingle_hashes(text, self.ngram) for text in self._parts(row)]
        for position in sorted(candidates):
            self.comparisons += 1
            similarity = self._similarity(shingles, position)
            if similarity >= self.threshold:
                return NearMatch(position, similarity)
        return None

    def admit(self, rows: Sequence[Row]) -> list[NearMatch | None]:
        """For each row, in order: the indexed row it nearly repeats, or None after indexing it. Rows
        with no text at all are neither indexed nor matched."""
        results: list[NearMatch | None] = [None] * len(rows)
        all_keys, has_text = self._band_keys(rows)
        batch = itertools.compress(range(len(rows)), has_text.tolist())
        keys = all_keys if has_text.all() else all_keys[:, has_text]
        del all_keys
        meetings = self._meetings(keys)
        members: list[dict[int, list[int]]] = [{} for _ in range(self.bands)]
        admitted = np.zeros(keys.shape[1], dtype=np.bool_)
        for local, index in enumerate(batch):
            if meetings.shared[local]:
                candidates: set[int] = set()
                for band in range(self.bands):
                    low, high = meetings.earlier_from[band, local], meetings.earlier_to[band, local]
                    candidates.update(self._order[band, low:high].tolist())
                    candidates.update(members[band].get(int(meetings.group[band, local]), ()))
                match = self._match(rows[index], candidates) if candidates else None
                if match is not None:
                    results[index] = match
                    continue
                for band in np.flatnonzero(meetings.in_group[:, local]):
                    members[band].setdefault(int(meetings.group[band, local]), []).append(len(self._indexed))
            self._indexed.append(rows[index])
            admitted[local] = True
        del meetings, members
        self._keys = (
            np.concatenate([self._keys, keys[:, admitted]], axis=1)
            if len(self._keys[0])
            else keys[:, admitted]
        )
        del keys
        self._order = np.empty(self._keys.shape, dtype=np.int32)
        for band in range(self.bands):  # one band at a time: argsort's int64 result is one band's size
            self._order[band] = np.argsort(self._keys[band], kind="stable")
        return results
