"""`lorakit demo`: the whole story in about three minutes on a laptop CPU.

From the embedded base, train an adapter on a shipped domain corpus, then show what changed:
domain and general held-out perplexity before/after (and with the adapter disabled, which must
equal the base exactly), the same prompt continued by base and adapted model, and how small the
adapter is next to the base.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from lorakit.adapters import disable_adapters
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
SEQ_LEN, BATCH_SIZE, RANK, LR = 128, 8, 16, 2e-3


@dataclass
class DemoConfig:
    """Everything `lorakit demo` takes; each field's help is its --help."""

    corpus: str = option("shipped domain corpus", default=DEFAULT_CORPUS)
    out: Path = option("where the adapter goes", default=Path("runs/demo"))
    steps: int = option("training steps", default=150)
    seed: int = option("random seed", default=0)
    dtype: str = dtype_option()


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
                                alpha=2 * r, lr=LR, seed=seed, dtype=dtype, eval_data=domain_held,
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
    attach_adapters(model, [str(out)])
    for name, examples in sets.items():
        scores[("adapted", name)] = _ppl(model, examples, tokenizer)
        with disable_adapters(model):
            scores[("disabled", name)] = _ppl(model, examples, tokenizer)
    print(f"  {'':22}{'domain (' + corpus + ')':>22}{'general':>14}")
    for variant in ("base", "adapted", "disabled"):
        label = {"base": "base", "adapted": "base + adapter", "disabled": "adapter disabled"}[variant]
        print(f"  {label:22}{scores[(variant, 'domain')]:>22.2f}{scores[(variant, 'general')]:>14.2f}")
    drop = 1 - scores[("adapted", "domain")] / scores[("base", "domain")]
    identical = scores[("disabled", "general")] == scores[("base", "general")]
    print(f"\n  domain perplexity {100 * drop:.1f}% lower with the adapter (target: at least 25%): "
          f"{'met' if drop >= 0.25 else 'MISSED'}")
    print(f"  general perplexity with the adapter disabled equals the base's exactly: {'yes' if identical else 'NO'}")
    report.update({f"{v}_{d}_perplexity": s for (v, d), s in scores.items()},
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
    report.update(adapter_bytes=adapter_bytes, base_bytes=base_bytes, seconds=time.perf_counter() - started)
    (out / "demo_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n  done in {report['seconds']:.0f} s. Try: lorakit generate --adapter {out} --prompt \"...\" --compare")
    return report


def _ppl(model, examples, tokenizer) -> float:
    return perplexity(mean_nll(model, examples, tokenizer.pad_token_id, batch_size=8, max_batches=12)[0])


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _header(text: str) -> None:
    print(f"\n== {text}", flush=True)


def register(subparsers) -> None:
    add_command(subparsers, "demo", "train and compare an adapter on a shipped corpus in ~3 minutes",
                "The whole story on the embedded base: train an adapter on a shipped domain corpus, then "
                "compare perplexity, generations and sizes.\n\nexample:\n  lorakit demo --corpus jargon",
                run_demo, DemoConfig)
