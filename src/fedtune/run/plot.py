"""metrics.png: the per-round curves a user looks at first."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.figure import Figure


def plot_rounds(rounds: list[dict], out: Path, *, title: str) -> None:
    """metrics.png: loss (train and held-out), perplexity or accuracy, and bytes per round."""
    if not rounds:
        return
    fig = draw_rounds(rounds, title=title)
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(out)


def draw_rounds(rounds: list[dict], *, title: str) -> Figure:
    x = [r["round"] for r in rounds]
    has_acc = any(r.get("eval_accuracy") is not None for r in rounds)
    quality = "eval_accuracy" if has_acc else "eval_perplexity"
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    ax = axes[0]
    for key, label in (("train_loss", "train loss (clients)"), ("eval_loss", "held-out loss (global)")):
        pts = [(a, r.get(key)) for a, r in zip(x, rounds, strict=True) if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=label)
    ax.set_xlabel("round")
    ax.set_title("loss")
    ax.legend()
    ax = axes[1]
    pts = [(a, r.get(quality)) for a, r in zip(x, rounds, strict=True) if r.get(quality) is not None]
    if pts:
        ax.plot(*zip(*pts, strict=True), marker="o", color="tab:green")
    ax.set_xlabel("round")
    ax.set_title("held-out " + ("accuracy" if has_acc else "perplexity"))
    ax = axes[2]
    ax.bar([a - 0.2 for a in x], [r.get("bytes_down", 0) / 1e6 for r in rounds], width=0.4, label="down")
    ax.bar([a + 0.2 for a in x], [r.get("bytes_up", 0) / 1e6 for r in rounds], width=0.4, label="up")
    ax.set_xlabel("round")
    ax.set_title("MB sent per round")
    ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig
