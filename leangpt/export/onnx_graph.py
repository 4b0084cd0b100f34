"""A checkpoint as an ONNX decoder graph for onnxruntime, written op by op with onnx.helper.

The graph is leangpt/model.py's forward with a growing KV cache, in the input and output names that
Hugging Face's ONNX exports use:

    input_ids                          int64 (batch, sequence)
    past_key_values.{i}.key / .value   float (batch, kv_heads, past_sequence, head_dim); past_sequence may be 0
    logits                             float (batch, sequence, vocab)
    present.{i}.key / .value           float (batch, kv_heads, past_sequence + sequence, head_dim)

Positions are past_sequence + 0..sequence-1 for every row (rows of equal length, no padding mask).
Every model leangpt builds has a graph, per-layer widths (pruned heads and neurons) and nanochat's options
included: each layer takes its own shapes.
"""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from leangpt.export.source import Source
from leangpt.model import rope_cache

OPSET = 17  # LayerNormalization's first opset; onnxruntime runs every op used here at it


class GraphBuilder:
    """Nodes and initializers, each op's output named after the op."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._names: set[str] = set()

    def op(self, op_type: str, *inputs: str, outputs: int = 1, name: str | None = None, **attrs) -> str | list[str]:
        base = name or f"{op_type.lower()}_{len(self.nodes)}"
        outs = [base] if outputs == 1 and name else [f"{base}_{k}" for k in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=f"{base}_node", **attrs))
        return outs[0] if outputs == 1 else outs

    def const(self, name: str, value: np.ndarray) -> str:
        """An initializer; a name asked for again is the same one (shared constants are made on first use)."""
        if name not in self._names:
            self._names.add(name)
            self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def ints(self, name: str, *values: int) -> str:
        return self.const(name, np.array(values, dtype=np.int64))

    def scalar(self, name: str, value: float) -> str:
        return self.const(name, np.array(value, dtype=np.float32))


class Decoder:
    """Builds the graph of one model: embedding, blocks, final norm, head."""

    def __init__(self, src: Source) -> None:
        self.src, self.config, self.g = src, src.config, GraphBuilder()

    def weight(self, name: str, transpose: bool = False) -> str:
        """An initializer under its leangpt name; linear weights transposed to (in, out) for MatMul."""
        w = self.src.float_weight(name).numpy().astype(np.float32)
        return self.g.const(name + (".T" if transpose else ""), w.T if transpose else w)

    def linear(self, x: str, name: str) -> str:
        y = self.g.op("MatMul", x, self.weight(f"{name}.weight", transpose=True))
        if f"{name}.bias" in self.src.weights:
            y = self.g.op("Add", y, self.weight(f"{name}.bias"))
        return y

    def norm(self, x: str, name: str) -> str:
        """leangpt.model.make_norm's norm over the last axis; parameter-free where norm_weight is off."""
        c, g = self.config, self.g
        if c.norm == "rmsnorm":
            return self.rms_norm(x, name)
        ones = np.ones(c.n_embd, np.float32)
        scale = self.weight(f"{name}.weight") if c.norm_weight else g.const(f"ones_{c.n_embd}", ones)
        bias = [self.weight(f"{name}.bias")] if c.bias and c.norm_weight else []
        return g.op("LayerNormalization", x, scale, *bias, axis=-1, epsilon=c.norm_eps)

    def rms_norm(self, x: str, name: str) -> str:
        g = self.g
        mean_sq = g.op("ReduceMean", g.op("Mul", x, x), axes=[-1], keepdims=1)
        rms = g.op("Sqrt", g.op("Add", mean_sq, g.scalar("norm_eps", self.config.norm_eps)))
        y = g.op("Div", x, rms)
        return g.op("Mul", y, self.weight(f"{name}.weight")) if self.config.norm_weight else y

    def heads(self, x: str, n: int) -> str:
        """(B, T, n·D) -> (B, n, T, D)."""
        shape = self.g.ints(f"heads_shape_{n}", 0, 0, n, self.config.head_dim)
        return self.g.op("Transpose", self.g.op("Reshape", x, shape), perm=[0, 2, 1, 3])

    def rope(self, x: str) -> str:
        """Hugging Face's rotate-half RoPE, as leangpt.model.apply_rope."""
        g, half = self.g, self.config.head_dim // 2
        x1, x2 = g.op("Split", x, g.ints("rope_halves", half, half), axis=-1, outputs=2)
        rotated = g.op("Concat", g.op("Neg", x2), x1, axis=-1)
        return g.op("Add", g.op("Mul", x, self.cos), g.op("Mul", rotated, self.sin))

    def repeat_kv(self, x: str, heads: int, kv_heads: int) -> str:
        """(B, Hkv, S, D) -> (B, H, S, D): query head h reads KV head h // (H / Hkv), as SDPA's enable_gqa."""
        if heads == kv_heads:
            return x
        g, group = self.g, heads // kv_heads
        x = g.op("Unsqueeze", x, g.ints("axis2", 2))  # (B, Hkv, 1, S, D)
        expanded = g.op("Expand", x, g.ints(f"gqa_expand_{group}", 1, 1, group, 1, 1))  # (B, Hkv, G, S, D)
        return g.op("Reshape", expanded, g.ints(f"gqa_shape_{heads}", 0, heads, -1, self.config.head_dim))

    def attention(self, x: str, i: int) -> str:
        g, c = self.g, self.config
        heads, kv_heads = c.layer_heads(i)
        d = c.head_dim
        split = g.ints(f"blocks.{i}.attn.qkv.split", heads * d, kv_heads * d, kv_heads * d)
        q, k, v = g.op("Split", self.linear(x, f"blocks.{i}.attn.qkv"), split, axis=-1, outputs=3)
        q, k, v = self.heads(q, heads), self.heads(k, kv_heads), self.heads(v, kv_heads)
        if c.qk_norm:  # one RMSNorm over head_dim for every query head, one for every key head (Qwen3)
            q, k = self.rms_norm(q, f"blocks.{i}.attn.q_norm"), self.rms_norm(k, f"blocks.{i}.attn.k_norm")
        if c.pos == "rope":
            q, k = self.rope(q), self.rope(k)
        k = g.op("Concat", f"past_key_values.{i}.key", k, axis=2, name=f"present.{i}.key")
        v = g.op("Concat", f"past_key_values.{i}.value", v, axis=2, name=f"present.{i}.value")
        k, v = self.repeat_kv(k, heads, kv_heads), self.repeat_kv(v, heads, kv_heads)
        scores = g.op("MatMul", q, g.op("Transpose", k, perm=[0, 1, 3, 2]))  # (B, H, T, S)
        scores = g.op("Mul", scores, g.scalar("attn_scale", 1 / math.sqrt(d)))
        p = g.op("Softmax", g.op("Where", self.mask, scores, g.scalar("neg_inf", -np.inf)), axis=-1)
        y = g.op("Transpose", g.op("MatMul", p, v), perm=[0, 2, 1, 3])  # (B, T, H, D)
        y = g.op("Reshape", y, g.ints(f"blocks.{i}.attn.merge", 0, 0, heads * d))
        return self.linear(y, f"blocks.{i}.attn.proj")

    def mlp(self, x: str, i: int) -> str:
        g, name = self.g, f"blocks.{i}.mlp"
        if self.config.mlp == "swiglu":
            gate = self.linear(x, f"{name}.gate")
            h = g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate)), self.linear(x, f"{name}.fc"))
        elif self.config.mlp == "relu2":
            u = g.op("Relu", self.linear(x, f"{name}.fc"))
            h = g.op("Mul", u, u)
        else:  # tanh-approximated GELU (GPT-2's gelu_new)
            u = self.linear(x, f"{name}.fc")
            cubic = g.op("Mul", g.op("Mul", g.op("Mul", u, u), u), g.scalar("gelu_c", 0.044715))
            inner = g.op("Mul", g.op("Add", u, cubic), g.scalar("gelu_k", math.sqrt(2 / math.pi)))
            one_plus_tanh = g.op("Add", g.op("Tanh", inner), g.scalar("one", 1.0))
            h = g.op("Mul", g.op("Mul", u, g.scalar("half", 0.5)), one_plus_tanh)
        return self.linear(h, f"{name}.proj")

    def positions(self) -> None:
        """pos = past_sequence + 0..T-1; the causal mask (T, S) lets query t see keys 0..pos[t]."""
        g = self.g
        past = g.op("Squeeze", g.op("Shape", "past_key_values.0.key", start=2, end=3))
        total = g.op("Add", past, g.op("Squeeze", g.op("Shape", "input_ids", start=1, end=2)))
        one, zero = g.const("one_i64", np.array(1, dtype=np.int64)), g.const("zero_i64", np.array(0, dtype=np.int64))
        self.pos = g.op("Range", past, total, one)
        keys = g.op("Range", zero, total, one)
        self.mask = g.op("LessOrEqual", g.op("Unsqueeze", keys, g.ints("axis0", 0)),
                         g.op("Unsqueeze", self.pos, g.ints("axis1", 1)))
        if self.config.pos == "rope":
            cos, sin = rope_cache(self.config)
            self.cos = g.op("Gather", g.const("rope_cos", cos.numpy()), self.pos)
            self.sin = g.op("Gather", g.const("rope_sin", sin.numpy()), self.pos)

    def build(self) -> onnx.ModelProto:
        g, c = self.g, self.config
        self.positions()
        x = g.op("Gather", self.weight("tok_emb.weight"), "input_ids")  # (B, T, C)
        if c.pos == "learned":
            x = g.op("Add", x, g.op("Gather", self.weight("pos_emb.weight"), self.pos))
        if c.embed_norm:
            x = self.norm(x, "norm_emb")
        for i in range(c.n_layer):
            x = g.op("Add", x, self.attention(self.norm(x, f"blocks.{i}.norm1"), i))
            x = g.op("Add", x, self.mlp(self.norm(x, f"blocks.{i}.norm2"), i))
        x = self.norm(x, "norm_f")
        tied = self.src.weights["lm_head.weight"] is self.src.weights["tok_emb.weight"]
        # A tied head reads the embedding's table (onnxruntime folds the transpose once, at load).
        head = g.op("Transpose", "tok_emb.weight", perm=[1, 0]) if tied else \
            self.weight("lm_head.weight", transpose=True)
        if c.logit_softcap is None:
            g.op("MatMul", x, head, name="logits")
        else:  # cap · tanh(logits / cap)
            cap = g.scalar("logit_softcap", c.logit_softcap)
            capped = g.op("Tanh", g.op("Div", g.op("MatMul", x, head), cap))
            g.op("Mul", capped, cap, name="logits")
        return self.model()

    def model(self) -> onnx.ModelProto:
        c = self.config
        kv = [(f"{i}.{part}", c.layer_heads(i)[1]) for i in range(c.n_layer) for part in ("key", "value")]
        inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])]
        inputs += [helper.make_tensor_value_info(f"past_key_values.{name}", TensorProto.FLOAT,
                                                 ["batch", h, "past_sequence", c.head_dim]) for name, h in kv]
        outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", c.vocab_size])]
        outputs += [helper.make_tensor_value_info(f"present.{name}", TensorProto.FLOAT,
                                                  ["batch", h, "total_sequence", c.head_dim]) for name, h in kv]
        graph = helper.make_graph(self.g.nodes, "leangpt", inputs, outputs, self.g.initializers)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="leangpt")


def decoder_graph(src: Source) -> onnx.ModelProto:
    return Decoder(src).build()


def write_onnx(src: Source, directory: Path, type_name: str) -> dict[str, Any]:
    """model.onnx (weights in model.onnx.data beside it past 1 GB), the tokenizer files and config.json, into
    an existing directory; int8 quantizes the MatMul weights with onnxruntime's own dynamic quantization."""
    model = decoder_graph(src)
    weight_bytes = sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)
    fp32_path = directory / ("model.onnx" if type_name != "int8" else "model-fp32.onnx")
    onnx.save_model(model, str(fp32_path), save_as_external_data=weight_bytes > 1 << 30,
                    location=fp32_path.name + ".data")
    onnx.checker.check_model(str(fp32_path))
    if type_name == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # the quantizer advises pre-processing through the root logger on every call
        try:
            # reduce_range (7-bit weights): without VNNI, onnxruntime's u8 x s8 kernels sum pairs in int16 and
            # saturate on full-range weights (KL to fp32 0.015 on an AVX2-only EPYC, against < 1e-3 with it)
            quantize_dynamic(fp32_path, directory / "model.onnx", weight_type=QuantType.QInt8, per_channel=True,
                             reduce_range=True, op_types_to_quantize=["MatMul"],
                             use_external_data_format=weight_bytes > 1 << 30)
        finally:
            root.setLevel(level)
        for f in directory.glob("model-fp32.onnx*"):
            f.unlink()
    src.tokenizer.save(directory)
    shutil.copyfile(src.directory / "config.json", directory / "config.json")
    return {"opset": OPSET, "inputs": [i.name for i in model.graph.input],
            "outputs": [o.name for o in model.graph.output], "weight_bytes": weight_bytes}
