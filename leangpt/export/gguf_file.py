"""A checkpoint as one GGUF file for llama.cpp, written with the `gguf` package (llama.cpp's own writer).

The file is what llama.cpp's converter (convert_hf_to_gguf.py) makes of the Hugging Face checkpoint:
the Hugging Face tensors (leangpt.hf) named by gguf's own table, GPT-2's Conv1D weights back in (out, in)
order, and for `llama` the query and key rows of each head reordered, since llama.cpp's llama rotates
adjacent pairs where Hugging Face rotates halves (its qwen3 rotates halves too). Norms (Qwen3's per-head
QK-norms included), biases and learned positions stay in F32.

A quantized leangpt checkpoint keeps its integers where a GGUF type holds them as they are: int8 (one
scale per row) is Q8_0 with that scale in every 32-block, int4 (scale and zero point per group of 32k
columns) is Q4_1 with d = scale and m = -zero · scale. Only the scales are rounded, to fp16. Any other
pairing dequantizes the layer and requantizes it with gguf's reference quantizer.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from leangpt import hf
from leangpt.config import ModelConfig
from leangpt.errors import UserError
from leangpt.export.source import Source, Weight
from leangpt.quant.formats import QuantizedWeight

Q = gguf.GGMLQuantizationType
TYPES = {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_1": Q.Q4_1}
FILE_TYPES = {Q.F32: gguf.LlamaFileType.ALL_F32, Q.F16: gguf.LlamaFileType.MOSTLY_F16,
              Q.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0, Q.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
              Q.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1}
EXACT = {8: Q.Q8_0, 4: Q.Q4_1}  # the GGUF type that holds a leangpt scheme's integers unchanged
BLOCK = 32  # values per block of Q8_0 / Q4_0 / Q4_1
ARCHS = {"gpt2": gguf.MODEL_ARCH.GPT2, "llama": gguf.MODEL_ARCH.LLAMA, "qwen3": gguf.MODEL_ARCH.QWEN3}
ROPE_PAIRS_ADJACENT = {"llama"}  # llama.cpp's rope type "norm"; the others rotate halves like Hugging Face


# ---------------------------------------------------------------- what llama.cpp can run

def architecture(config: ModelConfig) -> str:
    """The llama.cpp architecture of a checkpoint, or a UserError naming what would export."""
    model_type = hf.hf_model_type(config)
    if model_type not in ARCHS:
        raise UserError(f"llama.cpp export supports {', '.join(ARCHS)} models, not {model_type!r}; "
                        f"use --format onnx")
    uneven = [name for name in ("layer_n_head", "layer_intermediate_size")
              if len(set(getattr(config, name) or [0])) > 1]
    if uneven:
        raise UserError(f"llama.cpp runs every layer at one width, but this checkpoint has per-layer pruned widths "
                        f"({', '.join(uneven)}): export its unpruned parent, prune with --scope layer, "
                        f"or use --format onnx")
    if model_type == "gpt2" and config.layer_n_head is not None:
        raise UserError("llama.cpp's gpt2 derives the head size from n_embd / n_head, so a GPT-2 model with pruned "
                        "heads cannot run there: prune neurons only (--heads 0), or use --format onnx")
    return model_type


def pre_tokenizer(directory: Path, tokenizer_json: dict[str, Any]) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for the tokenizer's split, checked from its definition (not guessed from
    a hash of sample ids, which is how llama.cpp's converter fails on a tokenizer it has not seen)."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    model = tokenizer_json.get("model") or {}
    if (model.get("type") == "BPE" and tokenizer_json.get("normalizer") is None and pre.get("type") == "ByteLevel"
            and pre.get("use_regex", True) and not pre.get("add_prefix_space", False)):
        return "gpt-2"  # byte-level BPE on GPT-2's split: what `leangpt prepare` trains
    raise UserError(f"{directory}/tokenizer.json: no llama.cpp pre-tokenizer is known to match this one "
                    f"(model {model.get('type')}, pre-tokenizer {pre.get('type')}); GGUF export supports byte-level "
                    f"BPE on GPT-2's split, as `leangpt prepare` trains; use --format onnx")


# ---------------------------------------------------------------- metadata

def _add_hparams(w: gguf.GGUFWriter, config: ModelConfig, arch: str) -> None:
    heads, kv_heads = config.layer_heads(0)
    w.add_context_length(config.block_size)
    w.add_embedding_length(config.n_embd)
    w.add_block_count(config.n_layer)
    w.add_feed_forward_length(config.layer_mlp_width(0))
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_key_length(config.head_dim)
    w.add_value_length(config.head_dim)
    if arch == "gpt2":
        w.add_layer_norm_eps(config.norm_eps)
        return
    w.add_vocab_size(config.vocab_size)
    w.add_layer_norm_rms_eps(config.norm_eps)
    w.add_rope_freq_base(config.rope_theta)
    w.add_rope_dimension_count(config.head_dim)


def _add_tokenizer(w: gguf.GGUFWriter, src: Source) -> None:
    """Tokens in their byte-level spelling, types, merges, special ids and any chat template; no BOS is added
    (leangpt trains without one)."""
    tk = src.tokenizer.tk
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre_tokenizer(src.directory, json.loads(tk.to_str())))
    by_id = {i: t for t, i in tk.get_vocab(with_added_tokens=True).items()}
    added = tk.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(src.config.vocab_size):
        if i not in by_id:  # the model's vocabulary may be padded beyond the tokenizer's
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(by_id[i])
        types.append(gguf.TokenType.NORMAL if i not in added else
                     gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
    w.add_token_list(tokens)
    w.add_token_types(types)
    special = gguf.SpecialVocab(src.directory, load_merges=True, n_vocab=len(tokens))
    special.add_special_token.setdefault("bos", False)
    special.add_special_token.setdefault("eos", False)
    special.add_to_gguf(w, quiet=True)


# ---------------------------------------------------------------- tensors

def _rows(w: Weight) -> int:
    return w.out_features if isinstance(w, QuantizedWeight) else w.shape[0]


def hf_rows(config: ModelConfig, weights: dict[str, Weight]) -> dict[str, tuple[str, torch.Tensor]]:
    """Each Hugging Face tensor as (leangpt name, the rows of it that it holds): hf.to_hf_state_dict run on
    row numbers, so its renaming and its split of the fused QKV apply to any kind of weight, quantized ones
    included. For the types in ARCHS it only renames, splits and transposes (GPT-2's Conv1D transposition is a
    no-op on a vector of row numbers, and llama.cpp's converter undoes it anyway)."""
    names = list(weights)
    starts = np.cumsum([0] + [_rows(weights[n]) for n in names])
    numbered = {n: torch.arange(int(starts[i]), int(starts[i + 1])) for i, n in enumerate(names)}
    out = {}
    for hf_name, rows in hf.to_hf_state_dict(config, numbered).items():
        i = int(np.searchsorted(starts, int(rows[0]), side="right")) - 1
        out[hf_name] = (names[i], rows - int(starts[i]))
    return out


def _pairs_adjacent(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder each head's rows from Hugging Face's halves (i, i + D/2) to adjacent pairs (2i, 2i + 1)."""
    return rows.reshape(n_head, 2, -1).transpose(1, 2).reshape(-1)


def _take_rows(w: Weight, rows: torch.Tensor) -> Weight:
    if not isinstance(w, QuantizedWeight):
        return w[rows]
    return QuantizedWeight(w.scheme, w.qweight[rows], w.scales[rows],
                           None if w.zeros is None else w.zeros[rows], w.in_features)


def _fp16_bytes(x: torch.Tensor) -> np.ndarray:
    return x.numpy().astype(np.float16).view(np.uint8).reshape(*x.shape[:-1], -1)


def exact_blocks(qw: QuantizedWeight) -> np.ndarray:
    """The integers of a leangpt int8 / int4 weight as Q8_0 / Q4_1 blocks (out, in / 32 · bytes per block),
    unchanged: each 32-block takes its row's (int8) or its group's (int4) scale, as fp16."""
    out, n = qw.out_features, qw.in_features
    q = qw.int_weight().reshape(out, n // BLOCK, BLOCK)
    if qw.scheme.bits == 8:
        d = qw.scales[:, None, None].expand(out, n // BLOCK, 1)
        return np.concatenate([_fp16_bytes(d), q.numpy().view(np.uint8)], axis=-1).reshape(out, -1)
    group = torch.arange(0, n, BLOCK) // qw.scheme.group_size  # the group of each block's first column
    d = qw.scales[:, group, None]
    m = -(qw.zeros[:, group, None].float() * d)
    nibbles = (q[..., :BLOCK // 2] | (q[..., BLOCK // 2:] << 4)).to(torch.uint8)  # value j and j + 16 share a byte
    return np.concatenate([_fp16_bytes(d), _fp16_bytes(m), nibbles.numpy()], axis=-1).reshape(out, -1)


def _keeps_integers(w: Weight, qtype: Q) -> bool:
    if not isinstance(w, QuantizedWeight) or EXACT[w.scheme.bits] != qtype or w.in_features % BLOCK:
        return False
    return w.scheme.bits == 8 or w.scheme.group_size % BLOCK == 0


def encode(gguf_name: str, w: Weight, requested: Q | None) -> tuple[np.ndarray, Q, str]:
    """(data, GGUF type, how) for one tensor; how is 'float', 'kept' (integers carried over), 'requantized',
    'dequantized' or 'f16' (a row length that blocks of 32 do not divide)."""
    quantized = isinstance(w, QuantizedWeight)
    qtype = requested if requested is not None else (EXACT[w.scheme.bits] if quantized else Q.F32)
    one_d = not quantized and w.dim() == 1
    if one_d or gguf_name.endswith("_norm.weight") or gguf_name == "position_embd.weight":
        qtype = Q.F32  # as llama.cpp's converter keeps them
    if _keeps_integers(w, qtype):
        return exact_blocks(w), qtype, "kept"
    data = (w.dequantize() if quantized else w).numpy().astype(np.float32)
    how = "float"
    if qtype in (Q.Q8_0, Q.Q4_0, Q.Q4_1) and data.shape[-1] % BLOCK:
        qtype, how = Q.F16, "f16"
    elif quantized:
        how = "dequantized" if qtype in (Q.F32, Q.F16) else "requantized"
    return gguf.quants.quantize(data, qtype), qtype, how


def gguf_tensors(src: Source, arch: str, requested: Q | None) -> list[tuple[str, np.ndarray, Q, str]]:
    config, weights = src.config, src.weights
    names = gguf.get_tensor_name_map(ARCHS[arch], config.n_layer)
    out = []
    mapped = hf_rows(config, weights)
    if weights["lm_head.weight"] is not weights["tok_emb.weight"] and "lm_head.weight" not in mapped:
        # A tied model whose head was quantized on its own: llama.cpp reads `output` when it is there.
        mapped["lm_head.weight"] = ("lm_head.weight", torch.arange(_rows(weights["lm_head.weight"])))
    for hf_name, (name, rows) in mapped.items():
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"gguf has no {arch} name for {hf_name}")
        if arch in ROPE_PAIRS_ADJACENT and (".q_proj." in hf_name or ".k_proj." in hf_name):
            layer = int(hf_name.split(".")[2])
            heads, kv_heads = config.layer_heads(layer)
            rows = _pairs_adjacent(rows, heads if ".q_proj." in hf_name else kv_heads)
        out.append((gguf_name, *encode(gguf_name, _take_rows(weights[name], rows), requested)))
    return out


def write_gguf(src: Source, path: Path, type_name: str, progress: bool = False) -> dict[str, Any]:
    """Write src as GGUF at path; returns the architecture, file type and what became of each tensor (a progress
    bar while a large file is written)."""
    arch = architecture(src.config)
    requested = None if type_name == "auto" else TYPES[type_name]
    file_type = requested or (EXACT[src.quantization["scheme"]["bits"]] if src.quantization else Q.F32)
    tensors = gguf_tensors(src, arch, requested)
    w = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[ARCHS[arch]])
    try:
        w.add_name(src.directory.name)
        w.add_file_type(FILE_TYPES[file_type])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_hparams(w, src.config, arch)
        _add_tokenizer(w, src)
        for name, data, qtype, _ in tensors:
            w.add_tensor(name, data, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=progress and sum(data.nbytes for _, data, _, _ in tensors) > 256 << 20)
    finally:
        w.close()
    hows = Counter(how for *_, how in tensors)
    return {"architecture": arch, "type": file_type.name.lower(), "tensors": len(tensors),
            "tensor_types": dict(Counter(q.name.lower() for _, _, q, _ in tensors)),
            "kept_integers": hows["kept"], "requantized": [n for n, *_, how in tensors if how == "requantized"],
            "dequantized": hows["dequantized"], "f16_fallback": [n for n, *_, how in tensors if how == "f16"]}
