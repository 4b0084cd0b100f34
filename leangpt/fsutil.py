"""Outputs appear whole or not at all: write into a temporary sibling, then rename."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from leangpt.errors import UserError


def check_output_dir(out: str | Path, overwrite: bool) -> Path:
    """Refuse an existing output unless overwrite; call before any long work starts."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"output {out} already exists (pass --overwrite to replace it)")
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} exists and is not a directory")
    check_parent_writable(out)
    return out


def check_output_file(out: Path, overwrite: bool) -> None:
    """Refuse an existing file unless overwrite, a directory, or a place that cannot hold a new file."""
    if out.is_dir():
        raise UserError(f"output {out} is a directory, not a file")
    if out.exists() and not overwrite:
        raise UserError(f"output {out} already exists (pass --overwrite to replace it)")
    check_parent_writable(out)


def check_parent_writable(out: Path) -> None:
    """Fail now, not after hours of work, if the nearest existing parent cannot hold the output."""
    for parent in out.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"cannot write {out}: {parent} is a file, not a directory")
            if not os.access(parent, os.W_OK):
                raise UserError(f"cannot write {out}: {parent} is not writable")
            return


def replace_dir(tmp: Path, out: Path) -> None:
    """Move a finished tmp dir to out, replacing any old out with at most a moment of absence."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(out: str | Path) -> Iterator[Path]:
    """Yield a temporary directory next to out; on success it replaces out, on error it is removed."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, out)


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data
