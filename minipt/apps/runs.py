"""The experiments' shared machinery: setup fingerprint, run recorder, resume, run loop and results files.

`minipt experiment lester | depth | seed-claims` are each a setup, a list of runs (how to train one and what its
record holds), a summary of the recorded runs and a plot in `plots`; the rest is here, written once. A fourth
experiment, prompt length on the tiny base alone, is this much:

    @dataclass(frozen=True)
    class LengthSetup(Setup):                            # every field goes into the fingerprint
        seeds: tuple[int, ...] = (0, 1, 2)
        lengths: tuple[int, ...] = (5, 20)

    @dataclass(frozen=True)
    class LengthRun:
        n_prompt: int
        seed: int
        key = property(lambda self: f"n{self.n_prompt}-s{self.seed}")

    def run_length(setup=LengthSetup(), results_dir="benchmarks/results", work="runs/length"):
        base, data = load_base(), task_data("parity")
        runs = [LengthRun(n, seed) for n in setup.lengths for seed in setup.seeds]

        def execute(run, recorder):                      # one run's record; the loop adds its "seconds"
            cfg = replace(TUNE_DEFAULTS, seed=run.seed, progress=False)
            tuned, _ = tune_prompt(base, "parity", run.n_prompt, "vocab", cfg, data=data)
            return {"test": exact_match_accuracy(tuned, data[2], ByteTokenizer())}

        def summarise(recorder):
            return {"rows": [{"n_prompt": n, **spread([recorder.runs[LengthRun(n, s).key]["test"]
                                                       for s in setup.seeds])} for n in setup.lengths]}

        results, meta = run_experiment("length", setup, {"tiny": base}, runs, execute, summarise, work=work)
        save_results("length", results_dir, {"length.json": {**meta, **results}}, "length.png",
                     lambda path: plots.plot_length(results, path), meta=meta)

Each finished run is recorded in work/runs.json (atomically) under its key with the setup's fingerprint, and a
later call trains only the runs not recorded yet. A file of another setup or other base models is set aside
under a new name, never overwritten; a damaged one is refused with one line that names it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..checkpoint import atomic_write, model_fingerprint
from ..data import exact_match_accuracy
from ..frozen import trainable_parameters
from ..model import GPT
from ..tokenizer import ByteTokenizer
from .benchio import device_name
from .recipes import finetune, tune_prompt

__all__ = [
    "Record",
    "RunRecorder",
    "Setup",
    "command_line",
    "find_row",
    "mean_over_tasks",
    "pm",
    "read_records",
    "run_experiment",
    "save_results",
    "spread",
    "torch_threads",
    "train_and_score",
    "with_all",
]


class Setup:
    """Base class of an experiment's setup (a frozen dataclass): what decides the runs' results."""

    def identity(self) -> dict:  # a setup may leave out fields that only choose which runs exist
        return {"setup": asdict(self)}

    def fingerprint(self, bases: dict[str, GPT]) -> str:
        """A short hash of identity() and the base models' weights: recorded runs are reused only when both match."""
        identity = {**self.identity(), "bases": {size: model_fingerprint(m) for size, m in sorted(bases.items())}}
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]


# ---- the record of finished runs ---------------------------------------------------------------------------


class Record(dict):
    """One run's record as read from runs.json: a missing field is reported as damage to that file, by name.
    (dict calls __missing__ for record[field] when field is absent, instead of raising a bare KeyError.)"""

    def __init__(self, fields: dict, where: str):
        super().__init__({k: Record(v, f"{where}[{k!r}]") if isinstance(v, dict) else v for k, v in fields.items()})
        self.where = where

    def __missing__(self, name):
        raise ValueError(f"{self.where} has no field {name!r}: the file is damaged (move it away to start over)")


def read_records(path: Path) -> tuple[str, dict]:
    """(setup_id, {key: Record}) from a runs.json, or a ValueError that names the file."""
    try:
        saved, why = json.loads(path.read_text(encoding="utf-8")), 'expected {"setup_id": "...", "runs": {...}}'
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        saved, why = None, f"not valid JSON ({e})"
    ok = isinstance(saved, dict) and isinstance(saved.get("setup_id"), str) and isinstance(saved.get("runs"), dict)
    runs = saved["runs"].items() if ok else ()
    bad = [f"run {k!r} is a {type(r).__name__}, not a record" for k, r in runs if not isinstance(r, dict)]
    if bad or not ok:
        raise ValueError(
            f"{path}: {bad[0] if bad else why}; not a record of finished runs (move it away to start over)"
        )
    return saved["setup_id"], {k: Record(r, f"{path}: run {k!r}") for k, r in saved["runs"].items()}


@dataclass
class RunRecorder:
    """Finished runs by key, kept in work/runs.json with the setup's fingerprint. A run that keeps a prompt
    (`run.keeps_prompt`) saves it in work/prompts/ and counts as finished only while that file is there."""

    work: Path
    setup_id: str
    runs: dict = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return self.work / "runs.json"

    @classmethod
    def open(cls, work, setup: Setup, bases: dict[str, GPT]) -> RunRecorder:
        recorder = cls(Path(work), setup.fingerprint(bases))
        if recorder.path.is_file():
            setup_id, runs = read_records(recorder.path)
            if setup_id == recorder.setup_id:
                recorder.runs = runs
            else:
                kept = recorder.set_aside()
                print(
                    f"{recorder.path} was made by another setup or other base models: starting over (the old "
                    f"file is kept as {kept})"
                )
        return recorder

    def set_aside(self) -> Path:
        """Rename runs.json (and prompts/) to the first free runs.old.json (prompts.old), runs.old-2.json, ...:
        an earlier keep is never overwritten."""
        tags = ("old" if n == 1 else f"old-{n}" for n in range(1, 10**6))
        tag = next(
            t for t in tags if not any(p.exists() for p in (self.work / f"runs.{t}.json", self.work / f"prompts.{t}"))
        )
        if (self.work / "prompts").is_dir():
            (self.work / "prompts").rename(self.work / f"prompts.{tag}")
        return self.path.rename(self.work / f"runs.{tag}.json")

    def add(self, key: str, record: dict) -> None:
        self.runs[key] = record
        text = json.dumps({"setup_id": self.setup_id, "runs": self.runs}, indent=1)
        atomic_write(self.path, lambda tmp: Path(tmp).write_text(text))

    def prompt_file(self, run) -> Path:
        return self.work / "prompts" / f"{run.key}.safetensors"

    def done(self, run) -> bool:
        return run.key in self.runs and (not getattr(run, "keeps_prompt", False) or self.prompt_file(run).is_file())


def train_and_score(model: GPT, task: str, kind: str, cfg, data: tuple, **prompt) -> tuple[torch.nn.Module, dict]:
    """Fine-tune a copy of `model` (kind "finetune") or tune a prompt of that kind ("prompt", "ptuning",
    "ptuning-v2": recipes.tune_prompt's method, with `prompt`'s n_prompt, init, ...) on data = (train, val,
    test), keep the best validation step, and score it on test: the tuned module and the run's record."""
    if kind == "finetune":
        tuned, result = finetune(model, task, cfg, data=data)
    else:
        tuned, result = tune_prompt(model, task, cfg=cfg, data=data, method=kind, **prompt)
    return tuned, {
        "test": exact_match_accuracy(tuned, data[2], ByteTokenizer()),
        "val": result.best_metric,
        "best_step": result.best_step,
        "final_loss": result.losses[-1],
        "trainable": sum(p.numel() for _, p in trainable_parameters(tuned)),
    }


# ---- the run loop ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """torch's CPU threads set to `threads` for the block (None: torch's own choice), restored afterwards."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be an integer >= 1 (or None for torch's own choice), got {threads!r}")
    old = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)  # small models on a shared machine: fewer threads can run faster
    try:
        yield
    finally:
        torch.set_num_threads(old)


def run_experiment(
    name: str,
    setup: Setup,
    bases: dict[str, GPT],
    planned: list,
    execute,
    summarise,
    *,
    work,
    command: str | None = None,
    progress: bool = True,
    meta: dict | None = None,
) -> tuple[dict, dict]:
    """Train every planned run not recorded yet, recording each as it finishes, then summarise all of them.

    execute(run, recorder) -> the run's record (a dict of numbers; the loop adds its "seconds");
    summarise(recorder) -> the results. Returns (results, metadata for the results files; `meta` goes in
    after the setup). A Ctrl-C says how many runs are kept and that the same command continues from them.
    """
    t0 = time.perf_counter()
    recorder = RunRecorder.open(work, setup, bases)
    todo = [run for run in planned if not recorder.done(run)]
    details = "; ".join(
        f"{f} {', '.join(map(str, getattr(setup, f)))}"
        for f in ("methods", "tasks", "sizes", "seeds")
        if hasattr(setup, f)
    )
    print(f"[{name}] {len(planned)} runs planned, {len(todo)} to train ({details}; {torch.get_num_threads()} threads)")
    try:
        bar = tqdm(todo, desc=name, disable=not progress)
        for run in bar:
            bar.set_postfix_str(run.key)
            started = time.perf_counter()
            record = execute(run, recorder)
            recorder.add(run.key, {**record, "seconds": round(time.perf_counter() - started, 2)})
        results = summarise(recorder)
    except KeyboardInterrupt:
        finished = sum(recorder.done(run) for run in planned)
        raise KeyboardInterrupt(
            f"{finished} of {len(planned)} runs are finished and kept in {recorder.path}; "
            f"the same command continues from them"
        ) from None
    return results, {
        "command": command or f"minipt experiment {name}",
        "setup": asdict(setup),
        **(meta or {}),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": device_name("cpu"),
        "train_seconds": round(sum(recorder.runs[r.key]["seconds"] for r in planned), 1),
        "wall_seconds_this_call": round(time.perf_counter() - t0, 1),
    }


def save_results(
    name: str, results_dir, files: dict[str, dict], figure_name: str, draw, summary: str = "", meta: dict | None = None
) -> None:
    """Write each results file (JSON) and the figure (draw(path), a PNG) into results_dir, each atomically,
    then print the summary and what was written."""
    results_dir = Path(results_dir)
    try:
        for filename, content in files.items():
            text = json.dumps(content, indent=1) + "\n"
            atomic_write(results_dir / filename, lambda tmp, text=text: Path(tmp).write_text(text))
        atomic_write(results_dir / figure_name, draw)
    except KeyboardInterrupt:
        raise KeyboardInterrupt("every run is finished and kept; the same command writes the results") from None
    if summary:
        print(summary)
    names = next(iter(files)) if len(files) == 1 else "{" + ",".join(files) + "}"
    seconds = (meta or {}).get("wall_seconds_this_call", 0)
    print(f"[{name}] wrote {results_dir}/{names} and {figure_name} ({seconds:.0f} s)")


# ---- summarising -------------------------------------------------------------------------------------------


def spread(values: list[float]) -> dict:
    """Mean and sample standard deviation (0 for a single value) of per-seed values."""
    return {
        "values": values,
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
    }


def pm(s: dict) -> str:
    """A spread as text: "mean ± std" in percent."""
    return f"{s['mean']:.1%} ± {s['std']:.1%}"


def mean_over_tasks(per_task: dict[str, list[float]]) -> list[float]:
    """Per seed, the mean over tasks (per_task: task -> one value per seed): the 'all' row of each table."""
    return [statistics.fmean(column) for column in zip(*per_task.values())]


def with_all(per_task: dict[str, list[float]]) -> dict[str, list[float]]:
    """per_task and, last, its "all" row (mean_over_tasks)."""
    return {**per_task, "all": mean_over_tasks(per_task)}


def find_row(rows: list[dict], **where) -> dict:
    """The first row whose fields equal `where` (a results table's row for one task, method, size, ...)."""
    return next(r for r in rows if all(r[k] == v for k, v in where.items()))


def command_line() -> str:
    """How this process was started, as `minipt ...` (for the results files)."""
    return " ".join(["minipt", *sys.argv[1:]])
