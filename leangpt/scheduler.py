"""The server's worker: one thread that runs the model, never the event loop, with continuous batching.

Requests become jobs (one per prompt) in a bounded queue. While the running batch (leangpt.batching) has free
rows, the worker moves waiting jobs into it before every step; each step's tokens become text through
generate's text layer (decode_texts, the same loop as `leangpt generate`), and each job's pieces and result go
back to its request on the event loop. A job whose client went away (or whose request timed out) leaves the
batch after the step that follows, and a queued one is skipped without being prefilled.

Every torch op of the server runs on that one thread: the steps, scoring (Batcher.call), and in `leangpt serve`
the model load too. libgomp gives each thread that enters a parallel region a team of its own; with two teams
on a machine of few cores it counts more threads than cores and stops spinning between regions, so each of a
step's kernels waits for a sleeping OpenMP pool thread to wake: a 64-token request took 0.18 s instead of 0.04 s.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import queue
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from leangpt.batching import RunningBatch
from leangpt.data.tokenizer import TextTokenizer
from leangpt.engine import Completion, Engine, Request, check_request
from leangpt.generate import TextRequest, decode_texts, to_request
from leangpt.serve_metrics import ServeMetrics

log = logging.getLogger("leangpt.serve")


def worker_thread() -> ThreadPoolExecutor:
    """The one thread that runs a server's torch ops."""
    return ThreadPoolExecutor(1, thread_name_prefix="leangpt-serve-worker")


class Overloaded(Exception):
    """The queue is full: the request is refused (HTTP 429), to be retried after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class Job:
    """One prompt (one choice) of a request. The worker reports on the request's event queue (through the
    Outbox), tagged with index: ("text", piece), ("done", result dict) or ("error", message)."""
    text: TextRequest
    index: int
    stream: bool
    logprobs: bool
    events: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    request: Request | None = None  # the token ids, set by Batcher.job
    cancelled: bool = False  # the client went away or the request timed out: the worker drops the row
    arrived: float = field(default_factory=time.perf_counter)
    first_token: float | None = None  # when the worker emitted its first token


@dataclass
class _Call:
    """A function for the worker thread to run between steps, its result (or exception) set on future."""
    fn: Callable[[], Any]
    future: Future = field(default_factory=Future)

    def run(self) -> None:
        if self.future.set_running_or_notify_cancel():
            try:
                self.future.set_result(self.fn())
            except Exception as e:
                self.future.set_exception(e)


class Outbox:
    """What the worker reports during a step, handed to each event loop in one call when the step is done
    (one wake-up of the loop a step, not one a piece)."""

    def __init__(self) -> None:
        self.items: list[tuple[Job, str, Any]] = []

    def put(self, job: Job, kind: str, value: Any) -> None:
        self.items.append((job, kind, value))

    def flush(self) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, tuple[int, str, Any]]]] = {}
        for job, kind, value in self.items:
            by_loop.setdefault(job.loop, []).append((job.events, (job.index, kind, value)))
        self.items = []
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_deliver, items)


def _deliver(items: list[tuple[asyncio.Queue, tuple[int, str, Any]]]) -> None:
    for events, item in items:
        events.put_nowait(item)


@dataclass
class BatchStats:
    batches: int = 0  # runs of the batch, each from idle to idle
    rows: int = 0  # rows (choices) finished
    last_batch_rows: int = 0  # the most rows that ran together in the last run
    tokens: int = 0  # completion tokens
    steps: int = 0


class _Steps:
    """The token steps that decode_texts reads: before each step, waiting jobs take the free rows; after it, rows
    whose client went away leave."""

    completions: list[Completion] = []  # rows are reported by ended() as they end

    def __init__(self, batcher: "Batcher") -> None:
        self.batcher = batcher

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        b = self.batcher
        while True:
            b.admit()
            if not b.batch.rows:
                return
            b.stats.last_batch_rows = max(b.stats.last_batch_rows, b.batch.rows)
            tokens = b.batch.step()
            b.stats.steps += 1
            b.first_tokens(tokens)
            yield tokens
            b.outbox.flush()  # the step's pieces and results
            for row, job in b.jobs.items():
                if job.cancelled:
                    b.batch.stop(row)

    def stop(self, row: int) -> None:
        self.batcher.batch.stop(row)

    def ended(self) -> list[tuple[int, Completion]]:
        return self.batcher.batch.ended()


class Batcher:
    """The worker thread and its queue: jobs wait (at most max_queue of them) for one of max_batch rows. The
    thread is worker's (a one-thread executor that already ran torch ops, e.g. loaded the model), or one of its
    own."""

    def __init__(self, engine: Engine, tokenizer: TextTokenizer, max_batch: int, max_queue: int = 256,
                 prefill_chunk: int = 256, metrics: ServeMetrics | None = None,
                 worker: ThreadPoolExecutor | None = None) -> None:
        self.engine, self.tokenizer, self.max_batch, self.max_queue = engine, tokenizer, max_batch, max_queue
        self.batch = RunningBatch(engine, max_batch, prefill_chunk)
        self.metrics = metrics or ServeMetrics()
        self.queue: queue.Queue[Job | _Call | None] = queue.Queue()
        self.submitted = 0  # jobs ever submitted (event-loop thread only)
        self.stats = BatchStats()
        self.jobs: dict[int, Job] = {}  # the batch's rows, by row id
        self.outbox = Outbox()
        self.texts: dict[int, TextRequest] = {}
        self.closing = False
        self.ready = False  # warmed up: requests no longer wait for first-use compilation
        self._row_seconds = 0.0  # a moving average of a row's time in the batch, for Retry-After
        self._worker, self._own_worker = worker or worker_thread(), worker is None
        self._running: Future | None = None
        self.metrics.watch(self.queue.qsize, lambda: self.batch.rows)

    def job(self, text: TextRequest, index: int, stream: bool, logprobs: bool, events: asyncio.Queue) -> Job:
        """A checked job (UserError for an empty prompt, a prompt + max_tokens beyond the context, ...)."""
        job = Job(text, index, stream, logprobs, events, asyncio.get_running_loop())
        job.request = to_request(self.tokenizer, text, eos=True)
        check_request(job.request, self.engine.block_size)
        return job

    def submit(self, jobs: list[Job]) -> None:
        """Queue the jobs of one request, or refuse them all (Overloaded) if the queue would hold more than
        max_queue."""
        waiting = self.queue.qsize()
        if waiting + len(jobs) > self.max_queue:
            raise Overloaded(f"the server is busy: {waiting} choices are waiting for a row (at most "
                             f"{self.max_queue}); retry later", self.retry_after(waiting))
        for job in jobs:
            self.submitted += 1
            self.queue.put(job)

    def retry_after(self, waiting: int) -> int:
        """Seconds until the queue has likely moved by `waiting` jobs: rounds of max_batch rows at the mean
        row time seen so far."""
        return max(1, math.ceil(waiting / self.max_batch * self._row_seconds))

    def call(self, fn: Callable[..., Any], *args: Any) -> Future:
        """fn(*args) run on the worker thread between two steps, in turn with the waiting jobs."""
        c = _Call(functools.partial(fn, *args))
        self.queue.put(c)
        return c.future

    def start(self) -> None:
        self._running = self._worker.submit(self._loop)

    def close(self) -> None:
        self.queue.put(None)
        if self._running is not None:
            self._running.result()
        while not self.queue.empty():  # what came after the closing mark
            item = self.queue.get_nowait()
            if isinstance(item, _Call):
                item.future.cancel()
        if self._own_worker:
            self._worker.shutdown()

    def _loop(self) -> None:
        t0 = time.perf_counter()
        try:
            self.batch.warm_up()  # requests queue meanwhile
            log.info("warmed up batch sizes 1..%d in %.1f s", self.max_batch, time.perf_counter() - t0)
        except Exception:  # a bug: serve anyway, a request's step will show it again
            log.exception("warm-up failed")
        self.ready = True
        while not self.closing:
            first = self.queue.get()
            if first is None:
                return
            if isinstance(first, _Call):
                first.run()
            elif not first.cancelled:
                self._run([first])

    def _run(self, jobs: list[Job]) -> None:
        """Run the batch from these jobs until it is empty, taking in what arrives meanwhile."""
        self.stats.batches += 1
        self.stats.last_batch_rows = 0
        for job in jobs:
            self._add(job)
        try:
            decode_texts(_Steps(self), self.tokenizer, self.texts, logprobs=True, on_text=self._send,
                         on_done=self._done, cancelled=lambda row: self.jobs[row].cancelled)
        except Exception as e:  # a bug: fail the running requests, keep serving
            log.exception("a step of %d rows failed", self.batch.rows)
            for job in self.jobs.values():
                self.outbox.put(job, "error", f"generation failed ({type(e).__name__})")
            self.batch.clear()
            self.jobs.clear()
            self.texts.clear()
        self.outbox.flush()

    def admit(self) -> None:
        """Move waiting jobs into the free rows (skipping those already abandoned); on the closing mark, end
        every row."""
        while self.batch.free and not self.closing:
            try:
                job = self.queue.get_nowait()
            except queue.Empty:
                return
            if job is None:
                self.closing = True
                for row in list(self.jobs):
                    self.jobs[row].cancelled = True
                    self.batch.stop(row)
            elif isinstance(job, _Call):
                job.run()
            elif not job.cancelled:
                self._add(job)

    def _add(self, job: Job) -> None:
        row = self.batch.add(job.request)
        self.jobs[row], self.texts[row] = job, job.text

    def first_tokens(self, tokens: list[tuple[int, int]]) -> None:
        now = time.perf_counter()
        for row, _ in tokens:
            job = self.jobs[row]
            if job.first_token is None:
                job.first_token = now
                self.metrics.ttft.observe(now - job.arrived)

    def _send(self, row: int, piece: str) -> None:
        job = self.jobs[row]
        if job.stream and not job.cancelled:
            self.outbox.put(job, "text", piece)

    def _done(self, row: int, result: dict[str, Any]) -> None:
        job, _ = self.jobs.pop(row), self.texts.pop(row)
        now = time.perf_counter()
        self._row_seconds += 0.1 * (now - (job.first_token or job.arrived) - self._row_seconds)
        s, m = self.stats, self.metrics  # counted before the reply goes out, so a client sees its own row
        s.rows, s.tokens = s.rows + 1, s.tokens + result["tokens"]
        m.prompt_tokens.inc(len(job.request.prompt))
        m.completion_tokens.inc(result["tokens"])
        m.latency.observe(now - job.arrived)
        self.outbox.put(job, "done", result)
