"""Exact resume: a real SIGKILL of a training subprocess, then --resume, ends bitwise equal to an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from leangpt import train_state
from leangpt.errors import UserError
from tests.conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]
# Dropout on, so that the torch RNG state matters; deterministic kernels; fp32.
COMMON = ["--preset", "tiny", "--set", "max_steps=60", "--set", "save_every=5", "--set", "seed=1",
          "--set", "dropout=0.1", "--set", "deterministic=true", "--set", "precision=fp32", "--set", "batch_size=4",
          "--set", "eval_every=0", "--set", "eval_tokens=256", "--set", "log_every=5", "--set", "keep_last=2",
          "--set", "optimizer=adamw"]


def leangpt(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "leangpt", "train", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def weights(ckpt: Path) -> dict:
    return load_file(str(ckpt / "model.safetensors"))


def wait_for_state(out: Path, proc: subprocess.Popen, min_dirs: int = 1) -> None:
    deadline = time.time() + 120
    while len(train_state.step_dirs(out)) < min_dirs:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() < deadline
        time.sleep(0.005)


def test_sigkill_then_resume_is_bitwise_equal(tmp_path, dataset_dir):
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    p_ref = leangpt(["--data", str(dataset_dir), "--out", str(ref), *COMMON])
    p = leangpt(["--data", str(dataset_dir), "--out", str(killed), *COMMON])
    wait_for_state(killed, p)
    p.send_signal(signal.SIGKILL)  # wherever it is: mid-step or mid-save
    p.wait()
    saved = train_state.read_state(train_state.latest(killed))["step"]
    assert saved < 60, "the run finished before the kill; the test proves nothing"
    r = leangpt(["--data", str(dataset_dir), "--out", str(killed), "--resume", "--json"])
    out, err = r.communicate(timeout=300)
    assert r.returncode == 0, err[-2000:]
    assert p_ref.wait(timeout=300) == 0, p_ref.communicate()[1][-2000:]
    assert json.loads(out)["step"] == 60
    a, b = weights(ref), weights(killed)
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] == b[k]).all(), f"{k} differs after resume"
    assert len(train_state.step_dirs(killed)) == 2  # keep_last


def test_sigterm_finishes_the_step_saves_and_exits_0(tmp_path, dataset_dir):
    out = tmp_path / "ck"
    p = leangpt(["--data", str(dataset_dir), "--out", str(out), *COMMON, "--set", "max_steps=100000"])
    wait_for_state(out, p)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 0, err[-2000:]
    assert "SIGTERM" in err and "--resume" in err
    state = train_state.read_state(train_state.latest(out))
    assert state["step"] % 5 != 0 or state["step"] > 5  # saved at the signal, not only at save_every
    meta = json.loads((out / "leangpt.json").read_text())
    assert meta["step"] == state["step"] and meta["metrics"]["interrupted"] == "SIGTERM"


def test_resume_refuses_mismatches(tmp_path, capsys, dataset_dir, corpus_dir):
    out = tmp_path / "ck"
    code, _, err = run_cli(["train", "--data", str(dataset_dir), "--out", str(out), "--resume"], capsys)
    assert code == 2 and "no train_state/" in err
    code, _, _ = run_cli(["train", "--data", str(dataset_dir), "--out", str(out), "--preset", "tiny", "--set",
                          "max_steps=2", "--set", "eval_tokens=128", "--set", "batch_size=2"], capsys)
    assert code == 0
    code, _, err = run_cli(["train", "--data", str(dataset_dir), "--out", str(out), "--resume",
                            "--set", "model.n_layer=3"], capsys)
    assert code == 2 and "model.n_layer" in err
    from leangpt.data.prepare import PrepareSettings, prepare
    from tests.conftest import write_corpus
    other = tmp_path / "other"
    prepare(PrepareSettings(source=[str(write_corpus(tmp_path / "c2", n_docs=30, seed=5))], out=other, vocab_size=512,
                            val_fraction=0.2, seed=0, filters_enabled=False))
    code, _, err = run_cli(["train", "--data", str(other), "--out", str(out), "--resume"], capsys)
    assert code == 2 and "differs from the saved run" in err and len(err.strip().splitlines()) == 1
    # The library call makes the same checks (distill and prune recovery pass their own model).
    from leangpt.config import ModelConfig
    from leangpt.model import GPT
    from leangpt.train import TrainConfig, train
    with pytest.raises(UserError, match="differs from the saved run"):
        train(TrainConfig(preset="tiny", max_steps=4), other, out, resume=True, progress=False)
    with pytest.raises(UserError, match=r"the model differs from the saved run's \(n_layer: 3 now, 2 saved\)"):
        train(TrainConfig(max_steps=4), dataset_dir, out, resume=True, progress=False,
              model=GPT(ModelConfig.from_dict({**train_state.read_state(train_state.latest(out))["model_config"],
                                               "n_layer": 3})))
    # A longer run continues from the saved step; a half-written save is ignored.
    (out / "train_state" / ".step-00000099.tmp-x").mkdir()
    code, stdout, _ = run_cli(["train", "--data", str(dataset_dir), "--out", str(out), "--resume",
                               "--set", "max_steps=4", "--json"], capsys)
    assert code == 0 and json.loads(stdout)["step"] == 4
    assert [d.name for d in train_state.step_dirs(out)] == ["step-00000002", "step-00000004"]
    assert not list((out / "train_state").glob(".step-*"))
