"""Data-parallel training on PyTorch's own engine (torch.distributed + DDP).

Launch with torchrun (`torchrun --nproc-per-node 2 -m lorakit train ...`) or let
`lorakit train --nproc N` start torchrun for you. Each rank trains on its own slice of every
global batch; DDP all-reduces the gradients of the adapter parameters (the frozen base has none);
rank 0 alone writes checkpoints, metrics and the adapter. Backend: nccl on GPUs, gloo on CPUs.

`--fsdp` shards the frozen base instead of copying it to every rank (`shard`, FSDP2); the adapter
stays whole on every rank and its gradients are averaged here (`average_gradients`), as DDP would.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from lorakit.errors import UserError
from lorakit.nf4 import NF4Linear


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


def shard(model: nn.Module, root: nn.Module, device: torch.device) -> nn.Module:
    """FSDP2 over the frozen base: each decoder layer of `model`, then `root`, the loss module that holds
    it (as DDP wraps it), which takes the rest (embeddings, final norm, output head). Returns `root`.
    The base may be in CPU memory: FSDP moves each rank's shard to `device` (a GPU: this rank's).

    Every base parameter is split on its first dimension across the ranks and gathered whole only while
    its unit runs. The root is the loss and not the model because the loss calls the model's body and
    reads the output head's weight itself (lorakit.losses): only the root's forward gathers them all.
    The trainable parameters (the adapter) are left out (`ignored_params`): a fraction of a percent of
    the model, kept whole on every rank they leave the optimizer, gradient clipping, checkpoints and the
    saved adapter exactly as without FSDP. FSDP shards parameters only, so NF4 weights (codes and
    constants, buffers otherwise) become frozen parameters first; other buffers stay whole."""
    from torch.distributed.fsdp import fully_shard

    for module in model.modules():
        if isinstance(module, NF4Linear):
            module.storage_as_parameters()
    adapter = [p for p in model.parameters() if p.requires_grad]  # in the same order on every rank
    ignored = set(adapter)
    # transformers names its decoder layer classes in _no_split_modules (what accelerate wraps, too)
    layer_classes = set(getattr(model, "_no_split_modules", None) or ())
    for module in model.modules():
        if type(module).__name__ in layer_classes:
            fully_shard(module, ignored_params=ignored)
    root = fully_shard(root, ignored_params=ignored)
    for p in adapter:  # FSDP moves what it shards; the parameters it ignores are ours to move
        p.data = p.data.to(device)
        dist.broadcast(p.data, src=0)  # rank 0's initial adapter on every rank, as DDP starts
    return root


@contextlib.contextmanager
def unsharded(root: nn.Module):
    """The root unit's parameters gathered for a forward outside its own (evaluation calls the model)."""
    root.unshard()
    try:
        yield
    finally:
        root.reshard()


def average_gradients(world: World, params: list[nn.Parameter]) -> None:
    """Average the gradients of `params` over the ranks in place (what DDP's all-reduce does), in one
    collective: the adapter's many small tensors as one flat buffer."""
    grads = [p.grad for p in params if p.grad is not None]  # the same parameters on every rank
    if not world.active or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])  # (sum of numels,)
    dist.all_reduce(flat)
    flat /= world.size
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))


def local_bytes(model: nn.Module) -> int:
    """Bytes of the frozen base this rank holds: its shard of each sharded parameter (NF4 codes included
    once `shard` has made them parameters), whole unsharded parameters and all buffers."""
    from torch.distributed.tensor import DTensor

    total = 0
    params = {id(p): p for p in model.parameters() if not p.requires_grad}.values()
    for t in [*params, *{id(b): b for b in model.buffers()}.values()]:
        local = t.to_local() if isinstance(t, DTensor) else t
        total += local.numel() * local.element_size()
    return total


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
