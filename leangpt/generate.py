"""`leangpt generate`: text from one prompt (streamed to the terminal) or a file of prompts (JSONL out).

The engine (leangpt/engine.py) works on token ids; this module is the text layer on top, for `generate` and
`serve` alike: tokenizing, stop strings, and text pieces that never split a UTF-8 character. Its one loop,
TextGeneration, turns the tokens of an engine Generation (or of a speculative one) into text as they come.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn as nn
from tqdm import tqdm

from leangpt import cli
from leangpt.checkpoint import load_checkpoint
from leangpt.cli import setting
from leangpt.data.tokenizer import StreamDecoder, TextTokenizer
from leangpt.device import pick_device
from leangpt.engine import Completion, Engine, Request
from leangpt.errors import UserError
from leangpt.sampling import SamplingConfig
from leangpt.speculative import SpeculativeGeneration, SpeculativeRow, SpeculativeStats

__all__ = ["GenerateSettings", "SamplingConfig", "TextGeneration", "TextRequest", "TextStream", "decode_texts",
           "generate", "generate_ids", "generate_texts", "stream_text", "token_steps"]


# ---------------------------------------------------------------- the text layer

class TextStream:
    """Incremental text of one row: pieces never split a UTF-8 character (StreamDecoder), and text that may be
    the start of a stop string is held back until it is known not to be one. `stopped` turns True when a stop
    string appears; `text` is then cut just before it, and `ids` ends with the token that completed it."""

    def __init__(self, tokenizer: TextTokenizer, stop: list[str] | tuple[str, ...] = ()) -> None:
        self.decoder = StreamDecoder(tokenizer)
        self.stop = [s for s in stop if s]
        self.longest_stop = max(map(len, self.stop), default=0)
        self.text = ""
        self.sent = 0  # characters of text already handed out
        self.stopped = False

    @property
    def ids(self) -> list[int]:
        return self.decoder.ids

    def add(self, token: int) -> str:
        """Take one token; return the text that is now safe to show (may be empty)."""
        if self.stopped:
            return ""
        return self._extend(self.decoder.add(token))

    def finish(self) -> str:
        """The text still held back, once no more tokens will come."""
        if not self.stopped:
            self._extend(self.decoder.finish())
        return self._send(len(self.text))

    def _extend(self, new: str) -> str:
        if not new:
            return ""
        start = len(self.text)
        self.text += new
        # The text before `start` held no stop string, so a new one ends in `new`: search from where it may begin.
        cuts = [i for i in (self.text.find(s, max(0, start - len(s) + 1)) for s in self.stop) if i >= 0]
        if cuts:
            self.text, self.stopped = self.text[:min(cuts)], True
            return self._send(len(self.text))
        end = len(self.text)
        hold = next((h for h in range(min(end, self.longest_stop - 1), 0, -1)
                     if any(s.startswith(self.text[end - h:]) for s in self.stop)), 0)
        return self._send(end - hold)

    def _send(self, upto: int) -> str:
        piece = self.text[self.sent:upto] if upto > self.sent else ""
        self.sent = max(self.sent, upto)
        return piece


@dataclass
class TextRequest:
    prompt: str
    max_new_tokens: int = 100
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    seed: int | None = None
    stop: tuple[str, ...] = ()


def to_request(tokenizer: TextTokenizer, req: TextRequest, eos: bool) -> Request:
    """The engine's request for a text request: prompt ids, and end-of-text as a stop token if `eos`."""
    return Request(tokenizer.encode(req.prompt), req.max_new_tokens, req.sampling, req.seed,
                   (tokenizer.eos_id,) if eos else ())


class TokenSteps(Protocol):
    """What the text layer reads: an engine Generation, or a speculative one as a SpeculativeRow. Steps that rows
    join mid-way (the server's running batch) also have `ended() -> list[(row, Completion)]`: the rows that ended
    since it was last called, read after each step."""

    completions: list[Completion]  # filled once iteration ends (unless the steps report rows by ended())

    def __iter__(self) -> Iterator[list[tuple[int, int]]]: ...  # each step's (row, token) of the running rows

    def stop(self, row: int) -> None: ...


def token_steps(engine: Engine, tokenizer: TextTokenizer, requests: list[TextRequest], stop_at_eos: bool = True,
                draft: Engine | None = None, draft_tokens: int = 4) -> TokenSteps:
    """The tokens of text requests: the engine's batched generation, or with a draft model speculative decoding
    (one request)."""
    ids = [to_request(tokenizer, r, stop_at_eos) for r in requests]
    if draft is None:
        return engine.start(ids)
    if len(ids) != 1:
        raise ValueError(f"speculative decoding takes one request at a time, got {len(ids)}")
    return SpeculativeRow(SpeculativeGeneration(engine, draft, ids[0], draft_tokens))


def _record(req: TextRequest, stream: TextStream, completion: Completion, logprobs: bool) -> dict[str, Any]:
    """One finished row as generate's JSON record (the text cut at a stop string, counts to match)."""
    n = len(completion.tokens)
    if stream.stopped:  # the tokens up to and including the one that completed the stop string
        n = len(stream.ids)
    out: dict[str, Any] = {"prompt": req.prompt, "text": stream.text, "tokens": n,
                           "finish_reason": "stop" if stream.stopped else completion.finish_reason}
    if logprobs:
        out["token_ids"] = completion.tokens[:n]
        out["logprobs"] = [round(lp, 6) for lp in completion.logprobs[:n]]
    return out


class TextGeneration:
    """The decode-to-text loop. Iterate for (row, piece) as each row's text becomes safe to show: pieces never
    split a UTF-8 character nor show a stop string or text that may begin one, and a row's pieces join to its
    final text. A row ends at a stop string, or within one step once `cancelled(row)` is True. Each row's record
    (prompt, text, tokens, finish_reason; with `logprobs`, also token_ids and their logprobs) goes to
    on_done(row, record) as the row ends; for steps of a fixed batch it is also kept in `results`, in row order,
    once iteration ends. `requests[row]` is read when a row first shows up, so rows may join while it runs
    (a dict that the caller fills before adding the row to the steps)."""

    def __init__(self, steps: TokenSteps, tokenizer: TextTokenizer,
                 requests: Sequence[TextRequest] | Mapping[int, TextRequest], logprobs: bool = False,
                 cancelled: Callable[[int], bool] | None = None,
                 on_done: Callable[[int, dict[str, Any]], None] | None = None) -> None:
        self.steps, self.tokenizer, self.requests, self.logprobs = steps, tokenizer, requests, logprobs
        self.cancelled, self.on_done = cancelled, on_done
        self.streams: dict[int, TextStream] = {}
        self.results: list[dict[str, Any]] = []

    def _stream(self, row: int) -> TextStream:
        if row not in self.streams:
            self.streams[row] = TextStream(self.tokenizer, self.requests[row].stop)
        return self.streams[row]

    def __iter__(self) -> Iterator[tuple[int, str]]:
        ended = getattr(self.steps, "ended", None)  # rows that join mid-way end mid-way
        for step in self.steps:
            for row, tok in step:
                stream = self._stream(row)
                if piece := stream.add(tok):
                    yield row, piece
                if stream.stopped or (self.cancelled is not None and self.cancelled(row)):
                    self.steps.stop(row)
            if ended is not None:
                for row, completion in ended():
                    yield from self._end(row, completion)
        last = ended() if ended is not None else enumerate(self.steps.completions)
        for row, completion in last:
            yield from self._end(row, completion)

    def _end(self, row: int, completion: Completion) -> Iterator[tuple[int, str]]:
        stream = self._stream(row)
        del self.streams[row]
        if piece := stream.finish():
            yield row, piece
        record = _record(self.requests[row], stream, completion, self.logprobs)
        if not hasattr(self.steps, "ended"):
            self.results.append(record)
        if self.on_done is not None:
            self.on_done(row, record)


def decode_texts(steps: TokenSteps, tokenizer: TextTokenizer,
                 requests: Sequence[TextRequest] | Mapping[int, TextRequest], *, logprobs: bool = False,
                 on_text: Callable[[int, str], None] | None = None,
                 cancelled: Callable[[int], bool] | None = None,
                 on_done: Callable[[int, dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Run TextGeneration to the end: on_text(row, piece) for each piece as it comes, on_done(row, record) as
    each row ends; returns one record per row of a fixed batch (none for steps that rows join mid-way)."""
    text = TextGeneration(steps, tokenizer, requests, logprobs, cancelled, on_done)
    for row, piece in text:
        if on_text is not None:
            on_text(row, piece)
    return text.results


def generate_texts(engine: Engine, tokenizer: TextTokenizer, requests: list[TextRequest], logprobs: bool = False,
                   stop_at_eos: bool = True) -> list[dict[str, Any]]:
    """One batch of prompts to one result each: prompt, text, tokens, finish_reason (and logprobs)."""
    return decode_texts(token_steps(engine, tokenizer, requests, stop_at_eos), tokenizer, requests, logprobs=logprobs)


def stream_text(engine: Engine, tokenizer: TextTokenizer, request: TextRequest,
                draft: Engine | None = None, draft_tokens: int = 4,
                stop_at_eos: bool = True) -> Iterator[str]:
    """Text pieces of one completion as they are generated; with a draft model, by speculative decoding."""
    steps = token_steps(engine, tokenizer, [request], stop_at_eos, draft, draft_tokens)
    for _, piece in TextGeneration(steps, tokenizer, [request]):
        yield piece


def generate_ids(model: nn.Module, prompt: list[int], max_new_tokens: int, sampling: SamplingConfig,
                 seed: int | None = None, eos_id: int | None = None) -> Iterator[int]:
    """New token ids of one prompt, one at a time; stops at eos_id (not yielded) or max_new_tokens."""
    gen = Engine(model).start([Request(prompt, max_new_tokens, sampling, seed, () if eos_id is None else (eos_id,))])
    for step in gen:
        for _, tok in step:
            yield tok


# ---------------------------------------------------------------- the command

@dataclass
class GenerateSettings:
    prompt: str = setting("", "text to continue (streamed to the terminal unless --json)")
    prompts: Path | None = setting(None, "file with one prompt per line (empty lines skipped); prints one JSON "
                                         "object per prompt (JSONL), in order")
    model: Path | None = setting(None, "checkpoint directory", required=True)
    max_new_tokens: int = setting(100, "tokens to generate at most, per prompt")
    temperature: float = setting(0.8, "sampling temperature; 0 is greedy")
    top_k: int = setting(0, "sample among the k most likely tokens; 0 disables")
    top_p: float = setting(1.0, "nucleus sampling mass; 1 disables")
    min_p: float = setting(0.0, "drop tokens less likely than this fraction of the most likely one; 0 disables")
    repetition_penalty: float = setting(1.0, "divide positive (multiply negative) logits of tokens already seen; "
                                             "1 disables")
    frequency_penalty: float = setting(0.0, "subtract this times the token's count in the output from its logit")
    presence_penalty: float = setting(0.0, "subtract this from the logit of every token already in the output")
    stop: list[str] = setting([], "stop a completion where this text appears (not included); repeatable",
                              metavar="TEXT")
    ignore_eos: bool = setting(False, "keep generating past the end-of-text token")
    seed: int | None = setting(None, "random seed: the same seed gives the same text (prompt i of a --prompts file "
                                     "uses seed + i)")
    logprobs: bool = setting(False, "add token ids and their log-probabilities under the model to the JSON output")
    batch_size: int = setting(8, "prompts of a --prompts file decoded together")
    draft: Path | None = setting(None, "draft checkpoint for speculative decoding (same tokenizer)")
    draft_tokens: int = setting(4, "draft tokens proposed per speculative round")
    compile: bool = setting(True, "torch.compile the decode step (on a CPU, steps of up to 64 rows take leangpt's "
                                 "C++ step) for jobs of at least --compile-min-tokens (the "
                                 "first process on a machine compiles for about 10 s, later ones still trace "
                                 "for about 4 s; falls back to eager on failure); --no-compile decodes eagerly")
    # On a CPU a compiled step saved about 0.8-1 ms a token at batch 1 (before the C++ step took one row) and a
    # process on a warm compile cache
    # spends about 4.6 s before its first compiled token (the pipeline's model, 2026-12-04): shorter jobs
    # finish sooner eagerly.
    compile_min_tokens: int = setting(4096, "compile only when prompts x max new tokens reach this; 0: always")
    device: str = setting("auto", "auto, cpu, cuda, ...")

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(self.temperature, self.top_k, self.top_p, self.min_p, self.repetition_penalty,
                              self.frequency_penalty, self.presence_penalty)

    def validate(self) -> None:
        if self.prompt and self.prompts is not None:
            raise UserError("--prompts is not allowed with --prompt: give one of them")
        if not self.prompt and self.prompts is None:
            raise UserError("give a --prompt TEXT or a --prompts FILE")
        for name in ("max_new_tokens", "batch_size", "draft_tokens"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.compile_min_tokens < 0:
            raise UserError(f"--compile-min-tokens must be >= 0, got {self.compile_min_tokens}")
        self.sampling().validate()


def _read_prompts(path: Path) -> list[str]:
    if not path.is_file():
        raise UserError(f"{path}: prompts file not found")
    try:
        prompts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    if not prompts:
        raise UserError(f"{path}: no prompts (one per line)")
    return prompts


def _load_draft(path: Path, tokenizer: TextTokenizer, device: torch.device) -> Engine:
    draft, draft_tokenizer, _ = load_checkpoint(path, device)
    if draft_tokenizer.sha256() != tokenizer.sha256():
        raise UserError(f"{path}: the draft's tokenizer differs from the model's")
    return Engine(draft)


def _spec_stats(stats: SpeculativeStats) -> dict[str, Any]:
    return {"acceptance_rate": round(stats.acceptance_rate, 4), "rounds": stats.rounds,
            "draft_tokens_proposed": stats.drafted, "draft_tokens_accepted": stats.accepted}


@dataclass
class _Generator:
    """A loaded model (and draft) with the settings that apply to every prompt."""
    s: GenerateSettings
    engine: Engine
    tokenizer: TextTokenizer
    draft: Engine | None

    def complete(self, requests: list[TextRequest],
                 on_text: Callable[[int, str], None] | None = None) -> list[dict[str, Any]]:
        steps = token_steps(self.engine, self.tokenizer, requests, not self.s.ignore_eos, self.draft,
                            self.s.draft_tokens)
        results = decode_texts(steps, self.tokenizer, requests, logprobs=self.s.logprobs, on_text=on_text)
        if isinstance(steps, SpeculativeRow):
            results[0].update(_spec_stats(steps.spec.stats))
        return results

    def complete_all(self, requests: list[TextRequest],
                     on_record: Callable[[dict[str, Any]], None] | None) -> list[dict[str, Any]]:
        """Every request, --batch-size at a time (one at a time with a draft), each record as its batch ends."""
        bar = tqdm(total=len(requests), desc="generate", unit="prompt", file=sys.stderr,
                   disable=len(requests) < 2 or not sys.stderr.isatty())
        step = 1 if self.draft is not None else self.s.batch_size
        records: list[dict[str, Any]] = []
        for start in range(0, len(requests), step):
            for record in self.complete(requests[start:start + step]):
                records.append(record)
                if on_record is not None:
                    on_record(record)
            bar.update(min(step, len(requests) - start))
        bar.close()
        return records


def generate(s: GenerateSettings, on_text: Callable[[str], None] | None = None,
             on_record: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Text from s.prompt or from each line of s.prompts.

    One prompt: returns its record, what `--json` prints (prompt, text, tokens, finish_reason; with logprobs,
    token_ids and logprobs; with a draft, the acceptance figures); on_text(piece) gets the text as it comes.
    A prompts file: returns {"records": one record per prompt, in order}; on_record(record) gets each record
    as soon as its batch is done.
    """
    s.validate()
    prompts = _read_prompts(s.prompts) if s.prompts is not None else [s.prompt]
    device = pick_device(s.device)
    model, tokenizer, _ = load_checkpoint(s.model, device)
    draft = _load_draft(s.draft, tokenizer, device) if s.draft is not None else None
    compile = s.compile and len(prompts) * s.max_new_tokens >= s.compile_min_tokens
    gen = _Generator(s, Engine(model, compile=compile), tokenizer, draft)
    sampling = s.sampling()
    requests = [TextRequest(p, s.max_new_tokens, sampling, None if s.seed is None else s.seed + i, tuple(s.stop))
                for i, p in enumerate(prompts)]
    with torch.inference_mode():
        if s.prompts is None:
            [result] = gen.complete(requests, None if on_text is None else lambda _, piece: on_text(piece))
        else:
            result = {"records": gen.complete_all(requests, on_record)}
    if gen.engine.compile_error:
        cli.log(f"torch.compile failed, ran eager: {gen.engine.compile_error}")
    return result


def build_parser() -> cli.ArgumentParser:
    return cli.build_parser(GenerateSettings, "generate", "Generate text from a prompt, or from a file of prompts "
                                                          "(one per line) to JSONL.")


def _write_jsonl(record: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    s, output = cli.parse(build_parser(), argv)
    if s.prompts is not None:
        generate(s, on_record=_write_jsonl)
    elif output.json:
        cli.print_json(generate(s))
    else:
        prompt = [s.prompt]  # shown with the first piece, once the model has loaded and the request is accepted

        def show(piece: str) -> None:
            print(prompt.pop() + piece if prompt else piece, end="", flush=True)

        generate(s, on_text=show)
        print("".join(prompt))
    return 0
