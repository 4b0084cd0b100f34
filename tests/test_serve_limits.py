"""`leangpt serve` under load and faults, over real sockets: requests joining the running batch mid-way, 429 with
Retry-After beyond --max-queue, the per-request timeout, clients hanging up, the API key, and /metrics. Counts are
small and every loop is bounded in time."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from leangpt.serve import API_KEY_ENV, ServeSettings
from tests.serve_live import live, tiny_app, wait_for

pytestmark = pytest.mark.usefixtures("one_thread")

NAME = "tiny"


def body(**kw) -> dict:
    return {"model": NAME, "prompt": "The king", "max_tokens": 30, "temperature": 0.9, "seed": 1, **kw}


def health(client: httpx.Client) -> dict:
    return client.get("/health").json()


def test_a_request_joins_the_running_batch_mid_way(tiny_checkpoint):
    app = tiny_app(tiny_checkpoint, step_seconds=0.02, max_batch=4)
    with live(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        runs = health(client)["batches"]
        with client.stream("POST", "/v1/completions", json=body(stream=True, max_tokens=40)) as long:
            lines = long.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))  # the long row is decoding
            short = client.post("/v1/completions", json=body(max_tokens=3, seed=2)).json()
            during = health(client)
            rest = [line for line in lines if line.startswith("data: ")]
        assert short["usage"]["completion_tokens"] >= 1
        assert during["running_rows"] == 1 and during["batches"] == runs + 1  # one run: the short row joined it
        assert len(rest) > 5 and rest[-1] == "data: [DONE]"  # the long one went on after the short one was done


def test_overload_gets_429_with_retry_after_never_a_500(tiny_checkpoint):
    app = tiny_app(tiny_checkpoint, step_seconds=0.02, max_batch=1, max_queue=2)
    with live(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        def ask(i: int) -> httpx.Response:
            stream = i % 2 == 1
            return client.post("/v1/completions", json=body(max_tokens=8, seed=i, stream=stream))

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(ask, range(8)))
        codes = sorted(r.status_code for r in answers)
        assert set(codes) == {200, 429} and codes.count(200) >= 3, codes  # 1 row + 2 waiting, at least
        for r in answers:
            if r.status_code == 429:
                error = r.json()["error"]
                assert int(r.headers["retry-after"]) >= 1
                assert error["type"] == "rate_limit_error" and error["code"] == "rate_limit_exceeded"
                assert "at most 2" in error["message"]
        wait_for(lambda: health(client)["running_rows"] == 0)
        assert client.post("/v1/completions", json=body(max_tokens=4)).status_code == 200  # served again


def test_a_request_past_the_timeout_gets_408_and_frees_its_row(tiny_checkpoint):
    app = tiny_app(tiny_checkpoint, step_seconds=0.05, request_timeout=0.4)
    with live(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        r = client.post("/v1/completions", json=body(max_tokens=40))
        assert r.status_code == 408 and r.json()["error"]["type"] == "timeout_error", r.text
        with client.stream("POST", "/v1/completions", json=body(max_tokens=40, stream=True)) as s:
            events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["type"] == "timeout_error"
        assert len(events) > 3  # some text came before the limit
        wait_for(lambda: health(client)["running_rows"] == 0, timeout=2)
        assert client.post("/v1/completions", json=body(max_tokens=2)).status_code == 200


def test_a_client_that_hangs_up_frees_its_row_within_a_step(tiny_checkpoint):
    app = tiny_app(tiny_checkpoint, step_seconds=0.05)
    with live(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        # Streaming: read a few chunks, then close the connection.
        with client.stream("POST", "/v1/completions", json=body(max_tokens=40, stream=True)) as s:
            lines = s.iter_lines()
            for _ in range(3):
                next(lines)
            steps = health(client)["steps"]
        wait_for(lambda: health(client)["running_rows"] == 0, timeout=2)
        assert health(client)["steps"] - steps <= 3  # 40 tokens would have taken 2 s more
        # Not streaming: the request goes out, then the socket closes before any reply.
        host, port = url.removeprefix("http://").split(":")
        payload = json.dumps(body(max_tokens=40)).encode()
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
            wait_for(lambda: health(client)["running_rows"] == 1, timeout=5, every=0.01)
        wait_for(lambda: health(client)["running_rows"] == 0, timeout=2)
        assert 'status="499"' in client.get("/metrics").text


def test_the_api_key_guards_the_api_not_the_page(tiny_checkpoint, monkeypatch):
    import openai

    app = tiny_app(tiny_checkpoint, api_key="sekrit")
    with live(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekrit"}):
            for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"), ("GET", "/metrics")):
                r = client.request(method, path, headers=headers, json=body(max_tokens=2))
                assert r.status_code == 401, (path, headers)
                assert r.json()["error"]["code"] == "invalid_api_key"
        assert client.get("/health").status_code == 200 and client.get("/").status_code == 200
        assert client.get("/metrics", headers={"Authorization": "Bearer sekrit"}).status_code == 200
        good = openai.OpenAI(base_url=f"{url}/v1", api_key="sekrit", max_retries=0)
        assert good.completions.create(model=NAME, prompt="The king", max_tokens=3).usage.completion_tokens >= 1
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0).models.list()
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert ServeSettings(model=tiny_checkpoint).key() == "from-env"
    assert ServeSettings(model=tiny_checkpoint, api_key="flag").key() == "flag"
    monkeypatch.delenv(API_KEY_ENV)
    assert ServeSettings(model=tiny_checkpoint).key() is None


def metric_values(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_count_requests_tokens_and_times(tiny_checkpoint):
    app = tiny_app(tiny_checkpoint, max_batch=4)
    with live(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        def ask(i: int) -> dict:
            return client.post("/v1/completions", json=body(max_tokens=6, seed=i)).json()

        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(ask, range(6)))
        assert client.post("/v1/completions", json=body(temperature=5)).status_code == 400
        assert client.post("/v1/completions", json=body(model="gpt-4")).status_code == 404
        r = client.get("/metrics")
        assert r.headers["content-type"].startswith("text/plain")
    m = metric_values(r.text)
    ok = (("endpoint", "/v1/completions"), ("status", "200"))
    assert m[("leangpt_requests_total", ok)] == 6
    assert m[("leangpt_requests_total", (("endpoint", "/v1/completions"), ("status", "400")))] == 1
    assert m[("leangpt_requests_total", (("endpoint", "/v1/completions"), ("status", "404")))] == 1
    assert m[("leangpt_prompt_tokens_total", ())] == sum(a["usage"]["prompt_tokens"] for a in answers)
    assert m[("leangpt_completion_tokens_total", ())] == sum(a["usage"]["completion_tokens"] for a in answers)
    assert m[("leangpt_time_to_first_token_seconds_count", ())] == 6
    assert m[("leangpt_request_latency_seconds_count", ())] == 6
    assert m[("leangpt_queue_depth", ())] == 0 and m[("leangpt_running_rows", ())] == 0


def test_a_short_soak_with_clients_hanging_up(tiny_checkpoint):
    app = tiny_app(tiny_checkpoint, max_batch=4, max_queue=64)
    with live(app) as url:
        def client_run(i: int) -> int:
            with httpx.Client(base_url=url, timeout=30) as client:
                with client.stream("POST", "/v1/chat/completions", json={
                        "messages": [{"role": "user", "content": f"Speak {i}"}], "max_tokens": 20, "stream": True,
                        "temperature": 0.9, "seed": i}) as s:
                    if s.status_code != 200:
                        return s.status_code
                    for n, line in enumerate(s.iter_lines()):
                        if i % 5 == 0 and n == 2:  # one client in five hangs up mid-stream
                            return 200
                        if line.startswith("data: {") and "error" in json.loads(line[6:]):
                            return 500
            return 200

        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(client_run, range(40)))
        with httpx.Client(base_url=url) as client:
            wait_for(lambda: health(client)["running_rows"] == 0, timeout=5)
    assert codes == [200] * 40
