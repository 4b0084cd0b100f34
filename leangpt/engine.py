"""The generation engine, gpt-fast's shape: a KV cache allocated once, one prefill, then one-token decode steps.

It depends only on the model interface: `setup_cache(batch, max_len)`, `forward(idx, input_pos) -> logits`
(input_pos (T,) shared by every row, or (B, T) per row), `config.block_size` and `config.vocab_size`; so plain,
llama-style, quantized (swapped linear modules) and structurally pruned models all run through it.

Prompts of different lengths are right-padded and decoded with per-row positions: row b's next token sits at
cache slot len_b + step. Each row stops on its own (a stop token, its token budget, or `Generation.stop`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from leangpt.compile_cache import enable_compile_cache
from leangpt.cpu_linear import use_decode_linears
from leangpt.errors import UserError
from leangpt.native_decode import NativeDecoder, unsupported
from leangpt.sampling import Sampler, SamplingConfig, token_logprobs


@dataclass
class Request:
    prompt: list[int]
    max_new_tokens: int
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    seed: int | None = None
    stop_ids: tuple[int, ...] = ()  # tokens that end the row (not part of the output), e.g. end-of-text


@dataclass
class Completion:
    tokens: list[int]
    logprobs: list[float]  # of each token in `tokens`, under the model (before sampling filters)
    finish_reason: str  # "stop" (a stop token or Generation.stop) or "length"


def check_request(req: Request, block_size: int) -> None:
    if not req.prompt:
        raise UserError("the prompt is empty")
    if req.max_new_tokens < 1:
        raise UserError(f"max new tokens must be >= 1, got {req.max_new_tokens}")
    if len(req.prompt) + req.max_new_tokens > block_size:
        raise UserError(f"prompt ({len(req.prompt)} tokens) + max new tokens ({req.max_new_tokens}) exceed the "
                        f"context of {block_size}")
    req.sampling.validate()


def _compile_errors() -> tuple[type[Exception], ...]:
    """What a failed compilation raises (imported only when compiling). FailOnRecompileLimitHit: dynamo keeps
    the graphs of one step function for every model compiled in the process, up to its recompile limit (8), so
    a process that compiles many models falls back to eager for the later ones."""
    from torch._dynamo.exc import FailOnRecompileLimitHit, TorchDynamoException
    from torch._inductor.exc import InductorError

    return TorchDynamoException, InductorError, FailOnRecompileLimitHit


class Engine:
    """Batched generation with one model. On a CPU, steps of up to NativeDecoder.max_rows rows run leangpt's C++
    decode step where it covers the model (`native`; leangpt/native_decode.py). `compile=True` compiles the other
    decode steps (torch.compile) and falls back to eager, with a note in `compile_error`, if compiling fails."""

    def __init__(self, model: nn.Module, compile: bool = False, native: bool = True) -> None:
        self.model = model.eval()
        self.device = next(model.parameters()).device
        on_cpu = self.device.type == "cpu"
        self.native: NativeDecoder | None = None
        if on_cpu:
            # The C++ step and compiled graphs read plain (out, in) weights; eager one-row products MKL's order.
            if native:
                use_decode_linears(model, one_row_order=False)
                native = unsupported(model) is None
            use_decode_linears(model, one_row_order=not compile and not native)
            if native:
                self.native = NativeDecoder(model)
        self.compile = compile
        self.compile_error: str | None = None
        self._compiled_one = self._compiled_rows = None
        if compile:
            enable_compile_cache()
            # Without the generated code's size asserts (dynamo's guards check the inputs already) a batch-1 step
            # takes 0.08 ms less, ~4 %. (The one-row products store their input once themselves: cpu_linear.stored.)
            options = {"size_asserts": False} if on_cpu else None
            # On a CPU the compiled steps read the written cache slots only, as eager does (at batch 8 the whole
            # cache is comparable to the weights; at batch 1 a step took 0.44 ms against 0.51 reading all 256
            # slots at position 40). kv_len turns symbolic on its first change (one recompile per graph).
            dynamic = None if on_cpu else False
            if self.native is None:  # else the C++ step takes the one-row steps
                self._compiled_one = torch.compile(self._decode_eager, fullgraph=True, dynamic=dynamic,
                                                   options=options)
            self._compiled_rows = torch.compile(self._decode_rows, fullgraph=True, dynamic=dynamic, options=options)
        self._compile_errors = _compile_errors() if compile else ()

    @property
    def block_size(self) -> int:
        return self.model.config.block_size

    def _decode_eager(self, tokens: torch.Tensor, input_pos: torch.Tensor, kv_len: int | None = None) -> torch.Tensor:
        return self.model(tokens, input_pos, kv_len)[:, -1]  # (B, V)

    # The same step again: dynamo keeps compiled graphs, and counts recompiles, per code object, so the one-row
    # graph (compiled from _decode_eager) keeps a static batch while the several-row graph may take a symbolic one.
    def _decode_rows(self, tokens: torch.Tensor, input_pos: torch.Tensor, kv_len: int | None) -> torch.Tensor:
        return self.model(tokens, input_pos, kv_len)[:, -1]

    def decode(self, tokens: torch.Tensor, input_pos: torch.Tensor, kv_len: int | None = None) -> torch.Tensor:
        """Logits (B, V) for one new token per row: tokens (B, 1) at input_pos (1,) or (B, 1), every position
        below kv_len if given. Eager, and compiled on a CPU, attend to those kv_len cache slots only; compiled
        steps elsewhere keep one shape, the whole cache. The C++ step attends to each row's positions up to its
        own."""
        if self.native_takes(tokens.size(0)):
            return self.native.step(tokens, input_pos)
        compiled = self._compiled_one if tokens.size(0) == 1 else self._compiled_rows
        if compiled is not None:
            try:
                return compiled(tokens, input_pos, kv_len if self.device.type == "cpu" else None)
            except self._compile_errors as e:
                # Compilation failed (tracing, no C++ compiler, ...): run eager from now on, and say why.
                self.compile_error = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
                self._compiled_one = self._compiled_rows = None
        return self._decode_eager(tokens, input_pos, kv_len)

    def forward(self, idx: torch.Tensor, input_pos: torch.Tensor,
                logit_items: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens idx (B, T) at positions input_pos ((T,) or (B, T)), all written to the KV cache; the logits
        (n, V) of the items logit_items (ascending indices into idx flattened; default every item, empty: none),
        as `model(idx, input_pos).flatten(0, 1)[logit_items]`. Up to NativeDecoder.max_rows tokens in all take the
        C++ step, as decode steps of as many rows do."""
        B, T = idx.shape
        items = torch.arange(B * T) if logit_items is None else logit_items
        if self.native_takes(B * T):
            return self.native.forward(idx, input_pos, logit_items=items)
        kv_len = int(input_pos.max()) + 1
        if len(items) == 0:  # the cache only
            self.model.forward_hidden(idx, input_pos, kv_len)
            return torch.empty(0, self.model.config.vocab_size, device=self.device)
        return self.model(idx, input_pos, kv_len).flatten(0, 1)[items.to(self.device)]

    def prefill(self, idx: torch.Tensor, input_pos: torch.Tensor, last: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, V) at column last[b] of each row (default: the last column) of prompts idx (B, P) at
        positions input_pos ((P,) or (B, P)), every position written to the KV cache (forward())."""
        B, P = idx.shape
        columns = torch.full((B,), P - 1) if last is None else last.cpu()
        return self.forward(idx, input_pos, torch.arange(B) * P + columns)

    def native_takes(self, tokens: int) -> bool:
        """Whether a step of this many tokens (rows of a decode step, or prompt tokens) runs the C++ step."""
        return self.native is not None and tokens <= self.native.max_rows

    def decode_step(self, batch: int) -> str:
        """Which step decodes `batch` rows now: "c++" (leangpt's C++ step), "compiled" or "eager"."""
        if self.native_takes(batch):
            return "c++"
        return "compiled" if (self._compiled_one if batch == 1 else self._compiled_rows) is not None else "eager"

    def setup_cache(self, batch: int, max_len: int) -> None:
        if self.compile:
            # Round up so that requests of nearby lengths share one cache shape, hence one compiled graph.
            max_len = min(-(-max_len // 128) * 128, self.block_size)
        self.model.setup_cache(batch, max_len)

    def start(self, requests: list[Request]) -> "Generation":
        for r in requests:
            check_request(r, self.block_size)
        return Generation(self, requests)

    def generate(self, requests: list[Request]) -> list[Completion]:
        """Run a batch to the end without streaming; the host checks for finished rows every few steps only."""
        gen = self.start(requests)
        gen.run(sync_every=16)
        return gen.completions


class Generation:
    """One batched generation. Iterate it for the tokens of each step as they come: a list of (row, token)
    for the rows still running. Call stop(row) to end a row early (e.g. on a stop string)."""

    def __init__(self, engine: Engine, requests: list[Request]) -> None:
        self.engine, self.requests = engine, requests
        self.prefill_s = self.decode_s = 0.0  # prefill_s covers the first token: time to first token
        self.decode_steps = 0
        self._stopped: set[int] = set()
        self.completions: list[Completion] = []

    def stop(self, row: int) -> None:
        self._stopped.add(row)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return self._steps(sync_every=1)

    def run(self, sync_every: int = 16) -> None:
        for _ in self._steps(sync_every):
            pass

    @torch.inference_mode()
    def _steps(self, sync_every: int) -> Iterator[list[tuple[int, int]]]:
        """Yield, per step, (row, token) for the rows still running; fills self.completions at the end.

        The chosen tokens are read on the host every sync_every steps (a CPU reads them for free, so every step
        there), and the rows are ended there: a row's tokens after its stop token, its budget or stop(row) are
        dropped (the steps after a row's end still compute it, and are not read)."""
        eng, reqs, dev = self.engine, self.requests, self.engine.device
        B = len(reqs)
        lens = [len(r.prompt) for r in reqs]
        P, N = max(lens), max(r.max_new_tokens for r in reqs)
        eng.setup_cache(B, max(n + r.max_new_tokens for n, r in zip(lens, reqs)))
        sampler = Sampler([r.sampling for r in reqs], [r.seed for r in reqs], [r.prompt for r in reqs],
                          eng.model.config.vocab_size, dev)
        rows = _Rows(reqs)

        t0 = time.perf_counter()
        idx = torch.zeros(B, P, dtype=torch.long, device=dev)  # right-padded prompts
        for row, r in enumerate(reqs):
            idx[row, :len(r.prompt)] = torch.tensor(r.prompt, device=dev)
        if len(set(lens)) == 1:
            # Positions (1,) shared by all rows, one per step (views of one tensor: no op per step).
            positions = torch.arange(P, P + N, device=dev)[:, None]  # (N, 1)
            logits = eng.prefill(idx, torch.arange(P, device=dev))  # (B, V)
        else:
            # Per-row positions (B, 1) per step, each stopping at its row's last one, so that no row runs past
            # its part of the cache.
            last = torch.tensor([n + r.max_new_tokens - 1 for n, r in zip(lens, reqs)], device=dev)
            start = torch.tensor(lens, device=dev)
            positions = torch.minimum(start + torch.arange(N, device=dev)[:, None], last)[:, :, None]  # (N, B, 1)
            logits = eng.prefill(idx, torch.arange(P, device=dev).expand(B, P), start - 1)  # each row's last token
        pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # (tokens, logits) of steps not read yet
        for step in range(N):
            tok = sampler.sample(logits)
            pending.append((tok, logits))
            sampler.observe(tok)  # an ended row's later counts are never used
            if step == 0:
                self.prefill_s = time.perf_counter() - t0
                t0 = time.perf_counter()
            if sync_every == 1 or (step + 1) % sync_every == 0 or step + 1 == N:
                for emitted in rows.read(pending, self._stopped):
                    yield emitted
                pending = []
                if rows.all_ended:
                    break
            if step + 1 == N:
                break
            logits = eng.decode(tok[:, None], positions[step], P + step + 1)  # every position is <= P + step
            self.decode_steps += 1
        self.decode_s = time.perf_counter() - t0
        self.completions = rows.completions()


class _Rows:
    """The host's record of a generation's rows: tokens and logprobs emitted so far, and how each row ended."""

    def __init__(self, requests: list[Request]) -> None:
        self.requests = requests
        self.tokens: list[list[int]] = [[] for _ in requests]
        self.logprobs: list[list[float]] = [[] for _ in requests]
        self.finish: list[str | None] = [None] * len(requests)  # None while running
        self.steps_read = 0

    @property
    def all_ended(self) -> bool:
        return all(f is not None for f in self.finish)

    def read(self, pending: list[tuple[torch.Tensor, torch.Tensor]],
             stopped: set[int]) -> Iterator[list[tuple[int, int]]]:
        """Take in the pending steps' tokens and logits; yield each step's (row, token) emitted. stopped may grow
        while a step's tokens are out: a row in it emits nothing more."""
        if len(pending) == 1:  # every step on a CPU
            tokens, logits = pending[0][0][:, None], pending[0][1]  # (B, 1), (B, V)
        else:  # the log-probabilities of all pending steps in one call (cheaper than one per step at batch 1)
            tokens = torch.stack([t for t, _ in pending], 1)  # (B, steps)
            logits = torch.stack([lg for _, lg in pending], 1).flatten(0, 1)  # (B · steps, V)
        logprobs = token_logprobs(logits, tokens.flatten()).view_as(tokens).tolist()
        tokens = tokens.tolist()
        for s in range(len(pending)):
            step, emitted = self.steps_read + s, []
            for row, r in enumerate(self.requests):
                if self.finish[row] is not None:
                    continue
                tok = tokens[row][s]
                if row in stopped or tok in r.stop_ids:
                    self.finish[row] = "stop"
                    continue
                self.tokens[row].append(tok)
                self.logprobs[row].append(logprobs[row][s])
                emitted.append((row, tok))
                if step + 1 >= r.max_new_tokens:
                    self.finish[row] = "length"
            yield emitted
        self.steps_read += len(pending)

    def completions(self) -> list[Completion]:
        return [Completion(tokens=t, logprobs=lp, finish_reason=f or "length")
                for t, lp, f in zip(self.tokens, self.logprobs, self.finish)]
