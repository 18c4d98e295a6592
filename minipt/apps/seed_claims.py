"""`minipt experiment seed-claims`: the explainer's four claims about prompt tuning, tested in miniature.

The short explainer minipt grew from (in Chinese) says, in our translation:

    1  Prompt tuning suits few-shot learning: it usually does well on small data sets and uses little compute.
    2  On some tasks it comes close to full fine-tuning, especially on few-shot and zero-shot tasks.
    3  The design of the prompt directly affects performance.
and Lester et al. (2021, section 5, Table 1) add
    4  Prompt tuning is more robust than model tuning when the test domain shifts.

Three experiments on the shipped tiny base model (843k parameters), each task tuned *without* its written
instruction, as in `minipt experiment lester`:

    fewshot   training sets of 8 .. 2048 examples; prompt tuning (uniform and class-label init), full
              fine-tuning, and the frozen model with its written instruction (zero examples). Same steps per
              size for every method; early stopping on a validation split as small as the training set.
    design    five hand-written wordings per task on the frozen model, and a soft prompt initialised from each
              (`init="text"`): how much do the wordings differ before and after tuning?
    shift     tune on one input domain (`minipt.tasks.DOMAINS`), test in-domain and on a shifted domain; the
              drop per method, as in Lester et al.'s Table 1, and the share of in-domain accuracy kept.

Every trained number is a test-split exact match, as mean and sample standard deviation over seeds; a seed
draws the training and validation subsets, the prompt's initial values and the batch order. The test sets are
fixed. `verdicts` turns the three result files into one verdict per claim, and the README table, notebook 06
and the tests all call it, so the prose cannot drift from the data.

Runs are recorded in `work/runs.json` by `runs.RunRecorder` (atomic writes, set aside when the setup or the
base model changes), so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import copy
import json
import math
import statistics
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path

from ..assets import load_base
from ..checkpoint import model_fingerprint
from ..data import batch_fn, exact_match_accuracy
from ..frozen import trainable_parameters
from ..model import GPT
from ..prompt import PromptTuning
from ..tasks import DOMAINS, get_task, make_split
from ..tokenizer import ByteTokenizer
from ..train import TrainConfig, optimizer_state_bytes, train
from .plots import plot_seed_claims  # noqa: F401  (notebook 06 draws the figure as seed_claims.plot_seed_claims)
from .recipes import FINETUNE_DEFAULTS, TUNE_DEFAULTS
from .runs import (
    RunRecorder,
    Setup,
    find_row,
    mean_over_tasks,
    pm,
    run_experiment,
    save_results,
    spread,
    torch_threads,
    train_and_score,
    with_all,
)

__all__ = [
    "METHODS",
    "Method",
    "PARAPHRASES",
    "PARTS",
    "QUICK",
    "Run",
    "SHIFTS",
    "SeedSetup",
    "WORDINGS",
    "beyond_noise",
    "compare",
    "design_run",
    "execute",
    "few_shot_mean",
    "finetune_gap",
    "format_verdicts",
    "load_results",
    "planned_runs",
    "prompt_init",
    "retained",
    "run_data",
    "run_seed_claims",
    "shift_domains",
    "summarise",
    "train_config",
    "verdict_table",
    "verdicts",
    "wording_prefix",
]

PARTS = ("fewshot", "design", "shift")

# ---- the methods: what a row of the few-shot curve is ------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """One way to adapt the frozen base model: kind is what runs.train_and_score trains ("prompt", "finetune",
    or a deep prompt's "ptuning-v2"); "frozen" trains nothing. The figure names it plots.METHOD_LABELS[name].

    P-tuning v2 (deep prompts, `minipt.prefix.PrefixTuning`) is not among these methods yet: it becomes one more
    Method of kind "ptuning-v2" (with its step in _measure_compute), and the few-shot tables and the figure pick
    it up from SeedSetup.methods.
    """

    name: str
    kind: str  # "frozen" | "prompt" | "finetune"
    init: str = ""  # prompt methods: the init of minipt.prompt.init_prompt


METHODS = {
    m.name: m
    for m in (
        Method("instruction", "frozen"),
        Method("prompt-uniform", "prompt", "uniform"),
        Method("prompt-label", "prompt", "label"),
        Method("prompt-text", "prompt", "text"),
        Method("finetune", "finetune"),
    )
}


def prompt_init(method: Method, task: str) -> str:
    """The init a prompt method uses on `task`: class-label init falls back to sampled vocabulary on a
    generation task, which has no class labels (the paper fills the slots past the labels the same way)."""
    if method.init == "label" and get_task(task).kind != "classification":
        return "vocab"
    return method.init


# ---- the wordings of the design experiment -----------------------------------------------------------------

# Per task: the pretraining instruction, two paraphrases of it, a misleading one (another pretrained task's
# instruction), and none at all. Written once, before any was measured.
WORDINGS = {
    "parity": {
        "pretraining": "Is the number even or odd?",
        "paraphrase-1": "Is this number odd or even?",
        "paraphrase-2": "Tell me if the number is even or odd.",
        "misleading": "Is the sentiment positive or negative?",
        "empty": "",
    },
    "sentiment": {
        "pretraining": "Is the sentiment positive or negative?",
        "paraphrase-1": "Is the mood negative or positive?",
        "paraphrase-2": "Tell me if the sentence is positive or negative.",
        "misleading": "Is the number even or odd?",
        "empty": "",
    },
    "upper": {
        "pretraining": "Write the letters in uppercase:",
        "paraphrase-1": "Write these letters in capitals:",
        "paraphrase-2": "Make every letter uppercase:",
        "misleading": "Reverse the letters:",
        "empty": "",
    },
}
PARAPHRASES = ("pretraining", "paraphrase-1", "paraphrase-2")


def wording_prefix(text: str) -> str:
    """What the frozen model reads before the input for a wording: `text + " "`, as `data.query_ids` writes
    the pretraining instruction; nothing for the empty wording."""
    return text + " " if text else ""


# ---- the domains of the shift experiment -------------------------------------------------------------------

# task -> (the domain tuned on, the shifted domain tested on); None is the task's own input distribution.
SHIFTS = {
    "parity": ("short-numbers", "five-digit-numbers"),
    "sentiment": (None, "unseen-words"),
    "upper": ("short-letters", "long-letters"),
}


# ---- the setup ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SeedSetup(Setup):
    """What the experiment runs. The defaults are the full run; QUICK is a small version for tests."""

    # parity and sentiment are the lester experiment's pretrained classification tasks; palindrome was never
    # pretrained and prompt tuning stays at chance on it at every size (lester-*.json), so it is left out here.
    # upper is the generation task (97% test exact match with its instruction on the frozen model).
    tasks: tuple[str, ...] = ("parity", "sentiment", "upper")
    sizes: tuple[int, ...] = (8, 16, 32, 64, 128, 512, 2048)
    steps: tuple[int, ...] = (80, 80, 100, 100, 120, 160, 200)  # per size, the same for every method
    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = ("prompt-uniform", "prompt-label", "finetune")  # trained in the few-shot curve
    shift_methods: tuple[str, ...] = ("prompt-label", "finetune")
    n_prompt: int = 20  # every soft prompt but the design experiment's, whose length is its wording's
    val_cap: int = 256  # validation examples = min(training examples, val_cap)
    few_shot_max: int = 64  # "few-shot" in the verdicts: training sets of at most this many examples
    design_size: int = 32
    shift_size: int = 512
    n_test: int = 500
    timing_rounds: int = 5  # time per step: median over rounds of timing_steps steps, methods interleaved
    timing_steps: int = 10
    tune: TrainConfig = field(default_factory=lambda: replace(TUNE_DEFAULTS))
    finetune: TrainConfig = field(default_factory=lambda: replace(FINETUNE_DEFAULTS))

    def __post_init__(self):
        if len(self.steps) != len(self.sizes):
            raise ValueError(f"steps {self.steps} must give one step budget per size {self.sizes}")
        for value in (self.design_size, self.shift_size):
            if value not in self.sizes:
                raise ValueError(f"design_size and shift_size must be among the sizes {self.sizes}, got {value}")

    def steps_for(self, n: int) -> int:
        return self.steps[self.sizes.index(n)]

    def n_val(self, n: int) -> int:
        return min(n, self.val_cap)

    def identity(self) -> dict:
        """What decides a run's result: the setup, the wordings and the domains (Setup.fingerprint adds the base
        model's weights). The method lists only choose which runs exist, and a run's key names its method, so
        adding a method (a P-tuning v2 row) keeps the recorded runs."""
        chosen = {k: v for k, v in asdict(self).items() if k not in ("methods", "shift_methods")}
        return {"setup": chosen, "wordings": WORDINGS, "shifts": SHIFTS}


QUICK = SeedSetup(
    tasks=("parity",),
    sizes=(8, 32),
    steps=(10, 10),
    n_test=100,
    design_size=8,
    shift_size=32,
    timing_rounds=2,
    timing_steps=3,
    tune=replace(TUNE_DEFAULTS, batch_size=16),
    finetune=replace(FINETUNE_DEFAULTS, batch_size=16),
)


def train_config(base: TrainConfig, steps: int, seed: int) -> TrainConfig:
    """`base` with the step budget of a size: evaluate 10 times, warm up for the first tenth."""
    return replace(
        base, steps=steps, eval_every=max(1, steps // 10), warmup_steps=steps // 10, seed=seed, progress=False
    )


# ---- the plan ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """One training run of one method on one task: `part` says which experiment's data it trains on."""

    part: str
    method: str
    task: str
    n_train: int
    seed: int
    wording: str = ""  # design runs: the wording that initialised the prompt

    @property
    def key(self) -> str:
        return f"{self.part}-{self.method}-{self.task}-n{self.n_train}-s{self.seed}" + (
            f"-{self.wording}" if self.wording else ""
        )


def design_run(setup: SeedSetup, task: str, wording: str, seed: int) -> Run:
    """The soft prompt started from a wording. The empty wording has no text to start from: its prompt is the
    few-shot curve's uniform-init prompt at the design size (the same run, trained once)."""
    if wording == "empty":
        return Run("fewshot", "prompt-uniform", task, setup.design_size, seed)
    return Run("design", "prompt-text", task, setup.design_size, seed, wording)


def planned_runs(setup: SeedSetup) -> list[Run]:
    """Every distinct run of the three experiments, in a stable order (a shared run appears once)."""
    runs = []
    for task in setup.tasks:
        for seed in setup.seeds:
            runs += [Run("fewshot", m, task, n, seed) for n in setup.sizes for m in setup.methods]
            runs += [design_run(setup, task, w, seed) for w in WORDINGS[task]]
            runs += [Run("shift", m, task, setup.shift_size, seed) for m in setup.shift_methods]
    return list(dict.fromkeys(runs))


# ---- data --------------------------------------------------------------------------------------------------


@lru_cache(maxsize=64)
def _fixed_test(task: str, n: int, domain: str | None = None) -> tuple:
    """A fixed test set (seed 0): the same for every run, method and seed."""
    return tuple(make_split(task, "test", n, seed=0, domain=domain))


def run_data(run: Run, setup: SeedSetup) -> tuple[list, list, tuple]:
    """(train, val, test) of a run. The seed draws the training subset and a validation subset of the same
    size (at most val_cap): a few-shot learner gets no large validation set to pick its best step with."""
    domain = SHIFTS[run.task][0] if run.part == "shift" else None
    train_ex = make_split(run.task, "train", run.n_train, seed=run.seed, domain=domain)
    val_ex = make_split(run.task, "val", setup.n_val(run.n_train), seed=run.seed, domain=domain)
    return train_ex, val_ex, _fixed_test(run.task, setup.n_test, domain)


# ---- training ----------------------------------------------------------------------------------------------


def _prompt_args(run: Run, setup: SeedSetup) -> dict:
    """n_prompt and init of a prompt run: a design run starts exactly where its written wording is (its tokens'
    embeddings, one slot per token); the others use the method's init, n_prompt slots."""
    if run.wording:
        text = wording_prefix(WORDINGS[run.task][run.wording])
        return {"n_prompt": len(ByteTokenizer().encode(text)), "init": "text", "init_text": text}
    return {"n_prompt": setup.n_prompt, "init": prompt_init(METHODS[run.method], run.task)}


def execute(run: Run, setup: SeedSetup, model: GPT) -> dict:
    """Train one run and score it on the test set (and, for a shift run, on the shifted test set)."""
    kind, data = METHODS[run.method].kind, run_data(run, setup)
    cfg = train_config(setup.finetune if kind == "finetune" else setup.tune, setup.steps_for(run.n_train), run.seed)
    prompt = _prompt_args(run, setup) if kind != "finetune" else {}
    tuned, record = train_and_score(model, run.task, kind, cfg, data, **prompt)
    record.update(steps=cfg.steps, n_val=len(data[1]))
    if run.part == "shift":
        shifted = _fixed_test(run.task, setup.n_test, SHIFTS[run.task][1])
        record["shifted"] = exact_match_accuracy(tuned, shifted, ByteTokenizer())
    return record


# ---- compute: trainable numbers, optimizer state, time per step --------------------------------------------


def _measure_compute(model: GPT, task: str, setup: SeedSetup) -> dict:
    """Per trained method kind, on one task's batches: trainable numbers, optimizer state, and the median time
    of one training step (forward, backward, AdamW) over rounds that interleave the methods."""
    tok = ByteTokenizer()
    get_batch = batch_fn(make_split(task, "train", 64, seed=0), tok, setup.tune.batch_size, seed=0)
    ft = copy.deepcopy(model).requires_grad_(True)
    modules = {"prompt": PromptTuning(model, setup.n_prompt, "uniform"), "finetune": ft}
    cfgs = {"prompt": setup.tune, "finetune": setup.finetune}
    times = {kind: [] for kind in modules}
    for _ in range(setup.timing_rounds):
        for kind, module in modules.items():
            cfg = replace(cfgs[kind], steps=setup.timing_steps, eval_every=setup.timing_steps, progress=False)
            times[kind].append(train(module, get_batch, cfg).seconds / setup.timing_steps)
    return {
        kind: {
            "trainable": sum(p.numel() for _, p in trainable_parameters(module)),
            "optimizer_state_bytes": optimizer_state_bytes(module, get_batch(0), cfgs[kind]),
            "seconds_per_step": statistics.median(times[kind]),
        }
        for kind, module in modules.items()
    }


# ---- running -----------------------------------------------------------------------------------------------


def run_seed_claims(
    setup: SeedSetup = SeedSetup(),
    results_dir="benchmarks/results",
    work="runs/seed-claims",
    base=None,
    command: str | None = None,
    progress: bool = True,
    threads: int | None = None,
) -> dict:
    """Train every planned run (skipping recorded ones), then write seed-{fewshot,design,shift}.json and
    seed-claims.png into results_dir; returns the three results by part. threads: torch threads for the call."""
    with torch_threads(threads):
        model = load_base(base)
        results, meta = run_experiment(
            "seed-claims",
            setup,
            {"tiny": model},
            planned_runs(setup),
            lambda run, rec: execute(run, setup, model),
            lambda rec: summarise(setup, model, rec),
            work=work,
            command=command,
            progress=progress,
            meta={
                "wordings": WORDINGS,
                "shifts": {t: list(d) for t, d in SHIFTS.items()},
                "base": {"params": model.num_params(), "fingerprint": model_fingerprint(model)},
            },
        )
    files = {part: {"experiment": part, **meta, **results[part]} for part in PARTS}
    save_results(
        "seed-claims",
        results_dir,
        {f"seed-{part}.json": content for part, content in files.items()},
        "seed-claims.png",
        lambda path: plot_seed_claims(files, path),
        format_verdicts(verdicts(files["fewshot"], files["design"], files["shift"])),
        meta,
    )
    return files


# ---- summarising -------------------------------------------------------------------------------------------


def _frozen_accuracy(model: GPT, task: str, text: str, examples) -> float:
    """Exact match of the frozen model reading `text` before each input. A wording is scored through a soft
    prompt made of its own token embeddings (init="text"), which equals the model reading the text (tested)."""
    tok = ByteTokenizer()
    prefix = wording_prefix(text)
    if not prefix:
        return exact_match_accuracy(model, examples, tok, instruction=False)
    pt = PromptTuning(model, n_prompt=len(tok.encode(prefix)), init="text", init_text=prefix, tokenizer=tok)
    return exact_match_accuracy(pt, examples, tok)


def summarise(setup: SeedSetup, model: GPT, recorder: RunRecorder) -> dict:
    """The rows of the three experiments (per task and 'all'), plus the compute measurements."""

    def values(run_of_seed, key="test") -> list[float]:
        return [recorder.runs[run_of_seed(seed).key][key] for seed in setup.seeds]

    return {
        "fewshot": _summarise_fewshot(setup, model, recorder, values),
        "design": _summarise_design(setup, model, values),
        "shift": _summarise_shift(setup, model, values),
    }


def _summarise_fewshot(setup, model, recorder, values) -> dict:
    """The few-shot curve by method, size and task; the written instruction per task; the compute records."""
    rows = []
    for method in setup.methods:
        for n in setup.sizes:
            per_task = {t: values(lambda s, t=t: Run("fewshot", method, t, n, s)) for t in setup.tasks}
            for task, v in with_all(per_task).items():
                rows.append(
                    {
                        "task": task,
                        "method": method,
                        "n_train": n,
                        "steps": setup.steps_for(n),
                        "n_val": setup.n_val(n),
                        **spread(v),
                    }
                )
    instruction = {
        t: _frozen_accuracy(model, t, get_task(t).instruction, _fixed_test(t, setup.n_test)) for t in setup.tasks
    }
    instruction["all"] = statistics.fmean(instruction.values())
    for t in setup.tasks:  # measured once, after the training runs, and recorded like them
        if f"compute-{t}" not in recorder.runs:
            recorder.add(f"compute-{t}", _measure_compute(model, t, setup))
    compute = {t: recorder.runs[f"compute-{t}"] for t in setup.tasks}

    def train_seconds(method: str) -> float:  # every few-shot run of the method, all tasks, sizes and seeds
        runs = [Run("fewshot", method, t, n, s) for t in setup.tasks for n in setup.sizes for s in setup.seeds]
        return round(sum(recorder.runs[run.key]["seconds"] for run in runs), 1)

    kinds = ("prompt", "finetune")
    seconds = {kind: {m: train_seconds(m) for m in setup.methods if METHODS[m].kind == kind} for kind in kinds}
    return {
        "rows": rows,
        "instruction": [{"task": t, "method": "instruction", "n_train": 0, "test": a} for t, a in instruction.items()],
        "compute": {
            "per_task": compute,
            "train_seconds_by_method": seconds,
            "note": "seconds_per_step: the median of timing_rounds rounds of timing_steps steps "
            "(batch of tune.batch_size, n_prompt slots), methods interleaved",
        },
    }


def _ranges(per_wording: dict[str, list[float]], names) -> list[float]:
    """Per seed: best minus worst over the wordings in `names`."""
    columns = list(zip(*(per_wording[w] for w in names)))
    return [max(c) - min(c) for c in columns]


def _summarise_design(setup, model, values) -> dict:
    """Per task and wording: the frozen model reading it, and the prompt tuned from it; then per task the range
    (best minus worst) over the paraphrases and over all wordings, before and after tuning."""
    rows, ranges = [], []
    tuned_ranges, tuned_ranges_par, frozen_ranges, frozen_ranges_par, seed_stds = {}, {}, {}, {}, {}
    for task in setup.tasks:
        tests = _fixed_test(task, setup.n_test)
        frozen = {w: _frozen_accuracy(model, task, text, tests) for w, text in WORDINGS[task].items()}
        tuned = {w: values(lambda s, w=w: design_run(setup, task, w, s)) for w in WORDINGS[task]}
        for w, text in WORDINGS[task].items():
            rows.append(
                {
                    "task": task,
                    "wording": w,
                    "text": text,
                    "frozen": frozen[w],
                    "prompt_init": "text" if text else "uniform",
                    "n_prompt": len(ByteTokenizer().encode(wording_prefix(text))) or setup.n_prompt,
                    "tuned": spread(tuned[w]),
                }
            )
        wordings = list(WORDINGS[task])
        frozen_ranges[task] = max(frozen.values()) - min(frozen.values())
        frozen_ranges_par[task] = max(frozen[w] for w in PARAPHRASES) - min(frozen[w] for w in PARAPHRASES)
        tuned_ranges[task] = _ranges(tuned, wordings)
        tuned_ranges_par[task] = _ranges(tuned, PARAPHRASES)
        seed_stds[task] = statistics.fmean(spread(v)["std"] for v in tuned.values())
    for task in (*setup.tasks, "all"):
        pick = (lambda d: d[task]) if task != "all" else (lambda d: statistics.fmean(d.values()))
        pick_seeds = (lambda d: d[task]) if task != "all" else mean_over_tasks
        ranges.append(
            {
                "task": task,
                "frozen_range": pick(frozen_ranges),
                "frozen_range_paraphrases": pick(frozen_ranges_par),
                "tuned_range": spread(pick_seeds(tuned_ranges)),
                "tuned_range_paraphrases": spread(pick_seeds(tuned_ranges_par)),
                "seed_std": pick(seed_stds),
            }
        )
    return {
        "rows": rows,
        "ranges": ranges,
        "note": "range: best minus worst wording (per seed for the tuned prompts); the empty wording's soft "
        "prompt has no text to start from and uses uniform init, n_prompt slots",
    }


def _summarise_shift(setup, model, values) -> dict:
    """In-domain, shifted and drop (in minus shifted, per seed) by method and task (Lester et al. Table 1), and
    the frozen model with its instruction on both domains (no seed: nothing trained)."""
    rows = []
    for method in setup.shift_methods:
        per_task = {}
        for task in setup.tasks:
            ins = values(lambda s: Run("shift", method, task, setup.shift_size, s), "test")
            out = values(lambda s: Run("shift", method, task, setup.shift_size, s), "shifted")
            per_task[task] = (ins, out, [a - b for a, b in zip(ins, out)])
        per_task["all"] = tuple(mean_over_tasks({t: v[i] for t, v in per_task.items()}) for i in range(3))
        for task, (ins, out, drop) in per_task.items():
            rows.append(
                {
                    "task": task,
                    "method": method,
                    **shift_domains(task),
                    "n_train": setup.shift_size,
                    "in_domain": spread(ins),
                    "shifted": spread(out),
                    "drop": spread(drop),
                }
            )
    frozen = []
    for task in setup.tasks:
        tuned_on, shifted = SHIFTS[task]
        text = get_task(task).instruction
        ins = _frozen_accuracy(model, task, text, _fixed_test(task, setup.n_test, tuned_on))
        out = _frozen_accuracy(model, task, text, _fixed_test(task, setup.n_test, shifted))
        frozen.append(
            {
                "task": task,
                "method": "instruction",
                **shift_domains(task),
                "in_domain": ins,
                "shifted": out,
                "drop": ins - out,
            }
        )
    return {"rows": rows, "instruction": frozen}


def shift_domains(task: str) -> dict:
    """A shift row's two domains in words (None: the task's own inputs); blank on the "all" row."""
    if task == "all":
        return {"train_domain": "", "shifted_domain": ""}
    tuned_on, shifted = (DOMAINS[d].description if d else f"the {task} task's own inputs" for d in SHIFTS[task])
    return {"train_domain": tuned_on, "shifted_domain": shifted}


# ---- verdicts ----------------------------------------------------------------------------------------------


def beyond_noise(a: dict, b: dict) -> bool:
    """Is mean a above mean b by more than their combined seed spread sqrt(std_a^2 + std_b^2)? A rough
    yardstick with three seeds, not a significance test (the one notebook 05 uses)."""
    return a["mean"] - b["mean"] > math.hypot(a["std"], b["std"])


def compare(a: dict, b: dict, yes: str, no: str) -> str:
    """yes if a is clearly above b, no if clearly below, else 'inconclusive (within the seed spread)'."""
    if beyond_noise(a, b):
        return yes
    if beyond_noise(b, a):
        return no
    return "inconclusive (within the seed spread)"


def _points(s: dict) -> str:
    return f"{s['mean'] * 100:+.1f} ± {s['std'] * 100:.1f} points"


def _few_shot_sizes(setup: dict) -> list[int]:
    return [n for n in setup["sizes"] if n <= setup["few_shot_max"]]


def _mean_over_sizes(fewshot: dict, method: str, sizes, task: str = "all") -> list[float]:
    """Per seed, the test accuracy of `method` on `task` averaged over the training-set sizes `sizes`."""
    columns = [find_row(fewshot["rows"], task=task, method=method, n_train=n)["values"] for n in sizes]
    return [statistics.fmean(c) for c in zip(*columns)]


def few_shot_mean(fewshot: dict, method: str, task: str = "all") -> dict:
    """Mean and spread over seeds of the accuracy averaged over the few-shot sizes (n <= few_shot_max)."""
    return spread(_mean_over_sizes(fewshot, method, _few_shot_sizes(fewshot["setup"]), task))


def finetune_gap(fewshot: dict, sizes, task: str = "all") -> dict:
    """Fine-tuning minus class-label prompt tuning, per seed, averaged over the training-set sizes `sizes`."""
    ft, pt = (_mean_over_sizes(fewshot, m, sizes, task) for m in ("finetune", "prompt-label"))
    return spread([f - p for f, p in zip(ft, pt)])


def retained(row: dict) -> dict:
    """Per seed, the share of its in-domain accuracy a method keeps on the shifted domain (shifted / in-domain;
    0 where it learned nothing in-domain, as there was nothing to keep)."""
    pairs = zip(row["in_domain"]["values"], row["shifted"]["values"])
    return spread([out / ins if ins > 0 else 0.0 for ins, out in pairs])


_ZERO = {"mean": 0.0, "std": 0.0}


def verdicts(fewshot: dict, design: dict, shift: dict) -> list[dict]:
    """One verdict per claim, computed from the three result files (the dicts of seed-*.json).

    "Clearly" is `beyond_noise`: a difference of means larger than the combined seed spread.
    1a small data   class-label prompt tuning vs fine-tuning, mean over tasks and the few-shot sizes; the
                    tasks on which prompt tuning is clearly ahead are listed
    1b compute      trainable numbers, optimizer state and time per step, prompt tuning / fine-tuning
    2  vs fine-tuning   "almost as good on some tasks": a task where prompt tuning is not clearly behind;
                    "especially few-shot": the gap clearly smaller at the few-shot sizes than at the largest
    3a design       the frozen model's range (best minus worst) over three paraphrases of its instruction,
                    against the test set's sampling noise: two standard errors of a difference of two
                    accuracies on n_test examples, at most 2 sqrt(0.5 / n_test)
    3b design after tuning   the range over the five wordings after tuning from each, against the range
                    before, and against the seed spread of one wording (removed: no larger than twice it)
    4  domain shift the share of its in-domain accuracy each method keeps on the shifted domain (`retained`).
                    Lester et al.'s Table 1 compares the drop at equal in-domain accuracy (94.9 vs 94.8 F1 on
                    SQuAD); here the in-domain accuracies differ, and a method that learned less has less to
                    lose, so the absolute drop is reported but the verdict uses the share kept.
    """
    setup = fewshot["setup"]
    tasks, small, largest = setup["tasks"], _few_shot_sizes(setup), setup["sizes"][-1]
    sizes_text = f"{small[0]}-{small[-1]} examples"
    out = []

    pt, ft = few_shot_mean(fewshot, "prompt-label"), few_shot_mean(fewshot, "finetune")
    ahead = [
        t
        for t in tasks
        if beyond_noise(few_shot_mean(fewshot, "prompt-label", t), few_shot_mean(fewshot, "finetune", t))
    ]
    per_task = ", ".join(f"{t} {-finetune_gap(fewshot, small, t)['mean'] * 100:+.1f}" for t in tasks)
    verdict = compare(pt, ft, "holds", "does not hold")
    out.append(
        {
            "id": "1a",
            "claim": "suits few-shot learning: does well on small data sets",
            "measurement": f"{sizes_text}, mean over tasks: prompt tuning {pm(pt)}, fine-tuning {pm(ft)} "
            f"(prompt minus fine-tuning, points: {per_task})",
            "verdict": f"{verdict} on the mean; clearly ahead on {len(ahead)} of {len(tasks)} tasks"
            + (f" ({', '.join(ahead)})" if ahead else ""),
            "numbers": {"prompt": pt, "finetune": ft, "ahead_tasks": ahead},
        }
    )

    computes = fewshot["compute"]["per_task"].values()
    ratio = {
        k: statistics.fmean(c["prompt"][k] / c["finetune"][k] for c in computes)
        for k in ("trainable", "optimizer_state_bytes", "seconds_per_step")
    }
    cheaper_memory = ratio["trainable"] < 1 and ratio["optimizer_state_bytes"] < 1
    faster = ratio["seconds_per_step"] < 1
    out.append(
        {
            "id": "1b",
            "claim": "uses little compute",
            "measurement": f"prompt tuning / fine-tuning: trainable numbers {ratio['trainable']:.2%}, optimizer "
            f"state {ratio['optimizer_state_bytes']:.2%}, time per step "
            f"{ratio['seconds_per_step']:.2f}x",
            "verdict": (
                "holds"
                if cheaper_memory and faster
                else "holds for memory, not for time per step"
                if cheaper_memory
                else "does not hold"
            ),
            "numbers": ratio,
        }
    )

    gap_large, gap_small = finetune_gap(fewshot, [largest]), finetune_gap(fewshot, small)
    near_full = [t for t in tasks if not beyond_noise(finetune_gap(fewshot, [largest], t), _ZERO)]
    near_few = [t for t in tasks if not beyond_noise(finetune_gap(fewshot, small, t), _ZERO)]
    especially = beyond_noise(gap_large, gap_small)
    verdict2 = (
        "holds"
        if near_full and especially
        else f"holds for {sizes_text} only"
        if near_few and especially
        else "holds in part"
        if near_full or near_few
        else "does not hold"
    )
    out.append(
        {
            "id": "2",
            "claim": "almost as good as full fine-tuning on some tasks, especially few-shot",
            "measurement": f"fine-tuning minus prompt tuning, mean over tasks: {_points(gap_large)} at "
            f"{largest} examples, {_points(gap_small)} at {sizes_text}; prompt tuning not "
            f"clearly behind at {largest} on {', '.join(near_full) or 'no task'}, at "
            f"{sizes_text} on {', '.join(near_few) or 'no task'}",
            "verdict": verdict2,
            "numbers": {
                "gap_largest": gap_large,
                "gap_few_shot": gap_small,
                "near_largest": near_full,
                "near_few_shot": near_few,
            },
        }
    )

    ranges = find_row(design["ranges"], task="all")
    noise = 2 * math.sqrt(0.5 / design["setup"]["n_test"])
    out.append(
        {
            "id": "3a",
            "claim": "the design of the prompt directly affects performance",
            "measurement": f"frozen model, mean over tasks: best minus worst of 3 paraphrases of the "
            f"instruction {ranges['frozen_range_paraphrases'] * 100:.1f} points (test noise at "
            f"most {noise * 100:.1f}); of all 5 wordings {ranges['frozen_range'] * 100:.1f}",
            "verdict": "holds" if ranges["frozen_range_paraphrases"] > noise else "does not hold",
            "numbers": {
                "frozen_range_paraphrases": ranges["frozen_range_paraphrases"],
                "frozen_range": ranges["frozen_range"],
                "noise": noise,
            },
        }
    )

    before, after = {"mean": ranges["frozen_range"], "std": 0.0}, ranges["tuned_range"]
    removed = after["mean"] <= 2 * ranges["seed_std"]
    verdict3b = (
        "holds: the wordings differ no more than seeds do"
        if removed
        else "holds in part: reduced, not removed"
        if beyond_noise(before, after)
        else "does not hold"
    )
    out.append(
        {
            "id": "3b",
            "claim": "(the question it raises) tuning removes the sensitivity to the wording",
            "measurement": f"best minus worst of 5 wordings, mean over tasks: "
            f"{ranges['frozen_range'] * 100:.1f} points frozen, {after['mean'] * 100:.1f} ± "
            f"{after['std'] * 100:.1f} after tuning from each "
            f"({design['setup']['design_size']} examples; seed std of one wording "
            f"{ranges['seed_std'] * 100:.1f})",
            "verdict": verdict3b,
            "numbers": {"before": before["mean"], "after": after, "seed_std": ranges["seed_std"]},
        }
    )

    rows = {m: find_row(shift["rows"], task="all", method=m) for m in ("prompt-label", "finetune")}
    kept = {
        m: spread(mean_over_tasks({t: retained(find_row(shift["rows"], task=t, method=m))["values"] for t in tasks}))
        for m in rows
    }
    out.append(
        {
            "id": "4",
            "claim": "more robust than model tuning under domain shift (Lester et al. §5)",
            "measurement": f"share of in-domain accuracy kept on the shifted domain, mean over tasks: prompt "
            f"tuning {pm(kept['prompt-label'])}, fine-tuning {pm(kept['finetune'])} (drop: "
            f"{rows['prompt-label']['drop']['mean'] * 100:.1f} and "
            f"{rows['finetune']['drop']['mean'] * 100:.1f} points, from in-domain "
            f"{rows['prompt-label']['in_domain']['mean']:.1%} and "
            f"{rows['finetune']['in_domain']['mean']:.1%})",
            "verdict": compare(kept["prompt-label"], kept["finetune"], "holds", "does not hold"),
            "numbers": {
                "retained": kept,
                "drop": {m: r["drop"] for m, r in rows.items()},
                "in_domain": {m: r["in_domain"] for m, r in rows.items()},
            },
        }
    )
    return out


def verdict_table(rows: list[dict]) -> str:
    """The README's table "the explainer's claims": claim, measurement, verdict (markdown)."""
    lines = ["| claim | measurement | verdict |", "|---|---|---|"]
    lines += [f"| {r['id']}. {r['claim']} | {r['measurement']} | {r['verdict']} |" for r in rows]
    return "\n".join(lines)


def format_verdicts(rows: list[dict]) -> str:
    return "\n".join(f"claim {r['id']}: {r['verdict']:<40} {r['measurement']}" for r in rows)


def load_results(results_dir="benchmarks/results") -> dict:
    """The three result files of a run, by part."""
    return {part: json.loads((Path(results_dir) / f"seed-{part}.json").read_text()) for part in PARTS}
