"""Each quality filter on constructed documents, and the NumPy measures against plain-Python references."""

import random
from collections import Counter

import pytest

from leangpt.data.clean import clean
from leangpt.data.filters import (FilterSettings, duplicate_line_char_fraction, duplicate_ngram_char_fraction,
                                  failing_filter, top_ngram_char_fraction)
from leangpt.data.words import words
from tests.conftest import WORDS


def text_of(n: int, seed: int = 0) -> str:
    return " ".join(random.Random(seed).choices(WORDS, k=n))


def ref_words(text: str) -> list[str]:
    import re
    return re.findall(r"[a-z0-9\x80-\U0010ffff]+", text.lower())


def ref_top(ws: list[str], n: int) -> float:
    grams = Counter(tuple(ws[i:i + n]) for i in range(len(ws) - n + 1))
    top = max(grams.values())
    longest = max(sum(map(len, g)) for g, c in grams.items() if c == top)
    return 0.0 if top < 2 else top * longest / sum(map(len, ws))


def ref_dup(ws: list[str], n: int) -> float:
    grams = Counter(tuple(ws[i:i + n]) for i in range(len(ws) - n + 1))
    covered = set()
    for i in range(len(ws) - n + 1):
        if grams[tuple(ws[i:i + n])] > 1:
            covered.update(range(i, i + n))
    return sum(len(ws[i]) for i in covered) / sum(map(len, ws))


@pytest.mark.parametrize("text", [text_of(300, 1), text_of(40, 2) * 3 + " zz", "ab ab ab cd ab ab ef " * 20])
def test_measures_match_python_reference(text):
    w, ws = words(text), ref_words(text)
    assert len(w) == len(ws) and list(w.chars) == [len(x) for x in ws]
    total = int(w.chars.sum())
    for n in (2, 3, 4):
        assert top_ngram_char_fraction(w, n, total) == pytest.approx(ref_top(ws, n))
    for n in (5, 7, 10):
        assert duplicate_ngram_char_fraction(w, n, total) == pytest.approx(ref_dup(ws, n))


def test_words_are_case_and_punctuation_blind_and_count_characters():
    a, b = words("Ham. To be, or NOT"), words("ham to be or not")
    assert list(a.hashes) == list(b.hashes)
    w = words("naïve 東京 42")
    assert list(w.chars) == [5, 2, 2] and list(w.alpha) == [True, True, False]


def test_duplicate_lines_by_characters():
    assert duplicate_line_char_fraction("aaaa\nbb\naaaa\n\n  aaaa  ") == pytest.approx(8 / 14)
    assert duplicate_line_char_fraction("") == 0.0


GOOD = text_of(200)


@pytest.mark.parametrize("text, expected", [
    (GOOD, None),
    (text_of(20), "length"),
    (" ".join(["a", "be", "to"] * 30), "mean_word_length"),
    (" ".join(["incomprehensibilities"] * 60), "mean_word_length"),
    (GOOD + " " + " ".join(str(i) for i in range(100)), "alpha_fraction"),
    (GOOD + " #" * 30, "symbol_ratio"),
    (GOOD + " ..." * 30, "symbol_ratio"),
    ("\n".join([text_of(8, i) for i in range(20)] + [text_of(8, 99)] * 8), "duplicate_lines"),
    (GOOD + " the king" * 60, "top_ngram"),
    (text_of(100, 1) + " " + text_of(30, 2) + " " + text_of(30, 2), "duplicate_ngram"),
])
def test_each_filter_removes_its_documents(text, expected):
    cfg = FilterSettings()
    assert failing_filter(text, words(text), cfg) == expected
    if expected:
        setattr(cfg.enabled, expected, False)
        assert failing_filter(text, words(text), cfg) != expected


def test_thresholds_are_settings():
    cfg = FilterSettings(min_words=10)
    assert failing_filter(text_of(20), words(text_of(20)), cfg) is None


def test_cleaning_steps_are_counted_and_switchable():
    raw = "x\u00a0y  \r\n\x07e\u0301\n\n\n\nz\ufeff"
    text, changed = clean(raw, {})
    assert text == "x y\n\u00e9\n\nz"
    assert set(changed) == {"nfc", "control_chars", "whitespace"}
    assert changed["control_chars"] == 4  # BEL (1 byte) + BOM (3 bytes)
    assert "\x07" in clean(raw, {"control_chars": False})[0]


FAST_PATH_TEXTS = ["a  \t\nb\r\nc\rd\n\n\n\ne \u00a0f\u3000g\x07\u200b\ufeff \t", "plain ascii\nno changes", "",
                   "trailing tab\t", "\n\n\nlead and trail\n\n\n", "ünï\u2003cödé  \n  \n\n\n x", "a\x1b[0m b \x7f\x85"]


@pytest.mark.parametrize("text", FAST_PATH_TEXTS)
def test_whitespace_fast_paths_match_the_plain_regexes(text):
    import re

    from leangpt.data.clean import normalize_whitespace
    ref = text.replace("\r\n", "\n").replace("\r", "\n")
    ref = re.sub("[\u00a0\u2000-\u200a\u202f\u205f\u3000]", " ", ref)
    ref = re.sub(r"[ \t]+$", "", ref, flags=re.MULTILINE)
    ref = re.sub(r"\n{3,}", "\n\n", ref).strip("\n")
    assert normalize_whitespace(text) == ref


@pytest.mark.parametrize("text", FAST_PATH_TEXTS + ["x\nx\n y \ny\nz", text_of(200, 4).replace(" ", "\n")])
def test_duplicate_lines_match_a_loop(text):
    seen, total, dup = set(), 0, 0
    for line in (s.strip() for s in text.split("\n")):
        if line:
            total += len(line)
            dup += len(line) if line in seen else 0
            seen.add(line)
    assert duplicate_line_char_fraction(text) == pytest.approx(dup / total if total else 0.0)
