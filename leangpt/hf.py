"""Hugging Face interop, in one place: config.json and state-dict names for `gpt2`, `llama`, `qwen3` and `nanochat`.

The rest of leangpt never sees Hugging Face names. A config is saved only as a type that transformers reads back
as the same model; any other mix of options is refused when saving, never written approximately.
"""

from __future__ import annotations

from typing import Any

import torch

from leangpt.config import ModelConfig
from leangpt.errors import UserError

# Decoders with RoPE and RMSNorm, and what sets each apart.
_ROPE_TYPES = ("llama", "qwen3", "nanochat")
_ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM",
                  "nanochat": "NanoChatForCausalLM"}


def hf_model_type(config: ModelConfig) -> str:
    """'gpt2', 'llama', 'qwen3' or 'nanochat': the Hugging Face architecture a leangpt config is saved as."""
    if config.is_gpt2:
        return "gpt2"
    rope_rms = (config.norm, config.pos) == ("rmsnorm", "rope")
    if rope_rms and config.mlp == "swiglu" and config.norm_weight and not config.embed_norm \
            and config.logit_softcap is None:
        if not config.qk_norm:
            return "llama"
        if not config.bias:  # qwen3's MLP has no biases
            return "qwen3"
    if rope_rms and config.mlp == "relu2" and not config.norm_weight and config.embed_norm and config.qk_norm \
            and not config.bias:
        return "nanochat"
    raise UserError(
        "model config: this mix of options has no Hugging Face format; use GPT-2 "
        "(layernorm, gelu, learned positions, bias, tied), llama (rmsnorm, swiglu, rope), qwen3 (llama with "
        "qk_norm, no bias) or nanochat (rmsnorm with norm_weight=false, embed_norm, qk_norm, relu2, rope, no bias; "
        "logit_softcap optional)")


# ---------------------------------------------------------------- config.json

def _layer_widths(config: ModelConfig) -> tuple[int, int, int, dict[str, list[int]]]:
    """(query heads, KV heads, MLP width) for Hugging Face's keys, plus leangpt-only keys for per-layer widths
    that the format cannot express; Hugging Face then refuses those weights by shape rather than misreading them."""
    heads, kv_heads, width, extra = config.n_head, config.n_kv_head, config.intermediate_size, {}
    if config.layer_intermediate_size is not None:
        if len(set(config.layer_intermediate_size)) == 1:
            width = config.layer_intermediate_size[0]
        else:
            extra["leangpt_layer_intermediate_size"] = config.layer_intermediate_size
    if config.layer_n_head is not None:
        # GPT-2 derives head_dim from n_embd / n_head, so fewer heads never fit its format.
        if len(set(config.layer_n_head)) == 1 and hf_model_type(config) != "gpt2":
            heads, kv_heads = config.layer_heads(0)
        else:
            extra["leangpt_layer_n_head"] = config.layer_n_head
    return heads, kv_heads, width, extra


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    model_type = hf_model_type(config)
    common = dict(architectures=[_ARCHITECTURES[model_type]], model_type=model_type,
                  vocab_size=config.vocab_size, bos_token_id=config.bos_token_id,
                  eos_token_id=config.eos_token_id, tie_word_embeddings=config.tie_embeddings)
    heads, kv_heads, width, extra = _layer_widths(config)
    common.update(extra)
    if model_type == "gpt2":
        return dict(
            n_positions=config.block_size, n_ctx=config.block_size, n_embd=config.n_embd,
            n_layer=config.n_layer, n_head=heads, n_inner=width,
            activation_function="gelu_new", layer_norm_epsilon=config.norm_eps,
            resid_pdrop=config.dropout, embd_pdrop=config.dropout, attn_pdrop=config.dropout,
            **common)
    out = dict(
        hidden_size=config.n_embd, intermediate_size=width,
        num_hidden_layers=config.n_layer, num_attention_heads=heads,
        num_key_value_heads=kv_heads, head_dim=config.head_dim,
        max_position_embeddings=config.block_size, rms_norm_eps=config.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        attention_bias=config.bias, attention_dropout=config.dropout, **common)
    if model_type == "llama":
        out.update(hidden_act="silu", mlp_bias=config.bias, rope_theta=config.rope_theta)
    elif model_type == "qwen3":
        out.update(hidden_act="silu", use_sliding_window=False, sliding_window=None)
    else:
        # nanochat's defaults would otherwise cap the logits at 15 and make token 1 the padding embedding.
        out.update(hidden_act="relu2", final_logit_softcapping=config.logit_softcap, pad_token_id=None)
    return out


def _gpt2_config(hf: dict[str, Any], common: dict[str, Any]) -> ModelConfig:
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise UserError(f"config.json: unsupported GPT-2 activation {hf['activation_function']!r}")
    return ModelConfig(
        block_size=hf["n_positions"], n_layer=hf["n_layer"], n_head=hf["n_head"],
        n_embd=hf["n_embd"], intermediate_size=hf.get("n_inner"),
        norm_eps=hf.get("layer_norm_epsilon", 1e-5), dropout=hf.get("resid_pdrop", 0.0), **common)


def _heads(hf: dict[str, Any], default_head_dim: int | None) -> dict[str, int]:
    """n_head, n_kv_head and head_dim; heads pruned alike in every layer are just fewer heads of head_dim."""
    heads = hf["num_attention_heads"]
    return dict(n_head=heads, n_kv_head=hf.get("num_key_value_heads") or heads,
                head_dim=hf.get("head_dim", default_head_dim) or hf["hidden_size"] // heads)


def _rope_config(model_type: str, hf: dict[str, Any], common: dict[str, Any]) -> ModelConfig:
    rope = hf.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default" or hf.get("rope_scaling"):
        raise UserError("config.json: only default RoPE (no scaling) is supported")
    act = "relu2" if model_type == "nanochat" else "silu"
    if hf.get("hidden_act", act) != act:
        raise UserError(f"config.json: unsupported {model_type} activation {hf['hidden_act']!r}")
    bias = hf.get("attention_bias", False)
    if model_type == "llama" and hf.get("mlp_bias", False) != bias:
        raise UserError("config.json: attention_bias and mlp_bias must agree")
    if model_type != "llama" and bias:
        raise UserError(f"config.json: {model_type} with attention_bias is not supported (its MLP has no biases)")
    if model_type == "qwen3" and (hf.get("use_sliding_window") or
                                  any(t != "full_attention" for t in hf.get("layer_types") or [])):
        raise UserError("config.json: qwen3 with sliding-window attention is not supported")
    options = dict(norm="rmsnorm", pos="rope", mlp="relu2" if model_type == "nanochat" else "swiglu",
                   qk_norm=model_type != "llama")
    if model_type == "nanochat":
        options.update(norm_weight=False, embed_norm=True, logit_softcap=hf.get("final_logit_softcapping", 15.0))
    return ModelConfig(
        block_size=hf["max_position_embeddings"], n_layer=hf["num_hidden_layers"],
        n_embd=hf["hidden_size"], intermediate_size=hf["intermediate_size"], bias=bias,
        rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
        norm_eps=hf.get("rms_norm_eps", 1e-6), dropout=hf.get("attention_dropout", 0.0),
        **_heads(hf, 128 if model_type == "qwen3" else None), **options, **common)


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    model_type = hf.get("model_type")
    if model_type not in ("gpt2", *_ROPE_TYPES):
        raise UserError(f"config.json: unsupported model_type {model_type!r} (leangpt reads gpt2, "
                        f"{', '.join(_ROPE_TYPES)})")
    try:
        common = dict(vocab_size=hf["vocab_size"], bos_token_id=hf.get("bos_token_id"),
                      eos_token_id=hf.get("eos_token_id"),
                      layer_n_head=hf.get("leangpt_layer_n_head"),
                      layer_intermediate_size=hf.get("leangpt_layer_intermediate_size"))
        # leangpt has always read a missing key as tied for gpt2 and llama; qwen3 and nanochat default to untied.
        common["tie_embeddings"] = hf.get("tie_word_embeddings", model_type in ("gpt2", "llama"))
        if model_type == "gpt2":
            return _gpt2_config(hf, common)
        return _rope_config(model_type, hf, common)
    except KeyError as e:
        raise UserError(f"config.json: missing key {e.args[0]!r}") from None


# ---------------------------------------------------------------- state dicts

def _gpt2_names(config: ModelConfig) -> list[tuple[str, str, bool]]:
    """(leangpt name, HF name, transpose?) pairs; GPT-2 stores linear weights as Conv1D (in, out)."""
    names = [("tok_emb.weight", "transformer.wte.weight", False),
             ("pos_emb.weight", "transformer.wpe.weight", False),
             ("norm_f.weight", "transformer.ln_f.weight", False),
             ("norm_f.bias", "transformer.ln_f.bias", False)]
    for i in range(config.n_layer):
        ours, hf = f"blocks.{i}.", f"transformer.h.{i}."
        for a, b in (("norm1", "ln_1"), ("norm2", "ln_2")):
            names += [(f"{ours}{a}.weight", f"{hf}{b}.weight", False), (f"{ours}{a}.bias", f"{hf}{b}.bias", False)]
        for a, b in (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"),
                     ("mlp.fc", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj")):
            names += [(f"{ours}{a}.weight", f"{hf}{b}.weight", True), (f"{ours}{a}.bias", f"{hf}{b}.bias", False)]
    return names


def _decoder_names(config: ModelConfig, model_type: str) -> list[tuple[str, str]]:
    """(leangpt name, HF name) of every tensor but the attention's q, k and v, for the RoPE types."""
    names = [("tok_emb.weight", "model.embed_tokens.weight")]
    if config.norm_weight:
        names.append(("norm_f.weight", "model.norm.weight"))
    if not config.tie_embeddings:
        names.append(("lm_head.weight", "lm_head.weight"))
    suffixes = ("weight", "bias") if config.bias else ("weight",)
    mlp = (("mlp.fc", "mlp.fc1"), ("mlp.proj", "mlp.fc2")) if model_type == "nanochat" else \
        (("mlp.gate", "mlp.gate_proj"), ("mlp.fc", "mlp.up_proj"), ("mlp.proj", "mlp.down_proj"))
    for i in range(config.n_layer):
        ours, hf = f"blocks.{i}.", f"model.layers.{i}."
        if config.norm_weight:
            names += [(f"{ours}norm1.weight", f"{hf}input_layernorm.weight"),
                      (f"{ours}norm2.weight", f"{hf}post_attention_layernorm.weight")]
            if config.qk_norm:
                names += [(f"{ours}attn.q_norm.weight", f"{hf}self_attn.q_norm.weight"),
                          (f"{ours}attn.k_norm.weight", f"{hf}self_attn.k_norm.weight")]
        for a, b in (("attn.proj", "self_attn.o_proj"), *mlp):
            names += [(f"{ours}{a}.{s}", f"{hf}{b}.{s}") for s in suffixes]
    return names


def _qkv_split(config: ModelConfig, layer: int) -> list[int]:
    heads, kv_heads = config.layer_heads(layer)
    d = config.head_dim
    return [heads * d, kv_heads * d, kv_heads * d]


def _flip_rope_halves(rows: torch.Tensor, head_dim: int) -> torch.Tensor:
    """q or k projection rows with the second half of each head negated, its own inverse.

    nanochat rotates RoPE's halves the other way round (rotate_half is cat(x2, -x1)). Negating the second half
    of every query and key turns one rotation into the other and leaves each query-key product unchanged; its
    parameter-free QK-norm, after RoPE there and before it here, sees the same lengths either way."""
    sign = torch.ones(head_dim, dtype=rows.dtype, device=rows.device)
    sign[head_dim // 2:] = -1
    return rows * sign.repeat(rows.size(0) // head_dim).view(-1, *[1] * (rows.dim() - 1))


def to_hf_state_dict(config: ModelConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    model_type = hf_model_type(config)
    if model_type == "gpt2":
        for ours, hf, transpose in _gpt2_names(config):
            out[hf] = sd[ours].t() if transpose else sd[ours]
        return {k: v.contiguous() for k, v in out.items()}
    for ours, hf in _decoder_names(config, model_type):
        out[hf] = sd[ours]
    for i in range(config.n_layer):
        for s in ("weight", "bias") if config.bias else ("weight",):
            q, k, v = sd[f"blocks.{i}.attn.qkv.{s}"].split(_qkv_split(config, i), dim=0)
            if model_type == "nanochat":
                q, k = _flip_rope_halves(q, config.head_dim), _flip_rope_halves(k, config.head_dim)
            for name, t in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                out[f"model.layers.{i}.self_attn.{name}.{s}"] = t
    return {k: v.contiguous() for k, v in out.items()}


def from_hf_state_dict(config: ModelConfig, hf_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    def take(name: str) -> torch.Tensor:
        if name not in hf_sd:
            raise UserError(f"model.safetensors: missing tensor {name!r}")
        return hf_sd[name]

    sd: dict[str, torch.Tensor] = {}
    model_type = hf_model_type(config)
    if model_type == "gpt2":
        for ours, hf, transpose in _gpt2_names(config):
            sd[ours] = take(hf).t() if transpose else take(hf)
        sd["lm_head.weight"] = sd["tok_emb.weight"]
        return sd
    for ours, hf in _decoder_names(config, model_type):
        sd[ours] = take(hf)
    if config.tie_embeddings:
        sd["lm_head.weight"] = sd["tok_emb.weight"]
    for i in range(config.n_layer):
        for s in ("weight", "bias") if config.bias else ("weight",):
            q, k, v = (take(f"model.layers.{i}.self_attn.{n}.{s}") for n in ("q_proj", "k_proj", "v_proj"))
            if model_type == "nanochat":
                q, k = _flip_rope_halves(q, config.head_dim), _flip_rope_halves(k, config.head_dim)
            sd[f"blocks.{i}.attn.qkv.{s}"] = torch.cat([q, k, v], dim=0)
    return sd
