"""MinHash and LSH on constructed near-duplicates of known Jaccard, against datasketch, exact set arithmetic and an
exhaustive search for the banding."""

import json
import random

import numpy as np
import pytest

from leangpt.data.dedup import (RECALL, RECALL_MARGIN, MinHasher, candidate_probability, exact_key, lsh_params,
                                near_duplicates, recall_point)
from leangpt.data.words import ngram_hashes, words


def shingle_set(text: str, n: int = 5) -> set[int]:
    return set(ngram_hashes(words(text).hashes, n).tolist())


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b)


def variant(base: list[str], frac: float, rng: random.Random) -> str:
    """base with a fraction of its words replaced by fresh ones."""
    out = list(base)
    for i in rng.sample(range(len(out)), int(frac * len(out))):
        out[i] = f"new{rng.randrange(10**9)}"
    return " ".join(out)


@pytest.fixture(scope="module")
def family():
    """A base text, variants of it at a spread of Jaccard similarities, and unrelated texts."""
    rng = random.Random(0)
    base = [f"w{rng.randrange(5000)}" for _ in range(2000)]
    texts = [" ".join(base)] + [variant(base, f, rng) for f in (0.002, 0.01, 0.02, 0.05, 0.1, 0.2)]
    texts += [" ".join(f"w{rng.randrange(5000)}" for _ in range(2000)) for _ in range(5)]
    return texts


def test_minhash_estimates_jaccard_like_datasketch(family):
    from datasketch import MinHash

    hasher = MinHasher(256, 5)
    sets = [shingle_set(t) for t in family]
    sigs = [hasher.signature(words(t).hashes) for t in family]
    ref = []
    for s in sets:
        m = MinHash(num_perm=256, seed=1)
        m.update_batch([x.to_bytes(8, "little") for x in s])
        ref.append(m)
    for i in range(1, len(family)):
        true = jaccard(sets[0], sets[i])
        ours = float((sigs[0] == sigs[i]).mean())
        assert abs(ours - true) < 0.08, (i, ours, true)  # ~4 standard errors at 256 permutations
        assert abs(ref[0].jaccard(ref[i]) - true) < 0.08


def test_near_duplicates_finds_pairs_above_threshold_only(family):
    hasher = MinHasher(128, 5)
    sigs = np.stack([hasher.signature(words(t).hashes) for t in family])
    sets = [shingle_set(t) for t in family]
    res = near_duplicates(sigs, 0.8)
    clustered = {j: c[0] for c in res.clusters for j in c[1:]}
    for i in range(1, len(family)):
        true = jaccard(sets[0], sets[i])
        if true >= 0.9:
            assert clustered.get(i) == 0, (i, true)  # well above the threshold: always found, the first one kept
        if true <= 0.7:
            assert i not in clustered and all(i not in c for c in res.clusters), (i, true)


def _best_banding_by_search(threshold: float, num_perm: int) -> tuple[int, int] | None:
    """Every (bands, rows) with bands * rows <= num_perm: of those with P(candidate) >= RECALL at the recall point,
    the one with the least false-candidate area below the threshold (None when there is none)."""
    target, below = recall_point(threshold), np.linspace(0, threshold, 201)
    feasible = [(float(np.trapezoid(candidate_probability(below, b, r), below)), (b, r))
                for r in range(1, num_perm + 1) for b in range(1, num_perm // r + 1)
                if candidate_probability(target, b, r) >= RECALL]
    return min(feasible)[1] if feasible else None


@pytest.mark.parametrize("num_perm", [16, 64, 128, 256])
def test_banding_finds_pairs_just_above_the_threshold(num_perm):
    """P(candidate) >= 0.999 at Jaccard threshold + 0.05 (halfway to 1 above 0.9), for every threshold and
    permutation count; the banding is the one an exhaustive search picks; none there is an error."""
    for threshold in (0.003, 0.01, 0.05, 0.1, 0.3, 0.5, 0.7, 0.8, 0.85, 0.9, 0.95, 0.99):
        expected = _best_banding_by_search(threshold, num_perm)
        if expected is None:
            with pytest.raises(ValueError, match="permutations"):
                lsh_params(threshold, num_perm)
            continue
        bands, rows = lsh_params(threshold, num_perm)
        assert (bands, rows) == expected and bands * rows <= num_perm
        above = np.linspace(min(threshold + RECALL_MARGIN, (1 + threshold) / 2), 1, 50)
        assert (candidate_probability(above, bands, rows) >= RECALL).all(), (threshold, num_perm)


def test_default_banding_recall():
    # 9 bands x 13 rows (the old choice) made a pair at Jaccard 0.9 a candidate with chance only ~0.93.
    assert candidate_probability(0.9, 9, 13) == pytest.approx(0.93, abs=0.01)
    bands, rows = lsh_params(0.8, 128)
    assert candidate_probability(0.85, bands, rows) >= 0.999 and candidate_probability(0.9, bands, rows) > 0.99999
    assert lsh_params(0.05, 128) == (66, 1)  # split grouping: one value per band, as many bands as the recall needs
    with pytest.raises(ValueError, match="needs at least 66 permutations, got 64"):
        lsh_params(0.05, 64)


def near_copies(n_words: int, similarities: list[float], rng: random.Random) -> tuple[list[str], list[tuple[int, float]]]:
    """A base document of distinct words per similarity, then one copy of each with the true 5-shingle Jaccard
    just at or above that similarity: every replaced word (at positions 5 apart, by a fresh word) removes 5 shingles
    of the base's and adds 5 new ones. Returns the texts (bases first) and, per copy, (its base's index, true J)."""
    n_sh = n_words - 4
    bases = [[f"w{rng.randrange(10**12)}" for _ in range(n_words)] for _ in similarities]
    texts, copies = [" ".join(b) for b in bases], []
    for i, (base, sim) in enumerate(zip(bases, similarities)):
        k = int(n_sh * (1 - sim) / (5 * (1 + sim)))  # (n_sh - 5k) / (n_sh + 5k) >= sim
        copy = list(base)
        for p in rng.sample(range(4, n_words - 4, 5), k):
            copy[p] = f"x{rng.randrange(10**12)}"
        texts.append(" ".join(copy))
        copies.append((i, jaccard(shingle_set(texts[i]), shingle_set(texts[-1]))))
    return texts, copies


@pytest.mark.parametrize("num_perm", [128, 512])
def test_near_copies_around_the_threshold(num_perm):
    """Threshold 0.8: a copy whose estimated Jaccard reaches it is always found (LSH loses none), copies at 0.9 and
    more are all removed, far ones (0.6, 0.65) all kept. At 0.85 the estimate itself (standard error 0.03 with 128
    permutations, 0.016 with 512) sometimes falls under 0.8: with 512 permutations every copy is removed."""
    similarities = [s for s in (0.6, 0.65, 0.75, 0.85, 0.9, 0.95) for _ in range(12)]
    texts, copies = near_copies(1000, similarities, random.Random(num_perm))
    hasher = MinHasher(num_perm, 5)
    sigs = np.stack([hasher.signature(words(t).hashes) for t in texts])
    res = near_duplicates(sigs, 0.8)
    removed = {j: c[0] for c in res.clusters for j in c[1:]}
    n = len(similarities)
    for k, (base, true) in enumerate(copies):
        copy, estimate = n + k, float((sigs[base] == sigs[n + k]).mean())
        assert abs(true - similarities[k]) < 0.01
        if true >= 0.85 and estimate >= 0.8:
            assert removed.get(copy) == base, (true, estimate)
        if true >= 0.9 or (true >= 0.85 and num_perm == 512):
            assert removed.get(copy) == base, (true, estimate)
        if true <= 0.65:
            assert copy not in removed and base not in removed, (true, estimate)
    assert not set(removed) & set(range(n))  # each base document is the one kept


def test_prepare_removes_every_injected_near_copy(tmp_path, capsys):
    """60 documents and 20 near copies of some of them at true Jaccard 0.90-0.95: the old banding (9 bands x 13
    rows) left some in; the one chosen for recall removes them all."""
    from tests.conftest import run_cli

    rng = random.Random(5)
    texts, copies = near_copies(1000, [0.9 + 0.04 * rng.random() for _ in range(20)], rng)
    texts += [" ".join(f"w{rng.randrange(10**12)}" for _ in range(1000)) for _ in range(40)]
    for i, text in enumerate(texts):
        (tmp_path / f"d{i:03d}.txt").write_text(text)
    assert all(0.9 <= j <= 0.95 for _, j in copies)
    code, out, err = run_cli(["prepare", "--source", str(tmp_path), "--out", str(tmp_path / "o"), "--no-filters",
                              "--dry-run", "--json", "--workers", "1"], capsys)
    assert code == 0, err
    assert json.loads(out)["removed"]["near_dedup"]["documents"] == 20


def test_exact_key_ignores_case_and_whitespace():
    assert exact_key("To be,\n  or NOT") == exact_key("to be, or not ")
    assert exact_key("to be") != exact_key("to bee")


def test_hashes_are_stable_across_processes():
    # Fixed values: a change to word or shingle hashing changes every dataset's dedup, so it must be deliberate.
    sig = MinHasher(4, 2).signature(words("the king speaks of love").hashes)
    assert sig.tolist() == EXPECTED_SIG


EXPECTED_SIG = [478492858, 489537938, 646064254, 592099667]


def test_exact_key_normalises_like_the_regex():
    import hashlib
    import re
    for text in ["To be,\n  or NOT", " \u00a0a\u2003b\x1c c\t\r\n", "", "ÉTÉ  été"]:
        ref = hashlib.blake2b(re.sub(r"\s+", " ", text.lower()).strip().encode("utf-8"), digest_size=16).digest()
        assert exact_key(text) == ref


def test_signature_ignores_repeated_shingles():
    hasher = MinHasher(16, 2)
    shingles = ngram_hashes(words("a b c a b c a b d").hashes, 2)
    assert hasher.signature_of_shingles(shingles).tolist() == hasher.signature_of_shingles(np.unique(shingles)).tolist()
