"""`lorakit demo`: the whole story in a few minutes on a laptop CPU (less with --no-full: no full fine-tune).

From the embedded base, train an adapter on a shipped domain corpus, then show what changed:
domain and general held-out perplexity before/after (and with the adapter disabled, which must
equal the base exactly), the same prompt continued by base and adapted model, how small the
adapter is next to the base, and (unless --no-full) the same data and steps as a full fine-tune:
one line per recipe with what it trains, its file, what it learned and what it forgot.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

from lorakit.adapters import disable_adapters, set_adapters
from lorakit.base import CORPORA, EMBEDDED_BASE, default_device, dtype_option, load_base, resolve_dtype
from lorakit.data import load_examples
from lorakit.errors import UserError
from lorakit.evaluate import mean_nll, perplexity
from lorakit.generate import Sampling, stream_text, stream_tokens
from lorakit.io import attach_adapters
from lorakit.options import add_command, option
from lorakit.train import TrainConfig, train

DEFAULT_CORPUS = "kjv"
PROMPTS = {"kjv": ["And the king said", "The light of the"],
           "jargon": ["A hacker is", "The program"],
           "devil": ["PATIENCE, n.", "A lawyer is"]}


def corpora() -> list[str]:
    return sorted(p.name for p in CORPORA.iterdir() if (p / "train.txt").is_file()) if CORPORA.is_dir() else []


# The demo's training run, beside what `lorakit demo` lets a user choose.
SEQ_LEN, BATCH_SIZE, RANK = 128, 8, 16
SCALES = (0.5, 2.0)  # the adapter's scale, dialled at inference
DATA_SHARE = 0.3  # the data question: both recipes again on this share of the steps


@dataclass
class DemoConfig:
    """Everything `lorakit demo` takes; each field's help is its --help."""

    corpus: str = option("shipped domain corpus", default=DEFAULT_CORPUS)
    out: Path = option("where the adapter goes", default=Path("runs/demo"))
    steps: int = option("training steps", default=150)
    seed: int = option("random seed", default=0)
    dtype: str = dtype_option()
    full: bool = option("leave out the recipes the adapter is compared with (a full fine-tune on the same data and "
                        "steps, a rank-1 adapter, and both recipes on 30% of the steps; about twice as long again)",
                        default=True)


def run_demo(config: DemoConfig | None = None) -> dict:
    """Train on the corpus and report; returns the numbers it printed (also in out/demo_report.json)."""
    config = config or DemoConfig()
    corpus, out, steps, seed, dtype = config.corpus, Path(config.out), config.steps, config.seed, config.dtype
    seq_len, r = SEQ_LEN, RANK
    if not (EMBEDDED_BASE / "config.json").is_file():
        raise UserError(f"the embedded base is missing from {EMBEDDED_BASE}; reinstall lorakit")
    if corpus not in corpora():
        raise UserError(f"unknown corpus {corpus!r}; shipped corpora: {', '.join(corpora())}")
    if steps <= 0:
        raise UserError(f"--steps must be positive, got {steps}")
    domain_train, domain_held = CORPORA / corpus / "train.txt", CORPORA / corpus / "heldout.txt"
    general_held = CORPORA / "general" / "heldout.txt"
    started = time.perf_counter()
    _header(f"1. Train a rank-{r} adapter on '{corpus}' ({domain_train.stat().st_size / 1e6:.1f} MB of text)")
    summary = train(TrainConfig(data=domain_train, out=out, steps=steps, seq_len=seq_len, batch_size=BATCH_SIZE, r=r,
                                alpha=2 * r, seed=seed, dtype=dtype, eval_data=domain_held,
                                eval_every=max(1, steps // 3), eval_batches=8, overwrite=True, checkpoint_every=steps))

    _header("2. Held-out perplexity (lower is better)")
    device = default_device()
    model, tokenizer = load_base(None, dtype=resolve_dtype(dtype, device), device=device)
    sets = {name: load_examples(path, tokenizer, seq_len, "all")[0]
            for name, path in (("domain", domain_held), ("general", general_held))}
    report: dict = {"corpus": corpus, "steps": steps}
    scores = {}
    for name, examples in sets.items():
        scores[("base", name)] = _ppl(model, examples, tokenizer)
    adapter = next(iter(attach_adapters(model, [str(out)])))
    for name, examples in sets.items():
        scores[("adapted", name)] = _ppl(model, examples, tokenizer)
        with disable_adapters(model):
            scores[("disabled", name)] = _ppl(model, examples, tokenizer)
        for scale in SCALES:  # the same adapter dialled down and up: no retraining
            set_adapters(model, {adapter: scale})
            scores[(f"scale {scale:g}", name)] = _ppl(model, examples, tokenizer)
        set_adapters(model, {adapter: 1.0})
    print(f"  {'':22}{'domain (' + corpus + ')':>22}{'general':>14}")
    labels = {"base": "base", "adapted": "base + adapter", "disabled": "adapter disabled",
              **{f"scale {s:g}": f"adapter at scale {s:g}" for s in SCALES}}
    for variant, label in labels.items():
        print(f"  {label:22}{scores[(variant, 'domain')]:>22.2f}{scores[(variant, 'general')]:>14.2f}")
    drop = 1 - scores[("adapted", "domain")] / scores[("base", "domain")]
    identical = scores[("disabled", "general")] == scores[("base", "general")]
    print(f"\n  domain perplexity {100 * drop:.1f}% lower with the adapter (target: at least 25%): "
          f"{'met' if drop >= 0.25 else 'MISSED'}")
    print(f"  general perplexity with the adapter disabled equals the base's exactly: {'yes' if identical else 'NO'}")
    moved = {d: math.log(scores[("adapted", d)] / scores[("base", d)]) for d in sets}
    half = {d: f"{100 * math.log(scores[('scale 0.5', d)] / scores[('base', d)]) / moved[d]:.0f}%" if moved[d] else "-"
            for d in sets}
    double, once = scores[("scale 2", "domain")], scores[("adapted", "domain")]
    print(f"  scale 0.5 keeps {half['domain']} of the adapter's domain gain for {half['general']} of its general-text "
          f"change (in log-perplexity); scale 2 "
          f"{'overshoots: domain perplexity rises' if double > once else 'goes further: domain perplexity falls'} "
          f"from {once:.0f} to {double:.0f}")
    report.update({f"{v.replace(' ', '_')}_{d}_perplexity": s for (v, d), s in scores.items()},
                  domain_perplexity_drop=drop, disabled_equals_base=identical)

    _header("3. The same prompt, same seed: base vs adapted")
    sampling = Sampling(max_new_tokens=40, temperature=0.8, top_k=40, seed=seed)
    report["generations"] = []
    for prompt in PROMPTS.get(corpus, ["The"]):
        ids = tokenizer(prompt).input_ids
        row = {"prompt": prompt}
        for label, base_only in (("base", True), ("adapted", False)):
            text = "".join(stream_text(tokenizer, stream_tokens(model, ids, sampling, tokenizer.eos_token_id,
                                                                base=base_only)))
            row[label] = text
            print(f"  [{label:7}] {prompt}{_one_line(text)}")
        report["generations"].append(row)
        print()

    _header("4. Sizes")
    adapter_bytes = summary["adapter_bytes"]
    base_bytes = sum(f.stat().st_size for f in EMBEDDED_BASE.glob("*.safetensors"))
    print(f"  adapter {adapter_bytes / 1e6:.2f} MB ({summary['trainable_params']:,} parameters) vs base "
          f"{base_bytes / 1e6:.1f} MB: {100 * adapter_bytes / base_bytes:.1f}% of the base file")
    print(f"  trained {summary['tokens_seen']:,} tokens at {summary['tokens_per_s']:,.0f} tokens/s")
    print(f"  loss curve: {out / 'loss.png'}   adapter: {out}/   metrics: {out / 'metrics.jsonl'}")
    report.update(adapter_bytes=adapter_bytes, base_bytes=base_bytes)
    if config.full:
        report["recipes"] = _compare_with_full(config, summary, scores, sets, domain_train, domain_held)
    report["seconds"] = time.perf_counter() - started
    (out / "demo_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n  done in {report['seconds']:.0f} s. Try: lorakit generate --adapter {out} --prompt \"...\" --compare")
    return report


def _compare_with_full(config: DemoConfig, lora: dict, scores: dict, sets: dict, data: Path, held: Path) -> list[dict]:
    """Train every weight on the same data for the same steps (`lorakit train --full`), and, for the rank and
    data questions, a rank-1 adapter and both recipes on 30% of the steps; score each as the adapter was and
    print one line per recipe: trainable parameters, file size, time, domain and general perplexity."""
    _header(f"5. LoRA vs a full fine-tune: the same {lora['tokens_seen']:,} tokens, {config.steps} steps")
    part = max(1, round(DATA_SHARE * config.steps))

    def run(name: str, steps: int, **options) -> dict:
        out = Path(config.out) / name
        summary = train(TrainConfig(data=data, out=out, steps=steps, seq_len=SEQ_LEN, batch_size=BATCH_SIZE,
                                    seed=config.seed, dtype=config.dtype, eval_data=held, eval_every=steps,
                                    eval_batches=8, overwrite=True, checkpoint_every=steps, quiet=True, **options))
        full = options.get("full", False)
        device = default_device()
        model, tokenizer = load_base(out if full else None, dtype=resolve_dtype(config.dtype, device), device=device)
        if not full:
            attach_adapters(model, [str(out)])
        return {"trainable_params": summary["trainable_params"],
                "bytes": summary["weights_bytes" if full else "adapter_bytes"], "seconds": summary["train_seconds"],
                **{name: _ppl(model, examples, tokenizer) for name, examples in sets.items()}}

    rows = [{"recipe": f"LoRA r={RANK} {lora['config']['targets']}", "trainable_params": lora["trainable_params"],
             "bytes": lora["adapter_bytes"], "seconds": lora["train_seconds"],
             **{name: scores[("adapted", name)] for name in sets}},
            {"recipe": "full fine-tune", **run("full", config.steps, full=True)},
            {"recipe": "LoRA r=1", **run("rank1", config.steps, r=1, alpha=2.0)},
            {"recipe": f"LoRA, {100 * DATA_SHARE:.0f}% of the tokens", **run("lora_part", part, r=RANK, alpha=2.0 * RANK)},
            {"recipe": f"full, {100 * DATA_SHARE:.0f}% of the tokens", **run("full_part", part, full=True)}]
    base = {name: scores[("base", name)] for name in sets}
    gain_full = math.log(base["domain"] / rows[1]["domain"])
    for row in rows:
        row["gain_vs_full"] = math.log(base["domain"] / row["domain"]) / gain_full if gain_full > 0 else None
        share = "-" if row["gain_vs_full"] is None else f"{100 * row['gain_vs_full']:.0f}%"
        print(f"  {row['recipe']:26} {row['trainable_params'] / 1e6:5.2f}M trained, {row['bytes'] / 1e6:5.1f} MB, "
              f"{row['seconds']:4.0f} s: domain ppl {base['domain']:.0f} -> {row['domain']:.0f} ({share} of the full "
              f"fine-tune's gain), general {base['general']:.0f} -> {row['general']:.0f}")
    print(f"  (gain: the drop in held-out log-perplexity; the last three rows answer 'what rank?' and 'how much "
          f"data?'; `lorakit sweep` draws these trade-offs on your own data; models in {config.out}/)")
    return rows


def _ppl(model, examples, tokenizer) -> float:
    return perplexity(mean_nll(model, examples, tokenizer.pad_token_id, batch_size=8, max_batches=12)[0])


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _header(text: str) -> None:
    print(f"\n== {text}", flush=True)


def register(subparsers) -> None:
    add_command(subparsers, "demo", "train an adapter on a shipped corpus, compare it with the base and a full fine-tune",
                "The whole story on the embedded base: train an adapter on a shipped domain corpus, then "
                "compare perplexity, generations and sizes.\n\nexample:\n  lorakit demo --corpus jargon",
                run_demo, DemoConfig)
