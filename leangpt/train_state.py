"""`train_state/` inside a checkpoint dir: everything an exact resume needs, one sub-directory per saved step.

    train_state/step-00000040/  model.safetensors  (leangpt names, plus aux.* for an auxiliary module)
                                optimizer.pt       (full, un-sharded optimizer state keyed by parameter name)
                                state.json         (step, tokens seen, schedules, data position, RNG states, configs)
                                metrics.jsonl      (the log so far)

A step directory is written under a temporary name and renamed into place, so a kill during a save leaves the
previous ones intact; the last `keep` are kept. Used by train and by everything built on its loop, which also
find here what a resume may change: the saved settings, and the checks that the data and the model are the same.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from leangpt.errors import UserError
from leangpt.fsutil import read_json

STATE_DIR = "train_state"
Settings = TypeVar("Settings")
_STEP_DIR = re.compile(r"^step-(\d{8})$")


def step_dirs(out: Path) -> list[Path]:
    """Complete step directories, oldest first (temporaries of an interrupted save are not listed)."""
    root = Path(out) / STATE_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name))


def latest(out: Path) -> Path:
    dirs = step_dirs(out)
    if not dirs:
        raise UserError(f"{out}: no {STATE_DIR}/ to resume from (was the run saved at least once? set save_every)")
    return dirs[-1]


def write(out: Path, step: int, tensors: dict[str, torch.Tensor], optimizer: dict[str, Any],
          state: dict[str, Any], metrics: list[dict[str, Any]], keep: int) -> Path:
    root = Path(out) / STATE_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
    try:
        # safetensors refuses tensors that share memory (tied embeddings): store copies.
        save_file({k: v.detach().to("cpu").clone().contiguous() for k, v in tensors.items()}, str(tmp / "model.safetensors"))
        torch.save(optimizer, tmp / "optimizer.pt")
        (tmp / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
        (tmp / "state.json").write_text(json.dumps(state, indent=1))  # written last: its presence marks a whole save
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in step_dirs(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".step-*.tmp-*"):  # left by a killed save
        shutil.rmtree(stale, ignore_errors=True)
    return final


def read(step_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    """Tensors, optimizer state, state.json and metrics. The optimizer file is loaded with weights_only=True."""
    state = read_json(step_dir / "state.json")
    tensors = load_file(str(step_dir / "model.safetensors"))
    optimizer = torch.load(step_dir / "optimizer.pt", weights_only=True)
    metrics = [json.loads(line) for line in (step_dir / "metrics.jsonl").read_text().splitlines() if line]
    return tensors, optimizer, state, metrics


def read_state(step_dir: Path) -> dict[str, Any]:
    return read_json(step_dir / "state.json")


def capture_rng() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and CUDA) generator states as JSON."""
    py = random.getstate()
    np_state = np.random.get_state()
    rng: dict[str, Any] = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
    }
    if torch.cuda.is_available():
        rng["cuda"] = base64.b64encode(torch.cuda.get_rng_state().cpu().numpy().tobytes()).decode()
    return rng


def restore_rng(rng: dict[str, Any]) -> None:
    v, state, gauss = rng["python"]
    random.setstate((v, tuple(state), gauss))
    name, keys, *rest = rng["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(rng["torch"])), dtype=torch.uint8))
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(rng["cuda"])), dtype=torch.uint8))


def saved_settings(out: Path, cls: type[Settings]) -> Settings:
    """A cls (TrainConfig, or settings built on it) holding the training settings of the run saved in out; its
    other fields keep their defaults. A resumed command applies its --config and --set over these."""
    saved = read_state(latest(out))["train_config"]
    settings = cls()
    for f in dataclasses.fields(settings):
        if f.name not in saved:
            continue
        value, default = saved[f.name], getattr(settings, f.name)
        if dataclasses.is_dataclass(default):  # nested settings, e.g. distill's
            known = {g.name for g in dataclasses.fields(default)}
            value = dataclasses.replace(default, **{k: v for k, v in value.items() if k in known})
        setattr(settings, f.name, value)
    return settings


def check_resumable(state: dict[str, Any], data: Path, fingerprint: dict[str, Any],
                    train_config: dict[str, Any], model_config: dict[str, Any] | None) -> None:
    """Refuse, naming the first difference, to continue a saved run on other data or with another model.

    fingerprint: the data's now (leangpt.train_data.data_fingerprint); train_config: the settings now;
    model_config: the config of the model given to train, if one was (else the settings' preset and model.*
    overrides are compared).
    """
    for key, saved in state["data"].items():
        if fingerprint.get(key) != saved:
            raise UserError(f"--resume: dataset {data} differs from the saved run's ({key}: "
                            f"{fingerprint.get(key)} now, {saved} saved)")
    if model_config is not None:
        changed = _first_difference(model_config, state["model_config"])
        if changed:
            raise UserError(f"--resume: the model differs from the saved run's ({changed}: "
                            f"{model_config.get(changed)} now, {state['model_config'].get(changed)} saved)")
        return
    saved_config = state["train_config"]
    if train_config["preset"] != saved_config["preset"]:
        raise UserError(f"--resume: model preset {train_config['preset']} differs from the saved run's "
                        f"{saved_config['preset']}; the model cannot change in a resumed run")
    if train_config["optimizer"] != saved_config.get("optimizer", "adamw"):
        raise UserError(f"--resume: optimizer {train_config['optimizer']} differs from the saved run's "
                        f"{saved_config.get('optimizer', 'adamw')}; its state cannot continue another optimizer")
    changed = _first_difference(train_config["model"], saved_config["model"])
    if changed:
        raise UserError(f"--resume: model config differs from the saved run (model.{changed}); "
                        f"the model cannot change in a resumed run")


def _first_difference(now: dict[str, Any], saved: dict[str, Any]) -> str | None:
    return next((k for k in sorted(set(now) | set(saved)) if now.get(k) != saved.get(k)), None)
