"""loss.png: training and evaluation loss over optimiser steps (matplotlib, Agg backend, no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_losses(log_history: list[dict[str, Any]], path: str | Path) -> Path | None:
    """Plot ``loss`` and ``eval_loss`` entries of a Trainer log history; None when there is nothing to plot."""
    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h and "step" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h and "step" in h]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    try:
        if train:
            ax.plot(*zip(*train, strict=True), label="train loss", color="tab:blue", linewidth=1.5)
        if evals:
            ax.plot(*zip(*evals, strict=True), "o-", label="eval loss", color="tab:orange", linewidth=1.5)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (assistant tokens)")
        ax.set_title("facellm finetune")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        out = Path(path)
        fig.savefig(out)
    finally:
        plt.close(fig)
    return out
