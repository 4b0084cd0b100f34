"""Quantize a GPT (RTN or GPTQ), save it, and load it back with its nn.Linear layers swapped for quantized
modules (gpt-fast's module swap + state-dict transform): the model keeps GPT's interface, so generation,
eval and bench run on it unchanged.

A quantized checkpoint keeps the Hugging Face config.json; model.safetensors holds leangpt-named tensors:
`<layer>.qweight`, `<layer>.scales` (and `<layer>.zeros`) for each quantized linear, every other tensor as
is; leangpt.json's "quantization" entry names the scheme, the method and the quantized layers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import save_file
from tqdm import tqdm

from leangpt import hf
from leangpt.calibration import InputStats, process_blocks
from leangpt.config import ModelConfig
from leangpt.errors import UserError
from leangpt.model import GPT
from leangpt.quant.formats import QuantizedWeight, Scheme, quantize_rtn
from leangpt.quant.gptq import gptq_quantize
from leangpt.quant.kernels import build_linear

FORMAT_VERSION = 1
QUANT_SUFFIXES = (".qweight", ".scales", ".zeros")


def target_layers(model: GPT, include_head: bool) -> list[str]:
    """The linear layers to quantize: every linear in the blocks, and the output head on request."""
    names = [f"blocks.{i}.{n}" for i, b in enumerate(model.blocks) for n, m in b.named_modules() if isinstance(m, nn.Linear)]
    return names + (["lm_head"] if include_head else [])


@torch.no_grad()
def quantize_model(model: GPT, scheme: Scheme, method: str, calib_tokens: torch.Tensor | None = None,
                   include_head: bool = False, damp: float = 0.01, act_order: bool = False,
                   batch_size: int = 8, progress: bool = False,
                   include_embedding: bool = False) -> dict[str, QuantizedWeight]:
    """Quantized weights by layer name. GPTQ changes `model` in place: each block's linears take their
    dequantized weights, so later blocks calibrate on the already-quantized model's activations.

    include_embedding quantizes the token embedding by round-to-nearest (a lookup has no Hessian); with tied
    embeddings the output head then computes from that same quantized table, so it is stored once."""
    tied_table = include_embedding and model.config.tie_embeddings
    names = target_layers(model, include_head and not tied_table)
    embedding = {"tok_emb": quantize_rtn(model.tok_emb.weight, scheme)} if include_embedding else {}
    if method == "rtn":
        return {**{n: quantize_rtn(model.get_submodule(n).weight, scheme) for n in names}, **embedding}
    if method != "gptq":
        raise UserError(f"unknown quantization method {method!r}; choose rtn or gptq")
    if calib_tokens is None:
        raise UserError("GPTQ needs calibration data (--calib-data)")
    out: dict[str, QuantizedWeight] = {}
    bar = tqdm(total=len(model.blocks) + include_head, desc="gptq", disable=not progress, leave=False)

    def quantize_block(i: int, block: nn.Module, linears: dict[str, nn.Linear], stats: dict[str, InputStats]) -> None:
        for name, lin in linears.items():
            qw = gptq_quantize(lin.weight, stats[name].hessian, scheme, damp, act_order=act_order)
            lin.weight.copy_(qw.dequantize())
            out[f"blocks.{i}.{name}"] = qw
        bar.update()

    process_blocks(model, calib_tokens, quantize_block, batch_size)
    out.update(embedding)
    if include_head and not tied_table:  # its inputs are the final hidden states of the quantized blocks
        device = next(model.parameters()).device
        stats = InputStats(model.config.n_embd, device)
        for idx in calib_tokens.to(device).split(batch_size):
            stats.add(model.forward_hidden(idx))
        out["lm_head"] = gptq_quantize(model.lm_head.weight, stats.hessian, scheme, damp, act_order=act_order)
        bar.update()
    bar.close()
    return out


def bits_per_weight(qweights: dict[str, QuantizedWeight]) -> float:
    """Stored bits per quantized weight, scales and zeros counted."""
    n = sum(q.out_features * q.in_features for q in qweights.values())
    return 8 * sum(q.nbytes() for q in qweights.values()) / max(n, 1)


def save_quantized(directory: Path, model: GPT, qweights: dict[str, QuantizedWeight], scheme: Scheme,
                   method: str, meta: dict[str, Any]) -> dict[str, Any]:
    """Write config.json, model.safetensors and leangpt.json (tokenizer files are the caller's)."""
    config = model.config
    (directory / "config.json").write_text(json.dumps(hf.config_to_hf(config), indent=2))
    tensors: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        layer, _, leaf = name.rpartition(".")
        if layer in qweights and leaf == "weight":
            continue
        if name == "lm_head.weight" and config.tie_embeddings:
            continue  # the same tensor as tok_emb.weight
        tensors[name] = t.detach().to("cpu", torch.float32).contiguous()
    for name, qw in qweights.items():
        tensors.update(qw.tensors(name))
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    quant = {"format": FORMAT_VERSION, "method": method, "scheme": scheme.to_dict(), "scheme_name": scheme.name,
             "layers": sorted(qweights), "bits_per_weight": bits_per_weight(qweights)}
    meta = {**meta, "quantization": quant}
    (directory / "leangpt.json").write_text(json.dumps(meta, indent=2))
    return meta


def swap_linears(model: GPT, qweights: dict[str, QuantizedWeight], device: torch.device,
                 kernel: str | None = None) -> dict[str, str]:
    """Replace each named nn.Linear with a quantized module packed for `device`; returns layer -> kernel."""
    chosen: dict[str, str] = {}
    for name, qw in qweights.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        module = build_linear(qw, getattr(parent, child).bias, device, kernel)
        setattr(parent, child, module)
        chosen[name] = module.kernel
    return chosen


class QuantEmbedding(nn.Module):
    """A quantized (vocab, C) table: a lookup dequantizes only the rows it reads."""

    def __init__(self, qw: QuantizedWeight, device: torch.device) -> None:
        super().__init__()
        self.scheme, self.num_embeddings, self.embedding_dim = qw.scheme, qw.out_features, qw.in_features
        # Not in the state dict: the checkpoint stores these under tok_emb.qweight / .scales / .zeros.
        self.register_buffer("qweight", qw.qweight.to(device), persistent=False)
        self.register_buffer("scales", qw.scales.to(device), persistent=False)
        self.register_buffer("zeros", None if qw.zeros is None else qw.zeros.to(device), persistent=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        flat = idx.reshape(-1)
        rows = QuantizedWeight(self.scheme, self.qweight[flat], self.scales[flat],
                               None if self.zeros is None else self.zeros[flat], self.embedding_dim)
        return rows.dequantize().reshape(*idx.shape, self.embedding_dim)  # (B, T, C)


def swap_embedding(model: GPT, qw: QuantizedWeight, device: torch.device, kernel: str | None = None) -> None:
    """Replace the token embedding (and a tied head, which reads the same table) with quantized modules."""
    model.tok_emb = QuantEmbedding(qw, device)
    if model.config.tie_embeddings:
        model.lm_head = build_linear(qw, None, device, kernel)


def load_quantized(directory: Path, config: ModelConfig, quant: dict[str, Any], tensors: dict[str, torch.Tensor],
                   device: torch.device, kernel: str | None = None) -> GPT:
    """Build GPT(config) with its quantized layers swapped in, packed for `device` (no fp32 copy of them)."""
    if quant.get("format") != FORMAT_VERSION:
        raise UserError(f"{directory}/leangpt.json: unsupported quantization format {quant.get('format')!r}")
    scheme = Scheme.from_dict(quant["scheme"])
    model = GPT(config)
    qweights = {}
    for name in quant["layers"]:
        if name == "tok_emb":
            in_f, out_f = config.n_embd, config.vocab_size
        else:
            try:
                lin = model.get_submodule(name)
            except AttributeError:
                raise UserError(f"{directory}/leangpt.json: no layer {name!r} in this model") from None
            in_f, out_f = lin.in_features, lin.out_features
        qweights[name] = QuantizedWeight.from_tensors(scheme, tensors, name, in_f, out_f)
    if "tok_emb" in qweights:
        swap_embedding(model, qweights.pop("tok_emb"), device, kernel)
    swap_linears(model, qweights, device, kernel)  # frees the fp32 weights of the swapped layers
    model = model.to(device)
    rest = {k: v for k, v in tensors.items() if not k.endswith(QUANT_SUFFIXES)}
    if config.tie_embeddings and "lm_head" not in qweights and "tok_emb.weight" in rest:
        rest["lm_head.weight"] = rest["tok_emb.weight"]
    try:
        model.load_state_dict(rest, strict=True)
    except RuntimeError as e:
        raise UserError(f"{directory / 'model.safetensors'}: does not match config.json "
                        f"({str(e).splitlines()[-1].strip()})") from None
    return model.to(device).eval()


def kernels_used(model: nn.Module) -> dict[str, int]:
    """How many layers each kernel runs: for reports."""
    counts: dict[str, int] = {}
    for m in model.modules():
        k = getattr(m, "kernel", None)
        if isinstance(k, str) and k:
            counts[k] = counts.get(k, 0) + 1
    return counts

