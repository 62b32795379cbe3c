"""Training checkpoints: everything a resumed run needs to continue as if never stopped.

A checkpoint is a directory:
    adapter_config.json, adapter_model.safetensors   the adapter so far (a loadable PEFT adapter)
    optimizer.safetensors                            AdamW moments and steps, torch RNG state(s)
    state.json                                       step, tokens, time, LR schedule, param groups,
                                                     and the settings a resume must not change
It is written whole beside `<dir>` and then swapped in (`lorakit.files.staged_directory`), so a crash
leaves the previous checkpoint (as `<dir>` or, mid-swap, `previous_directory(<dir>)`, which load
falls back to).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from lorakit.errors import UserError
from lorakit.files import atomic_write_bytes, previous_directory, staged_directory
from lorakit.adapters import adapter_configs
from lorakit.io import adapter_state_dict, load_tensors, save_tensors, write_adapter


def save_checkpoint(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler, state: dict, settings: dict) -> None:
    opt = optimizer.state_dict()
    tensors = {f"optimizer.{index}.{key}": value for index, slots in opt["state"].items()
               for key, value in slots.items()}
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    meta = {**state, "param_groups": opt["param_groups"], "scheduler": scheduler.state_dict(), "settings": settings}
    with staged_directory(directory) as staging:
        # as trained (a PiSSA adapter unconverted: the resumed run rebuilds the same residual base)
        write_adapter(staging, adapter_configs(model)["default"], adapter_state_dict(model))
        save_tensors(staging / "optimizer.safetensors", tensors)
        atomic_write_bytes(staging / "state.json", (json.dumps(meta, indent=2) + "\n").encode())


@torch.no_grad()
def load_checkpoint(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler, settings: dict) -> dict:
    """Restore adapter, optimizer, scheduler and RNG in place; return {step, tokens, train_seconds}."""
    if not (directory / "state.json").is_file():
        old = previous_directory(directory)
        if not (old / "state.json").is_file():
            raise UserError(f"no checkpoint in {directory}; start without --resume")
        directory = old
    meta = json.loads((directory / "state.json").read_text())
    changed = [k for k, v in settings.items() if meta["settings"].get(k) != v]
    if changed:
        was = ", ".join(f"--{k.replace('_', '-')} {meta['settings'].get(k)}" for k in changed)
        raise UserError(f"--resume needs the original settings; this run changes {', '.join(changed)} (was {was})")
    saved = load_tensors(directory / "adapter_model.safetensors")
    for key, param in adapter_state_dict(model).items():
        param.copy_(saved[key])
    tensors = load_tensors(directory / "optimizer.safetensors")
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, slot = key.split(".", 2)
            state.setdefault(int(index), {})[slot] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(tensors["rng.cpu"])
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    return {k: meta[k] for k in ("step", "tokens", "train_seconds")}
