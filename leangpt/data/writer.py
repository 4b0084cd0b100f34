"""On-disk buffers of `prepare`: the spool of cleaned documents between the passes, and token shards written
incrementally."""

from __future__ import annotations

import os
from array import array
from pathlib import Path

import numpy as np


class Spool:
    """Cleaned documents appended to one file, read back by index: only offsets stay in memory.

    Reads use pread, not mmap: pages of a mapped file count in the process's resident memory, which would
    then grow with the corpus."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._f = path.open("wb")
        self._offsets = array("q", [0])
        self._fd: int | None = None

    def append(self, text: str) -> int:
        data = text.encode("utf-8")
        self._f.write(data)
        self._offsets.append(self._offsets[-1] + len(data))
        return len(data)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def nbytes(self, i: int) -> int:
        return self._offsets[i + 1] - self._offsets[i]

    def close_writing(self) -> None:
        self._f.close()
        self._fd = os.open(self.path, os.O_RDONLY)

    def __getitem__(self, i: int) -> str:
        return os.pread(self._fd, self.nbytes(i), self._offsets[i]).decode("utf-8")

    def close(self) -> None:
        self._f.close()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.path.unlink(missing_ok=True)


class TokenWriter:
    """Appends documents' token ids, each followed by the end-of-document id, to a flat .bin file."""

    def __init__(self, path: Path, dtype: np.dtype, eos_id: int) -> None:
        self._f = path.open("wb")
        self.dtype, self.eos_id = dtype, eos_id
        self.tokens = 0

    def write(self, docs_ids: list[list[int]]) -> None:
        if not docs_ids:
            return
        lengths = np.fromiter((len(ids) + 1 for ids in docs_ids), dtype=np.int64, count=len(docs_ids))
        flat = np.empty(int(lengths.sum()), dtype=self.dtype)
        ends = np.cumsum(lengths)
        flat[ends - 1] = self.eos_id
        for ids, end, n in zip(docs_ids, ends, lengths):
            flat[end - n:end - 1] = ids
        flat.tofile(self._f)
        self.tokens += len(flat)

    def close(self) -> None:
        self._f.close()
