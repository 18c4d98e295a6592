"""`minipt experiment lester`: Lester et al. 2021's ablations, scale curve and prompt ensembling, in miniature.

Four questions from the paper, asked of byte-level GPTs of 25k to 843k parameters on the built-in tasks,
each task tuned *without* its written instruction (the base models saw the tasks only with it, or, for the
held-out task, not at all):

    length     does a longer prompt help?              n_prompt in LENGTHS             (paper: Figure 3a)
    init       does the starting point matter?         uniform / sampled vocab / class label   (Figure 3b)
    scale      does prompt tuning catch up with model tuning as the model grows?       (Figure 1)
    ensemble   does a majority vote of K prompts beat the best single prompt?          (section 6, Table 3)

Every number is a test-split exact match, reported as mean and sample standard deviation over seeds. A seed
changes the prompt's initial values and the order of the training batches; the data and base models are
fixed. The length, init and ensemble experiments use the largest base model; the scale experiment uses all.

Runs shared by several experiments (the default setting appears in all four) are trained once. Each finished
run is recorded in `work/runs.json` (written atomically), so an interrupted experiment resumes where it stopped.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..assets import SIZES, base_path, load_bases
from ..checkpoint import model_fingerprint
from ..data import exact_match_accuracy
from ..ensemble import ensemble_accuracy
from ..prompt import PromptTuning
from ..tokenizer import ByteTokenizer
from ..train import TrainConfig
from .plots import plot_lester
from .recipes import FINETUNE_DEFAULTS, PRETRAIN_DEFAULTS, TUNE_DEFAULTS, pretrain, task_data
from .runs import RunRecorder, Setup, pm, run_experiment, save_results, spread, torch_threads, train_and_score, with_all

__all__ = [
    "EXPERIMENTS",
    "LesterSetup",
    "QUICK",
    "Run",
    "execute",
    "planned_runs",
    "pretrain_bases",
    "run_lester",
    "summarise",
]

EXPERIMENTS = ("length", "init", "scale", "ensemble")


@dataclass(frozen=True)
class LesterSetup(Setup):
    """What the experiment runs. The defaults are the full run; QUICK is a small version for tests."""

    # Classification tasks, like the paper's SuperGLUE; palindrome was never seen in pretraining.
    tasks: tuple[str, ...] = ("parity", "sentiment", "palindrome")
    sizes: tuple[str, ...] = SIZES
    seeds: tuple[int, ...] = (0, 1, 2)
    lengths: tuple[int, ...] = (1, 5, 20, 50)
    inits: tuple[str, ...] = ("uniform", "vocab", "label")
    n_prompt: int = 20  # the default setting, used wherever the length is not what is varied
    init: str = "label"  # the paper's default, class-label init
    ensemble_size: int = 5  # prompts per ensemble; one ensemble per seed, from disjoint prompt seeds
    tune: TrainConfig = field(default_factory=lambda: replace(TUNE_DEFAULTS))
    finetune: TrainConfig = field(default_factory=lambda: replace(FINETUNE_DEFAULTS))
    n_train: int = 2000
    n_val: int = 200
    n_test: int = 500

    def ensemble_groups(self) -> list[list[int]]:
        """Prompt seeds of each ensemble: group g is seeds g*K .. g*K + K-1 (K = ensemble_size)."""
        K = self.ensemble_size
        return [list(range(g * K, (g + 1) * K)) for g in range(len(self.seeds))]


QUICK = LesterSetup(
    tasks=("parity",),
    sizes=("pico", "nano"),
    lengths=(1, 5),
    n_prompt=5,
    ensemble_size=3,
    tune=replace(TUNE_DEFAULTS, steps=30, eval_every=15, warmup_steps=5),
    finetune=replace(FINETUNE_DEFAULTS, steps=30, eval_every=15, warmup_steps=5),
    n_train=300,
    n_val=50,
    n_test=100,
)


@dataclass(frozen=True)
class Run:
    """One training run: a soft prompt ("prompt") or full fine-tuning ("finetune") of one base on one task."""

    kind: str
    size: str
    task: str
    seed: int
    n_prompt: int = 0
    init: str = ""

    @property
    def keeps_prompt(self) -> bool:  # its prompt file is kept for the ensembles (RunRecorder.prompt_file)
        return self.kind == "prompt"

    @property
    def key(self) -> str:
        if self.kind == "finetune":
            return f"finetune-{self.size}-{self.task}-s{self.seed}"
        return f"prompt-{self.size}-{self.task}-n{self.n_prompt}-{self.init}-s{self.seed}"


def planned_runs(setup: LesterSetup) -> list[Run]:
    """Every distinct run the four experiments need, in a stable order (shared runs appear once)."""
    largest = setup.sizes[-1]
    runs = []
    for task in setup.tasks:
        for seed in setup.seeds:
            runs += [Run("prompt", largest, task, seed, n, setup.init) for n in setup.lengths]
            runs += [Run("prompt", largest, task, seed, setup.n_prompt, init) for init in setup.inits]
            for size in setup.sizes:
                runs += [Run("prompt", size, task, seed, setup.n_prompt, setup.init), Run("finetune", size, task, seed)]
        for group in setup.ensemble_groups():
            runs += [Run("prompt", largest, task, seed, setup.n_prompt, setup.init) for seed in group]
    return list(dict.fromkeys(runs))  # drop repeats, keep the order


def pretrain_bases(
    out, sizes=SIZES, cfg: TrainConfig = PRETRAIN_DEFAULTS, progress: bool = True, **pretrain_kwargs
) -> list[Path]:
    """Re-derive the scale ladder: every size pretrained with the same recipe (PRETRAIN_DEFAULTS, seed 0)."""
    unknown = [size for size in sizes if size not in SIZES]
    if unknown or not sizes:
        raise ValueError(f"sizes: expected some of {', '.join(SIZES)}, got {' '.join(map(str, sizes)) or 'none'}")
    paths = []
    try:
        for size in sizes:
            path = base_path(size, out)
            model, result = pretrain(size, replace(cfg, progress=progress), **pretrain_kwargs)
            model.save(path)
            print(f"saved {path}: {model.num_params():,} parameters, validation exact match {result.best_metric:.1%}")
            paths.append(path)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(
            f"saved {', '.join(map(str, paths)) or 'no base model'}; the sizes still to make "
            f"are {' '.join(sizes[len(paths) :])}"
        ) from None
    return paths


# ---- running ---------------------------------------------------------------------------------------------------


def execute(run: Run, setup: LesterSetup, bases: dict, data: dict, recorder: RunRecorder) -> dict:
    """Train one run and score it on the test split; the prompt of a prompt run is saved for the ensembles."""
    cfg = replace(setup.tune if run.kind == "prompt" else setup.finetune, seed=run.seed, progress=False)
    prompt = {"n_prompt": run.n_prompt, "init": run.init} if run.kind == "prompt" else {}
    tuned, record = train_and_score(bases[run.size], run.task, run.kind, cfg, data[run.task], **prompt)
    if run.keeps_prompt:
        tuned.save(recorder.prompt_file(run))
    return record


def run_lester(
    setup: LesterSetup = LesterSetup(),
    results_dir="benchmarks/results",
    work="runs/lester",
    bases_dir=None,
    command: str | None = None,
    progress: bool = True,
    threads: int | None = None,
) -> dict:
    """Train every planned run (skipping recorded ones), then write lester-{experiment}.json and lester.png."""
    with torch_threads(threads):
        bases = load_bases(setup.sizes, bases_dir)
        data = {task: task_data(task, setup.n_train, setup.n_val, setup.n_test, seed=0) for task in setup.tasks}
        results, meta = run_experiment(
            "lester",
            setup,
            bases,
            planned_runs(setup),
            lambda run, rec: execute(run, setup, bases, data, rec),
            lambda rec: summarise(setup, bases, data, rec),
            work=work,
            command=command,
            progress=progress,
            meta={
                "bases": {
                    size: {"params": m.num_params(), "fingerprint": model_fingerprint(m)} for size, m in bases.items()
                }
            },
        )
    save_results(
        "lester",
        results_dir,
        {f"lester-{name}.json": {"experiment": name, **meta, "rows": results[name]} for name in EXPERIMENTS},
        "lester.png",
        lambda path: plot_lester(results, path),
        _format_summary(results),
        meta,
    )
    return results


# ---- summarising -----------------------------------------------------------------------------------------------


def summarise(setup: LesterSetup, bases: dict, data: dict, recorder: RunRecorder) -> dict:
    """Rows of the four experiments, per task and averaged over tasks (mean and spread over seeds)."""
    largest = setup.sizes[-1]

    def test_acc(run: Run) -> float:
        return recorder.runs[run.key]["test"]

    def prompt_values(size, task, n, init) -> list[float]:
        return [test_acc(Run("prompt", size, task, seed, n, init)) for seed in setup.seeds]

    def rows_over(name, settings, values_of):
        rows = []
        for setting in settings:
            rows += [
                {name: setting, "task": task, **spread(v)}
                for task, v in with_all({task: values_of(task, setting) for task in setup.tasks}).items()
            ]
        return rows

    results = {
        "length": rows_over("n_prompt", setup.lengths, lambda task, n: prompt_values(largest, task, n, setup.init)),
        "init": rows_over("init", setup.inits, lambda task, init: prompt_values(largest, task, setup.n_prompt, init)),
    }

    scale = []
    tok = ByteTokenizer()
    for size in setup.sizes:
        pt = {task: prompt_values(size, task, setup.n_prompt, setup.init) for task in setup.tasks}
        ft = {task: [test_acc(Run("finetune", size, task, seed)) for seed in setup.seeds] for task in setup.tasks}
        gap = with_all({task: [f - p for f, p in zip(ft[task], pt[task])] for task in setup.tasks})
        pt, ft = with_all(pt), with_all(ft)
        instruction = {
            task: exact_match_accuracy(bases[size], data[task][2], tok, instruction=True) for task in setup.tasks
        }
        instruction["all"] = statistics.fmean(instruction.values())
        scale += [
            {
                "size": size,
                "params": bases[size].num_params(),
                "task": task,
                "prompt": spread(pt[task]),
                "finetune": spread(ft[task]),
                "gap": spread(gap[task]),
                "instruction": instruction[task],
            }
            for task in pt
        ]
    results["scale"] = scale

    ensemble = []
    measured = {}
    for task in setup.tasks:
        for group in setup.ensemble_groups():
            runs = [Run("prompt", largest, task, seed, setup.n_prompt, setup.init) for seed in group]
            bank = torch.stack(
                [PromptTuning.load(bases[largest], recorder.prompt_file(r)).prompt.detach() for r in runs]
            )  # (K, n_prompt, D)
            measured.setdefault(task, []).append(ensemble_accuracy(bases[largest], bank, data[task][2], tok))
    for task in (*setup.tasks, "all"):

        def column(f, task=task):
            return with_all({t: [f(m) for m in measured[t]] for t in setup.tasks})[task]

        ensemble.append(
            {
                "task": task,
                "ensemble": spread(column(lambda m: m["ensemble"])),
                "best_single": spread(column(lambda m: max(m["single"]))),
                "mean_single": spread(column(lambda m: statistics.fmean(m["single"]))),
                "groups": setup.ensemble_groups(),
            }
        )
    results["ensemble"] = ensemble
    return results


def _format_summary(results: dict) -> str:
    """The 'all tasks' rows of the four experiments as plain text (mean ± std over seeds)."""

    lines = [
        "length:   " + "   ".join(f"n={r['n_prompt']}: {pm(r)}" for r in results["length"] if r["task"] == "all"),
        "init:     " + "   ".join(f"{r['init']}: {pm(r)}" for r in results["init"] if r["task"] == "all"),
    ]
    for r in (r for r in results["scale"] if r["task"] == "all"):
        lines.append(
            f"scale:    {r['size']:>5} ({r['params']:,} params)  prompt {pm(r['prompt'])}  "
            f"fine-tune {pm(r['finetune'])}  gap {pm(r['gap'])}"
        )
    r = next(r for r in results["ensemble"] if r["task"] == "all")
    lines.append(
        f"ensemble: vote {pm(r['ensemble'])}  best single {pm(r['best_single'])}  mean single {pm(r['mean_single'])}"
    )
    return "\n".join(lines)
