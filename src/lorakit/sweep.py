"""`lorakit sweep`: which recipe learns your domain best for what it costs and forgets, measured on your data.

    lorakit sweep --data d.txt --eval-data held.txt --general-data general.txt --out runs/sweep
    lorakit sweep --data d.txt --eval-data held.txt --ranks 1,4,16,64 --no-full          # the rank table
    lorakit sweep --data d.txt --eval-data held.txt --data-fractions 0.1,0.3,1         # the data curve

Every recipe trains for the same budget (--steps of --batch-size x --seq-len tokens) with `lorakit train`'s
loop, in this one process: `lorakit train`'s default recipe, then each value of --ranks, --targets and --lrs
changed from it one at a time (--product: every combination), and a full fine-tune (`train --full`).
With --data-fractions the default LoRA, the full fine-tune and the same model trained from scratch (random
weights) also train on that share of the budget: fewer steps, so fewer and only distinct rows. Each result is
scored on held-out rows of --eval-data (learning) and of --general-data (forgetting; optional), each adapter at
every --scales. Into --out go `runs/<recipe>/` (what `lorakit train` writes there; a full fine-tune's weights
are removed once scored unless --keep-models), `results.jsonl` (one line per finished recipe, rewritten
atomically), `table.md`, `frontier.png` and, with fractions, `data_curve.png`. A killed sweep run again with
the same command continues: finished recipes are kept, the one in training resumes from its checkpoint.
"""

from __future__ import annotations

import json
import math
import shlex
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lorakit.adapters import delete_adapter, disable_adapters, set_adapters
from lorakit.base import base_name, base_option, default_device, dtype_option, load_base, resolve_dtype
from lorakit.checkpoint import has_checkpoint
from lorakit.data import Example, load_examples
from lorakit.errors import UserError
from lorakit.evaluate import mean_nll, perplexity
from lorakit.files import atomic_write_bytes
from lorakit.io import load_adapter
from lorakit.options import add_command, option
from lorakit.plots import plot_data_curve, plot_frontier
from lorakit.train import FULL_LR, LORA_LR, TrainConfig, cli_args, ctrl_c_stops, train

_DEFAULTS = TrainConfig.__dataclass_fields__


@dataclass(kw_only=True)
class SweepConfig:
    """Everything `lorakit sweep` takes; each field's help is its --help."""

    data: Path = option("training data, as `lorakit train` reads it")
    eval_data: Path = option("held-out text of the same domain: how much each recipe learned")
    general_data: Path | None = option("held-out general text: how much of the base's ability each recipe keeps "
                                       "(what it forgets)", default=None)
    out: Path = option("sweep directory (runs, results.jsonl, table.md, plots)", default=Path("runs/sweep"))
    base: str | None = base_option()
    ranks: str = option("LoRA ranks to try, comma-separated", default="4,16,64")
    targets: list[str] = option("target sets to try (as train's --targets), e.g. all-linear q_proj,v_proj",
                                default_factory=list, nargs="+")
    lrs: str = option("learning rates to try for LoRA, comma-separated (default: train's, x1/3 and x3)", default="",
                      show_default=False)
    product: bool = option("every combination of --ranks, --targets and --lrs instead of one at a time", default=False)
    full: bool = option("leave out the full fine-tune row (every weight trained: the baseline the gains are "
                        "measured against)", default=True)
    full_lr: float | None = option("learning rate of the full fine-tune and from-scratch rows (default: "
                                   "train's for --full)", default=None)
    scales: str = option("adapter scales to score, comma-separated", default="0.5,1,2")
    data_fractions: str = option("also train the default LoRA, the full fine-tune and a model from scratch on these "
                                 "shares of the budget, comma-separated (the data curve)", default="1")
    steps: int = option("optimizer steps of each recipe (the budget)", default=150)
    batch_size: int = option("rows per step", default=8)
    seq_len: int = option("tokens per row", default=128)
    eval_rows: int = option("score at most this many held-out rows of each set, spread evenly over it", default=128)
    seed: int = option("random seed (the same for every recipe)", default=0)
    dtype: str = dtype_option()
    keep_models: bool = option("keep full fine-tunes' model weights (otherwise removed once scored)", default=False)
    overwrite: bool = option("start over in an --out that holds another sweep", default=False)
    quiet: bool = option("no progress bar", default=False)

    def __post_init__(self) -> None:
        self.data, self.eval_data, self.out = Path(self.data), Path(self.eval_data), Path(self.out)
        for name in ("data", "eval_data", "general_data"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise UserError(f"--{name.replace('_', '-')} {path} not found")
        for name in ("steps", "batch_size", "seq_len", "eval_rows"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        self.rank_list, self.lr_list, self.scale_list  # noqa: B018 - parsed here: a bad list says so before any work
        if any(f > 1 for f in self.fraction_list):
            raise UserError(f"--data-fractions are shares of the budget, in (0, 1]; got {self.data_fractions!r}")
        if self.full_lr is not None and not (math.isfinite(self.full_lr) and self.full_lr > 0):
            raise UserError(f"--full-lr must be a positive number, got {self.full_lr}")
        for targets in self.targets:
            TrainConfig(data=self.data, out=self.out, targets=targets).lora_config()  # a bad regex says so here

    @property
    def rank_list(self) -> list[int]:
        return [int(r) for r in _numbers("ranks", self.ranks, integer=True)]

    @property
    def lr_list(self) -> list[float]:
        return _numbers("lrs", self.lrs) if self.lrs.strip() else [float(f"{LORA_LR / 3:.2g}"), LORA_LR, LORA_LR * 3]  # 6.7e-4, not 0.000666666...

    @property
    def scale_list(self) -> list[float]:
        return sorted({*_numbers("scales", self.scales, allow_zero=True), 1.0})  # 1: the adapter as trained

    @property
    def fraction_list(self) -> list[float]:
        return _numbers("data-fractions", self.data_fractions)


def _numbers(name: str, text: str, integer: bool = False, allow_zero: bool = False) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--{name} takes comma-separated numbers like 1,2,4; got {text!r}") from None
    bad = [v for v in values if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero)
           or (integer and v != int(v))]
    if not values or bad:
        kind = "positive whole numbers" if integer else "finite numbers >= 0" if allow_zero else "positive numbers"
        raise UserError(f"--{name} takes {kind}, comma-separated; got {text!r}")
    return list(dict.fromkeys(values))


# ---- recipes ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    """One row of the sweep: an adapter (kind "lora"), a full fine-tune or a model trained from scratch."""

    kind: str
    lr: float
    r: int | None = None
    targets: str | None = None
    fraction: float = 1.0

    @property
    def name(self) -> str:
        what = f"lora r={self.r} {self.targets}" if self.kind == "lora" else self.kind
        return f"{what} lr={self.lr:g}" + (f" data={self.fraction:g}" if self.fraction != 1 else "")

    @property
    def slug(self) -> str:
        """The recipe's directory name under runs/."""
        return "".join(c if c.isalnum() or c in "=.-" else "_" for c in self.name.replace(" ", "_"))


def recipes(config: SweepConfig) -> list[Recipe]:
    """The grid, the default recipe first (train's defaults are the centre every axis varies from)."""
    r0, t0, lr0 = _DEFAULTS["r"].default, _DEFAULTS["targets"].default, LORA_LR
    full_lr = config.full_lr or FULL_LR
    targets = config.targets or [t0]
    if config.product:
        grid = [Recipe("lora", lr, r, t) for r in config.rank_list for t in targets for lr in config.lr_list]
    else:
        grid = [Recipe("lora", lr0, r0, t0)]
        grid += [Recipe("lora", lr0, r, t0) for r in config.rank_list]
        grid += [Recipe("lora", lr0, r0, t) for t in targets]
        grid += [Recipe("lora", lr, r0, t0) for lr in config.lr_list]
    if config.full:
        grid.append(Recipe("full", full_lr))
    for fraction in config.fraction_list:
        if fraction != 1:
            grid += [Recipe("lora", lr0, r0, t0, fraction), Recipe("full", full_lr, fraction=fraction)]
        if len(config.fraction_list) > 1 or fraction != 1:
            grid.append(Recipe("scratch", full_lr, fraction=fraction))
    return list(dict.fromkeys(grid))


def train_config(config: SweepConfig, recipe: Recipe, out: Path, base: str | None = None) -> TrainConfig:
    """The `lorakit train` settings of `recipe` under the sweep's budget."""
    steps = max(1, round(config.steps * recipe.fraction))
    kwargs = dict(data=config.data, out=out, base=base or config.base, lr=recipe.lr, steps=steps,
                  batch_size=config.batch_size, seq_len=config.seq_len, seed=config.seed, dtype=config.dtype,
                  quiet=True, checkpoint_every=max(1, steps // 4))
    if recipe.kind == "lora":
        return TrainConfig(**kwargs, r=recipe.r, targets=recipe.targets)
    return TrainConfig(**kwargs, full=True)


def train_command(config: SweepConfig, recipe: Recipe) -> str:
    """The `lorakit train` command line that trains `recipe` on its own (into adapters/...)."""
    out = Path("adapters") / config.data.stem if recipe.kind == "lora" else Path("models") / config.data.stem
    args = cli_args(train_config(config, recipe, out))
    args = [a for a in args if a != "--quiet"]
    drop = {"--checkpoint-every"}
    kept = [a for i, a in enumerate(args) if a not in drop and (i == 0 or args[i - 1] not in drop)]
    return "lorakit train " + shlex.join(kept)


# ---- the sweep ----------------------------------------------------------------------------------


def sweep(config: SweepConfig, should_stop: Callable[[int], bool] | None = None) -> list[dict] | None:
    """Train and score every recipe not yet in `out/results.jsonl`; returns the rows of this grid (base first).

    `should_stop(step)` is passed to each recipe's training: True checkpoints that recipe and returns None
    (the same call later continues from there)."""
    grid = recipes(config)
    results_path = config.out / "results.jsonl"
    done = _prepare_out(config, results_path)
    device = default_device()
    dtype = resolve_dtype(config.dtype, device)
    model, tokenizer = load_base(config.base, dtype=dtype, device=device)
    sets = {"domain": _spread(load_examples(config.eval_data, tokenizer, config.seq_len, "all")[0], config.eval_rows)}
    if config.general_data is not None:
        sets["general"] = _spread(load_examples(config.general_data, tokenizer, config.seq_len, "all")[0],
                                  config.eval_rows)
    if "base" not in done:
        with disable_adapters(model):
            done["base"] = _save_row(results_path, done, {"recipe": "base", "kind": "base", "trainable_params": 0,
                                                          **_scores(model, tokenizer, sets)})
    from tqdm.auto import tqdm

    todo = [r for r in grid if r.name not in done]
    bar = tqdm(total=len(grid), initial=len(grid) - len(todo), unit="recipe", disable=config.quiet,
               dynamic_ncols=True)
    with bar:
        for recipe in todo:
            bar.set_postfix_str(recipe.name, refresh=True)
            row = _run_recipe(config, recipe, model, tokenizer, sets, should_stop)
            if row is None:
                return None
            done[recipe.name] = _save_row(results_path, done, row)
            bar.update(1)
    del model
    rows = [done["base"]] + [done[r.name] for r in grid]
    _report(config, rows, grid)
    return rows


def _prepare_out(config: SweepConfig, results_path: Path) -> dict[str, dict]:
    """The finished rows of an earlier run of this sweep in --out (name -> row); refuses another sweep's."""
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()
                if k in ("data", "eval_data", "general_data", "base", "steps", "batch_size", "seq_len",
                         "eval_rows", "seed", "dtype")}
    settings["base"] = base_name(config.base)
    marker = config.out / "sweep.json"
    if config.out.exists() and not config.out.is_dir():
        raise UserError(f"--out {config.out} is a file; choose a directory path")
    if marker.is_file():
        earlier = json.loads(marker.read_text())
        changed = [k for k in settings if earlier.get(k) != settings[k]]
        if changed and not config.overwrite:
            was = ", ".join(f"--{k.replace('_', '-')} {earlier.get(k)}" for k in changed)
            raise UserError(f"--out {config.out} holds a sweep with other settings ({was}); pass --overwrite to "
                            "start over or choose another --out")
        if config.overwrite:
            for name in ("results.jsonl", "table.md", "frontier.png", "data_curve.png", "scratch_init"):
                path = config.out / name
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
            shutil.rmtree(config.out / "runs", ignore_errors=True)
    elif config.out.is_dir() and any(config.out.iterdir()):
        raise UserError(f"--out {config.out} exists and is not a sweep directory; choose another --out")
    atomic_write_bytes(marker, (json.dumps(settings, indent=2) + "\n").encode())
    if not results_path.is_file():
        return {}
    rows = [json.loads(line) for line in results_path.read_text().splitlines() if line.strip()]
    return {row["recipe"]: row for row in rows}


def _save_row(path: Path, done: dict[str, dict], row: dict) -> dict:
    """Add `row` to results.jsonl: the whole file is replaced at once, so a kill never leaves half a line."""
    rows = [*(r for name, r in done.items() if name != row["recipe"]), row]
    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in rows).encode())
    return row


def _run_recipe(config: SweepConfig, recipe: Recipe, model, tokenizer, sets: dict,
                should_stop: Callable[[int], bool] | None) -> dict | None:
    """Train `recipe` (resuming its checkpoint if a killed sweep left one) and score it; None if stopped."""
    out = config.out / "runs" / recipe.slug
    base = str(_scratch_base(config)) if recipe.kind == "scratch" else None
    settings = train_config(config, recipe, out, base)
    resume = has_checkpoint(out / "checkpoint")  # or its mid-swap copy
    summary = train(TrainConfig(**{**asdict(settings), "resume": resume, "overwrite": not resume}), should_stop)
    if summary.get("interrupted"):
        return None
    row = {"recipe": recipe.name, **asdict(recipe), "steps": summary["steps"], "tokens": summary["tokens_seen"],
           "trainable_params": summary["trainable_params"], "weights_bytes": summary["weights_bytes"],
           "seconds": summary["train_seconds"], "command": train_command(config, recipe)}
    if recipe.kind == "lora":
        load_adapter(model, out, adapter="sweep")
        try:
            row.update(_scores(model, tokenizer, sets, config.scale_list, adapter="sweep"))
        finally:
            delete_adapter(model, "sweep")
    else:
        trained, _ = load_base(out, dtype=next(model.parameters()).dtype, device=next(model.parameters()).device)
        row.update(_scores(trained, tokenizer, sets))
        del trained
        if not config.keep_models:
            for weights in out.glob("*.safetensors"):
                weights.unlink()
    return row


def _scores(model, tokenizer, sets: dict[str, list[Example]], scales: list[float] = (1.0,),
            adapter: str | None = None) -> dict:
    """{"domain": {scale: perplexity}, "general": {...}}: the model as it is, or with `adapter` at each scale."""
    out: dict = {name: {} for name in sets}
    for scale in scales:
        if adapter is not None:
            set_adapters(model, {adapter: scale})
        for name, examples in sets.items():
            out[name][f"{scale:g}"] = perplexity(mean_nll(model, examples, tokenizer.pad_token_id)[0])
    return out


def _spread(examples: list[Example], most: int) -> list[Example]:
    """At most `most` rows, evenly spread (held-out text is whole passages in order: take from all of them)."""
    return examples[::math.ceil(len(examples) / most)] if len(examples) > most else examples


def _scratch_base(config: SweepConfig) -> Path:
    """The base's architecture and tokenizer with fresh random weights (seeded), written once."""
    path = config.out / "scratch_init"
    if (path / "config.json").is_file():
        return path
    from transformers import AutoModelForCausalLM

    from lorakit.export import fresh_tokenizer

    from transformers.utils import logging as hf_logging

    model, _ = load_base(config.base, device=torch.device("cpu"))
    torch.manual_seed(config.seed)
    scratch = AutoModelForCausalLM.from_config(model.config)
    staging = path.with_name(path.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    hf_logging.disable_progress_bar()  # a bar for writing one shard is noise
    try:
        scratch.save_pretrained(staging)
    finally:
        hf_logging.enable_progress_bar()
    fresh_tokenizer(config.base).save_pretrained(staging)
    staging.rename(path)
    return path


# ---- report -------------------------------------------------------------------------------------


def gain(row: dict, base: dict, reference: dict | None) -> float | None:
    """`row`'s held-out log-perplexity gain over the base as a share of `reference`'s (the full fine-tune's)."""
    if reference is None:
        return None
    full = math.log(base["domain"]["1"] / reference["domain"]["1"])
    return math.log(base["domain"]["1"] / row["domain"]["1"]) / full if full > 0 else None


def recommend(rows: list[dict]) -> dict | None:
    """The adapter recipe (whole budget, scale 1) that learns most among those forgetting no more than the
    full fine-tune (all of them without a full fine-tune or general text); None without adapter rows."""
    lora = [r for r in rows if r["kind"] == "lora" and r["fraction"] == 1]
    full = next((r for r in rows if r["kind"] == "full" and r["fraction"] == 1), None)
    if full is not None and "general" in full:
        kept = [r for r in lora if r["general"]["1"] <= full["general"]["1"]]
        lora = kept or lora
    return min(lora, key=lambda r: r["domain"]["1"], default=None)


def table(rows: list[dict]) -> str:
    """The results as a markdown table: one line per recipe."""
    base = rows[0]
    full = next((r for r in rows if r["kind"] == "full" and r["fraction"] == 1), None)
    general = "general" in base
    head = ["recipe", "trainable", "size", "time", "domain ppl", *(["general ppl"] if general else []),
            "gain vs full"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["recipe"], _count(row["trainable_params"]) if row["kind"] != "base" else "-",
                 _bytes(row.get("weights_bytes")), _seconds(row.get("seconds")), _ppls(row["domain"])]
        if general:
            cells.append(_ppls(row["general"]))
        share = gain(row, base, full) if row["kind"] != "base" else None
        cells.append("-" if share is None else f"{100 * share:.0f}%")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _report(config: SweepConfig, rows: list[dict], grid: list[Recipe]) -> None:
    best = recommend(rows)
    command = best["command"] if best else None
    text = table(rows)
    if best:
        text += f"\n\nrecommended: {best['recipe']}\n  {command}\n"
    atomic_write_bytes(config.out / "table.md", (text + "\n").encode())
    plot_frontier(rows, best, command, config.out / "frontier.png")
    if len(config.fraction_list) > 1:
        plot_data_curve(rows, config.out / "data_curve.png")
    print(text)
    print(f"(scales {', '.join(f'{s:g}' for s in config.scale_list)} in the ppl columns; table, frontier.png"
          f"{' and data_curve.png' if len(config.fraction_list) > 1 else ''} in {config.out})")


def _ppls(scores: dict[str, float]) -> str:
    return " / ".join(f"{v:.1f}" if v < 1000 else f"{v:.0f}" for v in scores.values())


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def _bytes(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.0f} kB"


def _seconds(s: float | None) -> str:
    return "-" if s is None else f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def register(subparsers) -> None:
    add_command(subparsers, "sweep", "train a grid of recipes on your data: learning vs forgetting, size, time",
                __doc__.split("\n\n", 1)[0].split(": ", 1)[1] + "\n\nexamples:\n"
                "  lorakit sweep --data d.txt --eval-data held.txt --general-data general.txt\n"
                "  lorakit sweep --data d.txt --eval-data held.txt --ranks 1,4,16,64 --no-full\n"
                "  lorakit sweep --data d.txt --eval-data held.txt --data-fractions 0.1,0.3,1",
                _run, SweepConfig)


def _run(config: SweepConfig) -> int:
    with ctrl_c_stops() as should_stop:
        rows = sweep(config, should_stop)
    if rows is None:
        print(f"interrupted; run the same command again to continue (finished recipes are in {config.out})")
        return 130
    return 0
