"""`leangpt eval`: held-out loss, perplexity and bits per byte of a checkpoint on a dataset's val split; or, with
tasks, lm-evaluation-harness tasks run in-process (leangpt.lm_eval_model), shakespeare-lambada among them."""

from __future__ import annotations

import contextlib
import math
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from leangpt import cli
from leangpt.cli import setting
from leangpt.checkpoint import load_checkpoint
from leangpt.data import lambada
from leangpt.data.shards import Dataset, sequential_windows
from leangpt.device import autocast, pick_device
from leangpt.errors import UserError
from leangpt.model import GPT


@dataclass
class EvalSettings:
    model: Path | None = setting(None, "checkpoint directory", required=True)
    data: Path | None = setting(None, "dataset directory made by `leangpt prepare` (required unless --tasks; with "
                                      "--tasks, the dataset shakespeare-lambada is built from)")
    split: str = setting("val", "which split to score", choices=["val", "train"])
    block_size: int | None = setting(None, "context length of each window (default: the model's)")
    batch_size: int = setting(8, "windows (with --tasks, requests) per forward pass")
    max_tokens: int | None = setting(None, "score only the first N tokens of the split")
    reference: Path | None = setting(None, "checkpoint to compare with: adds the mean KL(reference || model) of "
                                           "next-token distributions over the same windows, and top-1 agreement")
    tasks: list[str] = setting([], "lm-evaluation-harness tasks to run instead (comma-separated or repeated; "
                                   "needs `pip install 'leangpt[eval]'`): shakespeare-lambada (built from --data), "
                                   "those of --include-path, or lm-eval's own", metavar="NAME[,NAME...]")
    include_path: list[Path] = setting([], "directory of lm-eval task YAML files (repeatable)", metavar="DIR")
    limit: int | None = setting(None, "tasks: score only the first N documents of each (a quick look; the "
                                      "figures are then not the task's)")
    num_fewshot: int | None = setting(None, "tasks: examples in each prompt (default: the task's own, else 0)")
    bootstrap_iters: int = setting(1000, "tasks: bootstrap resamples for the stderr of metrics such as perplexity "
                                         "(lm-eval's command takes 100000; 0 skips those stderrs)")
    lambada_passages: int = setting(lambada.PASSAGES, "shakespeare-lambada: passages from the val split")
    write_tasks: Path | None = setting(None, "write shakespeare-lambada's YAML and JSONL into this directory and "
                                             "keep them (for `lm_eval --include_path DIR`)", metavar="DIR")
    log_samples: bool = setting(False, "tasks: add each document's metric values to the result (samples), for "
                                       "paired comparisons of models on the same documents")
    device: str = setting("auto", "auto, cpu, cuda, cuda:1, ...")
    progress: bool = setting(True, "show a progress bar on stderr", cli=False)

    def task_names(self) -> list[str]:
        return [name.strip() for item in self.tasks for name in item.split(",") if name.strip()]

    def validate(self) -> None:
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise UserError(f"--max-tokens must be >= 1, got {self.max_tokens}")
        if not self.task_names():
            if self.data is None:
                raise UserError("--data is required")
            return
        if self.reference is not None:
            raise UserError("--reference compares bits-per-byte scores; it does not apply to --tasks")
        if lambada.TASK in self.task_names() and self.data is None:
            raise UserError(f"task {lambada.TASK} is built from a dataset's val split: give --data DIR")
        for name, least in (("limit", 1), ("num_fewshot", 0), ("bootstrap_iters", 0), ("lambada_passages", 1)):
            value = getattr(self, name)
            if value is not None and value < least:
                raise UserError(f"--{name.replace('_', '-')} must be >= {least}, got {value}")


@torch.no_grad()
def evaluate_tokens(model: torch.nn.Module, tokens: np.ndarray, token_bytes: np.ndarray, block_size: int,
                    batch_size: int = 8, max_tokens: int | None = None, progress: bool = False,
                    reference: torch.nn.Module | None = None) -> dict[str, Any]:
    """Loss over consecutive windows of the split; bits per byte = total nats / (bytes of the targets x ln 2).

    With a reference model (same vocabulary), also the mean KL(reference || model) of the next-token
    distributions over the same positions, and how often both rank the same token first (as llama.cpp's
    perplexity tool reports for quantized models).

    Bytes are counted per target token (byte-level BPE: every token is a fixed byte string), so any subset
    of the split gives an exact figure.
    """
    if len(tokens) < 2:
        raise UserError("val split has fewer than 2 tokens: nothing to evaluate")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    # Measurements are comparable only at one precision: fp32 on CPUs, bf16 autocast on GPUs.
    dtype = torch.float32 if device.type == "cpu" else None
    total_nats, total_tokens, total_bytes = 0.0, 0, 0
    total_kl, same_top1 = 0.0, 0
    windows = list(sequential_windows(tokens, block_size, batch_size, max_tokens))
    for rows in tqdm(windows, desc="eval", disable=not progress, leave=False):
        for length in sorted({len(r) for r in rows}):  # the last window can be shorter
            batch = torch.from_numpy(np.stack([r for r in rows if len(r) == length])).to(device)
            x, y = batch[:, :-1], batch[:, 1:]
            with autocast(device, dtype):
                logits = model(x)
            nats = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum")
            total_nats += nats.item()
            total_tokens += y.numel()
            total_bytes += int(token_bytes[y.cpu().numpy()].sum())
            if reference is not None:
                with autocast(device, dtype):
                    ref_logits = reference(x.to(next(reference.parameters()).device))
                logp = F.log_softmax(logits.float(), -1).reshape(-1, logits.size(-1))
                ref_logp = F.log_softmax(ref_logits.float().to(device), -1).reshape(-1, logits.size(-1))
                total_kl += F.kl_div(logp, ref_logp, log_target=True, reduction="sum").item()
                same_top1 += int((logp.argmax(-1) == ref_logp.argmax(-1)).sum())
    model.train(was_training)
    loss = total_nats / total_tokens
    result = {
        "loss": loss,
        "perplexity": math.exp(loss),
        "bits_per_byte": total_nats / (max(total_bytes, 1) * math.log(2)),
        "tokens": total_tokens,
        "bytes": total_bytes,
    }
    if reference is not None:
        result["kl"] = total_kl / total_tokens
        result["top1_agreement"] = same_top1 / total_tokens
    return result


def _load_reference(s: EvalSettings, tokenizer_sha256: str, block_size: int, device: torch.device) -> GPT:
    """The --reference model, checked to score the same tokens over the same windows."""
    reference, ref_tokenizer, _ = load_checkpoint(s.reference, device)
    if ref_tokenizer.sha256() != tokenizer_sha256:
        raise UserError(f"--reference {s.reference} has a different tokenizer than {s.model}")
    if block_size > reference.config.block_size:
        raise UserError(f"--reference {s.reference} has a context of {reference.config.block_size}, "
                        f"shorter than the block size {block_size}")
    return reference


def evaluate(s: EvalSettings) -> dict[str, Any]:
    """Score s.model on a split of s.data: model, split, loss, perplexity, bits_per_byte, tokens, bytes; with a
    reference also kl, top1_agreement and reference. With s.tasks, run lm-eval's tasks instead (evaluate_tasks)."""
    s.validate()
    if s.task_names():
        return evaluate_tasks(s)
    device = pick_device(s.device)
    dataset = Dataset(s.data)
    model, tokenizer, _ = load_checkpoint(s.model, device)
    if dataset.manifest.get("tokenizer_sha256") != tokenizer.sha256():
        raise UserError(f"{s.data} was tokenized with a different tokenizer than {s.model}")
    block_size = s.block_size or model.config.block_size
    if not 0 < block_size <= model.config.block_size:
        raise UserError(f"--block-size must be in 1..{model.config.block_size}")
    reference = None if s.reference is None else _load_reference(s, tokenizer.sha256(), block_size, device)
    scores = evaluate_tokens(model, dataset.tokens(s.split), tokenizer.token_bytes, block_size,
                             s.batch_size, s.max_tokens, progress=s.progress, reference=reference)
    result = {"model": str(s.model), "split": s.split, **scores}
    if reference is not None:
        result["reference"] = str(s.reference)
    return result


def _lm_eval_runner() -> Any:
    """leangpt.lm_eval_model, which needs the optional lm-eval package."""
    try:
        from leangpt import lm_eval_model
    except ModuleNotFoundError as e:
        if e.name is not None and e.name.split(".")[0] == "lm_eval":
            raise UserError("--tasks needs lm-evaluation-harness: pip install 'leangpt[eval]'") from None
        raise
    return lm_eval_model


@contextlib.contextmanager
def _task_dir(s: EvalSettings):
    """Where shakespeare-lambada is written when asked for: s.write_tasks, else a directory removed afterwards."""
    if s.write_tasks is not None:
        yield s.write_tasks
        return
    with tempfile.TemporaryDirectory(prefix="leangpt-tasks-") as tmp:
        yield Path(tmp)


def evaluate_tasks(s: EvalSettings) -> dict[str, Any]:
    """Run lm-eval's tasks s.tasks on s.model in-process: model, tasks ({name: {metric: value, metric_stderr:
    stderr, ..., samples, num_fewshot}}), limit and lm_eval_version; with s.log_samples also samples ({name:
    {metric: [per-document value, ...]}}, in document order). shakespeare-lambada is built from s.data."""
    s.validate()
    runner = _lm_eval_runner()
    names = s.task_names()
    device = pick_device(s.device)
    model, tokenizer, _ = load_checkpoint(s.model, device)
    with _task_dir(s) as task_dir:
        include = list(s.include_path)
        if lambada.TASK in names:
            if Dataset(s.data).manifest.get("tokenizer_sha256") != tokenizer.sha256():
                raise UserError(f"{s.data} was tokenized with a different tokenizer than {s.model}")
            lambada.write_lambada_task(s.data, task_dir, s.lambada_passages)
            include.append(task_dir)
        with _lm_eval_output(s.progress), _no_bootstrap_pool():
            result = runner.run_tasks(runner.LeanGPTLM(model, tokenizer, s.batch_size, s.progress), names, include,
                                      limit=s.limit, num_fewshot=s.num_fewshot, bootstrap_iters=s.bootstrap_iters,
                                      log_samples=s.log_samples)
    return {"model": str(s.model), **result}


def paired_difference(values: list[float], reference: list[float]) -> dict[str, float]:
    """Mean of values - reference over the same documents, and its standard error. Two models scored on the same
    documents differ far less from document to document than documents differ from each other, so this tells
    apart models whose own stderrs overlap (per-document values: evaluate's samples, with log_samples)."""
    if len(values) != len(reference) or len(values) < 2:
        raise UserError(f"a paired difference needs the same documents, at least 2 (got {len(values)} and "
                        f"{len(reference)})")
    d = np.asarray(values, dtype=np.float64) - np.asarray(reference, dtype=np.float64)
    return {"mean": float(d.mean()), "stderr": float(d.std(ddof=1) / math.sqrt(len(d)))}


@contextlib.contextmanager
def _lm_eval_output(progress: bool):
    """lm-eval prints to stdout, which is for the result: its output goes to stderr, or nowhere without progress
    (its progress bars and notes)."""
    with contextlib.ExitStack() as stack:
        sink = sys.stderr if progress else stack.enter_context(open(os.devnull, "w"))
        stack.enter_context(contextlib.redirect_stdout(sink))
        if not progress:
            stack.enter_context(contextlib.redirect_stderr(sink))
        yield


@contextlib.contextmanager
def _no_bootstrap_pool():
    """lm-eval bootstraps stderrs in a pool of processes unless DISABLE_MULTIPROC is set: forking a process that
    holds a model costs more than the few thousand resamples asked for here."""
    before = os.environ.get("DISABLE_MULTIPROC")
    os.environ["DISABLE_MULTIPROC"] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ["DISABLE_MULTIPROC"]
        else:
            os.environ["DISABLE_MULTIPROC"] = before


def _print_tasks(result: dict[str, Any]) -> None:
    for name, metrics in result["tasks"].items():
        shown = [f"{k} {_fmt(v)}" + (f" ± {_fmt(metrics[k + '_stderr'])}" if metrics.get(k + "_stderr") is not None
                                     else "")
                 for k, v in metrics.items()
                 if not k.endswith("_stderr") and k not in ("samples", "num_fewshot") and isinstance(v, (int, float))]
        samples = f"  ({metrics['samples']} samples)" if metrics.get("samples") else ""
        print(f"{name}: {'  '.join(shown)}{samples}")


def _fmt(value: float) -> str:
    return f"{value:.4f}" if abs(value) < 100 else f"{value:,.1f}"


def build_parser() -> cli.ArgumentParser:
    return cli.build_parser(EvalSettings, "eval", "Held-out loss, perplexity and bits per byte of a checkpoint on a "
                                                  "dataset's val split; or lm-evaluation-harness tasks (--tasks).")


def main(argv: list[str] | None = None) -> int:
    settings, output = cli.parse(build_parser(), argv)
    result = evaluate(settings)
    if output.json:
        cli.print_json(result)
    elif "tasks" in result:
        _print_tasks(result)
    else:
        print(f"{result['split']} loss {result['loss']:.4f}  perplexity {result['perplexity']:.2f}  "
              f"bits/byte {result['bits_per_byte']:.4f}  ({result['tokens']:,} tokens)")
        if "kl" in result:
            print(f"KL(reference || model) {result['kl']:.5f} nats/token  "
                  f"top-1 agreement {result['top1_agreement']:.2%}")
    return 0
