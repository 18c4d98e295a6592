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


def plot_lester(results: dict, path=None, paper: dict | None = None):
    """The four experiments of `minipt experiment lester` in a 2 x 2 figure (mean ± std over seeds).

    results: what `minipt.experiments.run_lester` returns (or the rows of the lester-*.json files, by
    experiment name). Thin lines and light bars are single tasks; the thick line / dark bars are the mean over
    tasks. paper: optional experiment name -> one-line note of what the paper found, shown under each title.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    ax_len, ax_init, ax_scale, ax_ens = axes.flat
    tasks = list(dict.fromkeys(r["task"] for r in results["length"] if r["task"] != "all"))
    notes = paper or {}

    def by_task(rows, task):
        return [r for r in rows if r["task"] == task]

    for task in tasks:
        rows = by_task(results["length"], task)
        ax_len.plot([r["n_prompt"] for r in rows], [r["mean"] for r in rows], alpha=0.5, marker=".", label=task)
    rows = by_task(results["length"], "all")
    ax_len.errorbar([r["n_prompt"] for r in rows], [r["mean"] for r in rows], [r["std"] for r in rows],
                    color="k", lw=2.5, capsize=4, marker="o", label="all tasks")
    ax_len.set_xscale("log")
    ax_len.set_xticks([r["n_prompt"] for r in rows], [str(r["n_prompt"]) for r in rows])
    ax_len.minorticks_off()
    ax_len.set(xlabel="prompt length n_prompt", ylabel="test exact match",
               title="prompt length" + (f"\n{notes['length']}" if "length" in notes else ""))

    _grouped_bars(ax_init, results["init"], "init", [*tasks, "all"])
    ax_init.set(ylabel="test exact match", title="initialisation" + (f"\n{notes['init']}" if "init" in notes else ""))

    rows = by_task(results["scale"], "all")
    params = [r["params"] for r in rows]
    for j, (key, label) in enumerate((("finetune", "full fine-tuning"), ("prompt", "prompt tuning"))):
        ax_scale.errorbar(params, [r[key]["mean"] for r in rows], [r[key]["std"] for r in rows], color=f"C{j}",
                          lw=2.5, capsize=4, marker="o", label=label)
    ax_scale.plot(params, [r["instruction"] for r in rows], color="grey", ls="--", marker=".",
                  label="written instruction, frozen")
    ax_scale.set(xscale="log", xlabel="base model parameters", ylabel="test exact match (all tasks)",
                 title="scale: prompt tuning vs model tuning" + (f"\n{notes['scale']}" if "scale" in notes else ""))

    ens_rows = [{"task": r["task"], "kind": kind, **r[kind]}
                for r in results["ensemble"] for kind in ("mean_single", "best_single", "ensemble")]
    _grouped_bars(ax_ens, ens_rows, "kind", [*tasks, "all"])
    ax_ens.set(ylabel="test exact match",
               title="prompt ensembling" + (f"\n{notes['ensemble']}" if "ensemble" in notes else ""))
    for ax in (ax_len, ax_scale):
        ax.legend(fontsize=8)
    fig.tight_layout()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    return fig


def _grouped_bars(ax, rows, setting_key, tasks):
    """One group of bars per task, one bar per setting, with std error bars; y axis zoomed to the data."""
    settings = list(dict.fromkeys(r[setting_key] for r in rows))
    width = 0.8 / len(settings)
    lows = []
    for j, setting in enumerate(settings):
        picked = [next(r for r in rows if r["task"] == t and r[setting_key] == setting) for t in tasks]
        xs = [i + (j - (len(settings) - 1) / 2) * width for i in range(len(tasks))]
        ax.bar(xs, [r["mean"] for r in picked], width, yerr=[r["std"] for r in picked], capsize=3,
               label=str(setting), color=f"C{j}")
        lows += [r["mean"] - r["std"] for r in picked]
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylim(max(0.0, min(lows) - 0.05), 1.0)
    ax.legend(fontsize=8)
