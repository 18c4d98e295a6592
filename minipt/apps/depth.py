"""`minipt experiment depth`: does depth close the gap to fine-tuning at small scale?

Lester et al. 2021 (Figure 1) find prompt tuning far behind model tuning on small models; prefix tuning (Li &
Liang 2021) and P-tuning v2 (Liu et al. 2022) answer with depth, a trainable key/value prefix at every layer
(minipt.prefix), and P-tuning (Liu et al. 2021) with a shallow prompt made by an MLP. This experiment puts them
on the miniature's scale curve, with the setup of `minipt experiment lester` (same tasks, base models, seeds,
data and 300-step budget), so its rows sit next to the committed prompt-tuning and fine-tuning rows of
benchmarks/results/lester-scale.json:

    scale     every method on every base model, n = 20 prefix or prompt vectors
    length    P-tuning v2 on the largest base with prefixes of 1, 5 and 20 positions (prompt tuning: lester-length)

Two questions to answer from the data: does depth close the gap to fine-tuning, and can a deep prompt teach the
never-pretrained palindrome task, where a shallow prompt stays at chance? Results: benchmarks/results/depth.json
and depth.png. Finished runs are recorded in work/runs.json, so an interrupted run resumes.
"""
from __future__ import annotations

import hashlib
import json
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..assets import load_bases
from ..checkpoint import atomic_write, model_fingerprint
from ..data import exact_match_accuracy
from ..tokenizer import ByteTokenizer
from .benchio import device_name
from .experiments import SIZES, RunRecorder, spread
from .recipes import METHOD_DEFAULTS, task_data, tune_prompt


@dataclass(frozen=True)
class DepthSetup:
    """What the experiment runs; the data, tasks, sizes and seeds are those of LesterSetup."""

    tasks: tuple[str, ...] = ("parity", "sentiment", "palindrome")
    sizes: tuple[str, ...] = SIZES
    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = ("ptuning-v2", "ptuning")
    n_prompt: int = 20  # prefix (or prompt) positions wherever the length is not what is varied
    lengths: tuple[int, ...] = (1, 5, 20)  # P-tuning v2 prefix lengths on the largest base
    steps: int = 300
    eval_every: int = 50
    n_train: int = 2000
    n_val: int = 200
    n_test: int = 500
    configs: dict = field(default_factory=lambda: {m: asdict(c) for m, c in METHOD_DEFAULTS.items()})

    def fingerprint(self, bases) -> str:
        identity = {"setup": asdict(self), "bases": {size: model_fingerprint(m) for size, m in sorted(bases.items())}}
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]


DEPTH_QUICK = DepthSetup(tasks=("parity",), sizes=("pico", "nano"), seeds=(0,), lengths=(1, 5), n_prompt=5,
                         steps=20, eval_every=10, n_train=300, n_val=50, n_test=50)


@dataclass(frozen=True)
class DepthRun:
    method: str
    size: str
    task: str
    seed: int
    n: int

    @property
    def key(self) -> str:
        return f"{self.method}-{self.size}-{self.task}-n{self.n}-s{self.seed}"


def planned_runs(setup: DepthSetup) -> list[DepthRun]:
    runs = [DepthRun(m, size, task, seed, setup.n_prompt) for task in setup.tasks for seed in setup.seeds
            for size in setup.sizes for m in setup.methods]
    runs += [DepthRun("ptuning-v2", setup.sizes[-1], task, seed, n) for task in setup.tasks for seed in setup.seeds
             for n in setup.lengths]
    return list(dict.fromkeys(runs))


def execute(run: DepthRun, setup: DepthSetup, bases, data) -> dict:
    t0 = time.perf_counter()
    cfg = replace(METHOD_DEFAULTS[run.method], steps=setup.steps, eval_every=setup.eval_every, seed=run.seed,
                  progress=False)
    tuned, result = tune_prompt(bases[run.size], run.task, run.n, "vocab", cfg, data=data[run.task],
                                method=run.method)
    return {"test": exact_match_accuracy(tuned, data[run.task][2], ByteTokenizer()), "val": result.best_metric,
            "final_loss": result.losses[-1], "trainable": tuned.num_trainable(),
            "seconds": round(time.perf_counter() - t0, 2)}


def summarise(setup: DepthSetup, bases, recorder: RunRecorder, lester_scale: list | None) -> dict:
    """Rows per method, size and task (and "all"), with the lester rows for prompt tuning and fine-tuning."""
    def values(method, size, task, n):
        return [recorder.runs[DepthRun(method, size, task, seed, n).key]["test"] for seed in setup.seeds]

    def over_tasks(per_task):
        return [statistics.fmean(per_task[t][i] for t in setup.tasks) for i in range(len(setup.seeds))]

    scale = []
    for method in setup.methods:
        for size in setup.sizes:
            per_task = {t: values(method, size, t, setup.n_prompt) for t in setup.tasks}
            trainable = recorder.runs[DepthRun(method, size, setup.tasks[0], setup.seeds[0], setup.n_prompt).key]
            for task in (*setup.tasks, "all"):
                scale.append({"method": method, "size": size, "params": bases[size].num_params(), "task": task,
                              "trainable": trainable["trainable"],
                              **spread(per_task[task] if task != "all" else over_tasks(per_task))})
    for r in lester_scale or []:  # the committed prompt-tuning and fine-tuning rows of the same setup
        if r["size"] in setup.sizes and (r["task"] in setup.tasks or r["task"] == "all"):
            D = bases[r["size"]].config.n_embd
            for method, key in (("prompt", "prompt"), ("finetune", "finetune")):
                trainable = setup.n_prompt * D if method == "prompt" else bases[r["size"]].num_params()
                scale.append({"method": method, "size": r["size"], "params": r["params"], "task": r["task"],
                              "trainable": trainable, "source": "lester-scale.json", **r[key]})
    length = []
    largest = setup.sizes[-1]
    for n in setup.lengths:
        per_task = {t: values("ptuning-v2", largest, t, n) for t in setup.tasks}
        n_layer, D = bases[largest].config.n_layer, bases[largest].config.n_embd
        for task in (*setup.tasks, "all"):
            length.append({"method": "ptuning-v2", "size": largest, "n_prefix": n, "task": task,
                           "trainable": n_layer * 2 * n * D,
                           **spread(per_task[task] if task != "all" else over_tasks(per_task))})
    return {"scale": scale, "length": length}


def run_depth(setup: DepthSetup = DepthSetup(), results_dir="benchmarks/results", work="runs/depth", bases_dir=None,
              command: str | None = None, progress: bool = True, threads: int | None = None) -> dict:
    """Train every planned run (skipping recorded ones), then write depth.json and depth.png."""
    if threads:
        torch.set_num_threads(threads)  # small models on a shared machine: fewer threads run faster
    t0 = time.perf_counter()
    bases = load_bases(setup.sizes, bases_dir)
    data = {task: task_data(task, setup.n_train, setup.n_val, setup.n_test, seed=0) for task in setup.tasks}
    recorder = RunRecorder.open(work, setup, bases)
    planned = planned_runs(setup)
    todo = [run for run in planned if run.key not in recorder.runs]
    print(f"[depth] {len(planned)} runs planned, {len(todo)} to train (methods {', '.join(setup.methods)}; "
          f"bases {', '.join(setup.sizes)}; tasks {', '.join(setup.tasks)}; seeds {list(setup.seeds)})")
    bar = tqdm(todo, desc="depth", disable=not progress)
    for run in bar:
        bar.set_postfix_str(run.key)
        recorder.add(run.key, execute(run, setup, bases, data))
    results_dir = Path(results_dir)
    lester = results_dir / "lester-scale.json"
    lester_rows = json.loads(lester.read_text())["rows"] if lester.is_file() and setup == DepthSetup() else None
    results = summarise(setup, bases, recorder, lester_rows)
    meta = {"command": command or "minipt experiment depth", "setup": asdict(setup),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpu": device_name("cpu"),
            "train_seconds": round(sum(recorder.runs[r.key]["seconds"] for r in planned), 1),
            "wall_seconds_this_call": round(time.perf_counter() - t0, 1)}
    text = json.dumps({**meta, **results}, indent=1) + "\n"
    atomic_write(results_dir / "depth.json", lambda tmp: Path(tmp).write_text(text))
    plot_depth(results, results_dir / "depth.png")
    print(format_depth(results))
    print(f"[depth] wrote {results_dir}/depth.json and depth.png ({meta['wall_seconds_this_call']:.0f} s)")
    return results


def format_depth(results: dict) -> str:
    """The "all tasks" rows: accuracy per method and base model, and the palindrome row."""
    lines = []
    for task in ("all", "palindrome"):
        rows = [r for r in results["scale"] if r["task"] == task]
        for method in dict.fromkeys(r["method"] for r in rows):
            cells = "  ".join(f"{r['size']} {r['mean']:.1%}±{r['std']:.1%}" for r in rows if r["method"] == method)
            lines.append(f"{task:<10} {method:<11} {cells}")
    return "\n".join(lines)


def plot_depth(results: dict, path) -> None:
    """Test exact match against base-model size, one line per method (all tasks, and palindrome alone)."""
    from .plots import _pyplot

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, task in zip(axes, ("all", "palindrome")):
        rows = [r for r in results["scale"] if r["task"] == task]
        for method in dict.fromkeys(r["method"] for r in rows):
            mine = [r for r in rows if r["method"] == method]
            ax.errorbar([r["params"] for r in mine], [r["mean"] for r in mine], yerr=[r["std"] for r in mine],
                        marker="o", capsize=3, label=method)
        ax.set(xscale="log", xlabel="base model parameters", ylabel="test exact match",
               title="mean over tasks" if task == "all" else "palindrome (never pretrained)", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
