"""Helpers for tests of `leangpt serve` over real sockets: the app under uvicorn in a thread, on loopback, and an
engine slowed down so that a generation lasts long enough to be watched."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import uvicorn

from leangpt.checkpoint import load_checkpoint
from leangpt.engine import Engine
from leangpt.serve import create_app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slowed(engine: Engine, seconds: float) -> Engine:
    """Every decode step takes at least `seconds` more (the tiny model is otherwise done in a blink)."""
    decode = engine.decode

    def slow(*args, **kwargs):
        time.sleep(seconds)
        return decode(*args, **kwargs)

    engine.decode = slow
    return engine


def tiny_app(checkpoint, name: str = "tiny", step_seconds: float = 0.0, **options):
    """create_app over the tiny checkpoint, its decode step slowed by step_seconds."""
    model, tokenizer, _ = load_checkpoint(checkpoint)
    engine = slowed(Engine(model), step_seconds) if step_seconds else Engine(model)
    return create_app(engine, tokenizer, name, **options)


@contextmanager
def live(app) -> Iterator[str]:
    """Serve the app on a free loopback port while the block runs; yields its base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    url = f"http://127.0.0.1:{server.config.port}"
    wait_for(lambda: httpx.get(f"{url}/health").json()["ready"], timeout=60)  # warmed up: timings are the steps'
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(30)


def wait_for(condition, timeout: float = 10.0, every: float = 0.02) -> float:
    """Poll until condition() is true; returns the seconds it took (fails after timeout)."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not true within {timeout} s")
        time.sleep(every)
    return time.monotonic() - start
