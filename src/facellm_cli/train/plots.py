"""loss.png: training and evaluation loss over optimiser steps (matplotlib, Agg backend, no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# A loss that spans more than this factor gets a second, log-scale panel (the late steps are flat on a linear axis).
LOG_PANEL_SPAN = 10.0


def plot_losses(log_history: list[dict[str, Any]], path: str | Path, title: str = "facellm finetune") -> Path | None:
    """Plot ``loss`` and ``eval_loss`` entries of a Trainer log history; None when there is nothing to plot.

    ``title`` names the run. When the positive losses span more than
    ``LOG_PANEL_SPAN`` x, a log-scale panel is drawn beside the linear one.
    """
    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h and "step" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h and "step" in h]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    values = [v for _, v in train + evals if v > 0]
    log_panel = bool(values) and max(values) / min(values) > LOG_PANEL_SPAN
    fig, axes = plt.subplots(1, 2 if log_panel else 1, figsize=(11 if log_panel else 7, 4), dpi=100, squeeze=False)
    try:
        for ax, scale in zip(axes[0], ("linear", "log"), strict=False):
            if train:
                ax.plot(*zip(*train, strict=True), label="train loss", color="tab:blue", linewidth=1.5)
            if evals:
                ax.plot(*zip(*evals, strict=True), "o-", label="eval loss", color="tab:orange", linewidth=1.5)
            ax.set_xlabel("optimizer step")
            ax.set_ylabel("loss (assistant tokens)" + (", log scale" if scale == "log" else ""))
            ax.set_yscale(scale)
            ax.grid(alpha=0.3, which="both" if scale == "log" else "major")
            ax.legend()
        fig.suptitle(title)
        fig.tight_layout()
        out = Path(path)
        fig.savefig(out)
    finally:
        plt.close(fig)
    return out
