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

import hashlib
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..assets import base_path, load_bases
from ..checkpoint import atomic_write, model_fingerprint
from ..data import exact_match_accuracy
from ..ensemble import ensemble_accuracy
from ..model import GPT
from ..prompt import PromptTuning
from ..tokenizer import ByteTokenizer
from ..train import TrainConfig
from .benchio import device_name
from .recipes import FINETUNE_DEFAULTS, PRETRAIN_DEFAULTS, TUNE_DEFAULTS, finetune, pretrain, task_data, tune_prompt

SIZES = ("pico", "nano", "micro", "tiny")  # the scale ladder, smallest first; all pretrained by PRETRAIN_DEFAULTS
EXPERIMENTS = ("length", "init", "scale", "ensemble")


@dataclass(frozen=True)
class LesterSetup:
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

    def fingerprint(self, bases: dict[str, GPT]) -> str:
        """A short hash of the setup and the base models' weights: recorded runs are reused only when both match."""
        identity = {"setup": asdict(self), "bases": {size: model_fingerprint(m) for size, m in sorted(bases.items())}}
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]

    def ensemble_groups(self) -> list[list[int]]:
        """Prompt seeds of each ensemble: group g is seeds g*K .. g*K + K-1 (K = ensemble_size)."""
        K = self.ensemble_size
        return [list(range(g * K, (g + 1) * K)) for g in range(len(self.seeds))]


QUICK = LesterSetup(tasks=("parity",), sizes=("pico", "nano"), lengths=(1, 5), n_prompt=5, ensemble_size=3,
                    tune=replace(TUNE_DEFAULTS, steps=30, eval_every=15, warmup_steps=5),
                    finetune=replace(FINETUNE_DEFAULTS, steps=30, eval_every=15, warmup_steps=5),
                    n_train=300, n_val=50, n_test=100)


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


def pretrain_bases(out, sizes=SIZES, cfg: TrainConfig = PRETRAIN_DEFAULTS, progress: bool = True,
                   **pretrain_kwargs) -> list[Path]:
    """Re-derive the scale ladder: every size pretrained with the same recipe (PRETRAIN_DEFAULTS, seed 0)."""
    paths = []
    for size in sizes:
        path = base_path(size, out)
        model, result = pretrain(size, replace(cfg, progress=progress), **pretrain_kwargs)
        model.save(path)
        print(f"saved {path}: {model.num_params():,} parameters, validation exact match {result.best_metric:.1%}")
        paths.append(path)
    return paths


# ---- running ---------------------------------------------------------------------------------------------------


@dataclass
class RunRecorder:
    """Finished runs by key, kept in work/runs.json; a file from another setup (or other base models) is set
    aside as runs.old.json, not reused."""

    work: Path
    setup_id: str
    runs: dict = field(default_factory=dict)

    @classmethod
    def open(cls, work, setup: LesterSetup, bases: dict[str, GPT]) -> "RunRecorder":
        work = Path(work)
        recorder = cls(work, setup.fingerprint(bases))
        path = work / "runs.json"
        if path.is_file():
            saved = json.loads(path.read_text())
            if saved.get("setup_id") == recorder.setup_id:
                recorder.runs = saved["runs"]
            else:
                print(f"{path} was made by another setup or other base models: starting over (the old file is kept as runs.old.json)")
                path.replace(work / "runs.old.json")
        return recorder

    def add(self, key: str, record: dict) -> None:
        self.runs[key] = record
        text = json.dumps({"setup_id": self.setup_id, "runs": self.runs}, indent=1)
        atomic_write(self.work / "runs.json", lambda tmp: Path(tmp).write_text(text))

    def prompt_file(self, run: Run) -> Path:
        return self.work / "prompts" / f"{run.key}.safetensors"


def execute(run: Run, setup: LesterSetup, bases: dict, data: dict, recorder: RunRecorder) -> dict:
    """Train one run and score it on the test split; the prompt of a prompt run is saved for the ensembles."""
    t0 = time.perf_counter()
    model, tok = bases[run.size], ByteTokenizer()
    if run.kind == "prompt":
        cfg = replace(setup.tune, seed=run.seed, progress=False)
        tuned, result = tune_prompt(model, run.task, run.n_prompt, run.init, cfg, data=data[run.task])
        tuned.save(recorder.prompt_file(run))
    else:
        cfg = replace(setup.finetune, seed=run.seed, progress=False)
        tuned, result = finetune(model, run.task, cfg, data=data[run.task])
    test = exact_match_accuracy(tuned, data[run.task][2], tok)
    return {"test": test, "val": result.best_metric, "final_loss": result.losses[-1],
            "seconds": round(time.perf_counter() - t0, 2)}


def run_lester(setup: LesterSetup = LesterSetup(), results_dir="benchmarks/results", work="runs/lester",
               bases_dir=None, command: str | None = None, progress: bool = True) -> dict:
    """Train every planned run (skipping recorded ones), then write lester-{experiment}.json and lester.png."""
    t0 = time.perf_counter()
    bases = load_bases(setup.sizes, bases_dir)
    data = {task: task_data(task, setup.n_train, setup.n_val, setup.n_test, seed=0) for task in setup.tasks}
    recorder = RunRecorder.open(work, setup, bases)
    planned = planned_runs(setup)
    todo = [run for run in planned
            if run.key not in recorder.runs or (run.kind == "prompt" and not recorder.prompt_file(run).is_file())]
    print(f"[lester] {len(planned)} runs planned, {len(todo)} to train "
          f"(tasks {', '.join(setup.tasks)}; bases {', '.join(setup.sizes)}; seeds {list(setup.seeds)})")
    bar = tqdm(todo, desc="lester", disable=not progress)
    for run in bar:
        bar.set_postfix_str(run.key)
        recorder.add(run.key, execute(run, setup, bases, data, recorder))
    results = summarise(setup, bases, data, recorder)
    meta = {"command": command or "minipt experiment lester", "setup": asdict(setup),
            "bases": {size: {"params": m.num_params(), "fingerprint": model_fingerprint(m)} for size, m in bases.items()},
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpu": device_name("cpu"),
            "train_seconds": round(sum(recorder.runs[r.key]["seconds"] for r in planned), 1),
            "wall_seconds_this_call": round(time.perf_counter() - t0, 1)}
    results_dir = Path(results_dir)
    for name in EXPERIMENTS:
        text = json.dumps({"experiment": name, **meta, "rows": results[name]}, indent=1) + "\n"
        atomic_write(results_dir / f"lester-{name}.json", lambda tmp, text=text: Path(tmp).write_text(text))
    from .plots import plot_lester

    plot_lester(results, results_dir / "lester.png")
    print(format_summary(results))
    print(f"[lester] wrote {results_dir}/lester-{{{','.join(EXPERIMENTS)}}}.json and lester.png "
          f"({meta['wall_seconds_this_call']:.0f} s)")
    return results


# ---- summarising -----------------------------------------------------------------------------------------------


def spread(values: list[float]) -> dict:
    """Mean and sample standard deviation (0 for a single value) of per-seed values."""
    return {"values": values, "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def _over_tasks(setup: LesterSetup, per_task: dict) -> list[float]:
    """Per seed (or ensemble group), the mean over tasks: the 'all tasks' line of each experiment."""
    return [statistics.fmean(per_task[task][i] for task in setup.tasks) for i in range(len(setup.seeds))]


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
            per_task = {task: values_of(task, setting) for task in setup.tasks}
            rows += [{name: setting, "task": task, **spread(v)} for task, v in per_task.items()]
            rows.append({name: setting, "task": "all", **spread(_over_tasks(setup, per_task))})
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
        gap = {task: [f - p for f, p in zip(ft[task], pt[task])] for task in setup.tasks}
        instruction = {task: exact_match_accuracy(bases[size], data[task][2], tok, instruction=True)
                       for task in setup.tasks}
        params = bases[size].num_params()
        for task in (*setup.tasks, "all"):
            pick = (lambda d: d[task]) if task != "all" else (lambda d: _over_tasks(setup, d))
            scale.append({"size": size, "params": params, "task": task, "prompt": spread(pick(pt)),
                          "finetune": spread(pick(ft)), "gap": spread(pick(gap)),
                          "instruction": (instruction[task] if task != "all"
                                          else statistics.fmean(instruction.values()))})
    results["scale"] = scale

    ensemble = []
    measured = {}
    for task in setup.tasks:
        for group in setup.ensemble_groups():
            runs = [Run("prompt", largest, task, seed, setup.n_prompt, setup.init) for seed in group]
            bank = torch.stack([PromptTuning.load(bases[largest], recorder.prompt_file(r)).prompt.detach()
                                for r in runs])  # (K, n_prompt, D)
            measured.setdefault(task, []).append(ensemble_accuracy(bases[largest], bank, data[task][2], tok))
    for task in (*setup.tasks, "all"):
        def column(f, task=task):
            per_task = {t: [f(m) for m in measured[t]] for t in setup.tasks}
            return per_task[task] if task != "all" else _over_tasks(setup, per_task)

        ensemble.append({"task": task, "ensemble": spread(column(lambda m: m["ensemble"])),
                         "best_single": spread(column(lambda m: max(m["single"]))),
                         "mean_single": spread(column(lambda m: statistics.fmean(m["single"]))),
                         "groups": setup.ensemble_groups()})
    results["ensemble"] = ensemble
    return results


def format_summary(results: dict) -> str:
    """The 'all tasks' rows of the four experiments as plain text (mean ± std over seeds)."""
    def ms(s):
        return f"{s['mean']:.1%} ± {s['std']:.1%}"

    lines = ["length:   " + "   ".join(f"n={r['n_prompt']}: {ms(r)}" for r in results["length"] if r["task"] == "all"),
             "init:     " + "   ".join(f"{r['init']}: {ms(r)}" for r in results["init"] if r["task"] == "all")]
    for r in (r for r in results["scale"] if r["task"] == "all"):
        lines.append(f"scale:    {r['size']:>5} ({r['params']:,} params)  prompt {ms(r['prompt'])}  "
                     f"fine-tune {ms(r['finetune'])}  gap {ms(r['gap'])}")
    r = next(r for r in results["ensemble"] if r["task"] == "all")
    lines.append(f"ensemble: vote {ms(r['ensemble'])}  best single {ms(r['best_single'])}  "
                 f"mean single {ms(r['mean_single'])}")
    return "\n".join(lines)


def command_line() -> str:
    """How this process was started, as `minipt ...` (for the results files)."""
    return " ".join(["minipt", *sys.argv[1:]])
