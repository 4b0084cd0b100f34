"""Words of a document as NumPy arrays: spans, character lengths and 64-bit hashes, computed without a Python loop.

Quality filters and MinHash both need the words of every document. A word here is a maximal run of ASCII letters,
digits or non-ASCII characters in the lower-cased UTF-8 bytes (punctuation and whitespace separate words), so
"Ham." and "ham" are the same word. Hashes are deterministic across processes and runs (no Python `hash()`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

_WORD_BYTE = np.zeros(256, dtype=bool)
_WORD_BYTE[list(b"abcdefghijklmnopqrstuvwxyz0123456789")] = True
_WORD_BYTE[0x80:] = True  # every byte of a non-ASCII character
_ALPHA_BYTE = np.zeros(256, dtype=bool)
_ALPHA_BYTE[list(b"abcdefghijklmnopqrstuvwxyz")] = True
_ALPHA_BYTE[0xC0:] = True  # the lead byte of a non-ASCII character counts as a letter
_CHAR_START = np.ones(256, dtype=bool)
_CHAR_START[0x80:0xC0] = False  # UTF-8 continuation bytes do not start a character

_BASE = np.uint64(0x100000001B3)  # odd, so invertible modulo 2**64
_BASE_INV = np.uint64(pow(int(_BASE), -1, 2**64))
_pow = np.ones(1, dtype=np.uint64)
_inv = np.ones(1, dtype=np.uint64)


def _powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    """BASE**j and BASE**-j (mod 2**64) for j < n, grown by doubling and kept between calls."""
    global _pow, _inv
    if len(_pow) < n:
        m = max(n, 2 * len(_pow))
        with np.errstate(over="ignore"):
            _pow = np.cumprod(np.concatenate([[np.uint64(1)], np.full(m - 1, _BASE)]), dtype=np.uint64)
            _inv = np.cumprod(np.concatenate([[np.uint64(1)], np.full(m - 1, _BASE_INV)]), dtype=np.uint64)
    return _pow[:n], _inv[:n]


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: spreads every input bit over the whole 64-bit output."""
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint64(30))
        x = x * np.uint64(0xBF58476D1CE4E5B9)
        x = x ^ (x >> np.uint64(27))
        x = x * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


@dataclass
class Words:
    hashes: np.ndarray  # (W,) uint64, equal words have equal hashes
    chars: np.ndarray  # (W,) int64, characters per word
    alpha: np.ndarray  # (W,) bool, the word holds at least one letter
    _ngrams: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.hashes)

    def ngrams(self, n: int) -> np.ndarray:
        """ngram_hashes(self.hashes, n), computed once: the filters and MinHash both use the 5-grams."""
        if n not in self._ngrams:
            self._ngrams[n] = ngram_hashes(self.hashes, n)
        return self._ngrams[n]


def words(text: str) -> Words:
    """The words of text (see the module docstring)."""
    data = np.frombuffer(text.lower().encode("utf-8"), dtype=np.uint8)
    is_word = _WORD_BYTE[data]
    edges = np.flatnonzero(np.diff(np.concatenate([[False], is_word, [False]]).view(np.int8)))
    starts, ends = edges[0::2], edges[1::2]  # word i is data[starts[i]:ends[i]]
    if len(starts) == 0:
        return Words(np.zeros(0, np.uint64), np.zeros(0, np.int64), np.zeros(0, bool))
    n = len(data)
    pw, inv = _powers(n + 1)
    with np.errstate(over="ignore"):
        # prefix[i] = sum_{j<i} data[j] * BASE**j; a word's hash is its slice of the sum shifted back to position 0.
        prefix = np.empty(n + 1, dtype=np.uint64)
        prefix[0] = 0
        np.cumsum(data * pw[:n], out=prefix[1:])
        hashes = mix64((prefix[ends] - prefix[starts]) * inv[starts])
    if text.isascii():  # one byte per character
        chars = ends - starts
    else:
        char_cum = np.concatenate([[0], np.cumsum(_CHAR_START[data])])
        chars = char_cum[ends] - char_cum[starts]
    alpha_cum = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(_ALPHA_BYTE[data], dtype=np.int32, out=alpha_cum[1:])
    return Words(hashes, chars.astype(np.int64, copy=False), (alpha_cum[ends] - alpha_cum[starts]) > 0)


def ngram_hashes(word_hashes: np.ndarray, n: int) -> np.ndarray:
    """(W - n + 1,) hashes of the consecutive word n-grams; one hash of all words when there are fewer than n."""
    if len(word_hashes) == 0:
        return word_hashes
    n = min(n, len(word_hashes))
    count = len(word_hashes) - n + 1
    h = word_hashes[:count].copy()
    with np.errstate(over="ignore"):
        for j in range(1, n):
            h = h * _BASE + word_hashes[j:j + count]
    return mix64(h)
