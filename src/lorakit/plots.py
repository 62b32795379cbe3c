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
