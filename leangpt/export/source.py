"""What an export reads from a checkpoint: its config, tokenizer and weights by leangpt name, a quantized
layer's stored integers kept as they are (so a GGUF writer can carry them over without requantizing)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from leangpt.checkpoint import load_config, load_model, read_meta
from leangpt.config import ModelConfig
from leangpt.data.tokenizer import TextTokenizer
from leangpt.errors import UserError
from leangpt.model import GPT
from leangpt.quant.formats import QuantizedWeight, Scheme
from leangpt.quant.model import FORMAT_VERSION, QUANT_SUFFIXES

Weight = torch.Tensor | QuantizedWeight


@dataclass
class Source:
    directory: Path
    config: ModelConfig
    tokenizer: TextTokenizer
    weights: dict[str, Weight]  # leangpt state-dict names; a tied head is the embedding's entry again
    quantization: dict[str, Any] | None  # leangpt.json's entry of a quantized checkpoint

    def float_weight(self, name: str) -> torch.Tensor:
        """A weight in fp32, a quantized one dequantized."""
        w = self.weights[name]
        return w.dequantize() if isinstance(w, QuantizedWeight) else w

    @property
    def scheme_name(self) -> str | None:
        return self.quantization["scheme_name"] if self.quantization else None


def read_source(directory: Path) -> Source:
    config = load_config(directory)
    quant = read_meta(directory).get("quantization")
    if quant:
        weights = _quantized_weights(directory, config, quant)
    else:
        weights = {k: v.detach().float() for k, v in load_model(directory).state_dict().items()}
        if config.tie_embeddings:
            weights["lm_head.weight"] = weights["tok_emb.weight"]  # one tensor, so writers can tell it is tied
    return Source(directory, config, TextTokenizer.load(directory), weights, quant)


def _quantized_weights(directory: Path, config: ModelConfig, quant: dict[str, Any]) -> dict[str, Weight]:
    """The stored integers, scales and zeros of each quantized layer (leangpt.quant's format), the rest in fp32."""
    if quant.get("format") != FORMAT_VERSION:
        raise UserError(f"{directory}/leangpt.json: unsupported quantization format {quant.get('format')!r}")
    try:
        tensors = load_file(str(directory / "model.safetensors"))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{directory / 'model.safetensors'}: cannot be read as safetensors ({e})") from None
    scheme = Scheme.from_dict(quant["scheme"])
    shapes = GPT(config)  # the layers' in and out features (as cheap as the float path's load_model)
    weights: dict[str, Weight] = {k: v.float() for k, v in tensors.items() if not k.endswith(QUANT_SUFFIXES)}
    for name in quant["layers"]:
        in_f, out_f = (config.n_embd, config.vocab_size) if name == "tok_emb" else (
            shapes.get_submodule(name).in_features, shapes.get_submodule(name).out_features)
        weights[f"{name}.weight"] = QuantizedWeight.from_tensors(scheme, tensors, name, in_f, out_f)
    if config.tie_embeddings and "lm_head.weight" not in weights:  # a head quantized on its own stays apart
        weights["lm_head.weight"] = weights["tok_emb.weight"]
    return weights
