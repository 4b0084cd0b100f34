"""Exported models in their own runtimes: a GGUF file in llama.cpp (through llama-cpp-python's C API, an
optional install: `pip install -e ".[llamacpp]"`) and an ONNX directory in onnxruntime.

Both runners take rows of token ids and return next-token logits, keep a KV cache between calls, decode
greedily and time a generation the way `leangpt bench` does (time to the first token, then the rest), so
tests compare them with leangpt and bench/bench_export.py and the pipeline put them side by side.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from leangpt.errors import UserError


def llama_cpp_version() -> str | None:
    """llama-cpp-python's version, or None where it is not installed."""
    try:
        import llama_cpp
    except ImportError:
        return None
    return llama_cpp.__version__


def llama_cpp_extra_buffers() -> bool:
    """Whether LlamaCppModel lets llama.cpp use its extra weight buffers (see there): not on CPUs with AMX."""
    import llama_cpp

    return b"AMX_INT8 = 1" not in llama_cpp.llama_print_system_info()


class LlamaCppModel:
    """A GGUF file loaded in llama.cpp with `n_seq` parallel sequences of up to `n_ctx` tokens each.

    The KV cache is kept in f32 (llama.cpp's default is f16), so that f32 weights give leangpt's logits.
    On CPUs with AMX, llama.cpp's extra weight buffers (AMX and weight repacking) are turned off: llama.cpp
    as vendored in llama-cpp-python 0.3.36 segfaults in its AMX matmul (ggml_backend_amx_mul_mat) on a batch of
    more than one token with quantized weights; llama.cpp's own tools have --no-repack for the same switch."""

    def __init__(self, path: Path, n_ctx: int, threads: int = 2, n_seq: int = 1, verbose: bool = False) -> None:
        import llama_cpp

        self.lib = llama_cpp
        logging.getLogger("llama-cpp-python").setLevel(logging.DEBUG if verbose else logging.ERROR)
        self.extra_buffers = llama_cpp_extra_buffers()
        mp = llama_cpp.llama_model_default_params()
        mp.use_extra_bufts = self.extra_buffers
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), mp)
        if not self.model:
            raise UserError(f"{path}: llama.cpp could not load this file")
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx, cp.n_seq_max = n_ctx * n_seq, n_seq
        cp.n_batch = cp.n_ubatch = n_ctx * n_seq
        cp.n_threads = cp.n_threads_batch = threads
        cp.type_k = cp.type_v = llama_cpp.GGML_TYPE_F32
        cp.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.ctx = llama_cpp.llama_init_from_model(self.model, cp)
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.batch = llama_cpp.llama_batch_init(n_ctx * n_seq, 0, n_seq)
        self.threads = threads

    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's own tokenization of text (no BOS, special tokens read as text)."""
        data = text.encode()
        out = (self.lib.llama_token * (len(data) + 8))()
        n = self.lib.llama_tokenize(self.vocab, data, len(data), out, len(out), False, False)
        return list(out[:n])

    def reset(self) -> None:
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)

    def forward(self, rows: list[list[int]], start: int, all_logits: bool = False) -> np.ndarray:
        """Logits (R, T, V) of every row's tokens at positions start.. (all_logits), or (R, V) of the last one.
        Row r is sequence r of the cache; every row has the same length."""
        b, length = self.batch, len(rows[0])
        b.n_tokens = len(rows) * length
        for r, row in enumerate(rows):
            for t, token in enumerate(row):
                i = r * length + t
                b.token[i], b.pos[i], b.n_seq_id[i], b.seq_id[i][0] = token, start + t, 1, r
                b.logits[i] = all_logits or t == length - 1
        if self.lib.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")
        picked = range(b.n_tokens) if all_logits else [r * length + length - 1 for r in range(len(rows))]
        logits = np.stack([np.ctypeslib.as_array(self.lib.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,))
                           for i in picked])
        return logits.reshape(len(rows), length, -1) if all_logits else logits

    def close(self) -> None:
        if getattr(self, "ctx", None):
            self.lib.llama_batch_free(self.batch)
            self.lib.llama_free(self.ctx)
            self.lib.llama_model_free(self.model)
            self.ctx = self.model = None

    def __del__(self) -> None:
        self.close()

    def __enter__(self) -> "LlamaCppModel":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class OnnxModel:
    """An exported ONNX directory in onnxruntime, on `threads` threads; the cache is the graph's present.*
    outputs fed back as past_key_values.* inputs."""

    def __init__(self, directory: Path, threads: int = 2) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.log_severity_level = 3  # errors only
        self.session = ort.InferenceSession(str(directory / "model.onnx"), options, providers=["CPUExecutionProvider"])
        self.past_names = [i.name for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        self.kv_shapes = {i.name: (i.shape[1], i.shape[3])  # (kv heads, head dim) of each layer's cache
                          for i in self.session.get_inputs() if i.name in self.past_names}
        self.past: list[np.ndarray] = []
        self.threads = threads

    def reset(self) -> None:
        self.past = []

    def forward(self, rows: list[list[int]], start: int, all_logits: bool = False) -> np.ndarray:
        """Logits (R, T, V) of every row's tokens at positions start.. (all_logits), or (R, V) of the last one;
        the cache holds positions 0..start-1 (start 0: an empty cache of len(rows) rows)."""
        if start == 0:
            shapes = map(self.kv_shapes.get, self.past_names)
            self.past = [np.zeros((len(rows), h, 0, d), np.float32) for h, d in shapes]
        if self.past[0].shape[2] != start:
            raise ValueError(f"the cache holds {self.past[0].shape[2]} positions, not {start}")
        feeds = {"input_ids": np.asarray(rows, dtype=np.int64), **dict(zip(self.past_names, self.past))}
        logits, *self.past = self.session.run(None, feeds)
        return logits if all_logits else logits[:, -1]


def greedy(model: LlamaCppModel | OnnxModel, prompts: list[list[int]],
           new_tokens: int) -> tuple[list[list[int]], float, float]:
    """Greedy continuations of equal-length prompts from an empty cache, and the seconds to the first new
    token and from then to the last (as leangpt.bench.timed_run times leangpt's engine)."""
    t0 = time.perf_counter()
    model.reset()
    tokens = model.forward(prompts, 0).argmax(-1)
    out = [[int(t)] for t in tokens]
    first = time.perf_counter()
    for n in range(1, new_tokens):
        tokens = model.forward([[int(t)] for t in tokens], len(prompts[0]) + n - 1).argmax(-1)
        for row, t in zip(out, tokens):
            row.append(int(t))
    return out, first - t0, time.perf_counter() - first


def speed(model: LlamaCppModel | OnnxModel, batch: int, prompt_tokens: int, new_tokens: int, repeats: int = 3,
          vocab_size: int | None = None) -> dict[str, float]:
    """Prefill and decode tokens/s of random prompts, greedy, the full budget: one warm-up, medians of repeats."""
    vocab = vocab_size or getattr(model, "n_vocab", None)
    runs = []
    for r in range(repeats + 1):
        prompts = np.random.default_rng(r).integers(0, vocab, (batch, prompt_tokens)).tolist()
        runs.append(greedy(model, prompts, new_tokens)[1:])
    ttft = float(np.median([t for t, _ in runs[1:]]))
    decode = float(np.median([d for _, d in runs[1:]]))
    return {"prefill_tokens_per_s": round(batch * prompt_tokens / ttft, 2),
            "decode_tokens_per_s": round(batch * (new_tokens - 1) / decode, 2) if new_tokens > 1 else None,
            "time_to_first_token_s": round(ttft, 5), "threads": model.threads}


def gguf_speed(path: Path, batch: int = 1, prompt_tokens: int = 32, new_tokens: int = 128, threads: int = 2,
               repeats: int = 3) -> dict[str, Any]:
    """llama.cpp's speed on a GGUF file, as `leangpt bench` measures leangpt's; a UserError when
    llama-cpp-python is not installed."""
    version = llama_cpp_version()
    if version is None:
        raise UserError('llama-cpp-python is not installed (pip install -e ".[llamacpp]"; it builds llama.cpp)')
    with LlamaCppModel(path, prompt_tokens + new_tokens, threads, n_seq=batch) as model:
        return {"runtime": f"llama.cpp (llama-cpp-python {version})", "batch": batch,
                "extra_buffers": model.extra_buffers, **speed(model, batch, prompt_tokens, new_tokens, repeats)}


def onnx_speed(directory: Path, vocab_size: int, batch: int = 1, prompt_tokens: int = 32, new_tokens: int = 128,
               threads: int = 2, repeats: int = 3) -> dict[str, Any]:
    """onnxruntime's speed on an exported ONNX directory, as gguf_speed."""
    import onnxruntime

    model = OnnxModel(directory, threads)
    return {"runtime": f"onnxruntime {onnxruntime.__version__}", "batch": batch,
            **speed(model, batch, prompt_tokens, new_tokens, repeats, vocab_size)}

