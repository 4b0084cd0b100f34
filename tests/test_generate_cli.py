"""The text layer (UTF-8-safe streaming, stop strings) and the `leangpt generate` command."""

import json

import pytest

from leangpt.checkpoint import load_checkpoint
from leangpt.data.tokenizer import TextTokenizer
from leangpt.engine import Engine
from leangpt.generate import TextRequest, TextStream, generate_texts, stream_text
from leangpt.sampling import SamplingConfig
from tests.conftest import run_cli


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def byte_tokenizer() -> TextTokenizer:
    # Almost no merges: multi-byte characters are split over several tokens.
    return TextTokenizer.train(["plain ascii words and more words"], vocab_size=270)


def pieces_of(tokenizer, text, stop=()):
    stream = TextStream(tokenizer, stop)
    pieces = [stream.add(t) for t in tokenizer.encode(text)]
    pieces.append(stream.finish())
    return stream, [p for p in pieces if p]


def test_stream_never_splits_a_utf8_character(byte_tokenizer):
    text = "naïve café — 日本語 🙂 done"
    ids = byte_tokenizer.encode(text)
    assert len(ids) > len(text)  # characters really span several tokens
    stream, pieces = pieces_of(byte_tokenizer, text)
    assert "".join(pieces) == text == stream.text
    assert not any("\ufffd" in p for p in pieces) and len(pieces) > 5


def test_stop_strings_cut_the_text_and_are_never_streamed(byte_tokenizer):
    stream, pieces = pieces_of(byte_tokenizer, "one two, three four", stop=["thr", "zzz"])
    assert stream.stopped and stream.text == "one two, " == "".join(pieces)
    # A partial match is held back, then released when the text moves on.
    stream = TextStream(byte_tokenizer, ["three"])
    sent = "".join(stream.add(t) for t in byte_tokenizer.encode("one th"))
    assert sent == "one "
    sent += "".join(stream.add(t) for t in byte_tokenizer.encode(" two")) + stream.finish()
    assert sent == "one th two" and not stream.stopped
    stream, pieces = pieces_of(byte_tokenizer, "日本語", stop=["本"])
    assert stream.text == "日" == "".join(pieces)


def test_batch_results_equal_streamed_text_and_stop_strings(tiny_checkpoint):
    model, tokenizer, _ = load_checkpoint(tiny_checkpoint)
    engine = Engine(model)
    sampled = SamplingConfig(temperature=0.9, top_p=0.95)
    reqs = [TextRequest("The king", 30, sampled, seed=1), TextRequest("Night", 20, SamplingConfig(temperature=0)),
            TextRequest("The queen speaks with", 25, sampled, seed=2)]
    batch = generate_texts(engine, tokenizer, reqs, logprobs=True)
    for req, result in zip(reqs, batch):
        assert "".join(stream_text(engine, tokenizer, req)) == result["text"]
        assert len(result["logprobs"]) == result["tokens"] == len(result["token_ids"])
        assert all(lp <= 0 for lp in result["logprobs"])
    # Stop at a word that the unconstrained text contains.
    word = batch[0]["text"].split()[1]
    [stopped] = generate_texts(engine, tokenizer, [TextRequest("The king", 30, sampled, seed=1, stop=(word,))])
    assert stopped["finish_reason"] == "stop" and stopped["text"] == batch[0]["text"][:batch[0]["text"].index(word)]
    assert "".join(stream_text(engine, tokenizer, TextRequest("The king", 30, sampled, 1, (word,)))) == stopped["text"]


def test_prompts_file_to_jsonl(tiny_checkpoint, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The king\n\nNight falls\nThe queen\n")
    args = ["generate", "--model", str(tiny_checkpoint), "--prompts", str(prompts), "--max-new-tokens", "16",
            "--temperature", "0.8", "--top-p", "0.95", "--seed", "1", "--batch-size", "2", "--json"]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [r["prompt"] for r in lines] == ["The king", "Night falls", "The queen"]
    assert all(r["finish_reason"] in ("stop", "length") and r["tokens"] <= 16 for r in lines)
    # Seeds are per prompt: the batch size does not change the texts.
    code, out2, _ = run_cli(args[:-3] + ["--batch-size", "3", "--json"], capsys)
    assert code == 0 and [json.loads(line)["text"] for line in out2.splitlines()] == [r["text"] for r in lines]


def test_speculative_cli_greedy_equals_plain(tiny_checkpoint, capsys):
    base = ["generate", "--model", str(tiny_checkpoint), "--prompt", "To be", "--max-new-tokens", "24",
            "--temperature", "0", "--json"]
    code, plain, err = run_cli(base, capsys)
    assert code == 0, err
    code, spec, err = run_cli(base + ["--draft", str(tiny_checkpoint), "--draft-tokens", "3"], capsys)
    assert code == 0, err
    plain, spec = json.loads(plain), json.loads(spec)
    assert spec["text"] == plain["text"] and spec["acceptance_rate"] == 1.0
    code, streamed, _ = run_cli(base[:-1] + ["--draft", str(tiny_checkpoint)], capsys)
    assert code == 0 and streamed.strip() == ("To be" + plain["text"]).strip()


def test_generate_user_errors(tiny_checkpoint, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    cases = [
        (["--prompts", str(tmp_path / "missing.txt")], "not found"),
        (["--prompts", str(empty)], "no prompts"),
        (["--prompt", "x", "--top-p", "1.5"], "top-p"),
        (["--prompt", "x", "--draft", str(tmp_path)], "not found"),
        (["--prompt", "x", "--min-p", "2"], "min-p"),
        (["--prompt", "x", "--compile-min-tokens", "-1"], "compile-min-tokens"),
    ]
    for extra, message in cases:
        code, _, err = run_cli(["generate", "--model", str(tiny_checkpoint), *extra], capsys)
        assert code == 2 and message in err and err.count("\n") == 1, err
    code, _, err = run_cli(["generate", "--model", str(tiny_checkpoint), "--prompt", "x", "--prompts", str(empty)],
                           capsys)
    assert code == 2 and "not allowed with" in err


@pytest.mark.parametrize("extra, compiled", [
    ([], False),  # 24 tokens: compiling would cost more than it saves
    (["--compile-min-tokens", "24"], True),
    (["--compile-min-tokens", "0", "--no-compile"], False),
])
def test_generate_compiles_only_jobs_long_enough(tiny_checkpoint, capsys, monkeypatch, extra, compiled):
    import leangpt.generate as generate_module

    asked = []

    def recording_engine(model, compile=False):
        asked.append(compile)
        return Engine(model)  # eager either way: the choice is what is tested

    monkeypatch.setattr(generate_module, "Engine", recording_engine)
    code, _, err = run_cli(["generate", "--model", str(tiny_checkpoint), "--prompt", "To be", "--max-new-tokens",
                            "24", *extra], capsys)
    assert code == 0, err
    assert asked == [compiled]
