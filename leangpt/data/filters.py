"""Document quality filters after the Gopher rules (Rae et al. 2021, appendix A), each with a switch and threshold.

A filter returns nothing when the document passes and its name when it does not; the first failing filter (in the
order of FILTER_NAMES) is the one charged with the removal in the manifest.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from leangpt.cli import setting
from leangpt.data.words import Words


@dataclass
class FilterSwitches:
    """One on/off switch per filter (`--no-filter NAME`, or `--set filters.enabled.NAME=false`)."""

    length: bool = setting(True, "word count within [min_words, max_words]")
    mean_word_length: bool = setting(True, "mean word length within [min, max]")
    alpha_fraction: bool = setting(True, "enough words hold a letter")
    symbol_ratio: bool = setting(True, "few '#', '...' and '…' per word")
    duplicate_lines: bool = setting(True, "few characters in repeated lines")
    top_ngram: bool = setting(True, "no 2/3/4-gram covers too many characters")
    duplicate_ngram: bool = setting(True, "few characters in repeated 5..10-grams")


FILTER_NAMES = tuple(f.name for f in dataclasses.fields(FilterSwitches))  # in the order they are tried


@dataclass
class NgramLimits:
    """A character-fraction limit per n-gram length n, field `nN` (e.g. `n2`)."""

    def items(self) -> list[tuple[int, float]]:
        """(n, limit) pairs in increasing n."""
        return [(int(f.name[1:]), getattr(self, f.name)) for f in dataclasses.fields(self)]


@dataclass
class TopNgramLimits(NgramLimits):
    n2: float = setting(0.20, "most frequent 2-gram")
    n3: float = setting(0.18, "most frequent 3-gram")
    n4: float = setting(0.16, "most frequent 4-gram")


@dataclass
class DuplicateNgramLimits(NgramLimits):
    n5: float = setting(0.15, "repeated 5-grams")
    n6: float = setting(0.14, "repeated 6-grams")
    n7: float = setting(0.13, "repeated 7-grams")
    n8: float = setting(0.12, "repeated 8-grams")
    n9: float = setting(0.11, "repeated 9-grams")
    n10: float = setting(0.10, "repeated 10-grams")


@dataclass
class FilterSettings:
    """Thresholds (`--set filters.KEY=VALUE`); Gopher's values except where noted, and a switch per filter."""

    min_words: int = setting(50, "fewest words a document may have")
    max_words: int = setting(100_000, "most words a document may have")
    min_mean_word_length: float = setting(3.0, "shortest mean word length, in characters")
    max_mean_word_length: float = setting(10.0, "longest mean word length, in characters")
    min_alpha_fraction: float = setting(0.8, "smallest fraction of words holding at least one letter")
    max_symbol_ratio: float = setting(0.1, "most ('#' + '...' + '…') per word")
    # Gopher also caps the fraction of duplicate lines by count at 0.3; plays put every speaker's name on a line
    # of its own, which that rule removes, so leangpt uses Gopher's character-weighted version alone.
    max_duplicate_line_char_fraction: float = setting(0.2, "largest fraction of characters in repeated lines")
    max_top_ngram_char_fraction: TopNgramLimits = setting(
        TopNgramLimits(), "largest fraction of word characters in the most frequent n-gram, n = 2, 3, 4")
    max_duplicate_ngram_char_fraction: DuplicateNgramLimits = setting(
        DuplicateNgramLimits(), "largest fraction of word characters inside n-grams that occur more than once, n = 5..10")
    enabled: FilterSwitches = setting(FilterSwitches(), "a switch per filter")

    def to_dict(self) -> dict:
        """The settings as the manifest records them: the n-gram limits keyed by n."""
        out = dataclasses.asdict(self)
        for name in ("max_top_ngram_char_fraction", "max_duplicate_ngram_char_fraction"):
            out[name] = {str(n): limit for n, limit in getattr(self, name).items()}
        return out


def duplicate_line_char_fraction(text: str) -> float:
    """Characters in non-blank lines that repeat an earlier line, over the characters of all non-blank lines."""
    lines = [line for line in map(str.strip, text.split("\n")) if line]
    total = sum(map(len, lines))
    # Every distinct line counts once as original; the rest of the characters are repeats.
    return (total - sum(map(len, set(lines)))) / total if total else 0.0


def _bins(grams: np.ndarray) -> np.ndarray:
    """Hash buckets for n-gram hashes, about 4 per n-gram: bucket counts bound the true counts from above."""
    size = 1 << max(4, int(len(grams)).bit_length() + 2)
    return (grams & np.uint64(size - 1)).astype(np.intp)


def _word_mass_upper_bound(w: Words, total_chars: int) -> float:
    """At least the largest (occurrences x characters) of any word over all word characters. An n-gram occurring c
    times holds each of its words at c distinct places, so its character fraction is at most n times this."""
    return float(np.bincount(_bins(w.hashes), weights=w.chars).max()) / total_chars


def _top_ngram_upper_bound(w: Words, n: int, total_chars: int) -> float:
    """At least top_ngram_char_fraction: buckets merge n-grams, never split them. One pass, no sort."""
    if len(w) < n:
        return 0.0
    bins = _bins(w.ngrams(n))
    gram_chars = np.convolve(w.chars, np.ones(n, dtype=np.int64), mode="valid")
    return float(np.bincount(bins, weights=gram_chars).max()) / total_chars


def _covered_fraction(w: Words, dup_start: np.ndarray, n: int, total_chars: int) -> float:
    # A word is covered when a duplicated n-gram starts at one of the n positions up to it.
    covered = np.convolve(dup_start.astype(np.int32), np.ones(n, dtype=np.int32))[:len(w)] > 0
    return int(w.chars[covered].sum()) / total_chars


def top_ngram_char_fraction(w: Words, n: int, total_chars: int) -> float:
    """Characters covered by the most frequent n-gram (the longest one among ties), over all word characters."""
    if len(w) < n:
        return 0.0
    _, first, counts = np.unique(w.ngrams(n), return_index=True, return_counts=True)
    top = counts.max()
    if top < 2:
        return 0.0
    gram_chars = np.convolve(w.chars, np.ones(n, dtype=np.int64), mode="valid")[first[counts == top]]
    return float(top * gram_chars.max()) / total_chars


def duplicate_ngram_char_fraction(w: Words, n: int, total_chars: int) -> float:
    if len(w) < n:
        return 0.0
    grams = w.ngrams(n)
    order = np.argsort(grams)
    equal_next = grams[order[1:]] == grams[order[:-1]]  # neighbours in sorted order share a value
    repeated = np.zeros(len(grams), dtype=bool)
    repeated[order[1:][equal_next]] = True
    repeated[order[:-1][equal_next]] = True
    return _covered_fraction(w, repeated, n, total_chars)


def failing_filter(text: str, w: Words, cfg: FilterSettings) -> str | None:
    """The name of the first enabled filter that removes the document, or None when it passes."""
    on = cfg.enabled
    n_words = len(w)
    if on.length and not cfg.min_words <= n_words <= cfg.max_words:
        return "length"
    if n_words == 0:
        return None
    total_chars = int(w.chars.sum())
    if on.mean_word_length and not cfg.min_mean_word_length <= total_chars / n_words <= cfg.max_mean_word_length:
        return "mean_word_length"
    if on.alpha_fraction and float(w.alpha.mean()) < cfg.min_alpha_fraction:
        return "alpha_fraction"
    if on.symbol_ratio:
        symbols = text.count("#") + text.count("...") + text.count("…")
        if symbols / n_words > cfg.max_symbol_ratio:
            return "symbol_ratio"
    if on.duplicate_lines and duplicate_line_char_fraction(text) > cfg.max_duplicate_line_char_fraction:
        return "duplicate_lines"
    # The cheap upper bounds clear almost every document; the exact (sorting) measure runs only when they do not.
    if on.top_ngram:
        mass = _word_mass_upper_bound(w, total_chars)
        for n, limit in cfg.max_top_ngram_char_fraction.items():
            if n * mass > limit and _top_ngram_upper_bound(w, n, total_chars) > limit \
                    and top_ngram_char_fraction(w, n, total_chars) > limit:
                return "top_ngram"
    if on.duplicate_ngram:
        limits = sorted(cfg.max_duplicate_ngram_char_fraction.items())
        for i, (n, limit) in enumerate(limits):
            frac = duplicate_ngram_char_fraction(w, n, total_chars)
            if frac > limit:
                return "duplicate_ngram"
            # Longer duplicated n-grams cover no more words than shorter ones: the rest cannot fail.
            if frac <= min(lim for _, lim in limits[i:]):
                break
    return None
