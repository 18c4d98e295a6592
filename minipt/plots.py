"""matplotlib figures used by the CLI and the notebooks. Nothing is drawn on import."""
from __future__ import annotations

from pathlib import Path


def _pyplot():
    # No backend is forced: matplotlib picks Agg by itself on a machine without a display, and a notebook
    # keeps its inline backend, so the returned figure shows there too.
    import matplotlib.pyplot as plt

    return plt


def smooth(values, window: int = 10):
    """Trailing moving average, so noisy per-step losses read as a curve."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_runs(runs: dict, path=None, title: str = "", baselines: dict | None = None):
    """Training loss (left) and validation accuracy (right) of several runs.

    runs: name -> TrainResult (losses per step, evals as (step, accuracy)); baselines: name -> accuracy,
    drawn as horizontal lines on the accuracy panel. Saves a PNG when path is given; returns the figure.
    """
    plt = _pyplot()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in runs.items():
        ax_loss.plot(smooth(r.losses), label=name)
        if r.evals:
            steps, accs = zip(*r.evals)
            ax_acc.plot(steps, accs, marker="o", label=name)
    for i, (name, acc) in enumerate((baselines or {}).items()):
        ax_acc.axhline(acc, linestyle="--", color=f"C{len(runs) + i}", label=name)
    ax_loss.set(xlabel="step", ylabel="training loss (smoothed)", yscale="log", title="loss")
    ax_acc.set(xlabel="step", ylabel="validation exact match", ylim=(-0.02, 1.02), title="accuracy")
    ax_loss.legend()
    ax_acc.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    return fig
