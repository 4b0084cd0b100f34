"""Data parallelism applied from outside the model (torchtitan's shape): DDP or FSDP2 `fully_shard`, under torchrun.

The model code is written for one device; this module wraps it. gloo on CPU, NCCL on GPU.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.nn.parallel import DistributedDataParallel

from leangpt.errors import UserError
from leangpt.model import GPT

PARALLEL_MODES = ("none", "ddp", "fsdp")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def under_torchrun() -> bool:
    """True in a process that torchrun started (it sets RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init(device: torch.device) -> World:
    """Join the torchrun process group when launched by torchrun; one process otherwise."""
    if not under_torchrun():
        return World()
    world = World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        if device.type == "cuda":
            # NCCL wants this process's GPU by index ("cuda" alone is refused), one GPU per local rank.
            device_id = torch.device("cuda", world.local_rank)
            torch.cuda.set_device(device_id)
            dist.init_process_group("nccl", device_id=device_id)
        else:
            dist.init_process_group("gloo")
    return world


def local_device(device: torch.device, world: World) -> torch.device:
    """One GPU per local rank; CPU stays CPU."""
    if device.type == "cuda" and world.distributed:
        torch.cuda.set_device(world.local_rank)
        return torch.device("cuda", world.local_rank)
    return device


def is_main_process() -> bool:
    """True outside torchrun and on rank 0: the one process that prints the command's result."""
    return os.environ.get("RANK", "0") == "0"


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def parallelize(model: GPT, mode: str, world: World, device: torch.device) -> torch.nn.Module:
    """Wrap for data parallelism. FSDP2 shards each block and then the root (embeddings, final norm, head)."""
    if mode == "none" or not world.distributed:
        return model
    if mode == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    if mode == "fsdp":
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        return model
    raise UserError(f"unknown parallel mode {mode!r}; choose from {', '.join(PARALLEL_MODES)}")


@contextlib.contextmanager
def gradient_sync(wrapped: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulated step."""
    if isinstance(wrapped, DistributedDataParallel) and not enabled:
        with wrapped.no_sync():
            yield
        return
    if isinstance(wrapped, FSDPModule):
        wrapped.set_requires_gradient_sync(enabled)
    yield


def average_grads(module: torch.nn.Module, world: World) -> None:
    """All-reduce the gradients of parameters no wrapper looks after (an auxiliary module's)."""
    if not world.distributed:
        return
    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)


def any_rank(flag: bool, world: World, device: torch.device) -> bool:
    """True on every rank when flag is true on one (signals must stop all ranks at the same step)."""
    if not world.distributed:
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def launch(command: str, nproc: int, argv: list[str] | None) -> int:
    """`leangpt COMMAND --nproc N ...`: run the same command line (default: this process's) under torchrun with N
    processes on this machine, less --nproc (torchrun would take it for an abbreviation of --nproc-per-node).
    A --nproc from --set or --config stays, and the processes ignore it: torchrun started them."""
    args = list(sys.argv[2:] if argv is None else argv)
    for i, arg in enumerate(args):
        if arg == "--nproc" or arg.startswith("--nproc="):
            del args[i:i + (1 if "=" in arg else 2)]
            break
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "leangpt", command, *args]
    return subprocess.call(cmd)
