"""Hugging Face interop, in one place: config.json and state-dict names for `gpt2` and `llama`.

The rest of leangpt never sees Hugging Face names.
"""

from __future__ import annotations

from typing import Any

import torch

from leangpt.config import ModelConfig
from leangpt.errors import UserError


def hf_model_type(config: ModelConfig) -> str:
    """'gpt2' or 'llama': the Hugging Face architecture a leangpt config is saved as."""
    if config.is_gpt2:
        return "gpt2"
    if (config.norm, config.mlp, config.pos) == ("rmsnorm", "swiglu", "rope"):
        return "llama"
    raise UserError(
        "model config: this mix of options has no Hugging Face format; use GPT-2 "
        "(layernorm, gelu, learned positions, bias, tied) or llama (rmsnorm, swiglu, rope)")


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
        if len(set(config.layer_n_head)) == 1 and hf_model_type(config) == "llama":
            heads, kv_heads = config.layer_heads(0)
        else:
            extra["leangpt_layer_n_head"] = config.layer_n_head
    return heads, kv_heads, width, extra


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    common = dict(vocab_size=config.vocab_size, bos_token_id=config.bos_token_id,
                  eos_token_id=config.eos_token_id, tie_word_embeddings=config.tie_embeddings)
    heads, kv_heads, width, extra = _layer_widths(config)
    common.update(extra)
    if hf_model_type(config) == "gpt2":
        return dict(
            architectures=["GPT2LMHeadModel"], model_type="gpt2",
            n_positions=config.block_size, n_ctx=config.block_size, n_embd=config.n_embd,
            n_layer=config.n_layer, n_head=heads, n_inner=width,
            activation_function="gelu_new", layer_norm_epsilon=config.norm_eps,
            resid_pdrop=config.dropout, embd_pdrop=config.dropout, attn_pdrop=config.dropout,
            **common)
    return dict(
        architectures=["LlamaForCausalLM"], model_type="llama",
        hidden_size=config.n_embd, intermediate_size=width,
        num_hidden_layers=config.n_layer, num_attention_heads=heads,
        num_key_value_heads=kv_heads, head_dim=config.head_dim,
        max_position_embeddings=config.block_size, rms_norm_eps=config.norm_eps,
        rope_theta=config.rope_theta,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        hidden_act="silu", attention_bias=config.bias, mlp_bias=config.bias,
        attention_dropout=config.dropout, **common)


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    model_type = hf.get("model_type")
    try:
        common = dict(vocab_size=hf["vocab_size"], bos_token_id=hf.get("bos_token_id"),
                      eos_token_id=hf.get("eos_token_id"),
                      tie_embeddings=hf.get("tie_word_embeddings", True),
                      layer_n_head=hf.get("leangpt_layer_n_head"),
                      layer_intermediate_size=hf.get("leangpt_layer_intermediate_size"))
        if model_type == "gpt2":
            if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
                raise UserError(f"config.json: unsupported GPT-2 activation {hf['activation_function']!r}")
            return ModelConfig(
                block_size=hf["n_positions"], n_layer=hf["n_layer"], n_head=hf["n_head"],
                n_embd=hf["n_embd"], intermediate_size=hf.get("n_inner"),
                norm_eps=hf.get("layer_norm_epsilon", 1e-5), dropout=hf.get("resid_pdrop", 0.0), **common)
        if model_type == "llama":
            rope = hf.get("rope_parameters") or {}
            if rope.get("rope_type", "default") != "default" or hf.get("rope_scaling"):
                raise UserError("config.json: only default RoPE (no scaling) is supported")
            if hf.get("hidden_act", "silu") != "silu":
                raise UserError(f"config.json: unsupported llama activation {hf['hidden_act']!r}")
            heads = hf["num_attention_heads"]
            kv_heads = hf.get("num_key_value_heads") or heads
            head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
            if heads * head_dim != hf["hidden_size"] and common["layer_n_head"] is None \
                    and hf["hidden_size"] % head_dim == 0 and heads % kv_heads == 0:
                # Heads pruned alike in every layer: leangpt keeps n_head at hidden_size / head_dim.
                common["layer_n_head"] = [heads] * hf["num_hidden_layers"]
                heads, kv_heads = hf["hidden_size"] // head_dim, hf["hidden_size"] // head_dim // (heads // kv_heads)
            cfg = ModelConfig(
                block_size=hf["max_position_embeddings"], n_layer=hf["num_hidden_layers"],
                n_head=heads, n_kv_head=kv_heads,
                n_embd=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
                norm="rmsnorm", mlp="swiglu", pos="rope", bias=hf.get("attention_bias", False),
                rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
                norm_eps=hf.get("rms_norm_eps", 1e-6), dropout=hf.get("attention_dropout", 0.0), **common)
            if hf.get("head_dim", cfg.head_dim) != cfg.head_dim:
                raise UserError("config.json: head_dim other than hidden_size / num_attention_heads is not supported")
            if hf.get("mlp_bias", False) != cfg.bias:
                raise UserError("config.json: attention_bias and mlp_bias must agree")
            return cfg
    except KeyError as e:
        raise UserError(f"config.json: missing key {e.args[0]!r}") from None
    raise UserError(f"config.json: unsupported model_type {model_type!r} (leangpt reads gpt2 and llama)")


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


def _llama_names(config: ModelConfig) -> list[tuple[str, str]]:
    names = [("tok_emb.weight", "model.embed_tokens.weight"), ("norm_f.weight", "model.norm.weight")]
    if not config.tie_embeddings:
        names.append(("lm_head.weight", "lm_head.weight"))
    suffixes = ("weight", "bias") if config.bias else ("weight",)
    for i in range(config.n_layer):
        ours, hf = f"blocks.{i}.", f"model.layers.{i}."
        names += [(f"{ours}norm1.weight", f"{hf}input_layernorm.weight"),
                  (f"{ours}norm2.weight", f"{hf}post_attention_layernorm.weight")]
        for a, b in (("attn.proj", "self_attn.o_proj"), ("mlp.gate", "mlp.gate_proj"),
                     ("mlp.fc", "mlp.up_proj"), ("mlp.proj", "mlp.down_proj")):
            names += [(f"{ours}{a}.{s}", f"{hf}{b}.{s}") for s in suffixes]
    return names


def _qkv_split(config: ModelConfig, layer: int) -> list[int]:
    heads, kv_heads = config.layer_heads(layer)
    d = config.head_dim
    return [heads * d, kv_heads * d, kv_heads * d]


def to_hf_state_dict(config: ModelConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    if hf_model_type(config) == "gpt2":
        for ours, hf, transpose in _gpt2_names(config):
            out[hf] = sd[ours].t() if transpose else sd[ours]
        return {k: v.contiguous() for k, v in out.items()}
    for ours, hf in _llama_names(config):
        out[hf] = sd[ours]
    for i in range(config.n_layer):
        for s in ("weight", "bias") if config.bias else ("weight",):
            q, k, v = sd[f"blocks.{i}.attn.qkv.{s}"].split(_qkv_split(config, i), dim=0)
            for name, t in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                out[f"model.layers.{i}.self_attn.{name}.{s}"] = t
    return {k: v.contiguous() for k, v in out.items()}


def from_hf_state_dict(config: ModelConfig, hf_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    def take(name: str) -> torch.Tensor:
        if name not in hf_sd:
            raise UserError(f"model.safetensors: missing tensor {name!r}")
        return hf_sd[name]

    sd: dict[str, torch.Tensor] = {}
    if hf_model_type(config) == "gpt2":
        for ours, hf, transpose in _gpt2_names(config):
            sd[ours] = take(hf).t() if transpose else take(hf)
        sd["lm_head.weight"] = sd["tok_emb.weight"]
        return sd
    for ours, hf in _llama_names(config):
        sd[ours] = take(hf)
    if config.tie_embeddings:
        sd["lm_head.weight"] = sd["tok_emb.weight"]
    for i in range(config.n_layer):
        for s in ("weight", "bias") if config.bias else ("weight",):
            parts = [take(f"model.layers.{i}.self_attn.{n}.{s}") for n in ("q_proj", "k_proj", "v_proj")]
            sd[f"blocks.{i}.attn.qkv.{s}"] = torch.cat(parts, dim=0)
    return sd
