"""`leangpt serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the generation engine.

The model runs on one worker thread (leangpt.scheduler), never on the event loop, with continuous batching
(leangpt.batching): a request joins the running batch at the next step once a row is free, its prompt prefilled in
chunks, and a row that ends leaves at once. Rows of different lengths keep their own settings, seeds and stops,
and become text through generate's text layer (decode_texts), the same loop as `leangpt generate`. A bounded queue
answers 429 when full; a request past --request-timeout gets 408; a client that hangs up frees its row at the next
step. This module is the HTTP layer: request bodies, responses in OpenAI's shape, the API key, /metrics and the
chat page at /.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import ipaddress
import json
import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field, model_validator
from starlette.exceptions import HTTPException

from leangpt import cli
from leangpt.cli import setting
from leangpt.data.fastbpe import byte_decoder
from leangpt.data.tokenizer import TextTokenizer
from leangpt.engine import Engine, check_request
from leangpt.errors import UserError
from leangpt.generate import TextRequest
from leangpt.sampling import SamplingConfig
from leangpt.scheduler import Batcher, Job, Overloaded, worker_thread
from leangpt.scoring import score_tokens
from leangpt.serve_metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from leangpt.serve_metrics import ServeMetrics

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


MAX_TOP_LOGPROBS = 5  # OpenAI's limit for the completions API's logprobs


class CompletionBody(_Body):
    prompt: str | list[int] | list[list[int]] | list[str]  # text, token ids, or a list of either
    max_tokens: int = Field(16, ge=0)  # 0 with echo: score the prompt only
    logprobs: int | None = Field(None, ge=0)
    echo: bool = False
    suffix: str | None = None

    def check(self) -> None:
        super().check()
        if isinstance(self.prompt, list) and not self.prompt:
            raise UserError("prompt is an empty list")
        if self.logprobs is not None and self.logprobs > MAX_TOP_LOGPROBS:
            raise UserError(f"logprobs must be at most {MAX_TOP_LOGPROBS}, got {self.logprobs}")
        if (self.logprobs is not None or self.echo) and self.stream:
            raise UserError("logprobs and echo are not available when streaming")
        if self.max_tokens == 0 and not self.echo:
            raise UserError("max_tokens must be >= 1 (0 only with echo, to score the prompt)")
        if self.suffix:
            raise UserError("suffix is not supported")

    def prompts(self) -> list[str | list[int]]:
        """One prompt per choice: a text or a list of token ids."""
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]  # type: ignore[list-item]
        return list(self.prompt)  # type: ignore[arg-type]

    def scored(self) -> bool:
        """Whether the reply needs the forward pass of leangpt.scoring: echo, or top alternatives."""
        return self.echo or bool(self.logprobs)


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


def _text_offsets(tokenizer: TextTokenizer, ids: list[int], start: int = 0) -> list[int]:
    """Each token's offset in the text of `ids`, plus `start`: the whole characters before its first byte."""
    pieces = [bytes(_token_bytes(tokenizer, t)) for t in ids]
    raw, starts = b"".join(pieces), [0]
    for p in pieces[:-1]:
        starts.append(starts[-1] + len(p))
    return [start + len(raw[:b].decode("utf-8", errors="ignore")) for b in starts[:len(ids)]]


def _completion_logprobs(tokenizer: TextTokenizer, result: dict[str, Any]) -> dict[str, Any]:
    ids = result["token_ids"]
    return {"tokens": [tokenizer.decode([t]) for t in ids], "token_logprobs": result["logprobs"],
            "top_logprobs": None, "text_offset": _text_offsets(tokenizer, ids)}


def _scored_logprobs(tokenizer: TextTokenizer, model: Any, prompt: list[int], completion: list[int], top: int,
                     echo: bool, prompt_chars: int) -> dict[str, Any]:
    """The legacy API's logprobs object from one forward pass over prompt + completion: the prompt's positions
    too with echo (the first token's logprob and alternatives null), and with top >= 1 the `top` likeliest
    tokens as {token: logprob} at each position. prompt_chars: the echoed prompt's length in characters."""
    scores = score_tokens(model, prompt + completion, top)
    first = 0 if echo else len(prompt)
    ids = (prompt + completion)[first:]
    offsets = (_text_offsets(tokenizer, prompt) if echo else []) + _text_offsets(tokenizer, completion, prompt_chars
                                                                                  if echo else 0)
    tops: list[dict[str, float] | None] | None = None
    if top:
        tops = [None if not pairs else _top_dict(tokenizer, pairs) for pairs in scores.top[first:]]
    return {"tokens": [tokenizer.decode([t]) for t in ids], "token_logprobs": scores.token_logprobs[first:],
            "top_logprobs": tops, "text_offset": offsets}


def _top_dict(tokenizer: TextTokenizer, pairs: list[tuple[int, float]]) -> dict[str, float]:
    """{token text: logprob}, likeliest first; tokens that decode alike keep the likeliest one's logprob."""
    out: dict[str, float] = {}
    for token_id, logprob in pairs:
        out.setdefault(tokenizer.decode([token_id]), logprob)
    return out


def _chat_logprobs(tokenizer: TextTokenizer, result: dict[str, Any]) -> dict[str, Any]:
    return {"content": [{"token": tokenizer.decode([t]), "logprob": lp, "bytes": _token_bytes(tokenizer, t),
                         "top_logprobs": []} for t, lp in zip(result["token_ids"], result["logprobs"])]}


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj)}\n\n"


class RequestTimeout(Exception):
    """A request ran past --request-timeout (HTTP 408; in a stream, an error event)."""


class ClientGone(Exception):
    """The client of a request that is not streamed hung up before its reply."""


@dataclass
class Server:
    """What the endpoints share: the served model's name, the batching worker and the per-request timeout."""
    name: str
    batcher: Batcher
    timeout: float | None = None  # seconds a request may take, queue included
    created: int = field(default_factory=lambda: int(time.time()))

    def check(self, body: _Body) -> None:
        if body.model is not None and body.model != self.name:
            raise UnknownModel(f"model {body.model!r} is not served here; this server serves {self.name!r}")
        body.check()
        body.sampling().validate()

    def jobs(self, body: _Body, prompts: list[str] | list[str | list[int]], max_tokens: int, stops: tuple[str, ...],
             logprobs: bool) -> tuple[list[Job], asyncio.Queue]:
        """One checked job per prompt, a text or token ids (all checked before any is queued), seeds seed + i
        as `leangpt generate`."""
        sampling = body.sampling()
        events: asyncio.Queue = asyncio.Queue()
        jobs = []
        for i, prompt in enumerate(prompts):
            seed = None if body.seed is None else body.seed + i
            text = prompt if isinstance(prompt, str) else self.batcher.tokenizer.decode(prompt)
            job = self.batcher.job(TextRequest(text, max_tokens, sampling, seed, stops), i, body.stream, logprobs,
                                   events)
            if not isinstance(prompt, str):  # the ids as sent: decoding and encoding again may change them
                job.request = replace(job.request, prompt=list(prompt))
                check_request(job.request, self.batcher.engine.block_size)
            jobs.append(job)
        return jobs, events

    def submit(self, jobs: list[Job]) -> None:
        """Queue the jobs, or refuse them all with Overloaded (429) while the queue is full."""
        self.batcher.submit(jobs)

    def deadline(self) -> float | None:
        return None if self.timeout is None else time.monotonic() + self.timeout

    async def results(self, jobs: list[Job], events: asyncio.Queue, http: HTTPRequest) -> list[dict[str, Any]]:
        """Wait for all the queued jobs' results (in job order); RequestTimeout past the timeout, ClientGone when
        the client hangs up. However it ends, the jobs then leave the batch."""
        results: list[dict[str, Any] | None] = [None] * len(jobs)
        deadline = self.deadline()
        gone = asyncio.ensure_future(_hung_up(http))
        try:
            while any(r is None for r in results):
                index, kind, value = await _next_event(events, deadline, gone)
                if kind == "error":
                    raise RuntimeError(value)
                if kind == "done":
                    results[index] = value
        finally:
            gone.cancel()
            for job in jobs:
                job.cancelled = True  # no-op for finished rows; drops the rest if this request is abandoned
        return results  # type: ignore[return-value]

    async def stream(self, jobs: list[Job], events: asyncio.Queue) -> AsyncIterator[tuple[int, str, Any]]:
        """Yield (index, "text" | "done", value) of the queued jobs as the worker reports them."""
        deadline = self.deadline()
        left = len(jobs)
        try:
            while left:
                index, kind, value = await _next_event(events, deadline)
                if kind == "error":
                    raise RuntimeError(value)
                left -= kind == "done"
                yield index, kind, value
        finally:
            for job in jobs:
                job.cancelled = True


async def _hung_up(http: HTTPRequest) -> None:
    """Return once the client disconnects: its body has been read, so the next message it sends is that."""
    while (await http.receive())["type"] != "http.disconnect":
        pass


async def _next_event(events: asyncio.Queue, deadline: float | None,
                      gone: asyncio.Future | None = None) -> tuple[int, str, Any]:
    """The next (index, kind, value) from the worker; RequestTimeout past the deadline, ClientGone if `gone`
    finishes first."""
    if not events.empty() and (deadline is None or time.monotonic() < deadline):
        return events.get_nowait()  # the worker reports a whole step at once: most events are already here
    get = asyncio.ensure_future(events.get())
    timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
    done, _ = await asyncio.wait({get} if gone is None else {get, gone}, timeout=timeout,
                                 return_when=asyncio.FIRST_COMPLETED)
    if get in done:
        return get.result()
    get.cancel()
    if gone is not None and gone in done:
        raise ClientGone()
    raise RequestTimeout("the request ran past the server's time limit per request (--request-timeout)")


class _JobStream(StreamingResponse):
    """A streamed reply whose jobs leave the batch however the response ends, even before its first chunk."""

    def __init__(self, content: AsyncIterator[str], jobs: list[Job]) -> None:
        super().__init__(content, media_type="text/event-stream")
        self.jobs = jobs

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for job in self.jobs:
                job.cancelled = True


class _Gate:
    """ASGI middleware: the API key on /v1/ and /metrics (401 without it), and every answer counted by
    endpoint and status."""

    def __init__(self, app: Any, metrics: ServeMetrics, api_key: str | None) -> None:
        self.app, self.metrics = app, metrics
        self.expected = None if api_key is None else f"Bearer {api_key}".encode()

    def _authorized(self, scope: dict[str, Any]) -> bool:
        path = scope["path"]
        if self.expected is None or not (path.startswith("/v1/") or path == "/metrics"):
            return True
        given = dict(scope["headers"]).get(b"authorization", b"")
        return hmac.compare_digest(given, self.expected)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counted(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                self.metrics.count_request(scope["path"], message["status"])
            await send(message)

        if not self._authorized(scope):
            refused = _error(401, "a valid API key is required: send the header 'Authorization: Bearer KEY'",
                             code="invalid_api_key")
            return await refused(scope, receive, counted)
        await self.app(scope, receive, counted)


@functools.cache
def chat_page() -> str:
    """The chat web page served at / (one file, no build step)."""
    return (resources.files("leangpt") / "static" / "chat.html").read_text(encoding="utf-8")


def create_app(engine: Engine, tokenizer: TextTokenizer, name: str, max_batch: int = 16, *, max_queue: int = 256,
               prefill_chunk: int = 256, request_timeout: float | None = None,
               api_key: str | None = None, worker: ThreadPoolExecutor | None = None) -> FastAPI:
    """The FastAPI app serving one model; its worker thread runs while the app runs (lifespan): worker's, which
    should be the thread that loaded the model (see leangpt.scheduler), or one of its own. Requests wait for one
    of max_batch rows, at most max_queue of them (429 beyond); request_timeout (seconds) bounds each request;
    with api_key, /v1/ and /metrics need `Authorization: Bearer api_key`."""
    metrics = ServeMetrics()
    batcher = Batcher(engine, tokenizer, max_batch, max_queue, prefill_chunk, metrics, worker)
    server = Server(name, batcher, request_timeout)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        server.batcher.start()
        yield
        server.batcher.close()

    app = FastAPI(title="leangpt", lifespan=lifespan)
    app.state.server = server
    app.add_middleware(_Gate, metrics=metrics, api_key=api_key)
    _add_error_handlers(app, metrics)
    _add_info_routes(app, server, metrics)
    _add_generation_routes(app, server, engine, tokenizer)
    return app


def _add_error_handlers(app: FastAPI, metrics: ServeMetrics) -> None:
    """Every error in OpenAI's shape: 400 bad request, 404 unknown model or route, 408 timeout, 429 busy."""

    @app.exception_handler(RequestValidationError)
    async def bad_body(_: HTTPRequest, exc: RequestValidationError) -> JSONResponse:
        return _error(400, _validation_message(exc))

    @app.exception_handler(UserError)
    async def user_error(_: HTTPRequest, exc: UserError) -> JSONResponse:
        if isinstance(exc, UnknownModel):
            return _error(404, str(exc), code="model_not_found")
        return _error(400, str(exc))

    @app.exception_handler(Overloaded)
    async def overloaded(_: HTTPRequest, exc: Overloaded) -> JSONResponse:
        response = _error(429, str(exc), "rate_limit_error", "rate_limit_exceeded")
        response.headers["Retry-After"] = str(exc.retry_after)
        return response

    @app.exception_handler(RequestTimeout)
    async def timed_out(_: HTTPRequest, exc: RequestTimeout) -> JSONResponse:
        return _error(408, str(exc), "timeout_error", "timeout")

    @app.exception_handler(ClientGone)
    async def client_gone(_: HTTPRequest, exc: ClientGone) -> JSONResponse:
        return _error(499, "the client closed the request", code="client_closed_request")  # nobody reads it

    @app.exception_handler(HTTPException)
    async def http_error(_: HTTPRequest, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), "not_found_error" if exc.status_code == 404 else
                      "invalid_request_error")

    @app.exception_handler(Exception)
    async def server_error(http: HTTPRequest, exc: Exception) -> JSONResponse:
        log.error("request failed: %s: %s", type(exc).__name__, exc)
        metrics.count_request(http.url.path, 500)  # answered outside the counting middleware
        return _error(500, f"internal error: {exc}", "server_error")


def _add_info_routes(app: FastAPI, server: Server, metrics: ServeMetrics) -> None:
    """The chat page, /health, /metrics and /v1/models."""
    name, batcher = server.name, server.batcher

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return chat_page()

    @app.get("/health")
    async def health() -> dict[str, Any]:
        s = batcher.stats
        return {"status": "ok", "ready": batcher.ready, "model": name, "max_batch": batcher.max_batch,
                "batches": s.batches,
                "rows": s.rows, "last_batch_rows": s.last_batch_rows, "completion_tokens": s.tokens,
                "steps": s.steps, "running_rows": batcher.batch.rows, "queued": batcher.queue.qsize()}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=METRICS_CONTENT_TYPE)

    def model_card() -> dict[str, Any]:
        return {"id": name, "object": "model", "created": server.created, "owned_by": "leangpt"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> Any:
        if model_id != name:
            return _error(404, f"model {model_id!r} is not served here", code="model_not_found")
        return model_card()


def _add_generation_routes(app: FastAPI, server: Server, engine: Engine, tokenizer: TextTokenizer) -> None:
    """/v1/completions and /v1/chat/completions."""
    name = server.name

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, http: HTTPRequest) -> Any:
        server.check(body)
        prompts = body.prompts()
        if body.scored():
            return await _scored_completion(server, engine, tokenizer, body, prompts, http)
        jobs, events = server.jobs(body, prompts, body.max_tokens, body.stops(), body.logprobs is not None)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": name}
        prompt_tokens = sum(len(j.request.prompt) for j in jobs)
        server.submit(jobs)
        if body.stream:
            return _JobStream(_event_stream(server, jobs, events, head, prompt_tokens,
                                            bool(body.stream_options.get("include_usage")), _completion_choice), jobs)
        results = await server.results(jobs, events, http)
        choices = [{"index": i, "text": r["text"], "finish_reason": r["finish_reason"],
                    "logprobs": _completion_logprobs(tokenizer, r) if body.logprobs is not None else None}
                   for i, r in enumerate(results)]
        return {**head, "choices": choices, "usage": _usage(prompt_tokens, sum(r["tokens"] for r in results))}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, http: HTTPRequest) -> Any:
        server.check(body)
        prompt = render_chat(body.messages)
        prompt_tokens = len(tokenizer.encode(prompt))
        if prompt_tokens >= engine.block_size:
            raise UserError(f"the messages ({prompt_tokens} tokens) fill the model's context of {engine.block_size}")
        max_tokens = body.max_completion_tokens or body.max_tokens or engine.block_size - prompt_tokens
        jobs, events = server.jobs(body, [prompt], max_tokens, body.stops() + (CHAT_STOP,), body.logprobs)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": name}
        server.submit(jobs)
        if body.stream:
            role = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
            return _JobStream(_event_stream(server, jobs, events, {**head, "object": "chat.completion.chunk"},
                                            prompt_tokens, bool(body.stream_options.get("include_usage")),
                                            _chat_choice, role), jobs)
        [r] = await server.results(jobs, events, http)
        choice = {"index": 0, "message": {"role": "assistant", "content": r["text"]},
                  "logprobs": _chat_logprobs(tokenizer, r) if body.logprobs else None,
                  "finish_reason": r["finish_reason"]}
        return {**head, "choices": [choice], "usage": _usage(prompt_tokens, r["tokens"])}


async def _scored_completion(server: Server, engine: Engine, tokenizer: TextTokenizer, body: CompletionBody,
                             prompts: list[str | list[int]], http: HTTPRequest) -> dict[str, Any]:
    """A completion with echo or top alternatives (what lm-eval's local-completions asks for): the choices
    generated as usual (none with max_tokens 0), then each prompt + completion scored in one forward pass."""
    ids = [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
    for prompt in ids:
        if not prompt:
            raise UserError("the prompt is empty")
        if len(prompt) + body.max_tokens > engine.block_size:
            raise UserError(f"prompt ({len(prompt)} tokens) + max_tokens ({body.max_tokens}) exceed the context "
                            f"of {engine.block_size}")
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": server.name}
    results = [{"text": "", "token_ids": [], "tokens": 0, "finish_reason": "length"} for _ in prompts]
    if body.max_tokens:
        jobs, events = server.jobs(body, prompts, body.max_tokens, body.stops(), True)
        server.submit(jobs)
        results = await server.results(jobs, events, http)
    choices = []
    for i, (prompt, text, r) in enumerate(zip(ids, prompts, results)):
        echoed = (text if isinstance(text, str) else tokenizer.decode(prompt)) if body.echo else ""
        # On the worker thread: a forward pass over up to a whole context.
        logprobs = await asyncio.wrap_future(server.batcher.call(
            _scored_logprobs, tokenizer, engine.model, prompt, r["token_ids"], body.logprobs or 0, body.echo,
            len(echoed)))
        choices.append({"index": i, "text": echoed + r["text"], "finish_reason": r["finish_reason"],
                        "logprobs": logprobs})
    return {**head, "choices": choices,
            "usage": _usage(sum(map(len, ids)), sum(r["tokens"] for r in results))}


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
    except RequestTimeout as e:
        yield _sse({"error": {"message": str(e), "type": "timeout_error", "param": None, "code": "timeout"}})
    if include_usage:
        yield _sse({**head, "choices": [], "usage": _usage(prompt_tokens, completion_tokens)})
    yield "data: [DONE]\n\n"


# ---------------------------------------------------------------- the command

API_KEY_ENV = "LEANGPT_API_KEY"


@dataclass
class ServeSettings:
    model: Path | None = setting(None, "checkpoint directory (plain, quantized or pruned)", required=True)
    host: str = setting("127.0.0.1", "address to listen on (0.0.0.0 for every interface: set --api-key then)")
    port: int = setting(8000, "TCP port to listen on (0 picks a free one)")
    model_name: str | None = setting(None, "the model id clients send and /v1/models lists (default: the "
                                           "checkpoint directory's name)")
    max_batch: int = setting(16, "most prompts decoded together (rows of the running batch); a request joins at "
                                 "the next step once a row is free")
    max_queue: int = setting(256, "most prompts waiting for a row; a request beyond it gets 429 with Retry-After")
    prefill_chunk: int = setting(256, "prompt tokens prefilled per step over all joining rows: a long prompt holds "
                                      "the decoding rows up by one chunk a step")
    request_timeout: float = setting(600.0, "seconds a request may take, waiting included; past it the request "
                                            "gets 408 (a stream, an error event) and its rows stop; 0: no limit")
    api_key: str | None = setting(None, f"require 'Authorization: Bearer KEY' on /v1/ and /metrics (401 "
                                        f"without); default ${API_KEY_ENV}, else no key")
    compile: bool = setting(True, "torch.compile the decode step (on a CPU, steps of up to 64 rows take leangpt's C++ step; "
                                 "each batch shape compiles once, in the "
                                 "warm-up before serving; falls back to eager); --no-compile decodes eagerly")
    device: str = setting("auto", "auto, cpu, cuda, ...")
    log_level: str = setting("info", "server log level (requests and runs of the batch are logged at info)",
                             choices=["debug", "info", "warning", "error"])

    def validate(self) -> None:
        for name in ("max_batch", "max_queue", "prefill_chunk"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.request_timeout < 0:
            raise UserError(f"--request-timeout must be >= 0 (0: no limit), got {self.request_timeout}")
        if not 0 <= self.port <= 65535:
            raise UserError(f"--port must be in 0..65535, got {self.port}")
        if self.api_key is not None and not self.api_key.strip():
            raise UserError("--api-key is empty")

    def key(self) -> str | None:
        """The API key: --api-key, else $LEANGPT_API_KEY, else none."""
        return self.api_key or os.environ.get(API_KEY_ENV) or None


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def serve(s: ServeSettings) -> dict[str, Any]:
    """Serve s.model until SIGINT / SIGTERM; returns the counters /health reported last (batches, rows, tokens)."""
    s.validate()
    import uvicorn

    from leangpt.checkpoint import load_checkpoint
    from leangpt.device import pick_device

    worker = worker_thread()  # loads the model, then runs it: the process's only thread of torch ops
    model, tokenizer, _ = worker.submit(load_checkpoint, s.model, pick_device(s.device)).result()
    name = s.model_name or s.model.resolve().name
    key = s.key()
    app = create_app(Engine(model, compile=s.compile), tokenizer, name, s.max_batch, max_queue=s.max_queue,
                     prefill_chunk=s.prefill_chunk, request_timeout=s.request_timeout or None, api_key=key,
                     worker=worker)
    logging.basicConfig(level=s.log_level.upper(), format="%(levelname)s:     %(message)s")
    cli.log(f"serving {s.model} as {name!r} on http://{s.host}:{s.port}/v1 (chat page at /)")
    if key is None and not _loopback(s.host):
        cli.log(f"warning: listening on {s.host} without an API key: whoever reaches the port can use the model "
                f"(--api-key or ${API_KEY_ENV})")
    server = uvicorn.Server(uvicorn.Config(app, host=s.host, port=s.port, log_level=s.log_level))
    if threading.current_thread() is threading.main_thread():
        # uvicorn shuts down gracefully on SIGINT / SIGTERM, then re-raises the signal to the handler that was set
        # before it ran: with a no-op one, a requested stop returns here.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: None)
    server.run()  # a port already taken is logged and exits 1
    worker.shutdown()
    stats = app.state.server.batcher.stats
    return {"model": name, "batches": stats.batches, "rows": stats.rows, "completion_tokens": stats.tokens}


def build_parser() -> cli.ArgumentParser:
    return cli.build_parser(ServeSettings, "serve", "Serve a checkpoint over an OpenAI-compatible HTTP API "
                            "(/v1/completions, /v1/chat/completions, /v1/models, /health, /metrics) with "
                            "continuous batching, and a chat page at /.")


def main(argv: list[str] | None = None) -> int:
    s, output = cli.parse(build_parser(), argv)
    result = serve(s)
    if output.json:
        cli.print_json(result)
    return 0
