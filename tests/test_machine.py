"""leangpt.machine: a leaf module of machine facts, the one cache of measurements and the paired-median timer."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from leangpt import machine

CPU = torch.device("cpu")


def test_machine_imports_nothing_from_leangpt():
    tree = ast.parse(Path(machine.__file__).read_text())
    imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if m.split(".")[0] == "leangpt"]


def test_device_and_perf_do_not_import_each_other_in_a_cycle():
    # device.py measures its bf16 choice itself; perf.py imports device, never the other way round.
    code = "import sys, leangpt.device; assert 'leangpt.perf' not in sys.modules; import leangpt.perf"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("LEANGPT_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert machine.cache_dir() == tmp_path / "home" / ".cache" / "leangpt"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert machine.cache_dir() == tmp_path / "xdg" / "leangpt"
    monkeypatch.setenv("LEANGPT_CACHE_DIR", str(tmp_path / "own"))
    assert machine.cache_dir() == tmp_path / "own"
    assert machine.cache_file() == tmp_path / "own" / machine.MEASUREMENTS_FILE


def test_one_cache_holds_every_kind_of_measurement(monkeypatch, tmp_path):
    monkeypatch.setenv("LEANGPT_CACHE_DIR", str(tmp_path))
    calls = []

    def measure(value):
        def run():
            calls.append(value)
            return value
        return run

    assert machine.cached("peak", measure(1.5)) == 1.5
    assert machine.cached("kernels", measure({"a": 0.1})) == {"a": 0.1}
    assert machine.cached("peak", measure(9.0)) == 1.5  # stored: not measured again
    assert json.loads((tmp_path / machine.MEASUREMENTS_FILE).read_text()) == {"peak": 1.5, "kernels": {"a": 0.1}}
    # A stored value the caller no longer accepts (a new candidate appeared) is measured again.
    assert machine.cached("kernels", measure({"a": 0.1, "b": 0.2}), accept=lambda v: "b" in v) == {"a": 0.1, "b": 0.2}
    assert calls == [1.5, {"a": 0.1}, {"a": 0.1, "b": 0.2}]


def test_cached_without_a_writable_cache_still_measures(monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("LEANGPT_CACHE_DIR", str(blocker / "below"))
    assert machine.cached("k", lambda: 3.0) == 3.0


def test_machine_key_names_the_cpu_threads_and_torch():
    key = machine.machine_key(CPU, torch.float32)
    assert machine.cpu_name() in key and f"threads={torch.get_num_threads()}" in key and torch.__version__ in key
    assert "torch.float32" in key and "float32" not in machine.machine_key(CPU)


def test_describe_names_the_cpu_model():
    info = machine.describe()
    assert info["cpu"] == machine.cpu_name() and info["cpu"]
    assert set(info["cpu_flags"]) <= set(machine.CPU_FLAGS)
    assert info["cores"] >= 1 and info["torch"] == torch.__version__
    json.dumps(info)


def test_paired_medians_interleave_and_take_each_median():
    order, figures = [], iter([3.0, 1.0, 2.0])

    def own_seconds():
        order.append("own")
        return next(figures)

    def several():
        order.append("several")
        return {"total": len(order), "first": 1.0}

    def timed():
        order.append("timed")

    result = machine.paired_medians({"own": own_seconds, "several": several, "timed": timed}, repeats=2, warmup=1)
    # One warm-up round, then each round calls all in turn, in its own order.
    rounds = [order[i:i + 3] for i in (0, 3, 6)]
    assert rounds[0] == ["own", "several", "timed"] and all(sorted(r) == sorted(rounds[0]) for r in rounds)
    assert result["own"] == 1.5  # the warm-up's 3.0 is left out
    totals = [i + 1 for i, name in enumerate(order) if name == "several"][1:]
    assert result["several"] == {"total": sum(totals) / 2, "first": 1.0}
    assert 0 <= result["timed"] < 1
    with pytest.raises(ValueError):
        machine.paired_medians({"own": own_seconds}, repeats=0)
