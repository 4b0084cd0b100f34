"""`leangpt serve`: OpenAI-shaped responses equal to the engine's output, streaming, batching of concurrent requests,
bad requests as 400s, and the real `openai` client against the real command."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from leangpt.checkpoint import load_checkpoint
from leangpt.engine import Engine, Request
from leangpt.sampling import SamplingConfig
from leangpt.serve import CHAT_STOP, Message, create_app, render_chat
from tests.conftest import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

NAME = "tiny"


@pytest.fixture(scope="module")
def served(tiny_checkpoint):
    """(client, app, model, tokenizer): the tiny checkpoint behind a TestClient, worker thread running."""
    model, tokenizer, _ = load_checkpoint(tiny_checkpoint)
    app = create_app(Engine(model), tokenizer, NAME, max_batch=4)
    with TestClient(app) as client:
        yield client, app, model, tokenizer


def engine_text(model, tokenizer, prompt: str, max_tokens: int, temperature: float = 0, seed: int | None = None) -> str:
    """The reference: Engine.generate alone on this prompt, stopping at end-of-text."""
    req = Request(tokenizer.encode(prompt), max_tokens, SamplingConfig(temperature=temperature), seed,
                  (tokenizer.eos_id,))
    [completion] = Engine(model).generate([req])
    return tokenizer.decode(completion.tokens)


def complete(client, **body):
    r = client.post("/v1/completions", json={"model": NAME, **body})
    assert r.status_code == 200, r.text
    return r.json()


def sse(client, path: str, body: dict) -> list:
    """The parsed `data:` events of a streamed response; the last one must be [DONE]."""
    with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


def test_models_and_health(served):
    client = served[0]
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == [NAME]
    assert client.get(f"/v1/models/{NAME}").json()["object"] == "model"
    assert client.get("/v1/models/other").status_code == 404
    assert client.get("/health").json()["status"] == "ok"
    r = client.post("/v1/completions", json={"model": "gpt-4", "prompt": "The king"})
    assert r.status_code == 404 and r.json()["error"] == {
        "message": "model 'gpt-4' is not served here; this server serves 'tiny'", "type": "invalid_request_error",
        "param": None, "code": "model_not_found"}  # OpenAI's answer to an unknown model


def test_completions_equal_the_engine(served):
    client, _, model, tokenizer = served
    prompts = ["The king speaks", "Night"]
    out = complete(client, prompt=prompts, max_tokens=12, temperature=0)
    assert out["object"] == "text_completion" and out["id"].startswith("cmpl-") and out["model"] == NAME
    assert [c["index"] for c in out["choices"]] == [0, 1]
    for prompt, choice in zip(prompts, out["choices"]):
        assert choice["text"] == engine_text(model, tokenizer, prompt, 12)
        assert choice["finish_reason"] in ("stop", "length") and choice["logprobs"] is None
    # The tiny model's greedy text is plain; sampled text with a seed (prompt i gets seed + i) tells more apart.
    sampled = complete(client, prompt=prompts, max_tokens=12, temperature=0.9, seed=11)
    for i, (prompt, choice) in enumerate(zip(prompts, sampled["choices"])):
        assert choice["text"] == engine_text(model, tokenizer, prompt, 12, 0.9, 11 + i)
    usage = out["usage"]
    assert usage["prompt_tokens"] == sum(len(tokenizer.encode(p)) for p in prompts)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    with_lp = complete(client, prompt=prompts[0], max_tokens=12, temperature=0, logprobs=0)["choices"][0]
    lp = with_lp["logprobs"]
    assert with_lp["text"] == out["choices"][0]["text"] and "".join(lp["tokens"]) == with_lp["text"]
    assert len(lp["token_logprobs"]) == len(lp["tokens"]) and all(x <= 0 for x in lp["token_logprobs"])
    assert lp["text_offset"] == [len("".join(lp["tokens"][:i])) for i in range(len(lp["tokens"]))]


def test_streaming_reassembles_seeds_repeat(served):
    client = served[0]
    body = {"model": NAME, "prompt": "The queen", "max_tokens": 20, "temperature": 0.9, "seed": 5}
    whole = complete(client, **body)["choices"][0]
    assert complete(client, **body)["choices"][0]["text"] == whole["text"]  # same seed, same text
    others = {complete(client, **{**body, "seed": s})["choices"][0]["text"] for s in (6, 7, 8)}
    assert others - {whole["text"]}  # other seeds give other text
    chunks = sse(client, "/v1/completions", {**body, "stream": True, "stream_options": {"include_usage": True}})
    pieces = [c["choices"][0]["text"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"] is None]
    finals = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert "".join(pieces) == whole["text"] and len(pieces) > 1
    # No character split across chunks: a piece holds no replacement character that the whole text lacks (a
    # tiny model can sample an invalid byte sequence itself).
    assert sum(p.count("\ufffd") for p in pieces) == whole["text"].count("\ufffd")
    assert finals == [whole["finish_reason"]]
    assert chunks[-1]["usage"]["completion_tokens"] == complete(client, **body)["usage"]["completion_tokens"]


def test_stop_strings(served):
    client = served[0]
    body = {"prompt": "The king", "max_tokens": 24, "temperature": 0.9, "seed": 1}
    text = complete(client, **body)["choices"][0]["text"]
    word = text.split()[2]
    for stop in (word, [word, "zzz"]):
        choice = complete(client, **body, stop=stop)["choices"][0]
        assert choice == {**choice, "text": text[:text.index(word)], "finish_reason": "stop"}
    streamed = sse(client, "/v1/completions", {**body, "stop": word, "stream": True})
    assert "".join(c["choices"][0]["text"] for c in streamed) == text[:text.index(word)]


def test_chat_is_the_rendered_prompt_completed(served):
    client, _, model, tokenizer = served
    messages = [{"role": "system", "content": "You are a bard."}, {"role": "user", "content": "Sing of the king."}]
    prompt = render_chat([Message(**m) for m in messages])
    assert prompt == "System: You are a bard.\nUser: Sing of the king.\nAssistant:"
    r = client.post("/v1/chat/completions", json={"model": NAME, "messages": messages, "max_tokens": 16,
                                                  "temperature": 0, "logprobs": True})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-")
    expected = engine_text(model, tokenizer, prompt, 16).split(CHAT_STOP)[0]
    choice = out["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": expected}
    assert len(choice["logprobs"]["content"]) == out["usage"]["completion_tokens"]
    assert out["usage"]["prompt_tokens"] == len(tokenizer.encode(prompt))
    chunks = sse(client, "/v1/chat/completions", {"messages": messages, "max_tokens": 16, "temperature": 0,
                                                  "stream": True})
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == expected
    assert chunks[-1]["choices"][0]["finish_reason"] == choice["finish_reason"]


def test_concurrent_requests_share_the_running_batch(served):
    client, app = served[:2]
    batcher = app.state.server.batcher
    prompts = ["The king", "Night falls on the castle", "The brave queen rides"]
    results: dict[int, str] = {}

    def ask(i):
        results[i] = complete(client, prompt=prompts[i], max_tokens=10, temperature=0.9, seed=i)["choices"][0]["text"]

    before, submitted = client.get("/health").json(), batcher.submitted
    gate = threading.Event()
    held = batcher.call(gate.wait)  # the worker is busy: all three arrive while it is
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while batcher.submitted < submitted + 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    gate.set()
    assert held.result(timeout=30) is True
    for t in threads:
        t.join()
    after = client.get("/health").json()
    assert (after["batches"] - before["batches"], after["rows"] - before["rows"], after["last_batch_rows"]) == (1, 3, 3)
    for i, prompt in enumerate(prompts):  # each equals its solo run (one row per batch)
        assert results[i] == complete(client, prompt=prompt, max_tokens=10, temperature=0.9, seed=i)["choices"][0]["text"]
    # Six prompts of one request with --max-batch 4: 4 rows run, the other 2 take rows as they free up.
    before = client.get("/health").json()
    out = complete(client, prompt=prompts * 2, max_tokens=10, temperature=0.9, seed=0)
    after = client.get("/health").json()
    assert (after["rows"] - before["rows"], after["last_batch_rows"]) == (6, 4)
    assert [c["text"] for c in out["choices"][:3]] == [results[i] for i in range(3)]  # seed + i per prompt


BAD = [
    ("/v1/completions", {"prompt": ""}, "empty"),
    ("/v1/completions", {"prompt": []}, "empty"),
    ("/v1/completions", {"prompt": "The king", "max_tokens": 100000}, "context"),
    ("/v1/completions", {"prompt": "The king", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "The king", "temperature": -1}, "temperature"),
    ("/v1/completions", {"prompt": "The king", "top_p": 0}, "top_p"),
    ("/v1/completions", {"prompt": "The king", "frequency_penalty": 3}, "frequency_penalty"),
    ("/v1/completions", {"prompt": "The king", "n": 2}, "n must be 1"),
    ("/v1/completions", {"prompt": "The king", "seed": 2**70}, "seed"),
    ("/v1/completions", {"prompt": "The king", "echo": True, "stream": True}, "echo"),
    ("/v1/completions", {"prompt": "The king", "logprobs": 6}, "logprobs"),
    ("/v1/completions", {"prompt": "The king", "logprobs": 0, "stream": True}, "streaming"),
    ("/v1/completions", {"max_tokens": 5}, "prompt"),
    ("/v1/completions", {"prompt": 5}, "prompt"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, "role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}, "context"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi " * 200}]}, "context"),
]


@pytest.mark.parametrize("path,body,needle", BAD, ids=[f"{p.split('/')[-1]}-{n}-{i}" for i, (p, _, n) in enumerate(BAD)])
def test_bad_requests_are_400_with_a_message(served, path, body, needle):
    r = served[0].post(path, json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert needle in error["message"] and error["type"] == "invalid_request_error"


def test_malformed_json_and_unknown_route(served):
    client = served[0]
    r = client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["message"]
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["message"]


def test_quantized_checkpoint_serves(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LEANGPT_CACHE_DIR", str(tmp_path / "cache"))
    q = tmp_path / "int8"
    code, _, err = run_cli(["quantize", "--model", str(tiny_checkpoint), "--method", "int8", "--out", str(q)], capsys)
    assert code == 0, err
    model, tokenizer, meta = load_checkpoint(q)
    assert meta["quantization"]
    with TestClient(create_app(Engine(model), tokenizer, "q8")) as client:
        out = client.post("/v1/completions", json={"model": "q8", "prompt": "The king", "max_tokens": 10,
                                                   "temperature": 0.9, "seed": 2}).json()
    assert out["choices"][0]["text"] == engine_text(model, tokenizer, "The king", 10, 0.9, 2)


def test_help_and_missing_model(capsys, tmp_path):
    code, out, _ = run_cli(["serve", "--help"], capsys)
    assert code == 0 and "--max-batch" in out and "--model-name" in out
    code, out, err = run_cli(["serve", "--model", str(tmp_path / "nope")], capsys)
    assert code == 2 and err.count("\n") == 1 and "not found" in err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_openai_client_against_the_real_command(tiny_checkpoint):
    import openai

    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "leangpt", "serve", "--model", str(tiny_checkpoint), "--port",
                             str(port), "--model-name", NAME], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, cwd=Path(__file__).parents[1])
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        deadline = time.monotonic() + 60
        while True:
            try:
                models = client.models.list()
                break
            except openai.APIConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    pytest.fail(f"the server did not start:\n{proc.communicate()[0]}")
                time.sleep(0.2)
        assert [m.id for m in models.data] == [NAME]
        done = client.completions.create(model=NAME, prompt="The king", max_tokens=12, temperature=0)
        assert done.choices[0].finish_reason in ("stop", "length") and done.usage.completion_tokens >= 1
        stream = client.completions.create(model=NAME, prompt="The king", max_tokens=12, temperature=0, stream=True)
        assert "".join(c.choices[0].text for c in stream) == done.choices[0].text
        chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hail"}],
                                              max_tokens=8, temperature=0.7, seed=3)
        assert chat.choices[0].message.role == "assistant"
        parts = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hail"}],
                                               max_tokens=8, temperature=0.7, seed=3, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in parts) == chat.choices[0].message.content
        with pytest.raises(openai.BadRequestError, match="exceed"):
            client.completions.create(model=NAME, prompt="The king", max_tokens=10**6)
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "Traceback" not in out


def test_serve_loads_the_model_on_its_worker_thread(tiny_checkpoint, monkeypatch):
    """The thread that runs the model loads it too: the main thread never starts an OpenMP team of its own."""
    import leangpt.checkpoint
    from leangpt.errors import UserError
    from leangpt.serve import ServeSettings, serve

    def load(*_):
        raise UserError(threading.current_thread().name)

    monkeypatch.setattr(leangpt.checkpoint, "load_checkpoint", load)
    with pytest.raises(UserError, match="^leangpt-serve-worker"):
        serve(ServeSettings(model=tiny_checkpoint))
