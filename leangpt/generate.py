"""`leangpt generate`: text from a prompt with a KV cache: prefill once, then one token per step."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from leangpt import cli
from leangpt.checkpoint import load_checkpoint
from leangpt.device import pick_device
from leangpt.errors import UserError
from leangpt.model import GPT


@dataclass
class SamplingConfig:
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 disables
    top_p: float = 1.0  # 1 disables

    def validate(self) -> None:
        if self.temperature < 0:
            raise UserError(f"--temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise UserError(f"--top-k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p must be in (0, 1], got {self.top_p}")


def sample_next(logits: torch.Tensor, s: SamplingConfig, gen: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) -> token ids (B,)."""
    if s.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / s.temperature
    if s.top_k and s.top_k < logits.size(-1):
        kth = torch.topk(logits, s.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove = cum - sorted_logits.softmax(-1) > s.top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


@torch.no_grad()
def generate_ids(model: GPT, prompt: list[int], max_new_tokens: int, sampling: SamplingConfig,
                 seed: int | None = None, eos_id: int | None = None) -> Iterator[int]:
    """Yield new token ids one at a time; stops at eos_id (not yielded) or max_new_tokens."""
    if not prompt:
        raise UserError("the prompt is empty")
    device = next(model.parameters()).device
    total = len(prompt) + max_new_tokens
    if total > model.config.block_size:
        raise UserError(f"prompt ({len(prompt)} tokens) + max new tokens ({max_new_tokens}) exceed the context of "
                        f"{model.config.block_size}")
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    model.setup_cache(1, total)
    x = torch.tensor([prompt], device=device)
    logits = model(x, torch.arange(len(prompt), device=device))[:, -1]  # prefill
    for pos in range(len(prompt), total):
        nxt = sample_next(logits, sampling, gen)
        token = int(nxt.item())
        if token == eos_id:
            return
        yield token
        if pos + 1 < total:
            logits = model(nxt.view(1, 1), torch.tensor([pos], device=device))[:, -1]  # one-token decode


def build_parser() -> cli.ArgumentParser:
    p = cli.parser("generate", "Generate text from a prompt with a checkpoint.")
    p.add_argument("--model", type=Path, required=True, help="checkpoint directory")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=100, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 is greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens; 0 disables")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass; 1 disables")
    p.add_argument("--seed", type=int, help="random seed: the same seed gives the same text")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object instead of streaming text")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    sampling = SamplingConfig(args.temperature, args.top_k, args.top_p)
    sampling.validate()
    model, tokenizer, _ = load_checkpoint(args.model, pick_device(args.device))
    prompt = tokenizer.encode(args.prompt)
    ids = generate_ids(model, prompt, args.max_new_tokens, sampling, args.seed, tokenizer.eos_id)
    if args.json:
        new = list(ids)
        cli.print_json({"prompt": args.prompt, "text": tokenizer.decode(new), "tokens": len(new)})
        return 0
    print(args.prompt, end="", flush=True)
    for piece in tokenizer.stream_pieces(ids):
        print(piece, end="", flush=True)
    print()
    return 0
