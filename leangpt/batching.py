"""Continuous (iteration-level) batching over the engine: requests join a running batch at the next step, and a
row that ends leaves at once.

The KV cache holds `max_rows` rows (slots), allocated once at the whole context. A joining request takes the next
free slot, and its prompt is prefilled in chunks: at most `prefill_chunk` prompt tokens per step over all the
joining rows, so a long prompt holds the decoding rows up by one chunk a step, never by its whole length. The
prompt's last token is not prefilled: it is the row's first input to a decode step, which gives the row's first
token alongside every other row's next one. A row that ends frees its slot at once, and the row in the last
slot moves into it, so the n running rows always fill slots 0..n-1 and a decode step computes n rows, not
`max_rows`.

Each row samples with its own settings and its own generator, as in an engine Generation, so its tokens do not
depend on what runs beside it (up to the float rounding of batched products). It runs any model the engine runs,
through the engine's decode step (C++, compiled or eager) and, for prefill chunks of up to NativeDecoder.max_rows
tokens, the C++ step too; the Python paths see the KV cache through `SlotCache`s over the same tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from leangpt.engine import Completion, Engine, Request, check_request
from leangpt.model import KVCache
from leangpt.quant.kernels import GEMV_ROWS
from leangpt.sampling import Sampler, token_logprobs


class SlotCache(nn.Module):
    """One attention layer's KV cache, for a forward over some of its rows: rows first..first+B-1 for a batch of
    B (a joining row's prefill runs at its own slot; decode steps run at first = 0)."""

    def __init__(self, cache: KVCache) -> None:
        super().__init__()
        self.register_buffer("k", cache.k, persistent=False)
        self.register_buffer("v", cache.v, persistent=False)
        self.first = 0

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # input_pos: (T,) shared, or (B, T) per row; k, v: (B, Hkv, T, D)
        B, T = k.size(0), k.size(2)
        pos = input_pos.expand(B, T) if input_pos.dim() == 1 else input_pos
        rows = torch.arange(self.first, self.first + B, device=k.device)[:, None]  # (B, 1)
        self.k[rows, :, pos] = k.transpose(1, 2).to(self.k.dtype)  # indexed view is (B, T, Hkv, D)
        self.v[rows, :, pos] = v.transpose(1, 2).to(self.v.dtype)
        return self.k[self.first:self.first + B], self.v[self.first:self.first + B]

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of row src into row dst."""
        self.k[dst, :, :length] = self.k[src, :, :length]
        self.v[dst, :, :length] = self.v[src, :, :length]


@dataclass
class _Row:
    id: int
    request: Request
    slot: int
    generator: torch.Generator
    prefilled: int = 0  # prompt tokens already in the cache (all but the last one are prefilled)
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)

    @property
    def ready(self) -> bool:
        """Prefilled: the row takes part in decode steps."""
        return self.prefilled == len(self.request.prompt) - 1

    @property
    def position(self) -> int:
        """The cache slot of the row's next decode input (its prompt's last token, then each new token); while
        prefilling, the next position its prefill writes."""
        return self.prefilled + len(self.tokens)

    @property
    def next_input(self) -> int:
        return self.tokens[-1] if self.tokens else self.request.prompt[-1]


def _generator(seed: int | None, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


class RunningBatch:
    """Rows that join and leave between steps. add() a request (a row id back), step() for the tokens of that
    step as (row, token) pairs, stop(row) to end a row before its next step, ended() for the rows that ended
    since it was last called, with their Completions. While rows run, the batch owns the model's KV cache: run
    no other generation on the same model meanwhile."""

    def __init__(self, engine: Engine, max_rows: int, prefill_chunk: int = 256) -> None:
        if max_rows < 1 or prefill_chunk < 1:
            raise ValueError(f"max_rows and prefill_chunk must be >= 1, got {max_rows} and {prefill_chunk}")
        self.engine, self.max_rows, self.prefill_chunk = engine, max_rows, prefill_chunk
        self.device = engine.device
        self.vocab_size = engine.model.config.vocab_size
        self.max_len = engine.block_size
        self.steps = 0
        self._rows: list[_Row] = []  # by slot: row i sits in slot i
        self._ended: list[tuple[int, Completion]] = []
        self._next_id = 0
        self._attentions: list[nn.Module] = []
        self._caches: list[SlotCache] = []
        self._sampler: Sampler | None = None
        self._sampler_rows: tuple[int, ...] = ()
        # A compiled step on an accelerator keeps static shapes: round the rows of a step up to a power of two
        # (the extra slots are free ones), so a few graphs serve every batch size.
        self._pad_rows = engine.compile and self.device.type != "cpu"

    @property
    def rows(self) -> int:
        """Rows running (prefilling or decoding)."""
        return len(self._rows)

    @property
    def free(self) -> int:
        return self.max_rows - len(self._rows)

    def add(self, request: Request) -> int:
        """Take a request into the next free slot; it starts prefilling at the next step. Returns its row id."""
        check_request(request, self.max_len)
        if not self.free:
            raise RuntimeError(f"the batch is full ({self.max_rows} rows)")
        if not self._rows:
            self._own_cache()
        row = _Row(self._next_id, request, len(self._rows), _generator(request.seed, self.device))
        self._next_id += 1
        self._rows.append(row)
        return row.id

    @torch.inference_mode()  # a moved row is copied within the cache, which may be an inference tensor
    def stop(self, row_id: int) -> None:
        """End a row now (finish_reason "stop"); its slot is free for the next step. A row already ended is
        ignored."""
        row = next((r for r in self._rows if r.id == row_id), None)
        if row is not None:
            self._end(row, "stop")

    def ended(self) -> list[tuple[int, Completion]]:
        """The rows that ended since the last call, with their Completions."""
        out, self._ended = self._ended, []
        return out

    def clear(self) -> None:
        """Drop every row without reporting it (after a failed step)."""
        self._rows, self._ended, self._sampler, self._sampler_rows = [], [], None, ()

    @torch.inference_mode()
    def warm_up(self) -> None:
        """One decode step at every batch size this batch can run, and a prefill of every token count that a
        quantized kernel compiles for, on placeholder rows, before any request: what is built at a shape's first
        use (a compiled decode graph, a quantized kernel compiled per row count) is built now, not while a
        request waits. The cache slots written are free ones."""
        if self._rows:
            raise RuntimeError("warm up before adding rows")
        self._own_cache()
        for i, n in enumerate(sorted({self._width(n) for n in range(1, self.max_rows + 1)})):
            tokens, positions = (torch.zeros(n, 1, dtype=torch.long, device=self.device) for _ in range(2))
            # Attended lengths of 2 and 3 in turn: a compiled step's length turns symbolic now (0 and 1 would be
            # specialised), not at the first real step. Two tensors, as a real step has: dynamo guards aliasing.
            self.engine.decode(tokens, positions, 2 + i % 2)
        for t in range(1, min(GEMV_ROWS, self.max_len) + 1):
            self.engine.model.forward_hidden(torch.zeros(1, t, dtype=torch.long, device=self.device),
                                             torch.arange(t, device=self.device), t)

    @torch.inference_mode()
    def step(self) -> list[tuple[int, int]]:
        """One iteration: a prefill chunk for the joining rows, then one decode step for the prefilled ones.
        Returns (row, token) for the tokens emitted; rows that ended are reported by ended()."""
        if self._rows and self._attentions[0].kv_cache is not self._caches[0]:
            raise RuntimeError("the model's KV cache was replaced while rows were running (another generation on "
                               "the same model)")
        self._prefill()
        ready = [r for r in self._rows if r.ready]
        if not ready:
            return []
        logits = self._decode()
        if len(ready) < len(self._rows):
            logits = logits[torch.tensor([r.slot for r in ready], device=self.device)]
        sampler = self._sampler_for(ready)
        tokens = sampler.sample(logits)
        logprobs = token_logprobs(logits, tokens).tolist()
        emitted, out, ending = [], [], []
        for row, tok, lp in zip(ready, tokens.tolist(), logprobs):
            if tok in row.request.stop_ids:
                emitted.append(False)
                ending.append((row, "stop"))
                continue
            emitted.append(True)
            row.tokens.append(tok)
            row.logprobs.append(lp)
            out.append((row.id, tok))
            if len(row.tokens) >= row.request.max_new_tokens:
                ending.append((row, "length"))
        sampler.observe(tokens, torch.tensor(emitted, device=self.device))
        for row, reason in ending:  # once every row has its token: a row moved into a freed slot is whole
            self._end(row, reason)
        self.steps += 1
        return out

    # ------------------------------------------------------------ the cache

    def _own_cache(self) -> None:
        """Allocate the cache (kept if the model has one of this shape) and put SlotCaches over its tensors."""
        model = self.engine.model
        model.setup_cache(self.max_rows, self.max_len)
        attentions = [m for m in model.modules() if isinstance(getattr(m, "kv_cache", None), (KVCache, SlotCache))]
        for attn in attentions:
            if not isinstance(attn.kv_cache, SlotCache):
                attn.kv_cache = SlotCache(attn.kv_cache)
        self._attentions, self._caches = attentions, [attn.kv_cache for attn in attentions]

    def _end(self, row: _Row, reason: str) -> None:
        self._ended.append((row.id, Completion(row.tokens, row.logprobs, reason)))
        last = self._rows.pop()
        if last is not row:  # the last slot's row fills the hole
            for cache in self._caches:
                cache.move(last.slot, row.slot, last.position)
            last.slot = row.slot
            self._rows[row.slot] = last

    # ------------------------------------------------------------ prefill and decode

    def _prefill(self) -> None:
        """Up to prefill_chunk prompt tokens of the joining rows, oldest first, in one forward per run of
        neighbouring slots (rows of a run right-padded to its longest chunk)."""
        budget, plan = self.prefill_chunk, []
        for row in sorted((r for r in self._rows if not r.ready), key=lambda r: r.id):
            if budget == 0:
                break
            n = min(len(row.request.prompt) - 1 - row.prefilled, budget)
            plan.append((row, n))
            budget -= n
        plan.sort(key=lambda p: p[0].slot)
        run: list[tuple[_Row, int]] = []
        for item in plan:
            if run and item[0].slot != run[-1][0].slot + 1:
                self._prefill_run(run)
                run = []
            run.append(item)
        if run:
            self._prefill_run(run)

    def _prefill_run(self, run: list[tuple[_Row, int]]) -> None:
        dev, width = self.device, max(n for _, n in run)
        idx = torch.zeros(len(run), width, dtype=torch.long, device=dev)
        for i, (row, n) in enumerate(run):
            idx[i, :n] = torch.tensor(row.request.prompt[row.prefilled:row.prefilled + n], device=dev)
        start = torch.tensor([row.prefilled for row, _ in run], device=dev)[:, None]
        # Padding writes past a row's chunk, slots that its own later tokens overwrite before it attends them.
        pos = (start + torch.arange(width, device=dev)).clamp(max=self.max_len - 1)  # (R, W)
        if self.engine.native_takes(idx.numel()):
            self.engine.native.forward(idx, pos, first_row=run[0][0].slot)
        else:
            for cache in self._caches:
                cache.first = run[0][0].slot
            try:
                self.engine.model.forward_hidden(idx, pos, int(pos.max()) + 1)  # the cache is what it is run for
            finally:
                for cache in self._caches:
                    cache.first = 0
        for row, n in run:
            row.prefilled += n

    def _decode(self) -> torch.Tensor:
        """Logits (n, V) of one decode step over every running row; a row still prefilling feeds a placeholder
        at the next position its prefill will write, and its logits are ignored."""
        n = len(self._rows)
        width = self._width(n)
        inputs = [r.next_input if r.ready else 0 for r in self._rows] + [0] * (width - n)
        positions = [r.position for r in self._rows] + [0] * (width - n)  # free slots: position 0, unused
        tokens = torch.tensor(inputs, device=self.device)[:, None]  # (width, 1)
        pos = torch.tensor(positions, device=self.device)[:, None]
        return self.engine.decode(tokens, pos, max(positions) + 1)[:n]

    def _width(self, n: int) -> int:
        """Rows of a decode step for n running rows."""
        return min(1 << (n - 1).bit_length(), self.max_rows) if self._pad_rows else n

    def _sampler_for(self, ready: list[_Row]) -> Sampler:
        """The sampler of these rows in this order: the last one while the rows stay the same, else a new one
        with each row's own generator and token counts."""
        key = tuple(r.id for r in ready)
        if key != self._sampler_rows:
            reqs = [r.request for r in ready]
            sampler = Sampler([q.sampling for q in reqs], [0] * len(ready), [q.prompt + r.tokens for q, r in
                              zip(reqs, ready)], self.vocab_size, self.device)
            sampler.generators = [r.generator for r in ready]
            if sampler.counts is not None:
                for i, r in enumerate(ready):
                    if r.tokens:
                        sampler.counts[i] = torch.bincount(torch.tensor(r.tokens, device=self.device),
                                                           minlength=self.vocab_size).float()
            self._sampler, self._sampler_rows = sampler, key
        return self._sampler
