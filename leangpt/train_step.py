"""One optimizer step, the parts that decide correctness and are shared by train, distill and prune: the loss
as a mean over target tokens, gradients accumulated so that they equal the big-batch gradient, the optimizer,
and a step that skips itself when the gradient is not finite.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from leangpt import distributed
from leangpt.data.batches import IGNORE_INDEX
from leangpt.device import autocast

if TYPE_CHECKING:
    from leangpt.train import TrainConfig

LossFn = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def token_loss(logits: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0, z_loss: float = 0.0) -> torch.Tensor:
    """Mean next-token cross-entropy over the target tokens (y != IGNORE_INDEX). logits (B, T, V), y (B, T).

    z_loss adds z_loss · mean(log Z)², which keeps the softmax normaliser near 1 (PaLM).
    """
    flat, targets = logits.float().flatten(0, 1), y.flatten()
    loss = F.cross_entropy(flat, targets, ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing)
    if z_loss:
        mask = targets != IGNORE_INDEX
        loss = loss + z_loss * (torch.logsumexp(flat, dim=-1)[mask] ** 2).mean()
    return loss


def lm_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0,
            z_loss: float = 0.0) -> torch.Tensor:
    """The default loss_fn: mean next-token cross-entropy over the micro-batch's target tokens."""
    return token_loss(model(x), y, label_smoothing, z_loss)


OPTIMIZERS = ("adamw", "muon")
MUON_START_MOMENTUM = 0.85  # modded-nanogpt's: Muon's momentum warms up from here to muon_momentum


def muon_param_names(params: dict[str, torch.nn.Parameter]) -> list[str]:
    """The hidden matrices Muon orthogonalises: the 2-D weights inside the transformer blocks. Embeddings, the
    head, norms, biases and any auxiliary module stay with AdamW."""
    return [name for name, p in params.items() if p.dim() == 2 and name.startswith("model.blocks.")]


def newton_schulz(g: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float,
                  dtype: torch.dtype) -> torch.Tensor:
    """Keller Jordan's quintic Newton–Schulz iteration (torch's, in `dtype`): G's orthogonalisation, roughly
    U S' V^T with S' near 1, computed on the wide orientation so the Gram matrix is the small one."""
    a, b, c = coefficients
    tall = g.size(0) > g.size(1)
    x = (g.T if tall else g).to(dtype)
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


class Muon(torch.optim.Muon):
    """torch's Muon (Nesterov momentum, the quintic iteration, "original" lr scaling sqrt(max(1, rows / cols)),
    decoupled weight decay, the same state) with the iteration in `ns_dtype`. torch's always iterates in bf16,
    which on a CPU without bf16 matrix instructions is several times slower than fp32 (a 256 x 704 Gram
    product: 5.3 ms against 0.7 ms on an AVX2-only EPYC); there training runs in fp32 and so does this."""

    def __init__(self, params: list[dict], *, ns_dtype: torch.dtype = torch.bfloat16, **kwargs: float) -> None:
        super().__init__(params, adjust_lr_fn="original", **kwargs)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure: None = None) -> None:
        if closure is not None:
            raise ValueError("leangpt's Muon takes no closure")
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - group["momentum"])
                update = p.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf
                update = newton_schulz(update, group["ns_coefficients"], group["ns_steps"], group["eps"],
                                       self.ns_dtype)
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-group["lr"] * math.sqrt(max(1.0, p.size(0) / p.size(1))))


def configure_optimizer(params: dict[str, torch.nn.Parameter], cfg: TrainConfig, device: torch.device,
                        dtype: torch.dtype = torch.bfloat16) -> list[torch.optim.Optimizer]:
    """AdamW with weight decay on matrices only (not on biases or norm scales); with optimizer=muon, Muon takes
    the hidden matrices, iterating in the step's compute `dtype`, and AdamW the rest. Each group keeps its peak
    lr as "base_lr" for the schedule.

    The fused AdamW kernel (CPU and CUDA) skips a step itself when `found_inf` is set, with no host sync.
    """
    hidden = muon_param_names(params) if cfg.optimizer == "muon" else []
    adam = {n: p for n, p in params.items() if n not in set(hidden)}
    decay = [p for p in adam.values() if p.dim() >= 2]
    no_decay = [p for p in adam.values() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay, "base_lr": cfg.lr},
              {"params": no_decay, "weight_decay": 0.0, "base_lr": cfg.lr}]
    optimizers: list[torch.optim.Optimizer] = [
        torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type in ("cpu", "cuda"))]
    if hidden:
        group = {"params": [params[n] for n in hidden], "base_lr": cfg.muon_lr}
        optimizers.append(Muon([group], lr=cfg.muon_lr, weight_decay=cfg.muon_weight_decay,
                               momentum=cfg.muon_momentum, ns_dtype=dtype))
    return optimizers


def schedule_optimizers(optimizers: list[torch.optim.Optimizer], cfg: TrainConfig, step: int) -> float:
    """Set every group's lr for this step (its peak lr times the schedule's factor) and Muon's warming-up
    momentum. Both are functions of the step alone, so a resumed run continues them exactly. Returns the lr."""
    warm = min(step / cfg.muon_momentum_warmup, 1.0) if cfg.muon_momentum_warmup else 1.0
    momentum = MUON_START_MOMENTUM + warm * (cfg.muon_momentum - MUON_START_MOMENTUM)
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr_at(step, group["base_lr"])
            if isinstance(optimizer, torch.optim.Muon):
                group["momentum"] = momentum
    return cfg.lr_at(step)


def accumulate_gradients(wrapped: torch.nn.Module, loss_fn: LossFn, batches: list[tuple[torch.Tensor, torch.Tensor]],
                         n_targets: int, world: distributed.World, device: torch.device, dtype: torch.dtype,
                         noise_params: list[torch.nn.Parameter] | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Forward and backward over this rank's micro-batches; the gradient left in .grad is that of the mean loss
    over all n_targets target tokens of the step (every micro-batch of every rank), whatever the padding.

    Returns this rank's share of that mean loss and, with noise_params, the squared norms of the micro-batches'
    own mean gradients (for the gradient noise scale; rank-local ones only, before any all-reduce).
    """
    loss_sum = torch.zeros((), device=device)
    small_sq: list[torch.Tensor] = []
    prev = None
    for i, (xb, yb) in enumerate(batches):
        n_mb = int((yb != IGNORE_INDEX).sum())
        xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
        # loss_fn gives the mean over this micro-batch's targets; its weight is its share of the step's targets.
        # Gradient averaging over ranks divides by world.size, which the factor undoes.
        weight = n_mb * world.size / n_targets
        with distributed.gradient_sync(wrapped, i == len(batches) - 1):
            with autocast(device, dtype):
                loss = loss_fn(wrapped, xb, yb)
            (loss * weight).backward()
        loss_sum += loss.detach() * weight
        if noise_params is not None and n_mb and (i < len(batches) - 1 or not world.distributed):
            now = torch.cat([p.grad.flatten() for p in noise_params if p.grad is not None])
            diff = now if prev is None else now - prev
            small_sq.append((diff / weight).square().sum())  # the micro-batch's own mean gradient
            prev = now
    return loss_sum, small_sq


def clipped_step(optimizers: list[torch.optim.Optimizer], params: list[torch.nn.Parameter],
                 grad_clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip the global gradient norm (0: no clipping) and step, unless the gradient is not finite.

    Returns the norm before clipping and 1.0 where the step was skipped (0.0 otherwise), both on the device.
    """
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf)
    if isinstance(grad_norm, DTensor):
        grad_norm = grad_norm.full_tensor()
    bad = (~torch.isfinite(grad_norm)).float()
    skip = None
    for optimizer in optimizers:
        if optimizer.defaults.get("fused", False):
            optimizer.found_inf = bad  # the fused step skips itself when the gradient is not finite
            optimizer.step()
            continue
        if skip is None:
            skip = bool(bad.item())  # the others (Muon, foreach AdamW): one host sync per step
        if not skip:
            optimizer.step()
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    return grad_norm, bad
