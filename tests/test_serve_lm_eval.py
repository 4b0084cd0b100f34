"""/v1/completions as lm-eval's `local-completions` uses it: echo, logprobs with top alternatives, score-only
requests and token-id prompts checked against a direct forward pass, then lm-eval itself against the real
`leangpt serve`, agreeing with in-process scoring."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from leangpt.checkpoint import load_checkpoint
from leangpt.engine import Engine
from leangpt import serve
from leangpt.serve import create_app

pytestmark = pytest.mark.usefixtures("one_thread")

NAME = "tiny"
PROMPT = "The king speaks with the queen"


@pytest.fixture(scope="module")
def served(tiny_checkpoint):
    model, tokenizer, _ = load_checkpoint(tiny_checkpoint)
    with TestClient(create_app(Engine(model), tokenizer, NAME, max_batch=2)) as client:
        yield client, model, tokenizer


def reference(model, ids: list[int]) -> torch.Tensor:
    """log-softmax of the model's logits over ids[:-1]: row i is the distribution of token i + 1."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids[:-1]]))[0].float(), dim=-1)


def complete(client, **body) -> dict:
    r = client.post("/v1/completions", json={"model": NAME, "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()


def check_position(tokenizer, logp_row: torch.Tensor, token: int, lp: float, top: dict, n: int) -> None:
    assert math.isclose(lp, logp_row[token].item(), abs_tol=1e-5)
    values, indices = logp_row.topk(n)
    assert list(top) == [tokenizer.decode([i]) for i in indices.tolist()]
    assert all(math.isclose(top[tokenizer.decode([i])], v, abs_tol=1e-5)
               for i, v in zip(indices.tolist(), values.tolist()))


def test_echo_scores_the_prompt_with_top_alternatives(served):
    client, model, tokenizer = served
    ids = tokenizer.encode(PROMPT)
    out = complete(client, prompt=PROMPT, max_tokens=0, echo=True, logprobs=3)
    [choice] = out["choices"]
    assert choice["text"] == PROMPT and out["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0,
                                                         "total_tokens": len(ids)}
    lp = choice["logprobs"]
    assert lp["tokens"] == [tokenizer.decode([t]) for t in ids]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    logp = reference(model, ids)
    for i in range(1, len(ids)):
        check_position(tokenizer, logp[i - 1], ids[i], lp["token_logprobs"][i], lp["top_logprobs"][i], 3)
    assert lp["text_offset"] == [len(tokenizer.decode(ids[:i])) for i in range(len(ids))]


def test_echo_then_generated_tokens_and_token_id_prompts(served):
    client, model, tokenizer = served
    ids = tokenizer.encode(PROMPT)
    by_text = complete(client, prompt=PROMPT, max_tokens=4, echo=True, logprobs=1)["choices"][0]
    by_ids = complete(client, prompt=[ids, ids[:3]], max_tokens=4, echo=True, logprobs=1)["choices"]
    assert by_ids[0] == by_text and by_ids[1]["logprobs"]["tokens"][:3] == by_text["logprobs"]["tokens"][:3]
    tokens = by_text["logprobs"]["tokens"]
    generated = tokenizer.encode(by_text["text"])[len(ids):]
    assert by_text["text"].startswith(PROMPT) and "".join(tokens) == by_text["text"]
    assert len(tokens) == len(ids) + 4
    full = ids + generated
    logp = reference(model, full)
    for i in range(len(ids), len(full)):  # greedy: each generated token is the likeliest
        check_position(tokenizer, logp[i - 1], full[i], by_text["logprobs"]["token_logprobs"][i],
                       by_text["logprobs"]["top_logprobs"][i], 1)
        assert full[i] == logp[i - 1].argmax().item()


def test_logprobs_without_echo_cover_generated_tokens_only(served):
    client, _, _ = served
    choice = complete(client, prompt=["The king", "Night"], max_tokens=3, logprobs=2)["choices"][1]
    assert not choice["text"].startswith("Night")
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 3
    assert all(len(top) == 2 and max(top.values()) == top[t] for t, top in zip(lp["tokens"], lp["top_logprobs"]))
    assert lp["text_offset"][0] == 0


@pytest.mark.parametrize("body,needle", [({"logprobs": 6}, "at most 5"), ({"max_tokens": 0}, "echo"),
                                         ({"echo": True, "stream": True}, "streaming"),
                                         ({"prompt": [[]], "echo": True, "max_tokens": 0}, "empty")])
def test_bad_scoring_requests_are_openai_errors(served, body, needle):
    r = served[0].post("/v1/completions", json={"prompt": PROMPT, **body})
    assert r.status_code == 400 and needle in r.json()["error"]["message"]
    assert r.json()["error"]["type"] == "invalid_request_error"


# ---------------------------------------------------------------- lm-eval against the real server

def write_task(directory: Path, tokenizer) -> Path:
    """A multiple-choice task whose answer is the word the context ends on repeating (known by construction)."""
    words = ["king", "queen", "sword", "night", "crown", "castle"]
    docs = [{"context": f"The {w} speaks. The {w} speaks. The", "choices": [f" {w}", f" {words[i - 1]}"],
             "answer": 0} for i, w in enumerate(words)]
    data = directory / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (directory / "echo_mc.yaml").write_text(
        f"task: echo_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: '{{context}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n")
    return directory


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(proc: subprocess.Popen, url: str) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"the server did not start:\n{proc.communicate()[0]}")
            time.sleep(0.2)


def loglikelihoods(results: dict) -> list[float]:
    return [resp[0] for s in sorted(results["samples"]["echo_mc"], key=lambda s: s["doc_id"])
            for resp in s["filtered_resps"]]


def test_lm_eval_local_completions_agrees_with_in_process(tiny_checkpoint, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from leangpt.lm_eval_model import LeanGPTLM

    model, tokenizer, _ = load_checkpoint(tiny_checkpoint)
    tasks = TaskManager(include_path=str(write_task(tmp_path, tokenizer)), include_defaults=False)
    local = simple_evaluate(model=LeanGPTLM(model, tokenizer), tasks=["echo_mc"], task_manager=tasks,
                            log_samples=True, bootstrap_iters=0)
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "leangpt", "serve", "--model", str(tiny_checkpoint), "--port",
                             str(port), "--model-name", NAME], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            cwd=Path(__file__).parents[1])
    try:
        _wait_for(proc, f"http://127.0.0.1:{port}/health")
        served = simple_evaluate(model="local-completions", tasks=["echo_mc"], task_manager=tasks, log_samples=True,
                                 bootstrap_iters=0,
                                 model_args=f"model={NAME},base_url=http://127.0.0.1:{port}/v1/completions,"
                                            f"tokenizer_backend=huggingface,tokenizer={tiny_checkpoint},"
                                            f"num_concurrent=1,max_retries=1")
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert "Traceback" not in out
    assert served["results"]["echo_mc"]["acc,none"] == local["results"]["echo_mc"]["acc,none"]
    ours, theirs = loglikelihoods(local), loglikelihoods(served)
    assert len(ours) == len(theirs) == 12
    assert all(math.isclose(a, b, abs_tol=1e-4) for a, b in zip(ours, theirs))


def test_scoring_runs_on_the_worker_thread(served, monkeypatch):
    """One thread runs every torch op of a server (two OpenMP teams on few cores slow each step down 4x)."""
    client = served[0]
    batcher = client.app.state.server.batcher
    worker = batcher.call(threading.get_ident).result(timeout=30)
    seen = []
    original = serve._scored_logprobs
    monkeypatch.setattr(serve, "_scored_logprobs", lambda *a: (seen.append(threading.get_ident()), original(*a))[1])
    complete(client, prompt=PROMPT, max_tokens=2, echo=True, logprobs=1)
    assert seen == [worker] and worker != threading.get_ident()
