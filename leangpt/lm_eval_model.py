"""A leangpt model as an lm-evaluation-harness `LM`: every checkpoint variant (dense, quantized, pruned,
distilled) runs lm-eval's tasks in-process.

- loglikelihood: requests batched through the model's forward, right-padded (causal attention keeps the padding
  out of every scored position), context cut from the left to the model's window, the output head applied only
  where a continuation token is predicted;
- generate_until: the generation engine through leangpt.generate's text layer, with lm-eval's `until` strings as
  stop strings (greedy unless the task asks for sampling);
- loglikelihood_rolling: the windowed scorer of `leangpt eval` (evaluate_tokens) over [end-of-text] + document.

Scoring runs at `leangpt eval`'s precision: fp32 on CPUs, bf16 autocast on GPUs. This module imports lm_eval,
the optional `eval` extra; leangpt.evaluate imports it only when tasks are asked for.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lm_eval
import numpy as np
import torch
import torch.nn.functional as F
from datasets.exceptions import DatasetsError
from lm_eval.api.model import TemplateLM
from lm_eval.evaluator import simple_evaluate
from lm_eval.tasks import TaskManager
from tqdm import tqdm

from leangpt.data.tokenizer import TextTokenizer
from leangpt.device import autocast
from leangpt.engine import Engine
from leangpt.errors import UserError
from leangpt.evaluate import evaluate_tokens
from leangpt.generate import TextRequest, generate_texts
from leangpt.model import GPT
from leangpt.sampling import SamplingConfig

DEFAULT_GEN_TOKENS = 256  # lm-eval's own default for max_gen_toks


class LeanGPTLM(TemplateLM):
    """lm-eval's view of one loaded model and its tokenizer; `batch_size` rows per forward pass or generation."""

    def __init__(self, model: GPT, tokenizer: TextTokenizer, batch_size: int = 8, progress: bool = False) -> None:
        super().__init__()
        # Not `tokenizer`: TemplateLM reads that attribute as a Hugging Face tokenizer (chat templates).
        self.model, self.tokenizer_ = model.eval(), tokenizer
        self._device = next(model.parameters()).device
        self.batch_size, self.progress = batch_size, progress
        self._engine: Engine | None = None
        # Measurements are comparable only at one precision (as in evaluate_tokens).
        self._dtype = torch.float32 if self._device.type == "cpu" else None

    # ------------------------------------------------------------ what TemplateLM asks for
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer_.eos_id

    @property
    def max_length(self) -> int:
        return self.model.config.block_size

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.tokenizer_.encode(string)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer_.decode(tokens)

    # ------------------------------------------------------------ loglikelihood
    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        """(sum of the continuation's log-probabilities, whether greedy decoding gives the continuation) of each
        (context ids, continuation ids), longest first so that a batch pads little."""
        rows = [self._scored_row(context, continuation) for _, context, continuation in requests]
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        for batch in tqdm(batches, desc="loglikelihood", disable=disable_tqdm or not self.progress, leave=False):
            for i, result in zip(batch, self._score_batch([rows[i] for i in batch])):
                results[i] = result
        return results

    def _scored_row(self, context: list[int], continuation: list[int]) -> tuple[list[int], list[int]]:
        """The model's input (context + continuation less its last token, cut from the left to the window) and
        the continuation, which its last len(continuation) positions predict."""
        if not continuation:
            raise UserError("lm-eval asked for the loglikelihood of an empty continuation")
        if len(continuation) > self.max_length:
            raise UserError(f"a continuation of {len(continuation)} tokens does not fit the model's context of "
                            f"{self.max_length}")
        return (context + continuation)[-(self.max_length + 1):-1], continuation

    @torch.no_grad()
    def _score_batch(self, rows: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        width = max(len(inp) for inp, _ in rows)
        x = torch.zeros(len(rows), width, dtype=torch.long)
        for b, (inp, _) in enumerate(rows):
            x[b, :len(inp)] = torch.tensor(inp)
        with autocast(self._device, self._dtype):
            hidden = self.model.forward_hidden(x.to(self._device))  # (B, T, C)
            # The head only where a continuation token is predicted: most of a row is context.
            picked = torch.cat([hidden[b, len(inp) - len(cont):len(inp)] for b, (inp, cont) in enumerate(rows)])
            logits = self._head(picked)  # (sum of continuation lengths, vocab)
        logp = F.log_softmax(logits.float(), dim=-1)
        targets = torch.tensor([t for _, cont in rows for t in cont], device=logp.device)
        token_logp, greedy = logp.gather(1, targets[:, None])[:, 0], logp.argmax(-1) == targets
        out, start = [], 0
        for _, cont in rows:
            end = start + len(cont)
            out.append((token_logp[start:end].sum().item(), bool(greedy[start:end].all())))
            start = end
        return out

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's logits from final hidden states: its output head, then its logit softcap if it has one
        (the last step of GPT.forward)."""
        logits = self.model.lm_head(hidden)
        cap = self.model.config.logit_softcap
        return logits if cap is None else cap * torch.tanh(logits / cap)

    # ------------------------------------------------------------ rolling loglikelihood
    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole document after the end-of-text token, over consecutive windows of the
        model's context, as `leangpt eval` scores a split (every token a target once)."""
        out = []
        for (text,) in tqdm([r.args for r in requests], desc="rolling loglikelihood",
                            disable=disable_tqdm or not self.progress, leave=False):
            tokens = np.array([self.eot_token_id, *self.tok_encode(text)], dtype=np.int64)
            if len(tokens) < 2:
                out.append(0.0)
                continue
            scores = evaluate_tokens(self.model, tokens, self.tokenizer_.token_bytes, self.max_length,
                                     self.batch_size)
            out.append(-scores["loss"] * scores["tokens"])
        return out

    # ------------------------------------------------------------ generation
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Each (context, generation settings) continued until one of its `until` strings (not included), the
        end-of-text token or max_gen_toks; requests with the same settings are decoded together."""
        if self._engine is None:
            self._engine = Engine(self.model)
        texts: list[str] = [""] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(json.dumps(r.args[1], sort_keys=True, default=str), []).append(i)
        for indices in groups.values():
            kwargs = dict(requests[indices[0]].args[1])
            for start in tqdm(range(0, len(indices), self.batch_size), desc="generate_until",
                              disable=disable_tqdm or not self.progress, leave=False):
                batch = indices[start:start + self.batch_size]
                text_requests = [self._text_request(requests[i].args[0], kwargs, seed=i) for i in batch]
                with torch.inference_mode():
                    records = generate_texts(self._engine, self.tokenizer_, text_requests)
                for i, record in zip(batch, records):
                    texts[i] = record["text"]
        return texts

    def _text_request(self, context: str, kwargs: dict[str, Any], seed: int) -> TextRequest:
        """lm-eval's generation settings as a TextRequest, the context cut from the left to leave room for
        max_gen_toks in the model's window."""
        until = kwargs.get("until") or [self.tokenizer_.eos_token]
        until = [until] if isinstance(until, str) else list(until)
        max_new = max(1, min(int(kwargs.get("max_gen_toks", DEFAULT_GEN_TOKENS)), self.max_length - 1))
        sampling = SamplingConfig(temperature=0.0)
        if kwargs.get("do_sample"):
            sampling = SamplingConfig(temperature=float(kwargs.get("temperature", 1.0)),
                                      top_k=int(kwargs.get("top_k") or 0), top_p=float(kwargs.get("top_p", 1.0)))
        return TextRequest(self._fit_prompt(context, self.max_length - max_new), max_new, sampling, seed, tuple(until))

    def _fit_prompt(self, context: str, budget: int) -> str:
        """The context, or its end that encodes to at most `budget` tokens (at least one: the engine needs a
        prompt; an empty context becomes the end-of-text token)."""
        if not context:
            return self.tokenizer_.eos_token
        ids = self.tok_encode(context)
        keep = budget
        while len(ids) > budget:  # a cut decoded and encoded again can take a few more tokens: cut more
            context = self.tok_decode(ids[-keep:])
            ids, keep = self.tok_encode(context), keep - 1
        return context

    def get_model_info(self) -> dict[str, Any]:
        return {"model_num_parameters": sum(p.numel() for p in self.model.parameters())}


# ---------------------------------------------------------------- running tasks

def _task_manager(names: list[str], include: list[Path]) -> TaskManager:
    """lm-eval's index of tasks: of the include paths alone when they hold every task asked for (indexing
    lm-eval's own thousands of tasks takes seconds), else with lm-eval's own too."""
    for path in include:
        if not Path(path).is_dir():
            raise UserError(f"--include-path {path}: directory not found")
    missing: list[str] = names
    for with_defaults in (False, True) if include else (True,):
        manager = TaskManager(include_path=[str(p) for p in include] or None, include_defaults=with_defaults)
        missing = [n for n in names if n not in manager.all_tasks and not Path(n).is_file()]
        if not missing:
            return manager
    raise UserError(f"unknown lm-eval task{'s' if len(missing) > 1 else ''} {', '.join(missing)} (neither lm-eval's "
                    f"own nor in --include-path)")


def _metrics(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """lm-eval's results per task as {metric: value, metric_stderr: stderr (None where lm-eval has none),
    samples, num_fewshot}; a metric under a filter other than lm-eval's "none" keeps it as "metric,filter"."""
    out: dict[str, dict[str, Any]] = {}
    for name, values in results["results"].items():
        metrics: dict[str, Any] = {}
        for key, value in values.items():
            metric, _, filter_name = key.partition(",")
            if not filter_name:  # alias and other labels
                continue
            metrics[metric if filter_name == "none" else key] = None if value == "N/A" else value
        metrics["samples"] = results.get("n-samples", {}).get(name, {}).get("effective")
        metrics["num_fewshot"] = results.get("n-shot", {}).get(name)
        out[name] = metrics
    return out


def _per_document(results: dict[str, Any]) -> dict[str, dict[str, list[float]]]:
    """Each task's per-document metric values, in document order: {task: {metric: [value, ...]}} (for
    perplexity, the document's loglikelihood, which lm-eval's perplexity aggregates)."""
    out: dict[str, dict[str, list[float]]] = {}
    for name, samples in results.get("samples", {}).items():
        ordered = sorted(samples, key=lambda sample: sample["doc_id"])
        metrics = ordered[0]["metrics"] if ordered else []
        out[name] = {m: [float(sample[m]) for sample in ordered] for m in metrics}
    return out


def run_tasks(lm: LeanGPTLM, names: list[str], include: list[Path], limit: int | None = None,
              num_fewshot: int | None = None, bootstrap_iters: int = 1000, log_samples: bool = False) -> dict[str, Any]:
    """lm-eval's tasks `names` (found in lm-eval's own tasks or the include paths) scored with `lm`: tasks
    ({name: metrics, see _metrics}), limit, lm_eval_version; with log_samples, also samples (_per_document)."""
    manager = _task_manager(names, include)
    try:
        results = simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                                  bootstrap_iters=bootstrap_iters, log_samples=log_samples)
    except (ConnectionError, DatasetsError, FileNotFoundError) as e:  # offline, a hub dataset not in the cache;
        # a local data file that is not there
        raise UserError(f"a task's dataset cannot be loaded: {str(e).splitlines()[0]} (lm-eval downloads a "
                        f"hub dataset into the Hugging Face cache on a machine with internet)") from None
    out = {"tasks": _metrics(results), "limit": limit, "lm_eval_version": lm_eval.__version__}
    if log_samples:
        out["samples"] = _per_document(results)
    return out
