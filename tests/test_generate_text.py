"""The one decode-to-text loop (generate and serve both read it): callbacks, cancellation, UTF-8 hold-back, and
the `generate` / `serve` library functions against their commands."""

import asyncio
import json

import pytest

from leangpt.checkpoint import load_checkpoint
from leangpt.data.tokenizer import StreamDecoder, TextTokenizer
from leangpt.engine import Completion, Engine
from leangpt.errors import UserError
from leangpt.generate import GenerateSettings, TextRequest, decode_texts, generate, token_steps
from leangpt.sampling import SamplingConfig
from leangpt.serve import Batcher, ServeSettings
from tests.conftest import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

SAMPLED = SamplingConfig(temperature=0.9, top_p=0.95)


@pytest.fixture(scope="module")
def byte_tokenizer() -> TextTokenizer:
    # Almost no merges: multi-byte characters are split over several tokens.
    return TextTokenizer.train(["plain ascii words and more words"], vocab_size=270)


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    model, tokenizer, _ = load_checkpoint(tiny_checkpoint)
    return Engine(model), tokenizer


class ScriptedSteps:
    """Token steps that replay fixed rows of ids, one token per row per step, as an engine Generation would."""

    def __init__(self, rows: list[list[int]]) -> None:
        self.rows, self.completions, self.stopped = rows, [], set()
        self.steps_after_stop: dict[int, int] = {}

    def __iter__(self):
        emitted: list[list[int]] = [[] for _ in self.rows]
        for i in range(max(map(len, self.rows))):
            live = [(r, ids[i]) for r, ids in enumerate(self.rows) if i < len(ids) and r not in self.stopped]
            for r, tok in live:
                emitted[r].append(tok)
            yield live
        self.completions = [Completion(e, [0.0] * len(e), "stop" if r in self.stopped else "length")
                            for r, e in enumerate(emitted)]

    def stop(self, row: int) -> None:
        self.stopped.add(row)


def test_callbacks_see_exactly_the_pieces_of_the_final_text(loaded):
    engine, tokenizer = loaded
    reqs = [TextRequest("The king", 30, SAMPLED, seed=1), TextRequest("Night", 20, SamplingConfig(temperature=0)),
            TextRequest("The queen speaks with", 25, SAMPLED, seed=2)]
    free = decode_texts(token_steps(engine, tokenizer, reqs), tokenizer, reqs)
    word = free[0]["text"].split()[1]
    reqs[0].stop = (word, "zzz")
    pieces: dict[int, list[str]] = {i: [] for i in range(len(reqs))}
    results = decode_texts(token_steps(engine, tokenizer, reqs), tokenizer, reqs, logprobs=True,
                           on_text=lambda row, piece: pieces[row].append(piece))
    assert results[0]["finish_reason"] == "stop" and word not in results[0]["text"]
    assert results[0]["text"] == free[0]["text"][:free[0]["text"].index(word)]
    assert [r["text"] for r in results[1:]] == [r["text"] for r in free[1:]]  # a stop in one row leaves the rest
    for row, result in enumerate(results):
        assert "".join(pieces[row]) == result["text"] and all(pieces[row])
        assert len(result["token_ids"]) == len(result["logprobs"]) == result["tokens"]


def test_cancellation_stops_a_row_within_one_step(loaded):
    engine, tokenizer = loaded
    reqs = [TextRequest("The king", 20, SAMPLED, seed=3), TextRequest("Night falls", 20, SAMPLED, seed=4)]
    asked = [0, 0]

    def cancelled(row: int) -> bool:  # row 0 is cancelled after its fifth token
        asked[row] += 1
        return row == 0 and asked[row] >= 5

    steps = token_steps(engine, tokenizer, reqs, stop_at_eos=False)
    results = decode_texts(steps, tokenizer, reqs, logprobs=True, cancelled=cancelled)
    assert results[0]["tokens"] == len(steps.completions[0].tokens) == asked[0] == 5
    assert results[0]["finish_reason"] == "stop"
    assert results[1]["tokens"] == asked[1] == 20 and results[1]["finish_reason"] == "length"
    alone = decode_texts(token_steps(engine, tokenizer, reqs[:1], stop_at_eos=False), tokenizer, reqs[:1],
                         logprobs=True)[0]
    assert results[0]["token_ids"] == alone["token_ids"][:5]  # the row's text up to there is unchanged


def test_a_character_split_across_tokens_is_never_emitted_half(byte_tokenizer):
    text = "naïve café — 日本語 🙂 done"
    ids = byte_tokenizer.encode(text)
    assert len(ids) > len(text)  # characters really span several tokens
    other = byte_tokenizer.encode("plain 🙂")
    reqs = [TextRequest(""), TextRequest("", stop=("🙂",))]
    pieces: dict[int, list[str]] = {0: [], 1: []}
    results = decode_texts(ScriptedSteps([ids, other]), byte_tokenizer, reqs,
                           on_text=lambda row, piece: pieces[row].append(piece))
    assert results[0]["text"] == text == "".join(pieces[0]) and len(pieces[0]) > 5
    assert results[1]["text"] == "plain " == "".join(pieces[1]) and results[1]["finish_reason"] == "stop"
    assert not any("\ufffd" in p for row in pieces.values() for p in row)
    # Byte by byte: nothing until the character is whole; a dangling lead byte comes out, replaced, at the end.
    decoder = StreamDecoder(byte_tokenizer)
    emoji = byte_tokenizer.encode("🙂")
    assert [decoder.add(t) for t in emoji] == [""] * (len(emoji) - 1) + ["🙂"]
    assert decoder.add(emoji[0]) == "" and decoder.finish() == "\ufffd"


def test_server_batcher_drops_a_cancelled_row_at_its_next_step(loaded):
    engine, tokenizer = loaded
    batcher = Batcher(engine, tokenizer, max_batch=4)

    async def run() -> list:
        events: asyncio.Queue = asyncio.Queue()
        jobs = [batcher.job(TextRequest(p, 12, SAMPLED, seed=i), i, True, False, events)
                for i, p in enumerate(["The king", "Night falls"])]
        jobs[0].cancelled = True  # the client went away before its first token was read
        batcher._run(jobs)
        await asyncio.sleep(0)
        return [events.get_nowait() for _ in range(events.qsize())]

    events = asyncio.run(run())
    done = {index: value for index, kind, value in events if kind == "done"}
    assert done[0]["tokens"] == 1 and done[1]["tokens"] > 1
    streamed = "".join(value for index, kind, value in events if kind == "text" and index == 1)
    assert streamed == done[1]["text"]


def test_generate_library_call_matches_the_command(tiny_checkpoint, tmp_path, capsys):
    argv = ["generate", "--model", str(tiny_checkpoint), "--prompt", "The king", "--max-new-tokens", "16",
            "--temperature", "0.9", "--seed", "3", "--stop", "zzz", "--logprobs", "--json"]
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    pieces: list[str] = []
    s = GenerateSettings(model=tiny_checkpoint, prompt="The king", max_new_tokens=16, temperature=0.9, seed=3,
                         stop=["zzz"], logprobs=True)
    result = generate(s, on_text=pieces.append)
    assert json.loads(out) == result and "".join(pieces) == result["text"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The king\nNight falls\n")
    seen: list[dict] = []
    records = generate(GenerateSettings(model=tiny_checkpoint, prompts=prompts, max_new_tokens=16, temperature=0.9,
                                        seed=3, stop=["zzz"], logprobs=True, batch_size=1), on_record=seen.append)
    assert records == {"records": seen} and seen[0] == result and seen[1]["prompt"] == "Night falls"


def test_settings_are_checked_in_the_library_too(tiny_checkpoint, tmp_path):
    with pytest.raises(UserError, match="not allowed with"):
        generate(GenerateSettings(model=tiny_checkpoint, prompt="x", prompts=tmp_path / "p.txt"))
    with pytest.raises(UserError, match="--prompt"):
        generate(GenerateSettings(model=tiny_checkpoint))
    with pytest.raises(UserError, match="--draft-tokens"):
        generate(GenerateSettings(model=tiny_checkpoint, prompt="x", draft_tokens=0))
    with pytest.raises(UserError, match="--port"):
        ServeSettings(model=tiny_checkpoint, port=70000).validate()


def test_serve_rejects_bad_settings_in_one_line(tiny_checkpoint, capsys):
    for extra, message in [(["--port", "70000"], "--port"), (["--max-batch", "0"], "--max-batch"),
                           (["--log-level", "loud"], "expected one of")]:
        code, _, err = run_cli(["serve", "--model", str(tiny_checkpoint), *extra], capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
