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
    ax.set_ylabel("loss (nats / token)")
    ax.set_title("lorakit train")
    ax.grid(alpha=0.3)
    ax.legend()
    save_png(fig, path)
    return path
