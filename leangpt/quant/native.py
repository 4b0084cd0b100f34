"""leangpt's own C++ CPU kernels (native.cpp): built on first use with the machine's C++ compiler for its own
instruction set (-march=native), kept under the user's cache directory, and loaded as the torch operators
torch.ops.leangpt_native.*, so that a later process only loads the library (~0.3 s instead of ~20 s).

The build directory is named after a hash of the source, torch's version, the compiler flags and the CPU, so a
changed source, a torch upgrade or a home directory shared by different CPUs never loads a stale library.
Where no compiler is found or the build fails, available() is False and the layers use the other kernels.
"""

from __future__ import annotations

import functools
import hashlib
import warnings
from pathlib import Path

import torch

from leangpt.machine import _cpuinfo, cache_dir

HERE = Path(__file__).parent
SOURCES = [HERE / "native.cpp", HERE / "native_decoder.cpp"]  # both include native_rows.h
HEADERS = [HERE / "native_rows.h"]
# -fopenmp: at::parallel_for is inline OpenMP code, serial without it. The library links libgomp.so.1 by its
# soname, so the process keeps one OpenMP runtime: the one torch loaded already.
CFLAGS = ["-O3", "-march=native", "-fopenmp"]
_loaded: bool | None = None  # None: not tried yet in this process


@functools.cache  # read per quantized layer at load (its kernel timings are keyed by it): hash the source once
def build_hash() -> str:
    info = _cpuinfo()
    key = "|".join((*(f.read_text() for f in SOURCES + HEADERS), torch.__version__, " ".join(CFLAGS),
                    info.get("model name", ""), info.get("flags", "")))
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def build_directory() -> Path:
    return cache_dir() / "native" / build_hash()


def available() -> bool:
    """Whether the operators are loaded, building them first if this machine has not yet."""
    global _loaded
    if _loaded is None:
        _loaded = False
        try:
            from torch.utils.cpp_extension import load

            directory = build_directory()
            directory.mkdir(parents=True, exist_ok=True)
            load("leangpt_native", [str(f) for f in SOURCES], extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"],
                 build_directory=str(directory), is_python_module=False, verbose=False)
            _register_fakes()
            _loaded = True
        except Exception as e:  # no compiler, no ninja, a build error: the other kernels still run
            warnings.warn(f"leangpt's C++ kernels could not be built here, so quantized layers use the others: "
                          f"{type(e).__name__}: {' '.join(str(e).split())[:300]}")
    return _loaded


def set_vnni(on: bool) -> bool:
    """Switches the int8-activation products between VNNI's byte dot product and AVX2's (for tests on a VNNI
    machine); returns whether VNNI's run now: False where the build has none."""
    return available() and torch.ops.leangpt_native.set_vnni(on)


def _register_fakes() -> None:
    """Output shapes for torch.compile's tracing, which calls the operators inside compiled decode steps."""
    lib = "leangpt_native::"

    @torch.library.register_fake(lib + "int8_gemv")
    def _(x, q, scales):
        return x.new_empty(x.shape[0], q.shape[0])

    @torch.library.register_fake(lib + "int4_gemv")
    def _(x, packed, scales, szeros):
        return x.new_empty(x.shape[0], packed.shape[0])

    @torch.library.register_fake(lib + "int4_a8_gemv")
    def _(x, packed, scales, szeros):
        return x.new_empty(x.shape[0], packed.shape[0])

    @torch.library.register_fake(lib + "int8_a8_gemv")
    def _(x, q, scales):
        return x.new_empty(x.shape[0], q.shape[0])

    @torch.library.register_fake(lib + "int8_dequant")
    def _(q, scales):
        return scales.new_empty(q.shape)

    @torch.library.register_fake(lib + "int4_dequant")
    def _(packed, scales, szeros):
        return scales.new_empty(packed.shape[0], packed.shape[1] * 2)
