"""Structured pruning: remove attention heads and MLP neurons, giving a smaller dense model.

Importance is activation-weighted: the size of a unit's contribution to the block's output on calibration
data. A neuron j adds h_j · W_proj[:, j] to the residual stream, so its score is ‖h_j‖₂ · ‖W_proj[:, j]‖₂
(exact). A head group g (the query heads that share one KV head) adds Y_g W_gᵀ through the output
projection; ‖Y_g W_gᵀ‖_F² = n/2 · tr(W_g H_gg W_gᵀ) with H the projection's input Hessian (exact as well).
With grouped-query attention whole KV groups are removed, so the KV layout stays valid; a layer always keeps
at least one group and one neuron.

Scope 'layer' removes the same fraction in every layer, walking the blocks in order so each block is scored on
the outputs of the already-pruned ones; scope 'global' ranks units across layers (by the same scores, taken
on the unpruned model), so layers end up with different widths.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from leangpt.calibration import InputStats, process_blocks
from leangpt.config import ModelConfig
from leangpt.errors import UserError
from leangpt.model import GPT, Block


@dataclass
class Plan:
    """What each layer keeps: sorted KV-group indices and sorted MLP neuron indices."""

    groups: list[torch.Tensor]
    neurons: list[torch.Tensor]


def group_scores(block: Block, proj_stats: InputStats) -> torch.Tensor:
    """Output-contribution norm of each KV group of heads: (n_kv_head,)."""
    a = block.attn
    W = a.proj.weight.float()  # (C, H·D); a group's columns are contiguous (query head h uses KV head h // G)
    H = proj_stats.hessian
    width = (a.n_head // a.n_kv_head) * a.head_dim
    scores = []
    for g in range(a.n_kv_head):
        s = slice(g * width, (g + 1) * width)
        Wg = W[:, s]
        scores.append(((Wg @ H[s, s]) * Wg).sum().clamp(min=0).sqrt())
    return torch.stack(scores)


def neuron_scores(block: Block, proj_stats: InputStats) -> torch.Tensor:
    """‖h_j‖₂ · ‖W_proj[:, j]‖₂ for each MLP neuron: (intermediate,)."""
    return proj_stats.input_norm * block.mlp.proj.weight.float().norm(dim=0)


def n_removed(count: int, fraction: float) -> int:
    """Round half up, and always keep one."""
    return min(count - 1, math.floor(fraction * count + 0.5))


def keep_top(scores: torch.Tensor, n_remove: int) -> torch.Tensor:
    return torch.topk(scores, scores.numel() - n_remove).indices.sort().values


def keep_global(scores: list[torch.Tensor], fraction: float) -> list[torch.Tensor]:
    """Remove the lowest fraction of units across all layers; each layer's best unit is never removed."""
    protected = [s.clone().index_fill_(0, s.argmax().view(1), math.inf) for s in scores]
    flat = torch.cat(protected)
    k = n_removed(flat.numel(), fraction)
    k = min(k, flat.numel() - len(scores))
    drop = torch.zeros(flat.numel(), dtype=torch.bool)
    if k > 0:
        drop[torch.topk(flat, k, largest=False).indices] = True
    out, start = [], 0
    for s in scores:
        out.append((~drop[start:start + s.numel()]).nonzero().flatten())
        start += s.numel()
    return out


def _head_rows(groups: torch.Tensor, group_size: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices (in the q part, in the k or v part) of the kept groups."""
    heads = (groups[:, None] * group_size + torch.arange(group_size)).flatten()
    q = (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()
    kv = (groups[:, None] * head_dim + torch.arange(head_dim)).flatten()
    return q, kv


@torch.no_grad()
def zero_removed(block: Block, groups: torch.Tensor, neurons: torch.Tensor) -> None:
    """Zero the output-projection columns of removed units: the block then computes exactly what the
    shrunk block will (used so later blocks are calibrated on the pruned outputs)."""
    a = block.attn
    q_rows, _ = _head_rows(groups, a.n_head // a.n_kv_head, a.head_dim)
    for proj, kept in ((a.proj, q_rows), (block.mlp.proj, neurons)):
        keep = torch.zeros(proj.in_features, dtype=torch.bool)
        keep[kept] = True
        proj.weight[:, ~keep.to(proj.weight.device)] = 0


@torch.no_grad()
def shrink(model: GPT, plan: Plan) -> GPT:
    """A new, smaller dense GPT that keeps only the planned heads and neurons; every other weight is copied."""
    c = model.config
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    heads, widths = [], []
    for i, block in enumerate(model.blocks):
        a, p = block.attn, f"blocks.{i}."
        group_size = a.n_head // a.n_kv_head
        groups, neurons = plan.groups[i], plan.neurons[i]
        q_rows, kv_rows = _head_rows(groups, group_size, a.head_dim)
        q_size, kv_size = a.n_head * a.head_dim, a.n_kv_head * a.head_dim
        qkv_rows = torch.cat([q_rows, q_size + kv_rows, q_size + kv_size + kv_rows])
        for s in ("weight", "bias"):
            if f"{p}attn.qkv.{s}" in sd:
                sd[f"{p}attn.qkv.{s}"] = sd[f"{p}attn.qkv.{s}"][qkv_rows]
            for name in ("mlp.fc", "mlp.gate"):
                if f"{p}{name}.{s}" in sd:
                    sd[f"{p}{name}.{s}"] = sd[f"{p}{name}.{s}"][neurons]
        sd[f"{p}attn.proj.weight"] = sd[f"{p}attn.proj.weight"][:, q_rows]
        sd[f"{p}mlp.proj.weight"] = sd[f"{p}mlp.proj.weight"][:, neurons]
        heads.append(len(groups) * group_size)
        widths.append(len(neurons))
    d = c.to_dict()
    d["layer_n_head"] = None if all(h == c.n_head for h in heads) else heads
    if len(set(widths)) == 1:  # one width everywhere: a plain intermediate_size (Hugging Face loadable)
        d["intermediate_size"], d["layer_intermediate_size"] = widths[0], None
    else:
        d["layer_intermediate_size"] = widths
    small = GPT(ModelConfig.from_dict(d)).to(next(model.parameters()).device)
    small.load_state_dict({k: v.contiguous() for k, v in sd.items()}, strict=True)
    return small.eval()


def plan_structured(model: GPT, tokens: torch.Tensor, heads: float, neurons: float, scope: str = "layer",
                    batch_size: int = 8) -> Plan:
    """Score heads and neurons on calibration tokens and decide which to keep. With scope 'layer' the model's
    blocks are left with the removed units zeroed (calibration of later blocks sees the pruned outputs)."""
    if heads > 0 and any(model.config.layer_heads(i)[1] == 1 for i in range(model.config.n_layer)):
        raise UserError("cannot remove heads: a layer has a single KV group, and heads are removed by whole KV groups")
    g_scores: list[torch.Tensor] = []
    n_scores: list[torch.Tensor] = []
    plan = Plan([], [])

    def score_block(i: int, block: nn.Module, linears: dict[str, nn.Linear], stats: dict[str, InputStats]) -> None:
        gs, ns = group_scores(block, stats["attn.proj"]).cpu(), neuron_scores(block, stats["mlp.proj"]).cpu()
        g_scores.append(gs)
        n_scores.append(ns)
        if scope == "layer":
            plan.groups.append(keep_top(gs, n_removed(gs.numel(), heads)))
            plan.neurons.append(keep_top(ns, n_removed(ns.numel(), neurons)))
            zero_removed(block, plan.groups[-1], plan.neurons[-1])

    process_blocks(model, tokens, score_block, batch_size=batch_size, want_hessian=True)
    if scope == "global":
        plan = Plan(keep_global(g_scores, heads), keep_global(n_scores, neurons))
    return plan
