"""Data-parallel training on PyTorch's own engine (torch.distributed + DDP).

Launch with torchrun (`torchrun --nproc-per-node 2 -m lorakit train ...`) or let
`lorakit train --nproc N` start torchrun for you. Each rank trains on its own slice of every
global batch; DDP all-reduces the gradients of the adapter parameters (the frozen base has none);
rank 0 alone writes checkpoints, metrics and the adapter. Backend: nccl on GPUs, gloo on CPUs.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lorakit.errors import UserError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


def setup(timeout_s: float = 300.0) -> World:
    """Join the process group torchrun described in the environment (a single process: no-op)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        # A rank that dies makes torchrun stop the others; the timeout bounds any collective that
        # would otherwise wait forever on a peer that is gone.
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(size)))
    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_size))  # share the cores, no oversubscription
    return World(rank, size, local_rank)


def teardown(world: World) -> None:
    if world.active and dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.active:
        dist.barrier()


def all_sum(world: World, value: int | float) -> int | float:
    """The sum of `value` over all ranks (the value itself in a single process)."""
    if not world.active:
        return value
    t = torch.tensor([value], dtype=torch.long if isinstance(value, int) else torch.float64)
    dist.all_reduce(t)
    return type(value)(t.item())


def gather(world: World, value) -> list:
    """`value` from every rank, in rank order, on every rank ([value] in a single process)."""
    if not world.active:
        return [value]
    values = [None] * world.size
    dist.all_gather_object(values, value)
    return values


def launch(nproc: int, argv: list[str]) -> int:
    """Run `lorakit <argv>` under torchrun with `nproc` processes on this machine; its exit code."""
    if nproc < 1:
        raise UserError(f"--nproc must be at least 1, got {nproc}")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "lorakit", "--", *argv]  # "--": torchrun must not parse our flags (--r is ambiguous to it)
    code = subprocess.call(command)
    if code != 0:
        raise UserError(f"a training process failed (torchrun exit code {code}); all ranks were stopped, "
                        "see the first error above; resume with --resume if a checkpoint was written")
    return 0
