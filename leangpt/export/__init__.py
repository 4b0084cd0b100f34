"""`leangpt export`: a checkpoint as one GGUF file for llama.cpp, or an ONNX directory for onnxruntime.

GGUF (leangpt.export.gguf_file) covers `gpt2` and `llama` checkpoints, float or quantized, with the tokenizer
inside; ONNX (leangpt.export.onnx_graph) is a decoder graph with a KV cache, tokenizer.json beside it.
leangpt.export.runtimes runs both files in their runtimes (logits, greedy decoding, speed).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from leangpt import cli
from leangpt.checkpoint import load_config
from leangpt.cli import setting
from leangpt.errors import UserError
from leangpt.export import gguf_file, onnx_graph
from leangpt.export.source import read_source
from leangpt.fsutil import atomic_dir, check_output_dir, check_output_file

GGUF_TYPES = ("auto", "f32", "f16", "q8_0", "q4_0", "q4_1")
ONNX_TYPES = ("auto", "f32", "int8")


@dataclass
class ExportSettings:
    model: Path | None = setting(None, "checkpoint directory, float or quantized (leangpt quantize)", required=True)
    format: str | None = setting(None, "gguf: one file for llama.cpp; onnx: a directory for onnxruntime",
                                 choices=["gguf", "onnx"], required=True)
    out: Path | None = setting(None, "output: a .gguf file, or the ONNX directory", required=True)
    type: str = setting("auto", "weight type. gguf: f32, f16, q8_0, q4_0 or q4_1 for every weight matrix (norms, "
                                "biases and positions stay f32); auto keeps the checkpoint as it is: f32 for a float "
                                "one, and a quantized one's integers unchanged (int8 as q8_0, int4 with groups of "
                                "32k as q4_1; only the scales round to fp16); any other type requantizes a "
                                "quantized layer from its dequantized weights. onnx: f32, or int8 by onnxruntime's "
                                "dynamic quantization; a quantized checkpoint is dequantized (default: auto)",
                   choices=sorted(set(GGUF_TYPES + ONNX_TYPES)))
    overwrite: bool = setting(False, "replace --out if it exists")
    progress: bool = setting(True, "show a progress bar on stderr", cli=False)

    def validate(self) -> None:
        allowed = GGUF_TYPES if self.format == "gguf" else ONNX_TYPES
        if self.type not in allowed:
            raise UserError(f"--type {self.type} does not apply to --format {self.format}; "
                            f"choose from {', '.join(allowed)}")


def _export_gguf(s: ExportSettings) -> dict[str, Any]:
    gguf_file.architecture(load_config(s.model))  # refuse before reading any weights
    src = read_source(s.model)
    s.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = s.out.with_name(f".{s.out.name}.tmp-{os.getpid()}")
    try:
        result = gguf_file.write_gguf(src, tmp, s.type, progress=s.progress)
        os.replace(tmp, s.out)
    finally:
        tmp.unlink(missing_ok=True)
    return result


def _export_onnx(s: ExportSettings) -> dict[str, Any]:
    src = read_source(s.model)
    type_name = "f32" if s.type == "auto" else s.type
    with atomic_dir(s.out) as tmp:
        result = {"type": type_name, **onnx_graph.write_onnx(src, tmp, type_name),
                  "dequantized_from": src.scheme_name}
        meta = {"kind": "export", "parent": str(s.model), "format": "onnx", **result}
        (tmp / "leangpt.json").write_text(json.dumps(meta, indent=2))
    return result


def export(s: ExportSettings) -> dict[str, Any]:
    """Write s.model as s.format at s.out; returns what was written (type, tensors, sizes, seconds)."""
    s.validate()
    if s.format == "gguf":
        check_output_file(s.out, s.overwrite)
    else:
        check_output_dir(s.out, s.overwrite)
    t0 = time.perf_counter()
    result = _export_gguf(s) if s.format == "gguf" else _export_onnx(s)
    size = s.out.stat().st_size if s.out.is_file() else sum(f.stat().st_size for f in s.out.glob("model.onnx*"))
    parent_size = sum(f.stat().st_size for f in s.model.glob("model*.safetensors"))
    return {"out": str(s.out), "format": s.format, **result,
            "size_bytes": size, "parent_size_bytes": parent_size, "seconds": time.perf_counter() - t0}


def build_parser() -> cli.ArgumentParser:
    return cli.build_parser(ExportSettings, "export", "Export a checkpoint to GGUF (llama.cpp, Ollama, LM Studio) "
                            "or ONNX (onnxruntime), float or quantized.")


def main(argv: list[str] | None = None) -> int:
    settings, output = cli.parse(build_parser(), argv)
    result = export(settings)
    if output.json:
        cli.print_json(result)
        return 0
    line = f"wrote {result['out']}: {result['format']} {result['type']}, {result['size_bytes'] / 1e6:.1f} MB"
    if result["format"] == "gguf":
        types = ", ".join(f"{n} {t}" for t, n in result["tensor_types"].items())
        line += f", {result['architecture']}, {result['tensors']} tensors ({types})"
        if result["kept_integers"]:
            line += f", {result['kept_integers']} with their integers kept"
        if result["requantized"]:
            line += f", {len(result['requantized'])} requantized"
    elif result["dequantized_from"]:
        line += f", dequantized from {result['dequantized_from']}"
    print(f"{line}, {result['seconds']:.1f}s")
    return 0
