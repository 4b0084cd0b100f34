"""`leangpt <command>`: the subcommand table. Each command's module has a main(argv) -> int."""

from __future__ import annotations

import importlib
import sys

from leangpt.errors import UserError

COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("leangpt.data.prepare", "clean, filter and dedup text, train a tokenizer, write token shards"),
    "train": ("leangpt.train", "pretrain from scratch or fine-tune a checkpoint"),
    "eval": ("leangpt.evaluate", "held-out loss, perplexity and bits per byte"),
    "generate": ("leangpt.generate", "generate text from a prompt or a file of prompts (batched, speculative)"),
    "bench": ("leangpt.bench", "speed, memory and size of one or more checkpoints, side by side"),
    "distill": ("leangpt.distill", "train a smaller student from a teacher (soft targets, layer-initialised)"),
    "quantize": ("leangpt.quantize", "int8 / int4 weight quantization, round-to-nearest or GPTQ"),
    "prune": ("leangpt.prune", "unstructured, N:M and structured (smaller dense model) pruning"),
    "export": ("leangpt.export", "GGUF for llama.cpp and ONNX for onnxruntime, float or quantized"),
    "serve": ("leangpt.serve", "OpenAI-compatible HTTP server (completions, chat, streaming, batched requests)"),
    "pipeline": ("leangpt.pipeline", "the main job: data, train, quantize/prune/distill, eval and bench all, report"),
}


def usage() -> str:
    lines = ["usage: leangpt <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {summary}" for name, (_, summary) in COMMANDS.items()]
    lines += ["", "Run `leangpt <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"leangpt: error: unknown command {name!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    try:
        return module.main(rest)
    except UserError as e:
        print(f"leangpt {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"leangpt {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
