"""`leangpt generate`: text from one prompt (streamed to the terminal) or a file of prompts (JSONL out).

The engine (leangpt/engine.py) works on token ids; this module is the text layer on top: tokenizing, stop
strings, and streaming text that never splits a UTF-8 character.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from tqdm import tqdm

from leangpt import cli
from leangpt.checkpoint import load_checkpoint
from leangpt.data.tokenizer import TextTokenizer
from leangpt.device import pick_device
from leangpt.engine import Completion, Engine, Request
from leangpt.errors import UserError
from leangpt.sampling import SamplingConfig
from leangpt.speculative import SpeculativeGeneration, SpeculativeStats

__all__ = ["SamplingConfig", "TextStream", "TextRequest", "generate_ids", "generate_texts", "stream_text"]


class TextStream:
    """Incremental text of one row: pieces never split a UTF-8 character, and text that may be the start of a
    stop string is held back until it is known not to be one. `stopped` turns True when a stop string appears;
    `text` is then cut just before it."""

    def __init__(self, tokenizer: TextTokenizer, stop: list[str] | tuple[str, ...] = ()) -> None:
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0  # characters of text already handed out
        self.stopped = False

    def add(self, token: int) -> str:
        """Take one token; return the text that is now safe to show (may be empty)."""
        if self.stopped:
            return ""
        self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids)
        cuts = [i for i in (self.text.find(s) for s in self.stop) if i >= 0]
        if cuts:
            self.text, self.stopped = self.text[:min(cuts)], True
            return self._send(len(self.text))
        # Decoding stops short of an incomplete multi-byte character as U+FFFD: wait for its other bytes.
        safe = len(self.text.rstrip("\ufffd"))
        hold = next((h for h in range(min(safe, max(map(len, self.stop), default=1) - 1), 0, -1)
                     if any(s.startswith(self.text[safe - h:safe]) for s in self.stop)), 0)
        return self._send(safe - hold)

    def finish(self) -> str:
        """The text still held back, once no more tokens will come."""
        return self._send(len(self.text))

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


def text_result(req: TextRequest, stream: TextStream, completion: Completion, logprobs: bool) -> dict[str, Any]:
    """One finished row as generate's JSON record (the text cut at a stop string, counts to match)."""
    stream.finish()
    n = len(completion.tokens)
    if stream.stopped:  # the tokens up to and including the one that completed the stop string
        n = len(stream.ids)
    out: dict[str, Any] = {"prompt": req.prompt, "text": stream.text, "tokens": n,
                           "finish_reason": "stop" if stream.stopped else completion.finish_reason}
    if logprobs:
        out["token_ids"] = completion.tokens[:n]
        out["logprobs"] = [round(lp, 6) for lp in completion.logprobs[:n]]
    return out


def generate_texts(engine: Engine, tokenizer: TextTokenizer, requests: list[TextRequest], logprobs: bool = False,
                   stop_at_eos: bool = True) -> list[dict[str, Any]]:
    """One batch of prompts to one result each: prompt, text, tokens, finish_reason (and logprobs)."""
    gen = engine.start([to_request(tokenizer, r, stop_at_eos) for r in requests])
    streams = [TextStream(tokenizer, r.stop) for r in requests]
    for step in gen:
        for row, tok in step:
            streams[row].add(tok)
            if streams[row].stopped:
                gen.stop(row)
    return [text_result(r, s, c, logprobs) for r, s, c in zip(requests, streams, gen.completions)]


def stream_text(engine: Engine, tokenizer: TextTokenizer, request: TextRequest,
                draft: nn.Module | None = None, draft_tokens: int = 4,
                stop_at_eos: bool = True) -> Iterator[str]:
    """Text pieces of one completion as they are generated; with a draft model, by speculative decoding."""
    ids = to_request(tokenizer, request, stop_at_eos)
    stream = TextStream(tokenizer, request.stop)
    if draft is None:
        gen = engine.start([ids])
        for step in gen:
            for _, tok in step:
                if piece := stream.add(tok):
                    yield piece
                if stream.stopped:
                    gen.stop(0)
    else:
        spec = SpeculativeGeneration(engine.model, draft, ids, draft_tokens)
        for new in spec:
            for tok in new:
                if piece := stream.add(tok):
                    yield piece
            if stream.stopped:
                spec.stop()
    if piece := stream.finish():
        yield piece


def speculative_text(target: nn.Module, draft: nn.Module, tokenizer: TextTokenizer, request: TextRequest,
                     draft_tokens: int, logprobs: bool = False, stop_at_eos: bool = True) -> dict[str, Any]:
    """One prompt by speculative decoding: the result with its acceptance rate."""
    spec = SpeculativeGeneration(target, draft, to_request(tokenizer, request, stop_at_eos), draft_tokens)
    stream = TextStream(tokenizer, request.stop)
    for new in spec:
        for tok in new:
            stream.add(tok)
        if stream.stopped:
            spec.stop()
    result = text_result(request, stream, spec.completion, logprobs)
    result.update(_spec_stats(spec.stats))
    return result


def _spec_stats(stats: SpeculativeStats) -> dict[str, Any]:
    return {"acceptance_rate": round(stats.acceptance_rate, 4), "rounds": stats.rounds,
            "draft_tokens_proposed": stats.drafted, "draft_tokens_accepted": stats.accepted}


def generate_ids(model: nn.Module, prompt: list[int], max_new_tokens: int, sampling: SamplingConfig,
                 seed: int | None = None, eos_id: int | None = None) -> Iterator[int]:
    """New token ids of one prompt, one at a time; stops at eos_id (not yielded) or max_new_tokens."""
    gen = Engine(model).start([Request(prompt, max_new_tokens, sampling, seed, () if eos_id is None else (eos_id,))])
    for step in gen:
        for _, tok in step:
            yield tok


# ---------------------------------------------------------------- the command

def build_parser() -> cli.ArgumentParser:
    p = cli.parser("generate", "Generate text from a prompt, or from a file of prompts (one per line) to JSONL.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="text to continue (streamed to the terminal unless --json)")
    src.add_argument("--prompts", type=Path, help="file with one prompt per line (empty lines skipped); prints one "
                                                  "JSON object per prompt (JSONL), in order")
    p.add_argument("--model", type=Path, required=True, help="checkpoint directory")
    p.add_argument("--max-new-tokens", type=int, default=100, help="tokens to generate at most, per prompt")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 is greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens; 0 disables")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass; 1 disables")
    p.add_argument("--min-p", type=float, default=0.0,
                   help="drop tokens less likely than this fraction of the most likely one; 0 disables")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="divide positive (multiply negative) logits of tokens already seen; 1 disables")
    p.add_argument("--frequency-penalty", type=float, default=0.0,
                   help="subtract this times the token's count in the output from its logit")
    p.add_argument("--presence-penalty", type=float, default=0.0,
                   help="subtract this from the logit of every token already in the output")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop a completion where this text appears (not included); repeatable")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-text token")
    p.add_argument("--seed", type=int, help="random seed: the same seed gives the same text (prompt i of a "
                                            "--prompts file uses seed + i)")
    p.add_argument("--logprobs", action="store_true",
                   help="add token ids and their log-probabilities under the model to the JSON output")
    p.add_argument("--batch-size", type=int, default=8, help="prompts of a --prompts file decoded together")
    p.add_argument("--draft", type=Path, help="draft checkpoint for speculative decoding (same tokenizer)")
    p.add_argument("--draft-tokens", type=int, default=4, help="draft tokens proposed per speculative round")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (pays off only for long runs; falls back to eager on failure)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object instead of streaming text")
    return p


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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    sampling = SamplingConfig(args.temperature, args.top_k, args.top_p, args.min_p, args.repetition_penalty,
                              args.frequency_penalty, args.presence_penalty)
    sampling.validate()
    prompts = _read_prompts(args.prompts) if args.prompts else [args.prompt]
    device = pick_device(args.device)
    model, tokenizer, _ = load_checkpoint(args.model, device)
    draft = None
    if args.draft is not None:
        draft, draft_tok, _ = load_checkpoint(args.draft, device)
        if draft_tok.sha256() != tokenizer.sha256():
            raise UserError(f"{args.draft}: the draft's tokenizer differs from the model's")
    engine = Engine(model, compile=args.compile)
    eos = not args.ignore_eos
    requests = [TextRequest(p, args.max_new_tokens, sampling, None if args.seed is None else args.seed + i,
                            tuple(args.stop)) for i, p in enumerate(prompts)]
    with torch.inference_mode():
        if args.prompts is None and not args.json:
            print(args.prompt, end="", flush=True)
            for piece in stream_text(engine, tokenizer, requests[0], draft, args.draft_tokens, eos):
                print(piece, end="", flush=True)
            print()
            return 0
        bar = tqdm(total=len(requests), desc="generate", unit="prompt", file=sys.stderr,
                   disable=len(requests) < 2 or not sys.stderr.isatty())
        step = 1 if draft is not None else args.batch_size
        for start in range(0, len(requests), step):
            chunk = requests[start:start + step]
            if draft is not None:
                results = [speculative_text(model, draft, tokenizer, chunk[0], args.draft_tokens, args.logprobs, eos)]
            else:
                results = generate_texts(engine, tokenizer, chunk, args.logprobs, eos)
            for r in results:
                sys.stdout.write(json.dumps(r) + "\n")
            sys.stdout.flush()
            bar.update(len(chunk))
        bar.close()
    if engine.compile_error:
        cli.log(f"torch.compile failed, ran eager: {engine.compile_error}")
    return 0
