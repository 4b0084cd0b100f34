"""Text cleaning, each step counted: boilerplate (Project Gutenberg header and licence), Unicode NFC, control
characters, whitespace."""

from __future__ import annotations

import re
import unicodedata

CLEAN_STEPS = ("boilerplate", "nfc", "control_chars", "whitespace")

_GUTENBERG_START = re.compile(r"^\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG E?BOOK.*$", re.IGNORECASE | re.MULTILINE)
_GUTENBERG_END = re.compile(r"^\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG E?BOOK.*$", re.IGNORECASE | re.MULTILINE)
_GUTENBERG_END_OLD = re.compile(r"^End of (the )?Project Gutenberg'?s? .*$", re.IGNORECASE | re.MULTILINE)
# C0 and C1 controls except tab, newline and carriage return (whitespace handles those), DEL, zero-width space, BOM.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\ufeff]")
_ODD_SPACE = re.compile("[\u00a0\u2000-\u200a\u202f\u205f\u3000]")
_TRAILING = re.compile(r"[ \t]+$", re.MULTILINE)
_BLANK_RUN = re.compile(r"\n{3,}")


def strip_gutenberg(text: str) -> tuple[str, bool]:
    """Remove the Project Gutenberg header and licence footer; returns (text, whether anything was removed)."""
    if "gutenberg" not in text.lower():  # every marker names it; one scan instead of three regex searches
        return text, False
    start = _GUTENBERG_START.search(text)
    end = _GUTENBERG_END.search(text) or _GUTENBERG_END_OLD.search(text)
    if not start and not end:
        return text, False
    lo = start.end() if start else 0
    hi = end.start() if end and end.start() > lo else len(text)
    return text[lo:hi], True


def normalize_whitespace(text: str) -> str:
    """Unix line endings, odd spaces as plain spaces, no trailing spaces, at most one blank line in a row,
    no leading or trailing blank lines."""
    # Each regex runs only when a plain substring test says it can match (the tests cost a fraction of the scan).
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.isascii():
        text = _ODD_SPACE.sub(" ", text)
    if " \n" in text or "\t\n" in text or text.endswith((" ", "\t")):
        text = _TRAILING.sub("", text)
    if "\n\n\n" in text:
        text = _BLANK_RUN.sub("\n\n", text)
    return text.strip("\n")


def normalize(text: str) -> str:
    """NFC, no control characters, normalised whitespace (every cleaning step but boilerplate removal)."""
    return clean(text, {})[0]


def clean(text: str, enabled: dict[str, bool]) -> tuple[str, dict[str, int]]:
    """Run the cleaning steps (all unless enabled[step] is False); returns the text and, for every step that
    changed it, the UTF-8 bytes it removed (0 when it changed the text without shortening it)."""
    changed: dict[str, int] = {}

    def step(name: str, new: str, old: str) -> str:
        if new != old:
            changed[name] = len(old.encode("utf-8")) - len(new.encode("utf-8"))
        return new

    if enabled.get("boilerplate", True):
        text = step("boilerplate", strip_gutenberg(text)[0], text)
    if enabled.get("nfc", True) and not unicodedata.is_normalized("NFC", text):
        text = step("nfc", unicodedata.normalize("NFC", text), text)
    if enabled.get("control_chars", True):
        text = step("control_chars", _CONTROL.sub("", text), text)
    if enabled.get("whitespace", True):
        text = step("whitespace", normalize_whitespace(text), text)
    return text, changed
