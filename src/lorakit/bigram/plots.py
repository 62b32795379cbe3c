"""PNG figures for `diff --plot` and `eval --curve --plot`, written atomically (Agg backend)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display: works on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from lorakit.bigram.evaluate import CurvePoint  # noqa: E402
from lorakit.files import save_png  # noqa: E402


def _save(fig: plt.Figure, path: str | Path) -> None:
    save_png(fig, path, make_parents=False)


def heatmap(
    rows: Sequence[str],
    cols: Sequence[str],
    before: np.ndarray,
    after: np.ndarray,
    path: str | Path,
    title: str,
) -> None:
    """Two panels, P(next | row) before and after the LoRA, on one colour scale."""
    fig, axes = plt.subplots(
        1, 2, figsize=(3.0 + 0.9 * len(cols), 2.5 + 0.4 * len(rows)), sharey=True, squeeze=True
    )
    vmax = max(float(before.max()), float(after.max()), 1e-9)
    for ax, grid, name in ((axes[0], before, "base"), (axes[1], after, "base + LoRA")):
        image = ax.imshow(grid, cmap="viridis", vmin=0, vmax=vmax, aspect="auto")
        ax.set_title(name)
        ax.set_xticks(range(len(cols)), [repr(c)[1:-1] for c in cols], rotation=60, ha="right")
        ax.set_yticks(range(len(rows)), rows)
        ax.set_xlabel("next word")
    axes[0].set_ylabel("current word")
    fig.colorbar(image, ax=axes, label="P(next | current)", shrink=0.9)
    fig.suptitle(title, y=1.04)  # clear of the panel titles, bbox_inches="tight" keeps it in
    _save(fig, path)


def curve(points: Sequence[CurvePoint], path: str | Path, scale: float) -> None:
    """Held-out perplexity against domain tokens: base, from scratch, base + LoRA."""
    x = [p.domain_tokens for p in points]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.plot(x, [p.base.perplexity for p in points], "k--", label="base alone")
    ax.plot(x, [p.scratch.perplexity for p in points], "o-", label="from scratch on domain text")
    ax.plot(x, [p.lora.perplexity for p in points], "s-", label=f"base + {scale:g} × LoRA")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("domain text used (tokens)")
    ax.set_ylabel("held-out perplexity (lower is better)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    _save(fig, path)
