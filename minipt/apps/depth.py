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

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ..assets import SIZES, load_bases
from .plots import plot_depth
from .recipes import METHOD_DEFAULTS, task_data
from .runs import RunRecorder, Setup, run_experiment, save_results, spread, torch_threads, train_and_score, with_all

__all__ = ["DEPTH_QUICK", "DepthRun", "DepthSetup", "execute", "format_depth", "planned_runs", "run_depth", "summarise"]


@dataclass(frozen=True)
class DepthSetup(Setup):
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


DEPTH_QUICK = DepthSetup(
    tasks=("parity",),
    sizes=("pico", "nano"),
    seeds=(0,),
    lengths=(1, 5),
    n_prompt=5,
    steps=20,
    eval_every=10,
    n_train=300,
    n_val=50,
    n_test=50,
)


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
    runs = [
        DepthRun(m, size, task, seed, setup.n_prompt)
        for task in setup.tasks
        for seed in setup.seeds
        for size in setup.sizes
        for m in setup.methods
    ]
    runs += [
        DepthRun("ptuning-v2", setup.sizes[-1], task, seed, n)
        for task in setup.tasks
        for seed in setup.seeds
        for n in setup.lengths
    ]
    return list(dict.fromkeys(runs))


def execute(run: DepthRun, setup: DepthSetup, bases, data) -> dict:
    cfg = replace(
        METHOD_DEFAULTS[run.method], steps=setup.steps, eval_every=setup.eval_every, seed=run.seed, progress=False
    )
    return train_and_score(bases[run.size], run.task, run.method, cfg, data[run.task], n_prompt=run.n, init="vocab")[1]


def summarise(setup: DepthSetup, bases, recorder: RunRecorder, lester_scale: list | None) -> dict:
    """Rows per method, size and task (and "all"), with the lester rows for prompt tuning and fine-tuning."""

    def values(method, size, task, n):
        return [recorder.runs[DepthRun(method, size, task, seed, n).key]["test"] for seed in setup.seeds]

    scale = []
    for method in setup.methods:
        for size in setup.sizes:
            trainable = recorder.runs[DepthRun(method, size, setup.tasks[0], setup.seeds[0], setup.n_prompt).key]
            scale += [
                {
                    "method": method,
                    "size": size,
                    "params": bases[size].num_params(),
                    "task": task,
                    "trainable": trainable["trainable"],
                    **spread(v),
                }
                for task, v in with_all({t: values(method, size, t, setup.n_prompt) for t in setup.tasks}).items()
            ]
    for r in lester_scale or []:  # the committed prompt-tuning and fine-tuning rows of the same setup
        if r["size"] in setup.sizes and (r["task"] in setup.tasks or r["task"] == "all"):
            D = bases[r["size"]].config.n_embd
            for method in ("prompt", "finetune"):
                trainable = setup.n_prompt * D if method == "prompt" else bases[r["size"]].num_params()
                scale.append(
                    {
                        "method": method,
                        "size": r["size"],
                        "params": r["params"],
                        "task": r["task"],
                        "trainable": trainable,
                        "source": "lester-scale.json",
                        **r[method],
                    }
                )
    length = []
    largest = setup.sizes[-1]
    for n in setup.lengths:
        n_layer, D = bases[largest].config.n_layer, bases[largest].config.n_embd
        length += [
            {
                "method": "ptuning-v2",
                "size": largest,
                "n_prefix": n,
                "task": task,
                "trainable": n_layer * 2 * n * D,
                **spread(v),
            }
            for task, v in with_all({t: values("ptuning-v2", largest, t, n) for t in setup.tasks}).items()
        ]
    return {"scale": scale, "length": length}


def run_depth(
    setup: DepthSetup = DepthSetup(),
    results_dir="benchmarks/results",
    work="runs/depth",
    bases_dir=None,
    command: str | None = None,
    progress: bool = True,
    threads: int | None = None,
) -> dict:
    """Train every planned run (skipping recorded ones), then write depth.json and depth.png."""
    lester = Path(results_dir) / "lester-scale.json"
    with torch_threads(threads):
        bases = load_bases(setup.sizes, bases_dir)
        data = {task: task_data(task, setup.n_train, setup.n_val, setup.n_test, seed=0) for task in setup.tasks}
        lester_rows = json.loads(lester.read_text())["rows"] if lester.is_file() and setup == DepthSetup() else None
        results, meta = run_experiment(
            "depth",
            setup,
            bases,
            planned_runs(setup),
            lambda run, rec: execute(run, setup, bases, data),
            lambda rec: summarise(setup, bases, rec, lester_rows),
            work=work,
            command=command,
            progress=progress,
        )
    save_results(
        "depth",
        results_dir,
        {"depth.json": {**meta, **results}},
        "depth.png",
        lambda path: plot_depth(results, path),
        format_depth(results),
        meta,
    )
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
