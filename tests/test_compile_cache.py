"""The persistent compile cache (leangpt.compile_cache): a second process loads the compiled decode step
instead of building it, and compiling fails over to eager decoding with the reason kept."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from leangpt import compile_cache
from leangpt.config import ModelConfig
from leangpt.engine import Engine, Request
from leangpt.model import GPT
from leangpt.sampling import SamplingConfig

CACHE_PROBE = textwrap.dedent("""
    import json, torch
    from torch._dynamo.utils import counters
    from leangpt.config import ModelConfig
    from leangpt.engine import Engine, Request
    from leangpt.model import GPT
    from leangpt.sampling import SamplingConfig
    torch.manual_seed(0)
    torch.set_num_threads(1)
    engine = Engine(GPT(ModelConfig.from_preset("tiny", vocab_size=320)), compile=True, native=False)
    engine.generate([Request([1, 2, 3], 4, SamplingConfig(temperature=0))])
    assert engine.compile_error is None, engine.compile_error
    print(json.dumps({**counters["inductor"], **counters["aot_autograd"]}))
""")


def test_a_second_process_loads_the_compiled_step_from_the_cache(tmp_path):
    env = {**os.environ, "LEANGPT_CACHE_DIR": str(tmp_path)}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    runs = []
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", CACHE_PROBE], env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    first, second = runs
    assert first.get("fxgraph_cache_miss", 0) >= 1 and first.get("fxgraph_cache_hit", 0) == 0
    # The second process builds nothing: every graph comes from the cache, whichever layer of it answered.
    assert second.get("fxgraph_cache_miss", 0) == 0 and second.get("autograd_cache_miss", 0) == 0
    assert second.get("fxgraph_cache_hit", 0) + second.get("autograd_cache_hit", 0) >= 1
    assert any((tmp_path / "inductor").iterdir())


def test_the_users_own_inductor_directory_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("LEANGPT_CACHE_DIR", str(tmp_path / "leangpt"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert compile_cache.compile_cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    assert compile_cache.compile_cache_dir() == tmp_path / "leangpt" / "inductor"


def _greedy(engine: Engine) -> list[int]:
    return engine.generate([Request([1, 2, 3], 6, SamplingConfig(temperature=0))])[0].tokens


def test_a_failed_compile_decodes_eagerly_and_says_why(monkeypatch, tmp_path):
    import torch._inductor.compile_fx as compile_fx

    def no_compiler(*args, **kwargs):
        raise RuntimeError("CppCompileError: no C++ compiler")

    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset("tiny", vocab_size=320))
    want = _greedy(Engine(model))
    monkeypatch.setenv("LEANGPT_CACHE_DIR", str(tmp_path))  # an empty cache: nothing to load instead
    monkeypatch.setattr(compile_fx, "_compile_fx_inner", no_compiler)
    torch._dynamo.reset()
    engine = Engine(model, compile=True, native=False)
    assert _greedy(engine) == want
    assert engine.compile_error is not None and "no C++ compiler" in engine.compile_error
    torch._dynamo.reset()


def test_past_dynamos_recompile_limit_the_next_model_decodes_eagerly(monkeypatch, tmp_path):
    """Every model compiled in a process adds graphs to the same step function; past the limit, eager."""
    monkeypatch.setenv("LEANGPT_CACHE_DIR", str(tmp_path))
    torch._dynamo.reset()
    results = []
    # dynamo's own patch: monkeypatch's undo would delete the setting from the config module for every later test
    # A model's one-row step takes two graphs: static, then with a symbolic kv_len once it changes.
    with torch._dynamo.config.patch(recompile_limit=2):
        for width in (32, 48):
            torch.manual_seed(0)
            model = GPT(ModelConfig.from_preset("tiny", vocab_size=320, n_embd=width, n_head=2))
            engine = Engine(model, compile=True, native=False)
            results.append((_greedy(engine), _greedy(Engine(model)), engine.compile_error))
    torch._dynamo.reset()
    assert results[0][2] is None and results[0][0] == results[0][1]
    (got, want, error), = results[1:]
    assert got == want and error is not None and "FailOnRecompileLimitHit" in error
