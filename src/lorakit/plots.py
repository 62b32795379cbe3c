"""Plots written as PNG files (matplotlib, no display needed), atomically."""

from __future__ import annotations

from pathlib import Path


def plot_loss(history: list[dict], path: Path) -> Path | None:
    """Training loss per step (and eval loss where measured) -> PNG. Nothing to plot: no file."""
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lorakit.files import save_png

    preference = any("rewards/chosen" in r or "rewards/rejected" in r for r in history)
    if preference:
        fig, (ax, right) = plt.subplots(1, 2, figsize=(13, 4), dpi=110)
        _plot_preference(history, right)
    else:
        fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    steps = [r["step"] for r in history]
    ax.plot(steps, [r["loss"] for r in history], lw=1, alpha=0.5, label="train loss")
    window = max(1, len(history) // 20)
    if window > 1:
        smooth = [sum(r["loss"] for r in history[max(0, i - window + 1):i + 1]) / min(window, i + 1)
                  for i in range(len(history))]
        ax.plot(steps, smooth, lw=2, label=f"train loss ({window}-step mean)")
    evals = [r for r in history if "eval_loss" in r]
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss" if preference else "loss (nats / token)")
    ax.set_title("lorakit train")
    ax.grid(alpha=0.3)
    ax.legend()
    save_png(fig, path)
    return path


def _plot_preference(history: list[dict], ax) -> None:
    """The preference objectives' own figures: rewards (β·log-ratio to the reference) of chosen/good and
    rejected/bad, their margin, the KL estimate (kto); accuracy (dpo) on a second axis."""
    kto = any("kl" in r for r in history)
    labels = {"rewards/chosen": "reward good" if kto else "reward chosen",
              "rewards/rejected": "reward bad" if kto else "reward rejected",
              "rewards/margins": "margin", "kl": "KL estimate", "eval_margin": "held-out margin"}
    for key, label in labels.items():
        rows = [r for r in history if key in r]
        if rows:
            ax.plot([r["step"] for r in rows], [r[key] for r in rows], "o-" if key.startswith("eval") else "-",
                    lw=1.5, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("reward (beta x log-ratio to the reference)")
    ax.grid(alpha=0.3)
    accuracy = {k: [r for r in history if k in r] for k in ("rewards/accuracies", "eval_accuracy")}
    if any(accuracy.values()):
        twin = ax.twinx()
        for key, rows in accuracy.items():
            if rows:
                twin.plot([r["step"] for r in rows], [r[key] for r in rows], "s--" if key.startswith("eval") else ":",
                          color="gray" if key.startswith("rewards") else "black",
                          label="held-out accuracy" if key.startswith("eval") else "accuracy")
        twin.set_ylim(0, 1.05)
        twin.set_ylabel("preference accuracy")
        twin.legend(loc="lower right")
    ax.legend(loc="upper left")
    ax.set_title("preference figures")


def plot_frontier(rows: list[dict], recommended: dict | None, command: str | None, path: Path) -> Path:
    """`lorakit sweep`'s learning / forgetting plane: held-out domain perplexity (down: learned more) against
    general perplexity (right: forgot more), one point per recipe, each adapter's scales joined by a line;
    without general text, domain perplexity against trainable parameters."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lorakit.files import save_png

    general = "general" in rows[0]
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=110)
    colors = {"base": "black", "full": "tab:red", "scratch": "tab:gray", "lora": "tab:blue"}
    for row in (r for r in rows if r.get("fraction", 1) == 1):
        scales = list(row["domain"])
        ys = [row["domain"][s] for s in scales]
        xs = [row["general"][s] for s in scales] if general else [max(row["trainable_params"], 1)] * len(scales)
        color = colors[row["kind"]]
        if len(scales) > 1:
            ax.plot(xs, ys, "-", color=color, alpha=0.25, lw=1)
            for x, y, s in zip(xs, ys, scales):
                if s != "1":
                    ax.annotate(f"x{s}", (x, y), fontsize=6, color=color, alpha=0.6)
        one = scales.index("1")
        ax.plot(xs[one], ys[one], "*" if row is recommended else "o", color=color,
                ms=16 if row is recommended else 6, mec="black" if row is recommended else color)
        ax.annotate(row["recipe"], (xs[one], ys[one]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("general held-out perplexity (right: forgets more)" if general else "trainable parameters")
    ax.set_ylabel("domain held-out perplexity (down: learns more)")
    title = "lorakit sweep: learning vs forgetting" if general else "lorakit sweep: learning vs size"
    if recommended is not None:
        title += f"\nrecommended (star): {recommended['recipe']}"
    ax.set_title(title, fontsize=10)
    if command:
        fig.text(0.01, -0.02, command, fontsize=7, family="monospace", ha="left", va="top", wrap=True)
    ax.grid(alpha=0.3, which="both")
    save_png(fig, path)
    return path


def plot_data_curve(rows: list[dict], path: Path) -> Path:
    """Held-out domain perplexity against training tokens, one line per kind (LoRA, full fine-tune, scratch)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lorakit.files import save_png

    base = next(r for r in rows if r["kind"] == "base")
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    default = next((r for r in rows if r["kind"] == "lora" and r["fraction"] != 1), None)
    for kind, label in (("lora", "LoRA"), ("full", "full fine-tune"), ("scratch", "from scratch")):
        points = sorted((r["tokens"], r["domain"]["1"]) for r in rows if r["kind"] == kind and (
            kind != "lora" or default is None or (r["r"], r["targets"], r["lr"]) == (default["r"], default["targets"],
                                                                                      default["lr"])))
        if points:
            ax.plot(*zip(*points), "o-", label=label)
    ax.axhline(base["domain"]["1"], color="black", ls="--", lw=1, label="base (no training)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("domain held-out perplexity")
    ax.set_title("lorakit sweep: how much data each needs", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    save_png(fig, path)
    return path
