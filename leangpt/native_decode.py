"""Decode steps on a CPU by leangpt's C++ decode step (quant/native_decoder.cpp): the whole step in one
call, without a compiled graph, so it costs no compilation and none of a graph's per-operator overheads.

It covers leangpt's GPT in float32 with float, native int8 and native int4 linear layers (leangpt/quant/
kernels.py), every architecture option of leangpt/model.py and structurally pruned widths. `unsupported(model)`
says why another model is not covered; the Engine then decodes it as before.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from leangpt.cpu_linear import DecodeLinear
from leangpt.model import GPT
from leangpt.quant import native
from leangpt.quant.kernels import NativeInt4Linear, NativeInt8Linear

_NONE = torch.empty(0)  # "no tensor" in the C++ class's arguments
_MLP_KINDS = {"gelu": 0, "swiglu": 1, "relu2": 2}


def _tensor(t: torch.Tensor | None) -> torch.Tensor:
    return _NONE if t is None else t.detach()


def _linear(module: nn.Module) -> tuple[int, list[torch.Tensor]]:
    """The C++ kind of a linear layer and its four tensors; ValueError if it has no C++ product."""
    # kinds 4 (int8) and 3 (int4): int8-rounded inputs, integer products
    if isinstance(module, NativeInt8Linear):
        kind = 4 if module.scheme.activations == "int8" else 1
        return kind, [module.q, module.qscales, _NONE, _tensor(module.bias)]
    if isinstance(module, NativeInt4Linear):
        kind = 3 if module.scheme.activations == "int8" else 2
        return kind, [module.packed, module.qscales, module.szeros, _tensor(module.bias)]
    if type(module) in (nn.Linear, DecodeLinear) and module.weight.dtype == torch.float32 \
            and module.weight.is_contiguous():
        return 0, [module.weight.detach(), _NONE, _NONE, _tensor(module.bias)]
    raise ValueError(f"{type(module).__name__} layers have no C++ decode step")


def _norm(norm: nn.Module) -> list[torch.Tensor]:
    return [_tensor(norm.weight), _tensor(getattr(norm, "bias", None))]


def unsupported(model: nn.Module) -> str | None:
    """Why the C++ step cannot decode this model, or None if it can."""
    if not isinstance(model, GPT):
        return f"{type(model).__name__} is not leangpt's GPT"
    weight = model._float_tensor()
    if weight.dtype != torch.float32 or weight.device.type != "cpu":
        return "the model is not float32 on a CPU"
    layers = [model.lm_head] + [m for b in model.blocks for m in (b.attn.qkv, b.attn.proj, b.mlp.fc, b.mlp.proj)]
    layers += [b.mlp.gate for b in model.blocks if hasattr(b.mlp, "gate")]
    try:
        for layer in layers:
            _linear(layer)
    except ValueError as e:
        return str(e)
    if not native.available():
        return "leangpt's C++ kernels could not be built here"
    return None


class NativeDecoder:
    """The C++ decode step of one model. Build it after the model's weights are in their final place (it keeps
    references to them, not copies)."""

    # Tokens (rows of a decode step, or of a prompt) up to which the Engine takes this step. On the 2-core EPYC
    # (main-job model, position 64) a step took 0.36-0.87 times the compiled step's time at 2-32 rows for float,
    # int8 and int4 weights, and 0.75-1.07 at 64 rows, where MKL's matmul of the float (or dequantized) weights
    # catches up. With quantized layers it stays ahead for prompts: on the AVX-512 EPYC (2026-12-08, prompts of
    # 8 x 32, 16 x 32, 4 x 200 and 1 x 255 tokens) it took 0.45-0.55 of the Python prefill's time for int8-a8 and
    # int4-a8, 0.56-0.67 for weight-only int8, 0.80-0.86 for weight-only int4, and 1.04 for float weights.
    max_rows = 64
    quantized_max_rows = 1024

    def __init__(self, model: GPT) -> None:
        if not native.available():  # also loads the library that defines the class
            raise RuntimeError("leangpt's C++ kernels could not be built here")
        c = model.config
        self.model = model
        rope = (model.rope_cos, model.rope_sin) if c.pos == "rope" else (_NONE, _NONE)
        self.decoder = torch.classes.leangpt_native.Decoder(c.n_embd, c.head_dim, _MLP_KINDS[c.mlp],
                                                            float(c.logit_softcap or 0.0), *rope)
        rms = c.norm == "rmsnorm"
        all_kinds: list[int] = []
        for block in model.blocks:
            a, mlp = block.attn, block.mlp
            norms = _norm(block.norm1) + _norm(block.norm2)
            norms += [_tensor(a.q_norm.weight), _tensor(a.k_norm.weight)] if a.q_norm is not None else [_NONE] * 2
            kinds, weights = [], []
            for layer in (a.qkv, a.proj, getattr(mlp, "gate", None), mlp.fc, mlp.proj):
                kind, tensors = _linear(layer) if layer is not None else (-1, [_NONE] * 4)
                kinds.append(kind)
                weights += tensors
            self.decoder.add_block(a.n_head, a.n_kv_head, a.q_norm is not None, rms, c.norm_eps, norms, kinds,
                                   weights)
            all_kinds += kinds
        head_kind, head = _linear(model.lm_head)
        self.decoder.set_head(rms, c.norm_eps, *_norm(model.norm_f), head_kind, head)
        if any(kind > 0 for kind in all_kinds + [head_kind]):  # kind 0: float
            self.max_rows = self.quantized_max_rows
        self.float_table = type(model.tok_emb) is nn.Embedding  # else (a quantized table) embedded by the model
        if self.float_table:
            norm = model.norm_emb
            self.decoder.set_embedding(model.tok_emb.weight.detach(), _tensor(getattr(model.pos_emb, "weight", None)),
                                       norm is not None, rms, c.norm_eps, *(_norm(norm) if norm else [_NONE] * 2))
        self._first_attention = model.blocks[0].attn
        self._bound: torch.Tensor | None = None
        self._rows: dict[int, torch.Tensor] = {}

    def _bind_cache(self) -> None:
        """Point the step at the model's KV cache whenever the model has a new one."""
        first = self._first_attention.kv_cache
        if first is None:
            raise RuntimeError("call setup_cache() before decoding")
        if first.k is not self._bound:
            caches = [b.attn.kv_cache for b in self.model.blocks]
            self.decoder.set_cache([c.k for c in caches], [c.v for c in caches])
            self._bound = first.k

    def step(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """Logits (B, V) of one token per row, tokens (B, 1), at positions input_pos ((1,) shared by the rows, or
        (B, 1)), row b in the KV cache's row b, each attending to its positions up to its own; as
        `model(tokens, input_pos)[:, -1]`."""
        self._bind_cache()
        B = tokens.size(0)
        if B not in self._rows:
            self._rows[B] = torch.arange(B)
        rows = self._rows[B]  # the cache rows, and the items whose logits are wanted: all
        positions = input_pos.reshape(-1).expand(B)
        return self.decoder.step(tokens, positions, rows, rows, self._embedded(tokens, input_pos))

    def forward(self, idx: torch.Tensor, input_pos: torch.Tensor, first_row: int = 0,
                logit_items: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens idx (B, T) at positions input_pos ((T,) shared by the rows, or (B, T)), row b in the KV cache's
        row first_row + b, written to the cache; each token attends to its row's positions up to its own,
        including those written by the tokens before it. Returns the logits (len(logit_items), V) of the items
        logit_items (ascending indices into idx flattened; default none)."""
        self._bind_cache()
        B, T = idx.shape
        slots = torch.arange(first_row, first_row + B).repeat_interleave(T)
        items = _NONE.long() if logit_items is None else logit_items
        return self.decoder.step(idx.reshape(-1), input_pos.expand(B, T).reshape(-1), slots, items,
                                 self._embedded(idx, input_pos))

    def _embedded(self, idx: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """The model's embedding of idx when its table is not float (a quantized one), else none."""
        return _NONE if self.float_table else self.model.embed(idx, input_pos)  # (B, T, C)
