"""Text cleaning: Unicode NFC, line endings, Project Gutenberg boilerplate."""

from __future__ import annotations

import re
import unicodedata

_GUTENBERG_START = re.compile(r"^\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG E?BOOK.*$", re.IGNORECASE | re.MULTILINE)
_GUTENBERG_END = re.compile(r"^\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG E?BOOK.*$", re.IGNORECASE | re.MULTILINE)
_GUTENBERG_END_OLD = re.compile(r"^End of (the )?Project Gutenberg'?s? .*$", re.IGNORECASE | re.MULTILINE)


def strip_gutenberg(text: str) -> tuple[str, bool]:
    """Remove the Project Gutenberg header and licence footer; returns (text, whether anything was removed)."""
    start = _GUTENBERG_START.search(text)
    end = _GUTENBERG_END.search(text) or _GUTENBERG_END_OLD.search(text)
    if not start and not end:
        return text, False
    lo = start.end() if start else 0
    hi = end.start() if end and end.start() > lo else len(text)
    return text[lo:hi], True


def normalize(text: str) -> str:
    """NFC, Unix line endings, no trailing whitespace on lines, no leading/trailing blank lines."""
    text = unicodedata.normalize("NFC", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return text.strip("\n")
