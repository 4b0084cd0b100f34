"""torchrun with 2 CPU processes (gloo): the same loss curve as 1 process with the same global batch, and
checkpoints that resume across process counts (DDP: 2 -> 1, FSDP2: 1 -> 2)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from leangpt import train_state

ROOT = Path(__file__).resolve().parents[1]
# max_steps changes between legs: the lr must not depend on it. AdamW, which FSDP takes (Muon is refused there).
BASE = ["--preset", "tiny", "--set", "seed=3", "--set", "batch_size=2", "--set", "log_every=1", "--set", "eval_every=0",
        "--set", "eval_tokens=128", "--set", "precision=fp32", "--set", "lr=3e-3", "--set", "warmup_steps=1",
        "--set", "lr_schedule=constant", "--set", "optimizer=adamw"]


def run(args: list[str], nproc: int = 1) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] if nproc > 1 else []
    r = subprocess.run([sys.executable, *launcher, "-m", "leangpt", "train", *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["train_loss"] for r in rows if "train_loss" in r]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, dataset_dir) -> Path:
    """1 process, 2 micro-batches of 2 sequences: the same 4 sequences per step as 2 processes x 1 micro-batch."""
    out = tmp_path_factory.mktemp("dist") / "one"
    run(["--data", str(dataset_dir), "--out", str(out), *BASE, "--set", "max_steps=6", "--set", "grad_accum=2"])
    return out


def test_ddp_two_processes_then_resume_in_one(tmp_path, dataset_dir, reference):
    two = tmp_path / "two"
    run(["--data", str(dataset_dir), "--out", str(two), *BASE, "--set", "max_steps=3", "--set", "parallel=ddp"], nproc=2)
    assert train_state.read_state(train_state.latest(two))["world_size"] == 2
    run(["--data", str(dataset_dir), "--out", str(two), "--resume", "--set", "max_steps=6", "--set", "grad_accum=2"])
    assert losses(two) == pytest.approx(losses(reference), abs=1e-5) and len(losses(two)) == 6


def test_one_process_then_fsdp_two_processes(tmp_path, dataset_dir, reference):
    out = tmp_path / "one"
    run(["--data", str(dataset_dir), "--out", str(out), *BASE, "--set", "max_steps=3", "--set", "grad_accum=2"])
    run(["--data", str(dataset_dir), "--out", str(out), "--resume", "--set", "max_steps=6", "--set", "grad_accum=1",
         "--set", "parallel=fsdp"], nproc=2)
    assert train_state.read_state(train_state.latest(out))["world_size"] == 2
    assert losses(out) == pytest.approx(losses(reference), abs=1e-5) and len(losses(out)) == 6
    from leangpt.checkpoint import load_checkpoint
    load_checkpoint(out)  # the HF export gathered from the shards loads
