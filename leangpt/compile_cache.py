"""The persistent cache of compiled code: inductor's FX-graph cache and AOTAutograd's cache, kept under the
user's cache directory (machine.cache_dir() / "inductor") so that building the C++ kernels of a compiled step
is paid once per machine, not once per process; a later process reloads them and only redoes dynamo's tracing.

The caches key each graph by its code, shapes, torch version and inductor settings, so a stale entry is never
used. TORCHINDUCTOR_CACHE_DIR, when the user sets it, wins.
"""

from __future__ import annotations

import os
from pathlib import Path

from leangpt.machine import cache_dir

_ours: str | None = None  # the directory enable_compile_cache last put into TORCHINDUCTOR_CACHE_DIR


def compile_cache_dir() -> Path:
    """TORCHINDUCTOR_CACHE_DIR if the user set it, else cache_dir()/inductor. (Importing inductor writes its
    own default, /tmp/torchinductor_USER, into the variable: that one is not the user's.)"""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    given = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if given and given not in (_ours, os.path.abspath(default_cache_dir())):
        return Path(given)
    return cache_dir() / "inductor"


def enable_compile_cache() -> Path:
    """Turn the on-disk caches on and point them at compile_cache_dir(); call before compiling. Idempotent."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config
    from torch._inductor.utils import clear_caches

    global _ours
    directory = compile_cache_dir()
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") != str(directory):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = _ours = str(directory)
        clear_caches()  # inductor remembers paths under the directory it used before
    inductor_config.fx_graph_cache = True
    functorch_config.enable_autograd_cache = True
    return directory
