"""Exact and near-duplicate detection: a digest of normalised text, MinHash over word shingles, LSH banding.

MinHash here is vectorised NumPy: shingle hashes come from `words.ngram_hashes`, and permutation k maps a 64-bit
shingle hash x to the top 32 bits of (a_k * x + b_k) mod 2**64 (multiply-shift hashing). bench/bench_prepare.py
measures it against `datasketch.MinHash`, and tests/test_data_dedup.py checks both estimate the true Jaccard.

LSH works on the whole matrix of signatures at once: per band, sort the band's hashes and compare the documents
whose band is equal. Memory is the (N, num_perm) uint32 signature matrix plus O(N) per band.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

from leangpt.data.words import mix64, ngram_hashes


def exact_key(text: str) -> bytes:
    """Digest of the text with case and whitespace normalised: documents that differ only there share it."""
    # str.split() splits at the same (Unicode) whitespace as the regex \s+ and drops the ends, several times faster.
    return hashlib.blake2b(" ".join(text.lower().split()).encode("utf-8"), digest_size=16).digest()


class MinHasher:
    """MinHash signatures of word-shingle sets, num_perm 32-bit values per document."""

    def __init__(self, num_perm: int = 128, shingle: int = 5, seed: int = 1) -> None:
        if num_perm < 2 or shingle < 1:
            raise ValueError("num_perm must be at least 2 and shingle at least 1")
        self.num_perm, self.shingle = num_perm, shingle
        rng = np.random.default_rng(seed)
        self.a = rng.integers(1, 2**63, num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)  # odd multipliers
        self.b = rng.integers(0, 2**63, num_perm, dtype=np.uint64)

    def signature(self, word_hashes: np.ndarray) -> np.ndarray:
        """(num_perm,) uint32 of the word shingles; a document without words gets all-ones (it matches only other
        empty documents)."""
        return self.signature_of_shingles(ngram_hashes(word_hashes, self.shingle))

    def signature_of_shingles(self, shingles: np.ndarray) -> np.ndarray:
        """(num_perm,) uint32 from the shingle hashes; repeats need no removal (a minimum ignores them)."""
        best = np.full(self.num_perm, np.iinfo(np.uint64).max, dtype=np.uint64)
        step = max(1, (1 << 20) // self.num_perm)  # bound the (P, S) temporary to ~8 MB
        buf = np.empty((self.num_perm, min(step, max(1, len(shingles)))), dtype=np.uint64)
        for i in range(0, len(shingles), step):
            x = shingles[i:i + step]
            h = buf[:, :len(x)]  # (P, S): the reduction runs along contiguous rows, ~8x faster than (S, P)
            np.multiply(self.a[:, None], x[None, :], out=h)
            h += self.b[:, None]
            np.minimum(best, h.min(axis=1), out=best)
        return (best >> np.uint64(32)).astype(np.uint32)  # the shift is monotone: min, then shift


# Candidates are verified by their estimated Jaccard, so a false candidate costs one signature comparison while a
# missed one leaves a duplicate in: the banding is chosen for recall first.
RECALL = 0.999  # chance that a pair RECALL_MARGIN above the threshold shares a band
RECALL_MARGIN = 0.05


def candidate_probability(jaccard: float | np.ndarray, bands: int, rows: int) -> float | np.ndarray:
    """Chance that two documents of this Jaccard share at least one band: 1 - (1 - J**rows)**bands."""
    with np.errstate(divide="ignore"):  # J = 1: log(0) = -inf gives chance 1
        return -np.expm1(bands * np.log1p(-np.asarray(jaccard, dtype=np.float64) ** rows))


def recall_point(threshold: float) -> float:
    """The Jaccard at which a pair must become a candidate with chance RECALL: threshold + RECALL_MARGIN, or
    halfway from the threshold to 1 when that is closer."""
    return min(threshold + RECALL_MARGIN, (1 + threshold) / 2)


def _bands_needed(jaccard: float, rows: int) -> float:
    """Bands of `rows` rows that give a pair of this Jaccard chance RECALL, unrounded (inf when J**rows underflows)."""
    one_band_misses = math.log1p(-jaccard ** rows)
    return math.log(1 - RECALL) / one_band_misses if one_band_misses < 0 else math.inf


def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) with bands * rows <= num_perm: of the bandings that make a pair at recall_point(threshold) a
    candidate with chance RECALL, the one with the fewest false candidates (the candidate probability integrated
    over Jaccard 0..threshold). Raises ValueError when num_perm is too small for any banding to reach it."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    target = recall_point(threshold)
    below = np.linspace(0, threshold, 201)
    best, best_false = None, float("inf")
    for rows in range(1, num_perm + 1):
        needed = _bands_needed(target, rows)
        if needed * rows > num_perm:
            continue
        bands = max(1, math.ceil(needed))
        while candidate_probability(target, bands, rows) < RECALL:  # the rounded-up count may still fall short
            bands += 1
        false = float(np.trapezoid(candidate_probability(below, bands, rows), below))
        if bands * rows <= num_perm and false < best_false:
            best, best_false = (bands, rows), false
    if best is None:
        need = min(math.ceil(n) * r for r in range(1, num_perm + 1) if (n := _bands_needed(target, r)) < math.inf)
        raise ValueError(f"finding pairs at Jaccard {target:.3g} with chance {RECALL} needs at least {need} "
                         f"permutations, got {num_perm}")
    return best


class UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = np.arange(n)

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:
            self.parent[i], i = root, self.parent[i]
        return int(root)

    def union(self, i: int, j: int) -> None:
        ri, rj = self.find(i), self.find(j)
        if ri != rj:
            self.parent[max(ri, rj)] = min(ri, rj)  # the earliest document is the root, so the first one is kept

    def groups(self) -> list[list[int]]:
        """Sets of more than one member, each sorted, ordered by their first member."""
        by_root: dict[int, list[int]] = {}
        for i in range(len(self.parent)):
            by_root.setdefault(self.find(i), []).append(i)
        return [g for _, g in sorted(by_root.items()) if len(g) > 1]


@dataclass
class NearDupResult:
    clusters: list[list[int]]  # each: [kept document, removed documents...], indices into the signature matrix
    pairs: list[tuple[int, int, float]]  # (i, j, estimated Jaccard) of every confirmed candidate pair
    bands: int
    rows: int
    candidates: int  # signature comparisons made (one per document and band it shares with an earlier one)


def near_duplicates(signatures: np.ndarray, threshold: float) -> NearDupResult:
    """Cluster documents whose estimated Jaccard (fraction of equal MinHash values) reaches threshold.

    Candidates share at least one LSH band; a candidate is confirmed against the first document of its bucket,
    and confirmed pairs are joined transitively (union-find).
    """
    n, num_perm = signatures.shape
    bands, rows = lsh_params(threshold, num_perm)
    uf = UnionFind(n)
    pairs: dict[tuple[int, int], float] = {}
    candidates = 0
    for band in range(bands):
        cols = signatures[:, band * rows:(band + 1) * rows].astype(np.uint64)
        key = cols[:, 0].copy()
        with np.errstate(over="ignore"):
            for r in range(1, rows):
                key = mix64(key * np.uint64(0x9E3779B97F4A7C15) + cols[:, r])
        # Buckets of equal keys, all at once: a stable sort puts each bucket's members in index order, so its head
        # (the earliest document) comes first and every other member is a candidate against it.
        order = np.argsort(key, kind="stable")
        sorted_key = key[order]
        new_run = np.concatenate([[True], sorted_key[1:] != sorted_key[:-1]])
        heads = order[np.flatnonzero(new_run)][np.cumsum(new_run) - 1]
        cand_j, cand_h = order[~new_run], heads[~new_run]
        candidates += len(cand_j)
        for c in range(0, len(cand_j), 1 << 16):  # bound the (C, num_perm) comparison to a few MB
            j, h = cand_j[c:c + (1 << 16)], cand_h[c:c + (1 << 16)]
            agree = (signatures[j] == signatures[h]).mean(axis=1)  # estimated Jaccard vs the head
            for hi, ji, est in zip(h[agree >= threshold].tolist(), j[agree >= threshold].tolist(),
                                   agree[agree >= threshold].tolist()):
                pairs[(hi, ji)] = est
                uf.union(hi, ji)
    return NearDupResult(uf.groups(), [(i, j, e) for (i, j), e in sorted(pairs.items())], bands, rows, candidates)
