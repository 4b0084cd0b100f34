"""`leangpt serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the generation engine.

The model runs on one worker thread, never on the event loop. Requests go into a queue; whenever the engine is
free, the worker takes everything waiting (up to --max-batch rows) and decodes it as one Engine generation, rows of
different lengths with their own settings, seeds and stops, turned into text by generate's text layer
(decode_texts), the same loop as `leangpt generate`. Streaming rows get their text as the batch produces it.
A running batch is never joined: what arrives meanwhile waits for the next one (no continuous batching).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import queue
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field, model_validator
from starlette.exceptions import HTTPException

from leangpt import cli
from leangpt.cli import setting
from leangpt.data.fastbpe import byte_decoder
from leangpt.data.tokenizer import TextTokenizer
from leangpt.engine import Engine, Request, check_request
from leangpt.errors import UserError
from leangpt.generate import TextRequest, decode_texts, to_request
from leangpt.sampling import SamplingConfig

log = logging.getLogger("leangpt.serve")

# Base models have no chat template: messages become "Role: content" lines and the reply follows "Assistant:".
CHAT_ROLES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}
CHAT_STOP = "\nUser:"  # the model's guess at the user's next turn ends the reply


class UnknownModel(UserError):
    """A request names a model this server does not serve."""


# ---------------------------------------------------------------- request bodies (OpenAI's fields)

class _Body(BaseModel):
    model: str | None = None
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)  # not OpenAI's; vLLM and llama.cpp accept these three too
    min_p: float = Field(0.0, ge=0, lt=1)
    repetition_penalty: float = Field(1.0, gt=0)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    n: int = 1
    stop: str | list[str] = []
    seed: int | None = Field(None, ge=-2**63, lt=2**63)  # torch generators take 64 bits
    stream: bool = False
    stream_options: dict[str, Any] = {}

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        # Some clients send every field, null for "not set".
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(self.temperature, self.top_k, self.top_p, self.min_p, self.repetition_penalty,
                              self.frequency_penalty, self.presence_penalty)

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def check(self) -> None:
        if self.n != 1:
            raise UserError(f"n must be 1 (one choice per prompt), got {self.n}")


class CompletionBody(_Body):
    prompt: str | list[str]
    max_tokens: int = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0)
    echo: bool = False
    suffix: str | None = None

    def check(self) -> None:
        super().check()
        if isinstance(self.prompt, list) and not self.prompt:
            raise UserError("prompt is an empty list")
        if self.logprobs:
            raise UserError("logprobs > 0 (top alternatives) is not supported; logprobs=0 gives each token's "
                            "log-probability")
        if self.logprobs is not None and self.stream:
            raise UserError("logprobs are not available when streaming")
        if self.echo or self.suffix:
            raise UserError("echo and suffix are not supported")


class Message(BaseModel):
    role: str
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        if any(part.get("type") != "text" or not isinstance(part.get("text"), str) for part in self.content):
            raise UserError("message content parts must be of type text")
        return "".join(part["text"] for part in self.content)


class ChatBody(_Body):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int = Field(0, ge=0)

    def check(self) -> None:
        super().check()
        if self.top_logprobs:
            raise UserError("top_logprobs > 0 is not supported; logprobs=true gives each token's log-probability")
        if self.logprobs and self.stream:
            raise UserError("logprobs are not available when streaming")


def render_chat(messages: list[Message]) -> str:
    """The plain-text chat template: one "Role: content" line per message, then "Assistant:" for the reply."""
    lines = []
    for m in messages:
        if m.role not in CHAT_ROLES:
            raise UserError(f"unsupported message role {m.role!r}; use one of {', '.join(CHAT_ROLES)}")
        lines.append(f"{CHAT_ROLES[m.role]}: {m.text()}")
    return "\n".join(lines) + "\nAssistant:"


# ---------------------------------------------------------------- the batching worker

@dataclass
class Job:
    """One prompt (one choice) of a request; the worker reports on the request's event queue, tagged with index."""
    text: TextRequest
    index: int
    stream: bool
    logprobs: bool
    events: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    request: Request | None = None  # the token ids, set by Batcher.job
    cancelled: bool = False  # the client went away: the worker drops the row

    def emit(self, kind: str, value: Any) -> None:
        """("text", piece), ("done", result dict) or ("error", message); called from the worker thread."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, (self.index, kind, value))


@dataclass
class BatchStats:
    batches: int = 0
    rows: int = 0
    last_batch_rows: int = 0
    tokens: int = 0


class Batcher:
    """The worker thread: takes what is waiting (up to max_batch rows), runs it as one Generation, repeats."""

    def __init__(self, engine: Engine, tokenizer: TextTokenizer, max_batch: int) -> None:
        self.engine, self.tokenizer, self.max_batch = engine, tokenizer, max_batch
        self.queue: queue.Queue[Job | None] = queue.Queue()
        self.busy = threading.Lock()  # held while a batch runs
        self.submitted = 0  # jobs ever submitted (event-loop thread only)
        self.stats = BatchStats()
        self._thread: threading.Thread | None = None

    def job(self, text: TextRequest, index: int, stream: bool, logprobs: bool, events: asyncio.Queue) -> Job:
        """A checked job (UserError for an empty prompt, a prompt + max_tokens beyond the context, ...)."""
        job = Job(text, index, stream, logprobs, events, asyncio.get_running_loop())
        job.request = to_request(self.tokenizer, text, eos=True)
        check_request(job.request, self.engine.block_size)
        return job

    def submit(self, jobs: list[Job]) -> None:
        for job in jobs:
            self.submitted += 1
            self.queue.put(job)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="leangpt-serve-worker", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.queue.put(None)
        if self._thread is not None:
            self._thread.join()

    def _loop(self) -> None:
        closing = False
        while not closing:
            first = self.queue.get()
            if first is None:
                return
            with self.busy:
                jobs = [first]
                while len(jobs) < self.max_batch:
                    try:
                        nxt = self.queue.get_nowait()
                    except queue.Empty:
                        break
                    if nxt is None:
                        closing = True
                        break
                    jobs.append(nxt)
                jobs = [j for j in jobs if not j.cancelled]
                if jobs:
                    self._run_guarded(jobs)

    def _run_guarded(self, jobs: list[Job]) -> None:
        try:
            self._run(jobs)
        except Exception as e:  # a bug: fail these requests, keep serving
            log.exception("batch of %d rows failed", len(jobs))
            for job in jobs:
                job.emit("error", f"generation failed ({type(e).__name__})")

    def _run(self, jobs: list[Job]) -> None:
        t0 = time.perf_counter()

        def send(row: int, piece: str) -> None:
            if jobs[row].stream:
                jobs[row].emit("text", piece)

        results = decode_texts(self.engine.start([j.request for j in jobs]), self.tokenizer, [j.text for j in jobs],
                               logprobs=any(j.logprobs for j in jobs), on_text=send,
                               cancelled=lambda row: jobs[row].cancelled)
        tokens = sum(r["tokens"] for r in results)
        s = self.stats  # counted before the replies go out, so a client that got its reply sees its batch
        s.batches, s.rows, s.last_batch_rows, s.tokens = s.batches + 1, s.rows + len(jobs), len(jobs), s.tokens + tokens
        log.info("batch %d: %d rows, %d tokens in %.2f s", s.batches, len(jobs), tokens, time.perf_counter() - t0)
        for job, result in zip(jobs, results):
            job.emit("done", result)


# ---------------------------------------------------------------- responses

def _error(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}}, status_code=status)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        where = ".".join(str(x) for x in err.get("loc", ())[1:])  # loc[0] is "body"
        parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
    return "; ".join(parts)


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


@functools.cache
def _byte_of() -> dict[str, int]:
    return byte_decoder()


def _token_bytes(tokenizer: TextTokenizer, token_id: int) -> list[int]:
    """The token's own bytes (byte-level BPE: one alphabet character per byte), which may be part of a character."""
    of = _byte_of()
    piece = tokenizer.tk.id_to_token(token_id) or ""
    if piece and all(c in of for c in piece):
        return [of[c] for c in piece]
    return list(tokenizer.decode([token_id]).encode("utf-8"))


def _completion_logprobs(tokenizer: TextTokenizer, result: dict[str, Any]) -> dict[str, Any]:
    ids = result["token_ids"]
    pieces = [bytes(_token_bytes(tokenizer, t)) for t in ids]
    raw, starts = b"".join(pieces), [0]
    for p in pieces[:-1]:
        starts.append(starts[-1] + len(p))
    # A token's offset counts the whole characters before its first byte.
    offsets = [len(raw[:b].decode("utf-8", errors="ignore")) for b in starts[:len(ids)]]
    return {"tokens": [tokenizer.decode([t]) for t in ids], "token_logprobs": result["logprobs"],
            "top_logprobs": None, "text_offset": offsets}


def _chat_logprobs(tokenizer: TextTokenizer, result: dict[str, Any]) -> dict[str, Any]:
    return {"content": [{"token": tokenizer.decode([t]), "logprob": lp, "bytes": _token_bytes(tokenizer, t),
                         "top_logprobs": []} for t, lp in zip(result["token_ids"], result["logprobs"])]}


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj)}\n\n"


@dataclass
class Server:
    """What the endpoints share: the served model's name, its tokenizer and the batching worker."""
    name: str
    batcher: Batcher
    created: int = field(default_factory=lambda: int(time.time()))

    def check(self, body: _Body) -> None:
        if body.model is not None and body.model != self.name:
            raise UnknownModel(f"model {body.model!r} is not served here; this server serves {self.name!r}")
        body.check()
        body.sampling().validate()

    def jobs(self, body: _Body, prompts: list[str], max_tokens: int, stops: tuple[str, ...],
             logprobs: bool) -> tuple[list[Job], asyncio.Queue]:
        """One checked job per prompt (all checked before any is queued), seeds seed + i as `leangpt generate`."""
        sampling = body.sampling()
        events: asyncio.Queue = asyncio.Queue()
        jobs = []
        for i, prompt in enumerate(prompts):
            seed = None if body.seed is None else body.seed + i
            jobs.append(self.batcher.job(TextRequest(prompt, max_tokens, sampling, seed, stops), i, body.stream,
                                         logprobs, events))
        return jobs, events

    async def results(self, jobs: list[Job], events: asyncio.Queue) -> list[dict[str, Any]]:
        """Queue the jobs and wait for all their results (in job order)."""
        self.batcher.submit(jobs)
        results: list[dict[str, Any] | None] = [None] * len(jobs)
        try:
            while any(r is None for r in results):
                index, kind, value = await events.get()
                if kind == "error":
                    raise RuntimeError(value)
                if kind == "done":
                    results[index] = value
        finally:
            for job in jobs:
                job.cancelled = True  # no-op for finished rows; drops the rest if this request is abandoned
        return results  # type: ignore[return-value]

    async def stream(self, jobs: list[Job], events: asyncio.Queue) -> AsyncIterator[tuple[int, str, Any]]:
        """Queue the jobs and yield (index, "text" | "done", value) as the worker reports them."""
        self.batcher.submit(jobs)
        left = len(jobs)
        try:
            while left:
                index, kind, value = await events.get()
                if kind == "error":
                    raise RuntimeError(value)
                left -= kind == "done"
                yield index, kind, value
        finally:
            for job in jobs:
                job.cancelled = True


def create_app(engine: Engine, tokenizer: TextTokenizer, name: str, max_batch: int = 8) -> FastAPI:
    """The FastAPI app serving one model; its worker thread runs while the app runs (lifespan)."""
    server = Server(name, Batcher(engine, tokenizer, max_batch))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        server.batcher.start()
        yield
        server.batcher.close()

    app = FastAPI(title="leangpt", lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(RequestValidationError)
    async def bad_body(_: HTTPRequest, exc: RequestValidationError) -> JSONResponse:
        return _error(400, _validation_message(exc))

    @app.exception_handler(UserError)
    async def user_error(_: HTTPRequest, exc: UserError) -> JSONResponse:
        return _error(400, str(exc), code="model_not_found" if isinstance(exc, UnknownModel) else None)

    @app.exception_handler(HTTPException)
    async def http_error(_: HTTPRequest, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), "not_found_error" if exc.status_code == 404 else
                      "invalid_request_error")

    @app.exception_handler(Exception)
    async def server_error(_: HTTPRequest, exc: Exception) -> JSONResponse:
        log.error("request failed: %s: %s", type(exc).__name__, exc)
        return _error(500, f"internal error: {exc}", "server_error")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        s = server.batcher.stats
        return {"status": "ok", "model": name, "max_batch": max_batch, "batches": s.batches, "rows": s.rows,
                "last_batch_rows": s.last_batch_rows, "completion_tokens": s.tokens}

    def model_card() -> dict[str, Any]:
        return {"id": name, "object": "model", "created": server.created, "owned_by": "leangpt"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> Any:
        if model_id != name:
            return _error(404, f"model {model_id!r} is not served here", "not_found_error", "model_not_found")
        return model_card()

    @app.post("/v1/completions")
    async def completions(body: CompletionBody) -> Any:
        server.check(body)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        jobs, events = server.jobs(body, prompts, body.max_tokens, body.stops(), body.logprobs is not None)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": name}
        prompt_tokens = sum(len(j.request.prompt) for j in jobs)
        if body.stream:
            return StreamingResponse(_event_stream(server, jobs, events, head, prompt_tokens,
                                                   bool(body.stream_options.get("include_usage")), _completion_choice),
                                     media_type="text/event-stream")
        results = await server.results(jobs, events)
        choices = [{"index": i, "text": r["text"], "finish_reason": r["finish_reason"],
                    "logprobs": _completion_logprobs(tokenizer, r) if body.logprobs is not None else None}
                   for i, r in enumerate(results)]
        return {**head, "choices": choices, "usage": _usage(prompt_tokens, sum(r["tokens"] for r in results))}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody) -> Any:
        server.check(body)
        prompt = render_chat(body.messages)
        prompt_tokens = len(tokenizer.encode(prompt))
        if prompt_tokens >= engine.block_size:
            raise UserError(f"the messages ({prompt_tokens} tokens) fill the model's context of {engine.block_size}")
        max_tokens = body.max_completion_tokens or body.max_tokens or engine.block_size - prompt_tokens
        jobs, events = server.jobs(body, [prompt], max_tokens, body.stops() + (CHAT_STOP,), body.logprobs)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": name}
        if body.stream:
            role = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
            return StreamingResponse(_event_stream(server, jobs, events, {**head, "object": "chat.completion.chunk"},
                                                   prompt_tokens, bool(body.stream_options.get("include_usage")),
                                                   _chat_choice, role),
                                     media_type="text/event-stream")
        [r] = await server.results(jobs, events)
        choice = {"index": 0, "message": {"role": "assistant", "content": r["text"]},
                  "logprobs": _chat_logprobs(tokenizer, r) if body.logprobs else None,
                  "finish_reason": r["finish_reason"]}
        return {**head, "choices": [choice], "usage": _usage(prompt_tokens, r["tokens"])}

    return app


def _completion_choice(index: int, text: str | None, finish_reason: str | None) -> dict[str, Any]:
    return {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}


def _chat_choice(index: int, text: str | None, finish_reason: str | None) -> dict[str, Any]:
    return {"index": index, "delta": {} if text is None else {"content": text}, "logprobs": None,
            "finish_reason": finish_reason}


async def _event_stream(server: Server, jobs: list[Job], events: asyncio.Queue, head: dict[str, Any],
                        prompt_tokens: int, include_usage: bool,
                        choice: Callable[[int, str | None, str | None], dict[str, Any]],
                        first: dict[str, Any] | None = None) -> AsyncIterator[str]:
    """The Server-Sent Events of a streamed response: `first` (chat's role chunk) if given, a chunk per text
    piece and one with each choice's finish_reason, the usage if asked for, then [DONE]. `choice(index, text,
    finish_reason)` shapes a chunk's choice for the endpoint."""
    if first is not None:
        yield _sse({**head, "choices": [first]})
    completion_tokens = 0
    try:
        async for index, kind, value in server.stream(jobs, events):
            if kind == "text":
                yield _sse({**head, "choices": [choice(index, value, None)]})
            else:
                completion_tokens += value["tokens"]
                yield _sse({**head, "choices": [choice(index, None, value["finish_reason"])]})
    except RuntimeError as e:  # the batch failed after the response began: say so in the stream
        yield _sse({"error": {"message": str(e), "type": "server_error", "param": None, "code": None}})
    if include_usage:
        yield _sse({**head, "choices": [], "usage": _usage(prompt_tokens, completion_tokens)})
    yield "data: [DONE]\n\n"


# ---------------------------------------------------------------- the command

@dataclass
class ServeSettings:
    model: Path | None = setting(None, "checkpoint directory (plain, quantized or pruned)", required=True)
    host: str = setting("127.0.0.1", "address to listen on (0.0.0.0 for every interface)")
    port: int = setting(8000, "TCP port to listen on (0 picks a free one)")
    model_name: str | None = setting(None, "the model id clients send and /v1/models lists (default: the "
                                           "checkpoint directory's name)")
    max_batch: int = setting(8, "most prompts decoded together; requests that wait while a batch runs form the "
                                "next one")
    compile: bool = setting(False, "torch.compile the decode step (each new batch shape compiles once; falls back "
                                   "to eager)")
    device: str = setting("auto", "auto, cpu, cuda, ...")
    log_level: str = setting("info", "server log level (requests and batches are logged at info)",
                             choices=["debug", "info", "warning", "error"])

    def validate(self) -> None:
        if self.max_batch < 1:
            raise UserError(f"--max-batch must be >= 1, got {self.max_batch}")
        if not 0 <= self.port <= 65535:
            raise UserError(f"--port must be in 0..65535, got {self.port}")


def serve(s: ServeSettings) -> dict[str, Any]:
    """Serve s.model until SIGINT / SIGTERM; returns the counters /health reported last (batches, rows, tokens)."""
    s.validate()
    import uvicorn

    from leangpt.checkpoint import load_checkpoint
    from leangpt.device import pick_device

    model, tokenizer, _ = load_checkpoint(s.model, pick_device(s.device))
    name = s.model_name or s.model.resolve().name
    app = create_app(Engine(model, compile=s.compile), tokenizer, name, s.max_batch)
    logging.basicConfig(level=s.log_level.upper(), format="%(levelname)s:     %(message)s")
    cli.log(f"serving {s.model} as {name!r} on http://{s.host}:{s.port}/v1")
    server = uvicorn.Server(uvicorn.Config(app, host=s.host, port=s.port, log_level=s.log_level))
    if threading.current_thread() is threading.main_thread():
        # uvicorn shuts down gracefully on SIGINT / SIGTERM, then re-raises the signal to the handler that was set
        # before it ran: with a no-op one, a requested stop returns here.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: None)
    server.run()  # a port already taken is logged and exits 1
    stats = app.state.server.batcher.stats
    return {"model": name, "batches": stats.batches, "rows": stats.rows, "completion_tokens": stats.tokens}


def build_parser() -> cli.ArgumentParser:
    return cli.build_parser(ServeSettings, "serve", "Serve a checkpoint over an OpenAI-compatible HTTP API "
                            "(/v1/completions, /v1/chat/completions, /v1/models, /health).")


def main(argv: list[str] | None = None) -> int:
    s, output = cli.parse(build_parser(), argv)
    result = serve(s)
    if output.json:
        cli.print_json(result)
    return 0
