"""Continuous batching (leangpt.batching) against the engine run on each request alone: rows joining mid-way, chunked
prefill beside decoding rows, rows leaving and their slots reused, every model variant and the compiled step."""

from __future__ import annotations

import pytest
import torch

from leangpt.batching import RunningBatch
from leangpt.engine import Engine, Request
from leangpt.sampling import SamplingConfig
from tests.test_generate_engine import GREEDY, VARIANTS, tiny

pytestmark = pytest.mark.usefixtures("one_thread")

REQUESTS = [
    Request([1, 2, 3, 4, 5, 6, 7], 10, GREEDY),
    Request([9], 8, SamplingConfig(temperature=0.9, top_k=50), seed=3),
    Request(list(range(20, 50)), 12, SamplingConfig(temperature=0.8, repetition_penalty=1.3, frequency_penalty=0.5),
            seed=5, stop_ids=(7,)),
    Request([5, 6], 6, SamplingConfig(temperature=0.7, top_p=0.9), seed=9),
    Request([3, 1, 4, 1, 5, 9, 2, 6], 9, GREEDY, stop_ids=(11,)),
]


def solo(model, requests):
    return [Engine(model).generate([r])[0] for r in requests]


def run(batch: RunningBatch, requests: list[Request], joins: list[int]):
    """Add request i at step joins[i] (or as soon as a row is free after it); run until every row ended.
    Returns the completions in request order and the rows running at each step."""
    ids, got, running, step = {}, {}, [], 0
    todo = sorted(zip(joins, range(len(requests))))
    while todo or batch.rows:
        while todo and todo[0][0] <= step and batch.free:
            ids[batch.add(requests[todo.pop(0)[1]])] = len(ids)
        running.append(batch.rows)
        batch.step()
        step += 1
        for row, completion in batch.ended():
            got[row] = completion
    order = {i: row for row, i in ids.items()}
    return [got[order[i]] for i in range(len(requests))], running


def assert_same(got, ref):
    for g, r in zip(got, ref):
        assert (g.tokens, g.finish_reason) == (r.tokens, r.finish_reason)
        torch.testing.assert_close(torch.tensor(g.logprobs), torch.tensor(r.logprobs), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
def test_rows_joining_mid_way_equal_their_solo_runs(variant):
    model = VARIANTS[variant]()
    ref = solo(model, REQUESTS)
    # Three rows for five requests: later ones wait for a free slot, rows move when one before them ends, and the
    # 30-token prompt is prefilled 8 tokens a step beside decoding rows.
    batch = RunningBatch(Engine(model), 3, prefill_chunk=8)
    batch.warm_up()  # placeholder steps at every batch size leave nothing behind
    got, running = run(batch, REQUESTS, [0, 1, 1, 3, 4])
    assert_same(got, ref)
    assert max(running) == 3


def test_a_long_prompt_is_prefilled_in_chunks_while_rows_decode():
    model = tiny()
    decoding, long = Request([1, 2], 20, GREEDY), Request(list(range(10, 50)), 4, GREEDY)
    ref = solo(model, [decoding, long])  # before the batch: it owns the model's cache while rows run
    batch = RunningBatch(Engine(model), 2, prefill_chunk=6)
    first = batch.add(decoding)
    assert batch.step() == [(first, ref[0].tokens[0])]
    second = batch.add(long)
    steps = [batch.step() for _ in range(7)]  # 39 of its 40 prompt tokens, 6 a step: 7 steps
    assert all([row for row, _ in s] == [first] for s in steps[:6])  # the decoding row never waits
    assert [row for row, _ in steps[6]] == [first, second]  # the last chunk's step gives its first token
    while batch.rows:
        batch.step()
    ended = dict(batch.ended())
    assert_same([ended[first], ended[second]], ref)


def test_a_stopped_row_frees_its_slot_at_once():
    model = tiny(**{"norm": "rmsnorm", "pos": "rope"})
    a, b, c = Request([1, 2, 3], 30, GREEDY), Request([4, 5], 30, GREEDY), Request([6], 5, GREEDY)
    ref = solo(model, [a, b, c])
    batch = RunningBatch(Engine(model), 2)
    batch.warm_up()  # the cache is then made under inference mode, as in the server
    ra, rb = batch.add(a), batch.add(b)
    for _ in range(3):
        batch.step()
    with pytest.raises(RuntimeError, match="full"):
        batch.add(c)
    batch.stop(ra)  # row a's slot 0 goes to row b (moved), and the freed slot to c
    [(row, stopped)] = batch.ended()
    assert row == ra and stopped.finish_reason == "stop" and len(stopped.tokens) == 3 and batch.free == 1
    rc = batch.add(c)
    while batch.rows:
        batch.step()
    ended = dict(batch.ended())
    assert_same([ended[rb], ended[rc]], ref[1:])
    assert stopped.tokens == ref[0].tokens[:3]


def test_the_compiled_step_runs_a_changing_batch():
    # A real compilation: one row, then several at their own positions as rows join and leave.
    model = tiny()
    requests = [Request([1, 2, 3], 8, GREEDY), Request([9], 6, SamplingConfig(temperature=0.9), seed=1),
                Request(list(range(20, 32)), 5, GREEDY)]
    engine = Engine(model, compile=True, native=False)
    got, running = run(RunningBatch(engine, 2, prefill_chunk=4), requests, [0, 2, 3])
    assert engine.compile_error is None and engine._compiled_one is not None and 1 in running and 2 in running
    assert_same(got, solo(model, requests))
