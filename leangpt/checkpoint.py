"""Checkpoint directories: a Hugging Face model dir (config.json, model.safetensors, tokenizer) plus leangpt.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from leangpt import hf
from leangpt.config import ModelConfig
from leangpt.data.tokenizer import TextTokenizer
from leangpt.errors import UserError
from leangpt.fsutil import read_json
from leangpt.model import GPT
from leangpt.quant.model import load_quantized

META_FILE = "leangpt.json"


def load_config(directory: str | Path) -> ModelConfig:
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"{directory}: checkpoint directory not found")
    return hf.config_from_hf(read_json(directory / "config.json"))


def read_meta(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / META_FILE
    return read_json(path) if path.is_file() else {}


def _read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """model.safetensors, or the shards listed in model.safetensors.index.json. Never pickle."""
    single, index = directory / "model.safetensors", directory / "model.safetensors.index.json"
    files = [single] if single.is_file() else []
    if not files and index.is_file():
        files = sorted({directory / f for f in read_json(index).get("weight_map", {}).values()})
    if not files:
        hint = " (pytorch_model.bin is not loaded: pickle files can run code; convert it to safetensors)" \
            if (directory / "pytorch_model.bin").exists() else ""
        raise UserError(f"{single}: file not found{hint}")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            tensors.update(load_file(str(f)))
        except (SafetensorError, OSError) as e:
            raise UserError(f"{f}: cannot be read as safetensors ({e})") from None
    return tensors


def load_model(directory: str | Path, device: str | torch.device = "cpu") -> GPT:
    directory = Path(directory)
    config = load_config(directory)
    quant = read_meta(directory).get("quantization")
    if quant:  # quantized linears are swapped in and packed for the device (leangpt.quant)
        return load_quantized(directory, config, quant, _read_tensors(directory), torch.device(device))
    model = GPT(config)
    sd = hf.from_hf_state_dict(config, _read_tensors(directory))
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise UserError(f"{directory / 'model.safetensors'}: does not match config.json ({str(e).splitlines()[-1].strip()})") from None
    return model.to(device).eval()


def load_checkpoint(directory: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, TextTokenizer, dict[str, Any]]:
    model = load_model(directory, device)
    return model, TextTokenizer.load(directory), read_meta(directory)


def save_checkpoint(directory: str | Path, model: GPT, tokenizer: TextTokenizer, meta: dict[str, Any]) -> None:
    """Write a checkpoint into an existing (temporary) directory; the caller renames it into place."""
    directory = Path(directory)
    config = model.config
    (directory / "config.json").write_text(json.dumps(hf.config_to_hf(config), indent=2))
    sd = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    save_file(hf.to_hf_state_dict(config, sd), str(directory / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save(directory)
    (directory / META_FILE).write_text(json.dumps(meta, indent=2))
