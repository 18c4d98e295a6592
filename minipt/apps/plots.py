"""matplotlib figures used by the CLI and the notebooks. Nothing is drawn on import."""

from __future__ import annotations

import statistics
from pathlib import Path

from .runs import find_row, mean_over_tasks, spread

__all__ = ["METHOD_LABELS", "plot_depth", "plot_lester", "plot_runs", "plot_seed_claims", "smooth"]

# How seed-claims' methods (seed_claims.METHODS) are named in its figure.
METHOD_LABELS = {
    "instruction": "written instruction, frozen model (0 examples)",
    "prompt-uniform": "prompt tuning, uniform init",
    "prompt-label": "prompt tuning, class-label init",
    "prompt-text": "prompt tuning, init from a wording",
    "finetune": "full fine-tuning",
}


def _pyplot():
    # No backend is forced: matplotlib picks Agg by itself on a machine without a display, and a notebook
    # keeps its inline backend, so the returned figure shows there too.
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path, dpi: int = 110):
    """Lay the figure out and, when a path is given, save it as a PNG (its folder made if needed)."""
    fig.tight_layout()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi, format="png")  # the format by name: atomic_write draws into a .tmp file
    return fig


def _means(ax, xs, stats, **style):
    """One line through the means, with the std over seeds as error bars (stats: dicts with "mean" and "std")."""
    return ax.errorbar(xs, [s["mean"] for s in stats], [s["std"] for s in stats], marker="o", **style)


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
    return _save(fig, path)


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

    def title(text: str, name: str) -> str:  # the panel's title, and under it the paper's finding if given
        return text + (f"\n{paper[name]}" if paper and name in paper else "")

    def by_task(rows, task):
        return [r for r in rows if r["task"] == task]

    for task in tasks:
        rows = by_task(results["length"], task)
        ax_len.plot([r["n_prompt"] for r in rows], [r["mean"] for r in rows], alpha=0.5, marker=".", label=task)
    rows = by_task(results["length"], "all")
    _means(ax_len, [r["n_prompt"] for r in rows], rows, color="k", lw=2.5, capsize=4, label="all tasks")
    ax_len.set_xscale("log")
    ax_len.set_xticks([r["n_prompt"] for r in rows], [str(r["n_prompt"]) for r in rows])
    ax_len.minorticks_off()
    ax_len.set(
        xlabel="prompt length n_prompt",
        ylabel="test exact match",
        title=title("prompt length", "length"),
    )

    _grouped_bars(ax_init, results["init"], "init", [*tasks, "all"])
    ax_init.set(ylabel="test exact match", title=title("initialisation", "init"))

    rows = by_task(results["scale"], "all")
    params = [r["params"] for r in rows]
    for j, (key, label) in enumerate((("finetune", "full fine-tuning"), ("prompt", "prompt tuning"))):
        _means(ax_scale, params, [r[key] for r in rows], color=f"C{j}", lw=2.5, capsize=4, label=label)
    ax_scale.plot(
        params, [r["instruction"] for r in rows], color="grey", ls="--", marker=".", label="written instruction, frozen"
    )
    ax_scale.set(
        xscale="log",
        xlabel="base model parameters",
        ylabel="test exact match (all tasks)",
        title=title("scale: prompt tuning vs model tuning", "scale"),
    )

    ens_rows = [
        {"task": r["task"], "kind": kind, **r[kind]}
        for r in results["ensemble"]
        for kind in ("mean_single", "best_single", "ensemble")
    ]
    _grouped_bars(ax_ens, ens_rows, "kind", [*tasks, "all"])
    ax_ens.set(ylabel="test exact match", title=title("prompt ensembling", "ensemble"))
    for ax in (ax_len, ax_scale):
        ax.legend(fontsize=8)
    return _save(fig, path)


def _grouped_bars(ax, rows, setting_key, tasks):
    """One group of bars per task, one bar per setting, with std error bars; y axis zoomed to the data."""
    settings = list(dict.fromkeys(r[setting_key] for r in rows))
    width = 0.8 / len(settings)
    lows = []
    for j, setting in enumerate(settings):
        picked = [next(r for r in rows if r["task"] == t and r[setting_key] == setting) for t in tasks]
        xs = [i + (j - (len(settings) - 1) / 2) * width for i in range(len(tasks))]
        ax.bar(
            xs,
            [r["mean"] for r in picked],
            width,
            yerr=[r["std"] for r in picked],
            capsize=3,
            label=str(setting),
            color=f"C{j}",
        )
        lows += [r["mean"] - r["std"] for r in picked]
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylim(max(0.0, min(lows) - 0.05), 1.0)
    ax.legend(fontsize=8)


def plot_depth(results: dict, path) -> None:
    """Test exact match against base-model size, one line per method (all tasks, and palindrome alone)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, task in zip(axes, ("all", "palindrome")):
        rows = [r for r in results["scale"] if r["task"] == task]
        for method in dict.fromkeys(r["method"] for r in rows):
            mine = [r for r in rows if r["method"] == method]
            _means(ax, [r["params"] for r in mine], mine, capsize=3, label=method)
        ax.set(
            xscale="log",
            xlabel="base model parameters",
            ylabel="test exact match",
            title="mean over tasks" if task == "all" else "palindrome (never pretrained)",
            ylim=(0, 1.02),
        )
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    _save(fig, path, dpi=120)
    plt.close(fig)


def plot_seed_claims(files: dict, path=None):
    """Top row: the few-shot curves, one panel per task and one for the mean over tasks (mean ± std over
    seeds; dashed: the written instruction on the frozen model). Bottom row: prompt design (frozen vs tuned,
    per wording), domain shift (in-domain vs shifted per method), compute (time per step and trainable numbers).
    files: the contents of seed-{fewshot,design,shift}.json by part (what run_seed_claims returns)."""
    plt = _pyplot()
    fewshot, design, shift = files["fewshot"], files["design"], files["shift"]
    tasks = [*fewshot["setup"]["tasks"], "all"]
    ncols = max(len(tasks), 3)
    fig, axes = plt.subplots(2, ncols, figsize=(4.2 * ncols, 8.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        _plot_curve(ax, fewshot, task)
    for ax in axes[0][len(tasks) :]:
        ax.axis("off")
    ax_design, ax_shift, ax_compute, *rest = axes[1]
    for ax in rest:
        ax.axis("off")

    design_rows = [
        {
            "task": r["wording"],
            "kind": kind,
            **(r["tuned"] if kind == "after tuning" else {"mean": r["frozen"], "std": 0.0}),
        }
        for r in _all_task_design_rows(design)
        for kind in ("frozen", "after tuning")
    ]
    _grouped_bars(ax_design, design_rows, "kind", [r["wording"] for r in _all_task_design_rows(design)])
    ax_design.set_ylim(0, 1.0)
    ax_design.tick_params(axis="x", labelrotation=25, labelsize=8)
    ax_design.set(
        ylabel="test exact match (mean over tasks)",
        title=f"prompt design: 5 wordings, frozen vs tuned\n({design['setup']['design_size']} examples)",
    )

    shift_rows = [
        {"task": METHOD_LABELS[r["method"]].replace("prompt tuning, ", "PT, "), "kind": kind, **r[key]}
        for r in shift["rows"]
        if r["task"] == "all"
        for kind, key in (("in-domain", "in_domain"), ("shifted", "shifted"))
    ]
    _grouped_bars(ax_shift, shift_rows, "kind", list(dict.fromkeys(r["task"] for r in shift_rows)))
    ax_shift.set_ylim(0, 1.0)
    ax_shift.set(
        ylabel="test exact match (mean over tasks)",
        title=f"domain shift (Lester et al. Table 1)\n({shift['setup']['shift_size']} examples)",
    )

    per_task = fewshot["compute"]["per_task"]
    kinds = ["prompt", "finetune"]
    ms = [1000 * statistics.fmean(c[k]["seconds_per_step"] for c in per_task.values()) for k in kinds]
    trainable = [next(iter(per_task.values()))[k]["trainable"] for k in kinds]
    bars = ax_compute.bar(["prompt tuning", "full fine-tuning"], ms, color=["C1", "C2"])
    for bar, n in zip(bars, trainable):
        ax_compute.annotate(
            f"{n:,} trainable",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax_compute.set(ylabel="ms per training step (median)", title="compute per step")
    return _save(fig, path)


def _plot_curve(ax, fewshot: dict, task: str) -> None:
    for j, method in enumerate(fewshot["setup"]["methods"]):
        rows = [r for r in fewshot["rows"] if r["task"] == task and r["method"] == method]
        _means(ax, [r["n_train"] for r in rows], rows, capsize=3, color=f"C{j}", label=METHOD_LABELS[method])
    frozen = find_row(fewshot["instruction"], task=task)["test"]
    ax.axhline(frozen, color="grey", ls="--", label=METHOD_LABELS["instruction"])
    sizes = fewshot["setup"]["sizes"]
    ax.set_xscale("log")
    ax.set_xticks(sizes, [str(n) for n in sizes])
    ax.minorticks_off()
    ax.set(
        xlabel="training examples",
        ylabel="test exact match",
        ylim=(-0.02, 1.02),
        title=f"few-shot: {task if task != 'all' else 'mean over tasks'}",
    )
    if task == "all":
        ax.legend(fontsize=7, loc="lower right")


def _all_task_design_rows(design: dict) -> list[dict]:
    """Per wording, the frozen and tuned accuracies averaged over tasks (the tuned ones per seed)."""
    tasks = design["setup"]["tasks"]
    out = []
    for wording in dict.fromkeys(r["wording"] for r in design["rows"] if r["task"] == tasks[0]):
        rows = [find_row(design["rows"], task=t, wording=wording) for t in tasks]
        out.append(
            {
                "wording": wording,
                "frozen": statistics.fmean(r["frozen"] for r in rows),
                "tuned": spread(mean_over_tasks({r["task"]: r["tuned"]["values"] for r in rows})),
            }
        )
    return out
