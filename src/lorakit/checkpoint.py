"""Training checkpoints: everything a resumed run needs to continue as if never stopped.

A checkpoint is a directory:
    adapter_config.json, adapter_model.safetensors   the adapter so far (a loadable PEFT adapter), or
    model.safetensors                                a full fine-tune's weights so far (`--full`: a model
                                                     without adapters trains its own parameters)
    optimizer.safetensors                            AdamW moments and steps, every rank's RNG state(s)
    state.json                                       step, tokens, time, LR schedule, param groups,
                                                     and the settings a resume must not change
It is written whole beside `<dir>` and then swapped in (`lorakit.files.staged_directory`), so a crash
leaves the previous checkpoint: as `<dir>`, or, mid-swap, as `previous_directory(<dir>)`. Loading
checks everything before it changes anything and falls back to the previous checkpoint when `<dir>`
is missing or damaged (a torn write cannot happen, but a disk can fail or a user can edit a file).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lorakit.adapters import adapter_configs
from lorakit.errors import UserError
from lorakit.files import atomic_write_bytes, previous_directory, read_bytes, read_json, staged_directory
from lorakit.io import WEIGHTS_NAME, adapter_state_dict, parse_tensors, save_tensors, write_adapter

STATE_NAME = "state.json"
OPTIMIZER_NAME = "optimizer.safetensors"
MODEL_WEIGHTS = "model.safetensors"


class SettingsChanged(UserError):
    """--resume with settings that would make the run a different one."""


def rng_state() -> dict[str, torch.Tensor]:
    """This process's random state: the CPU generator's, and the current CUDA device's."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save_checkpoint(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, state: dict,
                    settings: dict, rng_states: list[dict[str, torch.Tensor]] | None = None) -> None:
    """Write a checkpoint; `rng_states` holds every rank's `rng_state()` in rank order (default: this process's)."""
    opt = optimizer.state_dict()
    tensors = {f"optimizer.{index}.{key}": value for index, slots in opt["state"].items()
               for key, value in slots.items()}
    for rank, states in enumerate(rng_states or [rng_state()]):
        for kind, value in states.items():
            tensors[f"rng.{rank}.{kind}"] = value
    meta = {**state, "param_groups": opt["param_groups"], "scheduler": scheduler.state_dict(), "settings": settings}
    with staged_directory(directory) as staging:
        # as trained (a PiSSA adapter unconverted: the resumed run rebuilds the same residual base);
        # write_adapter refuses a non-finite adapter
        if adapter_configs(model):
            write_adapter(staging, adapter_configs(model)["default"], adapter_state_dict(model))
        else:  # --full: the model's own parameters (tied weights once)
            weights = dict(model.named_parameters())
            if not all(torch.isfinite(w).all() for w in weights.values()):
                raise UserError("the model's weights are not finite; no checkpoint written")
            save_tensors(staging / MODEL_WEIGHTS, {k: w.detach() for k, w in weights.items()})
        save_tensors(staging / OPTIMIZER_NAME, tensors)
        atomic_write_bytes(staging / STATE_NAME, (json.dumps(meta, indent=2) + "\n").encode())


def has_checkpoint(directory: Path) -> bool:
    """Whether `directory` or its mid-swap copy holds a checkpoint to resume from (not checked for damage)."""
    return any((d / STATE_NAME).exists() for d in (directory, previous_directory(directory)))


@dataclass
class _Checkpoint:
    where: Path
    meta: dict
    adapter: dict[str, torch.Tensor]
    tensors: dict[str, torch.Tensor]


@torch.no_grad()
def load_checkpoint(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, settings: dict,
                    rank: int = 0) -> dict:
    """Restore adapter, optimizer, scheduler and this rank's RNG in place; return {step, tokens, train_seconds}
    and whatever else of the run's state the checkpoint records (`onednn_fp32`: how its products ran).

    Every file is read and checked before anything changes. If `directory` is missing (a crash mid-swap)
    or damaged, the previous checkpoint is used, and a damaged one is reported on stderr. Settings that
    differ from the checkpoint's raise `SettingsChanged`, naming each difference.
    """
    problems = []
    for where in (directory, previous_directory(directory)):
        if not where.exists():
            continue
        try:
            found = _read(where, model, settings)
        except SettingsChanged:
            raise
        except UserError as err:
            problems.append(str(err))
            continue
        if problems and rank == 0:
            print(f"lorakit train: warning: {problems[0]}; resuming from the previous checkpoint instead "
                  f"(step {found.meta['step']})", file=sys.stderr, flush=True)
        _restore(found, model, optimizer, scheduler, rank)
        return {k: found.meta[k] for k in ("step", "tokens", "train_seconds", "onednn_fp32") if k in found.meta}
    if not problems:
        raise UserError(f"no checkpoint in {directory}; start without --resume")
    raise UserError(f"cannot resume: {'; '.join(problems)}; start the run again with --overwrite")


def _read(where: Path, model: nn.Module, settings: dict) -> _Checkpoint:
    """A checkpoint's contents, checked against this run (its settings, the adapter's keys and shapes)."""
    meta = read_json(where / STATE_NAME, "checkpoint state")
    problem = _meta_problem(meta)
    if problem:
        raise UserError(f"{where / STATE_NAME} is damaged ({problem})")
    _check_settings(meta["settings"], settings)
    name = WEIGHTS_NAME if adapter_configs(model) else MODEL_WEIGHTS
    adapter = parse_tensors(read_bytes(where / name, "checkpoint weights"), where / name)
    for key, param in _trained(model).items():
        value = adapter.get(key)
        if value is None:
            raise UserError(f"{where / name} lacks {key}; the checkpoint is damaged")
        if value.shape != param.shape or not value.is_floating_point() or not torch.isfinite(value).all():
            raise UserError(f"{where / name}: {key} is {tuple(value.shape)} {value.dtype} or not finite; "
                            f"this run needs a finite {tuple(param.shape)}: the checkpoint is damaged")
    tensors = parse_tensors(read_bytes(where / OPTIMIZER_NAME, "optimizer state"), where / OPTIMIZER_NAME)
    if not any(k in tensors for k in ("rng.0.cpu", "rng.cpu")):
        raise UserError(f"{where / OPTIMIZER_NAME} lacks the random state; the checkpoint is damaged")
    return _Checkpoint(where, meta, adapter, tensors)


def _meta_problem(meta) -> str | None:
    if not isinstance(meta, dict):
        return f"a JSON {type(meta).__name__}, not an object"
    types = {"step": int, "tokens": int, "train_seconds": (int, float), "param_groups": list, "scheduler": dict,
             "settings": dict}
    for key, kind in types.items():
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            return f"{key!r} is missing or not a {getattr(kind, '__name__', 'number')}"
    if meta["step"] < 0 or meta["tokens"] < 0 or not math.isfinite(meta["train_seconds"]):
        return "negative or non-finite counters"
    if not isinstance(meta.get("onednn_fp32", False), bool):
        return "'onednn_fp32' is not true or false"
    return None


def _check_settings(saved: dict, settings: dict) -> None:
    """Refuse a resume whose settings differ from the checkpoint's, naming every difference.

    A setting the checkpoint does not record (a checkpoint written by an older lorakit) is not compared.
    """
    changed = [k for k, v in settings.items() if k in saved and saved[k] != v]
    if changed:
        differences = ", ".join(f"{_flag(k)} (was {saved[k]}, now {settings[k]})" for k in changed)
        raise SettingsChanged(f"--resume continues the same run, but this one changes {differences}; resume with "
                              "the original settings, or start a new run with --overwrite")


def _flag(key: str) -> str:
    return {"world_size": "the number of processes", "data_sha256": "the data file's contents (sha256)"}.get(
        key, f"--{key.replace('_', '-')}")


def _trained(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint holds of the model: its adapter, or (a full fine-tune) all its parameters."""
    return adapter_state_dict(model) if adapter_configs(model) else dict(model.named_parameters())


def _restore(found: _Checkpoint, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, rank: int) -> None:
    for key, param in _trained(model).items():
        param.copy_(found.adapter[key])
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in found.tensors.items():
        if key.startswith("optimizer."):
            _, index, slot = key.split(".", 2)
            state.setdefault(int(index), {})[slot] = value
    try:
        optimizer.load_state_dict({"state": state, "param_groups": found.meta["param_groups"]})
        scheduler.load_state_dict(found.meta["scheduler"])
    except (ValueError, KeyError, TypeError, IndexError) as err:
        raise UserError(f"{found.where}: the optimizer state does not fit this run ({err}); the checkpoint is "
                        "damaged or from another run") from None
    tensors = found.tensors
    # Each rank's own generators (dropout masks differ per rank); a checkpoint of an older lorakit has rank 0's only.
    cpu = tensors.get(f"rng.{rank}.cpu", tensors.get("rng.0.cpu", tensors.get("rng.cpu")))
    torch.set_rng_state(cpu)
    if torch.cuda.is_available():
        cuda = tensors.get(f"rng.{rank}.cuda")
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)
        else:
            legacy = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
            if legacy:
                torch.cuda.set_rng_state_all(legacy)
