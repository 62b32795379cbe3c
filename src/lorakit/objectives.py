"""Training objectives: `sft` (next-token loss), `dpo` (chosen vs rejected pairs), `kto` (good / bad records).

DPO and KTO judge the adapted model (the policy π) against a reference: the same model with its adapters
disabled, or, when training continues a starting adapter (`--init-from`), the base plus that adapter
frozen, as TRL does when it starts from an SFT model. Never a second copy of the base. Both use the
summed log-probability of a completion given its prompt, `logp(y|x)`, and its log-ratio to the
reference, `ρ = logp_π(y|x) - logp_ref(y|x)`; the reward is `β·ρ`. TRL's definitions (trl 1.16):

    DPO (loss_type "sigmoid")   loss = -log σ(β·(ρ_chosen - ρ_rejected))                  mean over pairs
    KTO (loss_type "kto")       good: w_good·(1 - σ(β·(ρ - z)))   bad: w_bad·(1 - σ(β·(z - ρ)))   mean over records
                                z = max(0, mean over the batch of logp_π(y'|x) - logp_ref(y'|x)), no gradient,
                                where y' is the completion of the batch's previous record (a mismatched pair)

Each objective is a module `objective(batch, share) -> loss`: the mean loss of its units (tokens for sft,
pairs or records otherwise) in the micro-batch, times `share` (this micro-batch's part of the step), so
the train loop weights a step the same however it is split into micro-batches and ranks. Each keeps
its step's figures (rewards, margins, accuracy, KL) until `figures()` reads and clears them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lorakit import distributed
from lorakit.adapters import active_adapters, disable_adapters, set_adapters
from lorakit.data import Example, collate
from lorakit.errors import UserError
from lorakit.io import install_adapter, read_adapter
from lorakit.losses import IGNORE, causal_lm_loss, token_logps
from lorakit.preferences import Judged, Pair, joined

OBJECTIVES = ("sft", "kto", "dpo")
REFERENCE_ADAPTER = "reference"  # the frozen copy of --init-from's adapter that a preference run compares against


@dataclass(frozen=True)
class Preference:
    """The settings of the preference objectives (defaults as TRL's)."""

    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0

    def __post_init__(self) -> None:
        # inf passes "> 0" but turns the first step's zero log-ratios into NaN (inf * 0)
        if not 0 < self.beta < math.inf:
            raise UserError(f"--beta must be a positive number, got {self.beta}")
        for name in ("desirable_weight", "undesirable_weight"):
            if not 0 < getattr(self, name) < math.inf:
                raise UserError(f"--{name.replace('_', '-')} must be a positive number, got {getattr(self, name)}")


# ---- the losses, as TRL defines them --------------------------------------------------------------


def dpo_losses(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
               beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses and the rewards of chosen and rejected (detached); all inputs (P,) summed logps."""
    chosen_ratio = chosen - ref_chosen  # (P,)
    rejected_ratio = rejected - ref_rejected  # (P,)
    losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))  # (P,)
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def kto_losses(logps: torch.Tensor, ref_logps: torch.Tensor, good: torch.Tensor, kl: torch.Tensor,
               settings: Preference) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-record KTO losses (weighted) and rewards (detached); logps (N,), good (N,) bool, kl a scalar."""
    ratio = logps - ref_logps  # (N,)
    beta = settings.beta
    losses = torch.where(good, settings.desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl))),
                         settings.undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio))))  # (N,)
    return losses, beta * ratio.detach()


def sequence_logps(model: nn.Module, rows: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed log-probability of each row's learned tokens (the completion) given what precedes them: (B,)."""
    return token_logps(model, rows).sum(1)


@contextlib.contextmanager
def reference(model: nn.Module, adapter: str | None = None) -> Iterator[nn.Module]:
    """The reference model, in place and without gradients: the base (adapters disabled), or only the
    frozen `adapter` active (the starting adapter of a run that continues one)."""
    with torch.no_grad():
        if adapter is None:
            with disable_adapters(model):
                yield model
            return
        previous = active_adapters(model)
        set_adapters(model, {adapter: 1.0})
        try:
            yield model
        finally:
            set_adapters(model, previous)


def add_reference(model: nn.Module, directory: str | Path) -> str:
    """Load the adapter in `directory` as the frozen reference of a run that continues it (TRL's "ref"
    copy of a starting adapter), without dropout so that the reference is the same on every call.
    Load it before the trainable copy: loading an adapter freezes the others and activates it."""
    config, tensors = read_adapter(directory)
    return install_adapter(model, dataclasses.replace(config, lora_dropout=0.0), tensors, REFERENCE_ADAPTER,
                           source=directory)


# ---- the objectives as modules ------------------------------------------------------------------


class _Figures:
    """Sums and counts of a step's figures, added up over micro-batches and ranks when read."""

    def __init__(self, names: tuple[str, ...]):
        self.names = names
        self.clear()

    def clear(self) -> None:
        self.sums = dict.fromkeys(self.names, 0.0)
        self.counts = dict.fromkeys(self.names, 0)

    def add(self, name: str, values: torch.Tensor) -> None:
        self.sums[name] += float(values.double().sum())
        self.counts[name] += values.numel()

    def read(self, world: distributed.World) -> dict[str, float]:
        out = {}
        for name in self.names:
            total, count = distributed.all_sum(world, self.sums[name]), distributed.all_sum(world, self.counts[name])
            if count:
                out[name] = total / count
        self.clear()
        return out


class SFT(nn.Module):
    """Next-token cross-entropy on the learned tokens (today's `lorakit train`)."""

    name = "sft"

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @staticmethod
    def units(batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"][:, 1:] != IGNORE).sum())

    @staticmethod
    def collate(rows: list[Example], rank: int, per_rank: int, pad_id: int, seq_len: int) -> dict[str, torch.Tensor]:
        return collate(rows[rank * per_rank:(rank + 1) * per_rank], pad_id)

    def forward(self, batch: dict[str, torch.Tensor], share: float) -> torch.Tensor:
        return causal_lm_loss(self.model, batch) * share

    def figures(self, world: distributed.World) -> dict[str, float]:
        return {}


class DPO(nn.Module):
    """Direct Preference Optimization over (prompt, chosen, rejected) pairs; a batch holds the chosen
    rows, then the rejected rows, as TRL's."""

    name = "dpo"

    def __init__(self, model: nn.Module, settings: Preference, reference_adapter: str | None = None):
        super().__init__()
        self.model, self.settings, self.reference_adapter = model, settings, reference_adapter
        self.tally = _Figures(("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"))

    @staticmethod
    def units(batch: dict[str, torch.Tensor]) -> int:
        return batch["input_ids"].shape[0] // 2

    @staticmethod
    def collate(pairs: list[Pair], rank: int, per_rank: int, pad_id: int, seq_len: int) -> dict[str, torch.Tensor]:
        mine = pairs[rank * per_rank:(rank + 1) * per_rank]
        return collate([joined(p.prompt, p.chosen, seq_len) for p in mine]
                       + [joined(p.prompt, p.rejected, seq_len) for p in mine], pad_id)

    def margins(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-pair losses and rewards of chosen and rejected, for the rows of `batch`."""
        with reference(self.model, self.reference_adapter):
            ref_chosen, ref_rejected = sequence_logps(self.model, batch).chunk(2)  # (P,), (P,)
        chosen, rejected = sequence_logps(self.model, batch).chunk(2)  # (P,), (P,)
        return dpo_losses(chosen, rejected, ref_chosen, ref_rejected, self.settings.beta)

    def forward(self, batch: dict[str, torch.Tensor], share: float) -> torch.Tensor:
        losses, chosen, rejected = self.margins(batch)
        self.tally.add("rewards/chosen", chosen)
        self.tally.add("rewards/rejected", rejected)
        self.tally.add("rewards/margins", chosen - rejected)
        self.tally.add("rewards/accuracies", (chosen > rejected).float())
        return losses.mean() * share

    def figures(self, world: distributed.World) -> dict[str, float]:
        return self.tally.read(world)

    @torch.no_grad()
    def evaluate(self, pairs: list[Pair], batch_size: int, pad_id: int, seq_len: int) -> dict[str, float]:
        """Held-out preference accuracy: how often the adapted model's reward margin of chosen over
        rejected (relative to the reference) is positive, a tie counting half; and the mean margin."""
        margins = []
        for start in range(0, len(pairs), batch_size):
            batch = _to(self.collate(pairs[start:start + batch_size], 0, batch_size, pad_id, seq_len), self.model)
            _, chosen, rejected = self.margins(batch)
            margins.append(chosen - rejected)
        m = torch.cat(margins).double()  # (P,)
        return {"eval_accuracy": float(((m > 0).double() + 0.5 * (m == 0).double()).mean()),
                "eval_margin": float(m.mean())}


class KTO(nn.Module):
    """Kahneman-Tversky Optimization over records judged good or bad one by one.

    The KL term z is estimated, as in TRL, from mismatched pairs: record i's prompt with the completion
    of record i-1 of the same (global) micro-batch, scored by the adapted and the reference model
    without gradients, averaged over every rank's rows, clamped at 0.
    """

    name = "kto"

    def __init__(self, model: nn.Module, settings: Preference, world: distributed.World,
                 reference_adapter: str | None = None):
        super().__init__()
        self.model, self.settings, self.world, self.reference_adapter = model, settings, world, reference_adapter
        self.tally = _Figures(("rewards/chosen", "rewards/rejected", "kl"))

    @staticmethod
    def units(batch: dict[str, torch.Tensor]) -> int:
        return batch["input_ids"].shape[0]

    @staticmethod
    def collate(records: list[Judged], rank: int, per_rank: int, pad_id: int, seq_len: int) -> dict[str, torch.Tensor]:
        # The mismatched completions rotate over the whole global micro-batch, so that N ranks of b
        # rows see the pairs one process with N*b rows sees.
        previous = records[-1:] + records[:-1]
        lo, hi = rank * per_rank, (rank + 1) * per_rank
        batch = collate([joined(r.prompt, r.completion, seq_len) for r in records[lo:hi]], pad_id)
        kl = collate([joined(r.prompt, p.completion, seq_len) for r, p in zip(records[lo:hi], previous[lo:hi])],
                     pad_id)
        batch.update({f"kl_{k}": v for k, v in kl.items()})
        batch["good"] = torch.tensor([r.good for r in records[lo:hi]], dtype=torch.bool)
        return batch

    def scores(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-record losses and rewards, and the KL estimate, for the records of `batch`."""
        rows = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
        kl_rows = {k: batch[f"kl_{k}"] for k in ("input_ids", "attention_mask", "labels")}
        with reference(self.model, self.reference_adapter):
            ref_logps = sequence_logps(self.model, rows)  # (N,)
            ref_kl = sequence_logps(self.model, kl_rows)  # (N,)
        with torch.no_grad():
            kl_logps = sequence_logps(self.model, kl_rows)  # (N,)
        gap = (kl_logps - ref_kl).double()
        kl = distributed.all_sum(self.world, float(gap.sum())) / distributed.all_sum(self.world, gap.numel())
        kl = torch.tensor(max(kl, 0.0), dtype=ref_logps.dtype, device=ref_logps.device)
        losses, rewards = kto_losses(sequence_logps(self.model, rows), ref_logps, batch["good"], kl, self.settings)
        return losses, rewards, kl

    def forward(self, batch: dict[str, torch.Tensor], share: float) -> torch.Tensor:
        losses, rewards, kl = self.scores(batch)
        good = batch["good"]
        self.tally.add("rewards/chosen", rewards[good])
        self.tally.add("rewards/rejected", rewards[~good])
        self.tally.add("kl", kl.reshape(1))  # the same z on every rank: the mean over ranks is z
        return losses.mean() * share

    @torch.no_grad()
    def evaluate(self, records: list[Judged], batch_size: int, pad_id: int, seq_len: int) -> dict[str, float]:
        """Held-out mean rewards (β·log-ratio to the reference) of good and of bad answers, and their margin."""
        rewards, good = [], []
        for start in range(0, len(records), batch_size):
            chunk = records[start:start + batch_size]
            batch = _to(collate([joined(r.prompt, r.completion, seq_len) for r in chunk], pad_id), self.model)
            with reference(self.model, self.reference_adapter):
                ref_logps = sequence_logps(self.model, batch)  # (N,)
            rewards.append(self.settings.beta * (sequence_logps(self.model, batch) - ref_logps).double())
            good += [r.good for r in chunk]
        r, g = torch.cat(rewards).cpu(), torch.tensor(good)
        out = {"eval_rewards_good": float(r[g].mean()) if g.any() else None,
               "eval_rewards_bad": float(r[~g].mean()) if (~g).any() else None}
        if g.any() and (~g).any():
            out["eval_margin"] = out["eval_rewards_good"] - out["eval_rewards_bad"]
        return {k: v for k, v in out.items() if v is not None}

    def figures(self, world: distributed.World) -> dict[str, float]:
        figures = self.tally.read(world)
        if "rewards/chosen" in figures and "rewards/rejected" in figures:
            figures["rewards/margins"] = figures["rewards/chosen"] - figures["rewards/rejected"]
        return figures


def _to(batch: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    device = next(model.parameters()).device
    return {k: v.to(device) for k, v in batch.items()}
