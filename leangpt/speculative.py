"""Speculative decoding (Leviathan et al. 2023; Chen et al. 2023): a small draft model proposes k tokens, the
target checks them all in one forward, and the standard accept/reject rule keeps the target's distribution.

One sequence at a time. Target and draft run through their Engines (leangpt/engine.py; on a CPU the C++ step
takes the draft's steps and the target's verification of the k + 1 positions), so any variant can be the target
or the draft, as long as they share the vocabulary.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from leangpt.engine import Completion, Engine, Request, check_request
from leangpt.errors import UserError
from leangpt.sampling import Sampler, token_logprobs


_NO_LOGITS = torch.empty(0, dtype=torch.long)  # Engine.forward's logit items: none (the cache only)


def accept_draft(p: torch.Tensor, q: torch.Tensor, draft: torch.Tensor, sampler: Sampler) -> list[int]:
    """The accept/reject rule: the tokens to append, all accepted drafts then one corrected or bonus token.

    p: (k + 1, V) target probabilities at the k draft positions and one beyond; q: (k, V) draft probabilities
    that draft: (k,) was drawn from. Draft token i is kept with probability min(1, p_i(d_i) / q_i(d_i)); at the
    first rejection a token is drawn from norm(max(0, p_i - q_i)); if all are kept, one from p_k. The output is
    distributed as p. Greedy rows have one-hot p and q, so this reduces to "keep while equal to the argmax".
    """
    k = draft.numel()
    gen = sampler.generators[0]
    rows = torch.arange(k, device=p.device)
    ratio = p[rows, draft] / q[rows, draft]  # (k,)
    u = torch.rand(k, device=p.device, generator=gen)
    n_ok = int((u < ratio).long().cumprod(0).sum())  # accepted prefix length: the one host sync of a round
    if n_ok == k:
        nxt = p[k]
    else:
        residual = (p[n_ok] - q[n_ok]).clamp(min=0)
        # p == q on the support leaves no residual mass (then every draft would have been kept): fall back to p.
        nxt = residual / residual.sum() if residual.sum() > 0 else p[n_ok]
    return draft[:n_ok].tolist() + [int(sampler.draw(nxt[None])[0])]


@dataclass
class SpeculativeStats:
    rounds: int = 0
    drafted: int = 0  # draft tokens proposed
    accepted: int = 0  # draft tokens kept
    prefill_s: float = 0.0  # time to first token
    decode_s: float = 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


class SpeculativeGeneration:
    """Iterate for lists of new tokens, one list per round; `completion` and `stats` are filled at the end."""

    def __init__(self, target: Engine, draft: Engine, request: Request, k: int = 4) -> None:
        vocab, draft_vocab = target.model.config.vocab_size, draft.model.config.vocab_size
        if vocab != draft_vocab:
            raise UserError(f"the draft's vocabulary ({draft_vocab}) differs from the target's ({vocab})")
        if request.sampling.has_penalties:
            raise UserError("speculative decoding does not support repetition, frequency or presence penalties")
        if k < 1:
            raise UserError(f"draft tokens per round must be >= 1, got {k}")
        for engine in (target, draft):
            check_request(request, engine.block_size)
        self.target, self.draft, self.request, self.k = target, draft, request, k
        self.stats = SpeculativeStats()
        self.completion: Completion | None = None
        self._stop = False

    def stop(self) -> None:
        """End after the current round (e.g. on a stop string); the completion is then finish_reason "stop"."""
        self._stop = True

    @torch.inference_mode()
    def __iter__(self) -> Iterator[list[int]]:
        req, target, draft = self.request, self.target, self.draft
        dev = target.device
        n_prompt, budget = len(req.prompt), req.max_new_tokens
        sampler = Sampler([req.sampling], [req.seed], [req.prompt], target.model.config.vocab_size, dev)
        target.setup_cache(1, n_prompt + budget)
        draft.setup_cache(1, n_prompt + budget)
        seq = list(req.prompt)
        out: list[int] = []
        logprobs: list[float] = []
        finish = "length"
        t0 = time.perf_counter()
        if n_prompt > 1:  # the target's cache holds every token but the last, which each round feeds again
            target.forward(torch.tensor([seq[:-1]], device=dev), torch.arange(n_prompt - 1, device=dev),
                           _NO_LOGITS)
        draft_len = 0  # tokens of seq the draft's cache holds
        while len(out) < budget:
            n = len(seq)
            k = min(self.k, budget - len(out) - 1)
            drafted, q = [], []
            feed = torch.tensor([seq[draft_len:]], device=dev)
            for i in range(k):
                logits = draft.prefill(feed, torch.arange(draft_len, draft_len + feed.size(1), device=dev))
                draft_len += feed.size(1)
                q.append(sampler.probs(logits)[0])
                drafted.append(int(sampler.draw(q[-1][None])[0]))
                feed = torch.tensor([[drafted[-1]]], device=dev)
            verify = torch.tensor([[seq[-1]] + drafted], device=dev)  # (1, k + 1)
            t_logits = target.forward(verify, torch.arange(n - 1, n + k, device=dev))  # (k + 1, V)
            p = sampler.probs(t_logits)
            new = accept_draft(p, torch.stack(q) if q else p[:0], torch.tensor(drafted, device=dev, dtype=torch.long),
                               sampler)
            self.stats.rounds += 1
            self.stats.drafted += k
            self.stats.accepted += len(new) - 1
            draft_len = min(draft_len, n + len(new) - 1)  # drop the draft's cache past the last kept draft token
            lps = token_logprobs(t_logits[:len(new)], torch.tensor(new, device=dev)).tolist()
            for j, tok in enumerate(new):
                if tok in req.stop_ids:
                    new, lps, finish = new[:j], lps[:j], "stop"
                    break
            seq += new
            out += new
            logprobs += lps
            if self.stats.rounds == 1:
                self.stats.prefill_s = time.perf_counter() - t0
                t0 = time.perf_counter()
            if new:
                yield new
            if self._stop:
                finish = "stop"
            if finish == "stop":
                break
        self.stats.decode_s = time.perf_counter() - t0
        self.completion = Completion(tokens=out, logprobs=logprobs, finish_reason=finish)


class SpeculativeRow:
    """A speculative generation read as an engine Generation of one row: each round's tokens as (0, token)
    pairs, stop(row) and completions, so that the text layer takes either."""

    def __init__(self, spec: SpeculativeGeneration) -> None:
        self.spec = spec

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for new in self.spec:
            yield [(0, tok) for tok in new]

    def stop(self, row: int) -> None:
        self.spec.stop()

    @property
    def completions(self) -> list[Completion]:
        return [] if self.spec.completion is None else [self.spec.completion]
