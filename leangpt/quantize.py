"""`leangpt quantize`: int8 / int4 weight-only quantization of a checkpoint, round-to-nearest or GPTQ."""

from __future__ import annotations

import time
from pathlib import Path

from leangpt import cli
from leangpt.calibration import calibration_tokens
from leangpt.checkpoint import load_checkpoint, read_meta
from leangpt.data.shards import Dataset
from leangpt.device import pick_device
from leangpt.errors import UserError
from leangpt.fsutil import atomic_dir, check_output_dir
from leangpt.quant.formats import Scheme
from leangpt.quant.model import bits_per_weight, quantize_model, save_quantized

METHODS = {"int8": ("rtn", 8), "int4": ("rtn", 4), "gptq-int8": ("gptq", 8), "gptq-int4": ("gptq", 4)}


def build_parser() -> cli.ArgumentParser:
    p = cli.parser("quantize", "Quantize a checkpoint's linear layers to int8 (per output channel) or int4 "
                               "(group-wise), by round-to-nearest or GPTQ.")
    p.add_argument("--model", type=Path, required=True, help="float checkpoint directory")
    p.add_argument("--method", required=True, choices=list(METHODS),
                   help="int8 / int4: round-to-nearest; gptq-int8 / gptq-int4: GPTQ with calibration data")
    p.add_argument("--group-size", type=int, default=64,
                   help="int4: input columns sharing one scale and zero point (32, 64, 128 are usual)")
    p.add_argument("--calib-data", type=Path, help="GPTQ: dataset directory (from `leangpt prepare`) to calibrate on")
    p.add_argument("--calib-samples", type=int, default=128, help="GPTQ: calibration windows")
    p.add_argument("--calib-seq-len", type=int, help="GPTQ: tokens per calibration window (default: min(256, context))")
    p.add_argument("--calib-split", default="train", choices=["train", "val"], help="GPTQ: split to draw windows from")
    p.add_argument("--damp", type=float, default=0.01, help="GPTQ: Hessian damping as a fraction of its mean diagonal")
    p.add_argument("--act-order", action="store_true", help="GPTQ: quantize columns by decreasing Hessian diagonal")
    p.add_argument("--quantize-head", action="store_true",
                   help="also quantize the output head (default: kept in full precision)")
    p.add_argument("--quantize-embedding", action="store_true",
                   help="also quantize the token embedding (round-to-nearest); with tied embeddings the head "
                        "computes from the same quantized table (default: kept in full precision)")
    p.add_argument("--seed", type=int, default=0, help="seed for drawing calibration windows")
    p.add_argument("--device", default="auto", help="device to quantize on (the result loads on any device)")
    p.add_argument("--out", type=Path, required=True, help="output checkpoint directory")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object on stdout")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    method, bits = METHODS[args.method]
    scheme = Scheme(bits, args.group_size if bits == 4 else None)
    if not 0 <= args.damp < 1:
        raise UserError(f"--damp must be in [0, 1), got {args.damp}")
    check_output_dir(args.out, args.overwrite)
    if read_meta(args.model).get("quantization"):
        raise UserError(f"{args.model} is already quantized; quantize its float parent instead")
    device = pick_device(args.device)
    model, tokenizer, parent_meta = load_checkpoint(args.model, device)
    tokens = None
    if method == "gptq":
        if args.calib_data is None:
            raise UserError(f"--method {args.method} needs --calib-data DIR")
        if args.calib_samples < 1:
            raise UserError(f"--calib-samples must be >= 1, got {args.calib_samples}")
        if Dataset(args.calib_data).manifest.get("tokenizer_sha256") != tokenizer.sha256():
            raise UserError(f"{args.calib_data} was tokenized with a different tokenizer than {args.model}")
        seq_len = args.calib_seq_len or min(256, model.config.block_size)
        if not 0 < seq_len <= model.config.block_size:
            raise UserError(f"--calib-seq-len must be in 1..{model.config.block_size}")
        tokens = calibration_tokens(args.calib_data, args.calib_samples, seq_len, args.seed, args.calib_split)
    t0 = time.perf_counter()
    qweights = quantize_model(model, scheme, method, tokens, args.quantize_head, args.damp, args.act_order,
                              progress=True, include_embedding=args.quantize_embedding)
    seconds = time.perf_counter() - t0
    meta = {"kind": "quantize", "parent": str(args.model), "method": args.method,
            "calibration": None if tokens is None else {
                "data": str(args.calib_data), "samples": args.calib_samples, "seq_len": tokens.shape[1],
                "split": args.calib_split, "seed": args.seed, "damp": args.damp, "act_order": args.act_order},
            "quantize_head": args.quantize_head, "quantize_embedding": args.quantize_embedding,
            "parent_meta": parent_meta}
    with atomic_dir(args.out) as tmp:
        save_quantized(tmp, model, qweights, scheme, "gptq" if method == "gptq" else "rtn", meta)
        tokenizer.save(tmp)
    size = (args.out / "model.safetensors").stat().st_size
    parent_size = sum(f.stat().st_size for f in args.model.glob("model*.safetensors"))
    result = {"out": str(args.out), "method": args.method, "scheme": scheme.name, "layers": len(qweights),
              "bits_per_weight": bits_per_weight(qweights), "size_bytes": size, "parent_size_bytes": parent_size,
              "size_ratio": size / parent_size if parent_size else None, "seconds": seconds}
    if args.json:
        cli.print_json(result)
    else:
        print(f"wrote {args.out}: {scheme.name} by {result['method']}, {len(qweights)} layers, "
              f"{result['bits_per_weight']:.2f} bits/weight, {size / 1e6:.1f} MB "
              f"({result['size_ratio']:.2f}x the parent), {seconds:.1f}s")
    return 0

