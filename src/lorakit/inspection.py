"""Looking inside adapters: what an adapter holds (`inspect`) and what it changes (`diff`).

`inspect` reads only the adapter: per module rank, alpha, scale, ‖ΔW‖ and the singular values of
ΔW = s·B·A, with an effective rank (Roy & Vetterli 2007: exp of the entropy of the normalised
singular values; r when all are equal, 1 when one dominates). `diff` runs the base with and
without the adapter over contexts and reports which next-token predictions move: KL(adapted ‖ base)
per context and the tokens that gain and lose the most probability on average.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from lorakit import nf4
from lorakit.adapters import disable_adapters
from lorakit.algebra import Adapter, low_rank_svd
from lorakit.base import EMBEDDED_BASE, base_option, default_device, load_base
from lorakit.config import CONFIG_NAME, LoraConfig
from lorakit.data import load_examples
from lorakit.errors import UserError
from lorakit.files import check_output, read_json, save_png
from lorakit.io import EMBEDDING_COPY, WEIGHTS_NAME, adapters_option, attach_adapters
from lorakit.modules import output_head
from lorakit.options import add_command, default_of, option

# -- inspect --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerReport:
    module: str
    rank: int
    alpha: float
    scale: float
    norm: float
    """‖ΔW‖_F of s·B·A."""
    singular_values: list[float]
    """Of ΔW, largest first (r of them)."""
    effective_rank: float
    """exp(entropy of σᵢ/Σσ): between 1 and r."""


@dataclass(frozen=True)
class AdapterReport:
    path: str
    config: LoraConfig
    trainable_params: int
    bytes_on_disk: int
    """Of adapter_config.json and adapter_model.safetensors."""
    base_params: int | None
    """Parameters of the base named in the config, when it is a local directory; else None."""
    layers: list[LayerReport]
    base_memory: dict | None = None
    """Base bytes and bits per parameter and peak memory of the training run, from the
    `training_summary.json` beside the adapter; else, for an NF4 base directory, from its files."""


def inspect_adapter(adapter: str | Path, plot: str | Path | None = None) -> AdapterReport:
    """Report on the adapter in directory `adapter`; with `plot`, also draw spectra and norms to a PNG."""
    loaded = Adapter.load(adapter)
    config = loaded.config
    layers = []
    for path, factors in loaded.modules().items():
        S = low_rank_svd(factors)[1]  # (k,) singular values, fp64
        layers.append(LayerReport(
            module=path, rank=factors.rank, alpha=config.alpha_for(path), scale=factors.scale,
            norm=float(S.square().sum().sqrt()), singular_values=[float(s) for s in S],
            effective_rank=effective_rank(S),
        ))
    trainable = sum(t.numel() for k, t in loaded.tensors.items() if not k.endswith(EMBEDDING_COPY))
    report = AdapterReport(path=str(adapter), config=config, trainable_params=trainable,
                           bytes_on_disk=sum((Path(adapter) / n).stat().st_size for n in (CONFIG_NAME, WEIGHTS_NAME)),
                           base_params=base_parameter_count(config.base_model_name_or_path), layers=layers,
                           base_memory=_base_memory(Path(adapter), config.base_model_name_or_path))
    if plot is not None:
        _plot_spectra(report, plot)
    return report


def effective_rank(singular_values: torch.Tensor) -> float:
    total = float(singular_values.sum())
    if total <= 0:
        return 0.0
    p = singular_values.double() / total
    p = p[p > 0]
    return math.exp(float(-(p * p.log()).sum()))


def base_parameter_count(name: str | None) -> int | None:
    """Parameters of a local base model (from safetensors headers, no weights read), else None.

    The name comes from the adapter's config, so anything may be there: a base that cannot be read
    (a hub id, a path that is not a model, a broken file) only means the count is not shown.
    """
    try:
        return _base_parameter_count(name)
    except Exception:  # noqa: BLE001 - informational: unknown, not an error of the adapter
        return None


def _base_parameter_count(name: str | None) -> int | None:
    from safetensors import safe_open

    if name is None:
        return None
    directory = EMBEDDED_BASE if name == "lorakit/embedded" else Path(name).expanduser()
    if nf4.is_quantized(directory):  # packed 4-bit weights: count elements, not bytes
        return nf4.saved_memory(directory).params
    files = sorted(directory.glob("*.safetensors")) if (directory / "config.json").is_file() else []
    if not files:
        return None
    count = 0
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            count += sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())
    return count


def _base_memory(adapter: Path, base: str | None) -> dict | None:
    """The base's memory from the training summary beside the adapter (if it is one of ours), else from an NF4
    base directory; None when neither can be read (informational, like `base_parameter_count`)."""
    summary = adapter / "training_summary.json"
    if summary.is_file():
        try:
            memory = read_json(summary, "training summary").get("memory")
        except (UserError, AttributeError):  # not JSON, or not an object
            return None
        numbers = isinstance(memory, dict) and all(
            isinstance(memory.get(k), (int, float)) and not isinstance(memory.get(k), bool)
            for k in ("base_bytes", "base_bits_per_param", *(k for k in ("nf4_params", "nf4_bits_per_param",
                                                                          "peak_bytes") if memory.get(k))))
        return memory if numbers else None
    try:
        quantized = bool(base) and nf4.is_quantized(Path(base).expanduser())
    except Exception:  # noqa: BLE001 - "~nosuchuser/x", NUL bytes, loops: not a base we can read
        return None
    if quantized:
        memory = nf4.saved_memory(Path(base).expanduser())
        return {"base_bytes": memory.bytes, "base_bits_per_param": memory.bits_per_param,
                "nf4_params": memory.nf4_params, "nf4_bits_per_param": memory.nf4_bits_per_param}
    return None


@dataclass
class InspectConfig:
    """Everything `lorakit inspect` takes; each field's help is its --help."""

    adapter: Path = option("adapter directory", positional=True)
    plot: Path | None = option("PNG to draw the spectra and per-module norms to", default=None)


def cmd_inspect(config: InspectConfig) -> AdapterReport:
    """`lorakit inspect`: `inspect_adapter`, printed as a table."""
    plot = config.plot
    if plot is not None:
        check_output(plot, "--plot")
    r = inspect_adapter(config.adapter, plot)
    c = r.config
    targets = c.target_modules if isinstance(c.target_modules, str) else ", ".join(c.target_modules or [])
    if isinstance(c.target_modules, list) and len(c.target_modules) > 8:  # full paths, as combine writes them
        leaves = sorted({t.rsplit(".", 1)[-1] for t in c.target_modules})
        targets = f"{len(c.target_modules)} module paths ({', '.join(leaves)})"
    print(f"adapter {r.path}: LoRA for base {c.base_model_name_or_path or '(not recorded)'}")
    scale = f"alpha/sqrt(r) = {c.lora_alpha / math.sqrt(c.r):.3g}" if c.use_rslora else f"{c.lora_alpha / c.r:.3g}"
    print(f"  r={c.r}, lora_alpha={c.lora_alpha:g} (scale {scale}), rslora {'yes' if c.use_rslora else 'no'}, "
          f"dropout {c.lora_dropout:g}, targets {targets}")
    if c.rank_pattern or c.alpha_pattern:
        print(f"  rank_pattern {c.rank_pattern or '{}'}, alpha_pattern {c.alpha_pattern or '{}'}")
    share = (f"{100 * r.trainable_params / r.base_params:.3g}% of the base's {r.base_params:,}"
             if r.base_params else "base size unknown")
    print(f"  {r.trainable_params:,} trainable params in {len(r.layers)} modules ({share}); "
          f"{r.bytes_on_disk / 1e3:,.1f} KB on disk")
    if r.base_memory:
        m = r.base_memory
        nf4_part = (f", NF4 layers {m['nf4_bits_per_param']:.3f} bits/param with constants"
                    if m.get("nf4_params") else "")
        peak = f"; peak memory in training {m['peak_bytes'] / 1e6:,.0f} MB" if m.get("peak_bytes") else ""
        print(f"  base weights {m['base_bytes'] / 1e6:,.2f} MB, {m['base_bits_per_param']:.2f} bits/param"
              f"{nf4_part}{peak}")
    width = max([len("module"), *(len(layer.module) for layer in r.layers)])
    print(f"{'module':<{width}} {'rank':>4} {'alpha':>6} {'scale':>6} {'‖ΔW‖':>8} {'eff.rank':>8}  "
          "singular values of ΔW (largest first)")
    for layer in r.layers:
        sv = " ".join(f"{s:.3g}" for s in layer.singular_values[:6]) + (" …" if layer.rank > 6 else "")
        print(f"{layer.module:<{width}} {layer.rank:>4} {layer.alpha:>6g} {layer.scale:>6.3g} {layer.norm:>8.4g} "
              f"{layer.effective_rank:>8.2f}  {sv}")
    if plot is not None:
        print(f"wrote {plot}")
    return r


# -- diff -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ContextChange:
    text: str
    """The end of the context (the model predicts what follows it)."""
    kl: float
    """KL(adapted ‖ base) of the next-token distributions, in nats."""
    base_top: str
    adapted_top: str


@dataclass(frozen=True)
class TokenShift:
    token: str
    token_id: int
    change: float
    """Mean over contexts of P_adapted(token) − P_base(token)."""
    base: float
    adapted: float


@dataclass(frozen=True)
class DiffReport:
    contexts: int
    mean_kl: float
    top_contexts: list[ContextChange]
    gained: list[TokenShift]
    lost: list[TokenShift]


def diff_adapters(adapters: list[str], base: str | None = None, data: str | Path | None = None,
                  prompts: list[str] | None = None, max_contexts: int = 2000, seq_len: int = 128,
                  top: int = 15) -> DiffReport:
    """Which next-token predictions `adapters` ('PATH[:SCALE]') change most, over `data` or `prompts`."""
    if (data is None) == (not prompts):
        raise UserError("give either --data FILE or --prompts TEXT ... (one of them)")
    for name, value in (("max-contexts", max_contexts), ("seq-len", seq_len), ("top", top)):
        if value <= 0:
            raise UserError(f"--{name} must be positive, got {value}")
    if not adapters:
        raise UserError("give at least one --adapter to compare against the base")
    if data is not None and not Path(data).is_file():
        raise UserError(f"data file {data} not found")  # before the model loads, not after
    model, tokenizer = load_base(base, dtype=torch.float32, device=default_device())
    attach_adapters(model, adapters)
    seq_len = min(seq_len, getattr(model.config, "max_position_embeddings", seq_len))
    sequences = (_data_contexts(Path(data), tokenizer, max_contexts, seq_len) if data is not None
                 else _prompt_contexts(tokenizer, prompts))

    vocab = output_head(model).weight.shape[0]
    p_base_sum, p_adapted_sum = torch.zeros(vocab, dtype=torch.float64), torch.zeros(vocab, dtype=torch.float64)
    changes: list[ContextChange] = []
    for ids, positions in sequences:
        x = torch.tensor([ids], device=model.device)  # (1, T)
        with torch.no_grad():
            adapted = model(x).logits[0, positions].float().log_softmax(-1)  # (n, V)
            with disable_adapters(model):
                based = model(x).logits[0, positions].float().log_softmax(-1)  # (n, V)
        kl = (adapted.exp() * (adapted - based)).sum(-1).clamp(min=0)  # (n,)
        p_base_sum += based.exp().sum(0).double().cpu()
        p_adapted_sum += adapted.exp().sum(0).double().cpu()
        for i, t in enumerate(positions):
            changes.append(ContextChange(text=_tail(tokenizer, ids[: t + 1]), kl=float(kl[i]),
                                         base_top=_token_text(tokenizer, int(based[i].argmax())),
                                         adapted_top=_token_text(tokenizer, int(adapted[i].argmax()))))
    n = len(changes)
    mean_base, mean_adapted = p_base_sum / n, p_adapted_sum / n
    shift = mean_adapted - mean_base  # (V,)

    def shifts(ids: torch.Tensor) -> list[TokenShift]:
        return [TokenShift(_token_text(tokenizer, int(i)), int(i), float(shift[i]), float(mean_base[i]),
                           float(mean_adapted[i])) for i in ids]

    k = min(top, vocab)
    return DiffReport(contexts=n, mean_kl=sum(c.kl for c in changes) / n,
                      top_contexts=sorted(changes, key=lambda c: -c.kl)[:top],
                      gained=shifts(shift.topk(k).indices), lost=shifts((-shift).topk(k).indices))


def _data_contexts(data: Path, tokenizer, max_contexts: int, seq_len: int) -> list[tuple[list[int], list[int]]]:
    """Rows of the data file (as training reads it) spread evenly over it; every position is a context."""
    rows = [e.input_ids for e in load_examples(data, tokenizer, seq_len, labels="all")[0]]
    mean_len = sum(map(len, rows)) / len(rows)
    count = min(len(rows), math.ceil(max_contexts / mean_len))
    spread = sorted(set(torch.linspace(0, len(rows) - 1, count).round().long().tolist()))
    order = spread + [i for i in range(len(rows)) if i not in set(spread)]  # more rows if short ones fell short
    contexts, left = [], max_contexts
    for i in order:
        if left <= 0:
            break
        positions = list(range(min(len(rows[i]), left)))
        contexts.append((rows[i], positions))
        left -= len(positions)
    return contexts


def _prompt_contexts(tokenizer, prompts: list[str]) -> list[tuple[list[int], list[int]]]:
    contexts = []
    for prompt in prompts:
        ids = tokenizer(prompt)["input_ids"]
        if not ids:
            raise UserError(f"prompt {prompt!r} has no tokens; give a non-empty prompt")
        contexts.append((ids, [len(ids) - 1]))
    return contexts


def _token_text(tokenizer, token_id: int) -> str:
    """The token as text; a lone byte of a multi-byte character shows as its vocabulary entry instead of �."""
    text = tokenizer.decode([token_id])
    return tokenizer.convert_ids_to_tokens(token_id) if "\ufffd" in text else text


def _tail(tokenizer, ids: list[int], tokens: int = 12, chars: int = 48) -> str:
    text = tokenizer.decode(ids[-tokens:]).replace("\n", "⏎")
    return text if len(text) <= chars else "…" + text[-chars:]


@dataclass
class DiffConfig:
    """Everything `lorakit diff` takes; each field's help is its --help (defaults: `diff_adapters`')."""

    adapters: list[str] = adapters_option("to compare a mix", required=True)
    base: str | None = base_option()
    data: Path | None = option(".txt or .jsonl file (the formats train reads)", default=None)
    prompts: list[str] | None = option("contexts given directly", default=None, nargs="+", metavar="TEXT")
    max_contexts: int = option("contexts taken from --data", default=default_of(diff_adapters, "max_contexts"))
    seq_len: int = option("tokens per window of --data", default=default_of(diff_adapters, "seq_len"))
    top: int = option("contexts and tokens to list", default=default_of(diff_adapters, "top"))
    json: bool = option("print the report as JSON instead of tables", default=False)
    plot: Path | None = option("PNG bar chart of the tokens gained and lost", default=None)


def cmd_diff(config: DiffConfig) -> DiffReport:
    """`lorakit diff`: `diff_adapters`, printed as tables (or JSON), and its plot."""
    adapters, plot = config.adapters, config.plot
    if plot is not None:
        check_output(plot, "--plot")
    r = diff_adapters(adapters, config.base, config.data, config.prompts, config.max_contexts, config.seq_len,
                      config.top)
    if plot is not None:
        _plot_shifts(r, plot, title=f"{' + '.join(adapters)}: mean change of next-token probability")
    if config.json:
        print(json.dumps(dataclasses.asdict(r), indent=2, ensure_ascii=False))
        return r
    kls = sorted(c.kl for c in r.top_contexts)
    print(f"{r.contexts:,} context{'s' if r.contexts != 1 else ''}; mean KL(adapted ‖ base) {r.mean_kl:.4g} nats, "
          f"largest {kls[-1] if kls else 0:.4g}")
    print(f"\ncontexts that change most:\n{'KL':>8}  {'base → adapted':<24} context")
    for c in r.top_contexts:
        print(f"{c.kl:>8.4g}  {f'{c.base_top!r} → {c.adapted_top!r}':<24} {c.text!r}")
    for title, shifts in (("gain", r.gained), ("lose", r.lost)):
        print(f"\ntokens that {title} most probability (mean over contexts):\n"
              f"{'change':>9} {'base':>7} {'adapted':>7}  token")
        for s in shifts:
            print(f"{s.change:>+9.4f} {s.base:>7.4f} {s.adapted:>7.4f}  {s.token!r}")
    if plot is not None:
        print(f"\nwrote {plot}")
    return r


# -- plots ----------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _plot_spectra(report: AdapterReport, path: str | Path) -> None:
    """Left: singular values of each module's ΔW; right: ‖ΔW‖ per module."""
    plt = _pyplot()
    names = _short_names([layer.module for layer in report.layers])
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, max(4.0, min(40.0, 0.22 * len(names) + 1.5))),
                                      gridspec_kw={"width_ratios": [1, 1.2]})
    colours = plt.cm.viridis([i / max(1, len(names) - 1) for i in range(len(names))])
    for layer, colour in zip(report.layers, colours, strict=True):
        left.plot(range(1, layer.rank + 1), layer.singular_values, "o-", color=colour, markersize=3, lw=1)
    left.set_yscale("log")
    left.xaxis.get_major_locator().set_params(integer=True)
    left.set_xlabel("index i")
    left.set_ylabel("σᵢ of ΔW")
    left.set_title("singular values (colours as on the right)")
    right.barh(range(len(names)), [layer.norm for layer in report.layers], color=colours)
    right.set_yticks(range(len(names)), names, fontsize=7)
    right.invert_yaxis()
    right.set_xlabel("‖ΔW‖_F")
    right.set_title("update size per module")
    fig.suptitle(f"{report.path}: r={report.config.r}, {len(names)} modules")
    fig.tight_layout()
    save_png(fig, path)


def _plot_shifts(report: DiffReport, path: str | Path, title: str) -> None:
    """Bars of the mean probability change: gained tokens (green) above lost ones (red)."""
    plt = _pyplot()
    shifts = report.gained + list(reversed(report.lost))
    fig, ax = plt.subplots(figsize=(7, 1.5 + 0.28 * len(shifts)))
    ax.barh(range(len(shifts)), [s.change for s in shifts],
            color=["tab:green" if s.change > 0 else "tab:red" for s in shifts])
    ax.set_yticks(range(len(shifts)), [repr(s.token) for s in shifts], fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlabel(f"mean P(adapted) − P(base) over {report.contexts:,} contexts")
    ax.set_title(title, fontsize=9)
    save_png(fig, path)


def _short_names(names: list[str]) -> list[str]:
    """Drop the dotted prefix all names share ('model.layers.0.q_proj' -> 'layers.0.q_proj')."""
    prefix = os.path.commonprefix(names) if len(names) > 1 else ""
    prefix = prefix[: prefix.rfind(".") + 1]
    return [n[len(prefix):] for n in names]


# -- commands -------------------------------------------------------------------------------------


def register(subparsers) -> None:
    """Adds both `inspect` and `diff`."""
    add_command(subparsers, "inspect", "what an adapter holds: config, size, per-module rank, scale, ‖ΔW‖ and spectrum",
                "Report on an adapter directory (PEFT format): config, trainable parameters, bytes on disk, base "
                "size when known, and per module rank, alpha, scale, ‖ΔW‖, singular values of ΔW and an effective "
                "rank (exp of the entropy of the normalised singular values).\n\n"
                "example:\n  lorakit inspect adapters/legal --plot legal.png",
                cmd_inspect, InspectConfig)
    add_command(subparsers, "diff",
                "which next-token predictions an adapter changes most (KL per context, tokens gained/lost)",
                "Run the base with and without the adapters over contexts (every position of token windows from "
                "--data, or the end of each --prompts text) and report KL(adapted ‖ base) per context and the "
                "tokens that gain and lose the most probability on average.\n\n"
                "examples:\n  lorakit diff --adapter adapters/pirate --data held_out.txt --plot pirate.png\n"
                '  lorakit diff --adapter adapters/pirate --prompts "The captain said" "We sail" --json',
                cmd_diff, DiffConfig)
