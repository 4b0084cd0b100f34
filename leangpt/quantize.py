"""`leangpt quantize`: int8 / int4 quantization of a checkpoint's weights, round-to-nearest or GPTQ; int4 products
round their inputs to int8 by default, int8 products on request (formats.round_activations)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from leangpt import cli
from leangpt.cli import setting
from leangpt.calibration import calibration_tokens
from leangpt.checkpoint import load_checkpoint, read_meta
from leangpt.data.shards import Dataset
from leangpt.device import pick_device
from leangpt.errors import UserError
from leangpt.fsutil import atomic_dir, check_output_dir
from leangpt.quant.formats import Scheme
from leangpt.quant.model import bits_per_weight, quantize_model, save_quantized

METHODS = {"int8": ("rtn", 8), "int4": ("rtn", 4), "gptq-int8": ("gptq", 8), "gptq-int4": ("gptq", 4)}


@dataclass
class QuantizeSettings:
    model: Path | None = setting(None, "float checkpoint directory", required=True)
    out: Path | None = setting(None, "output checkpoint directory", required=True)
    method: str | None = setting(None, "int8 / int4: round-to-nearest; gptq-int8 / gptq-int4: GPTQ with calibration data",
                                 choices=list(METHODS), required=True)
    group_size: int = setting(64, "int4: input columns sharing one scale and zero point (32, 64, 128 are usual)")
    activations: str | None = setting(None, "what each product's inputs are: int8 (rounded at every product, int4 "
                                            "per group of inputs as llama.cpp's CPU Q4 dot products do, int8 per "
                                            "input row as dynamic per-token w8a8: integer products) or float "
                                            "(default: int8 for int4, float for int8)", choices=["int8", "float"])
    calib_data: Path | None = setting(None, "GPTQ: dataset directory (from `leangpt prepare`) to calibrate on")
    calib_samples: int = setting(128, "GPTQ: calibration windows")
    calib_seq_len: int | None = setting(None, "GPTQ: tokens per calibration window (default: min(256, context))")
    calib_split: str = setting("train", "GPTQ: split to draw windows from", choices=["train", "val"])
    damp: float = setting(0.01, "GPTQ: Hessian damping as a fraction of its mean diagonal")
    act_order: bool = setting(False, "GPTQ: quantize columns by decreasing Hessian diagonal")
    quantize_head: bool = setting(True, "quantize the output head too, as llama.cpp's Q8_0/Q4_0 do (it is read "
                                       "for every token); --no-quantize-head keeps it in full precision")
    quantize_embedding: bool = setting(False, "also quantize the token embedding (round-to-nearest); with tied "
                                              "embeddings the head computes from the same quantized table "
                                              "(default: kept in full precision)")
    seed: int = setting(0, "seed for drawing calibration windows")
    device: str = setting("auto", "device to quantize on (the result loads on any device)")
    overwrite: bool = setting(False, "replace --out if it exists")
    progress: bool = setting(True, "show a progress bar on stderr", cli=False)

    def validate(self) -> None:
        if not 0 <= self.damp < 1:
            raise UserError(f"--damp must be in [0, 1), got {self.damp}")
        if self.calib_samples < 1:
            raise UserError(f"--calib-samples must be >= 1, got {self.calib_samples}")
        if self.method in METHODS and METHODS[self.method][0] == "gptq" and self.calib_data is None:
            raise UserError(f"--method {self.method} needs --calib-data DIR")


def quantize(s: QuantizeSettings) -> dict[str, Any]:
    """Quantize s.model into s.out; returns what was written (scheme, layers, bits per weight, sizes, seconds)."""
    s.validate()
    method, bits = METHODS[s.method]
    scheme = Scheme(bits, s.group_size if bits == 4 else None, s.activations or ("int8" if bits == 4 else "float"))
    check_output_dir(s.out, s.overwrite)
    if read_meta(s.model).get("quantization"):
        raise UserError(f"{s.model} is already quantized; quantize its float parent instead")
    device = pick_device(s.device)
    model, tokenizer, parent_meta = load_checkpoint(s.model, device)
    tokens = None
    if method == "gptq":
        if Dataset(s.calib_data).manifest.get("tokenizer_sha256") != tokenizer.sha256():
            raise UserError(f"{s.calib_data} was tokenized with a different tokenizer than {s.model}")
        seq_len = s.calib_seq_len or min(256, model.config.block_size)
        if not 0 < seq_len <= model.config.block_size:
            raise UserError(f"--calib-seq-len must be in 1..{model.config.block_size}")
        tokens = calibration_tokens(s.calib_data, s.calib_samples, seq_len, s.seed, s.calib_split)
    t0 = time.perf_counter()
    qweights = quantize_model(model, scheme, method, tokens, s.quantize_head, s.damp, s.act_order,
                              progress=s.progress, include_embedding=s.quantize_embedding)
    seconds = time.perf_counter() - t0
    meta = {"kind": "quantize", "parent": str(s.model), "method": s.method,
            "calibration": None if tokens is None else {
                "data": str(s.calib_data), "samples": s.calib_samples, "seq_len": tokens.shape[1],
                "split": s.calib_split, "seed": s.seed, "damp": s.damp, "act_order": s.act_order},
            "quantize_head": s.quantize_head, "quantize_embedding": s.quantize_embedding,
            "parent_meta": parent_meta}
    with atomic_dir(s.out) as tmp:
        save_quantized(tmp, model, qweights, scheme, "gptq" if method == "gptq" else "rtn", meta)
        tokenizer.save(tmp)
    size = (s.out / "model.safetensors").stat().st_size
    parent_size = sum(f.stat().st_size for f in s.model.glob("model*.safetensors"))
    return {"out": str(s.out), "method": s.method, "scheme": scheme.name, "layers": len(qweights),
            "quantized_layers": sorted(qweights), "tied_embeddings": model.config.tie_embeddings,
            "bits_per_weight": bits_per_weight(qweights), "size_bytes": size, "parent_size_bytes": parent_size,
            "size_ratio": size / parent_size if parent_size else None, "seconds": seconds}


def build_parser() -> cli.ArgumentParser:
    return cli.build_parser(QuantizeSettings, "quantize", "Quantize a checkpoint's linear layers to int8 (per "
                            "output channel) or int4 (group-wise), by round-to-nearest or GPTQ.")


def main(argv: list[str] | None = None) -> int:
    settings, output = cli.parse(build_parser(), argv)
    result = quantize(settings)
    if output.json:
        cli.print_json(result)
    else:
        print(f"wrote {result['out']}: {result['scheme']} by {result['method']}, {result['layers']} layers, "
              f"{result['bits_per_weight']:.2f} bits/weight, {result['size_bytes'] / 1e6:.1f} MB "
              f"({result['size_ratio']:.2f}x the parent), {result['seconds']:.1f}s")
    return 0
