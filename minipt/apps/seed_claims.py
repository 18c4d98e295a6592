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

Runs are recorded in `work/runs.json` by `experiments.RunRecorder` (atomic writes, set aside when the setup
or the base model changes), so an interrupted run resumes where it stopped.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..assets import load_base
from ..checkpoint import atomic_write, model_fingerprint
from ..data import batch_fn, exact_match_accuracy
from ..frozen import trainable_parameters
from ..model import GPT
from ..prompt import PromptTuning
from ..tasks import DOMAINS, get_task, make_split
from ..tokenizer import ByteTokenizer
from ..train import TrainConfig, make_optimizer, train
from .benchio import device_name
from .experiments import RunRecorder, spread
from .recipes import FINETUNE_DEFAULTS, TUNE_DEFAULTS, finetune, tune_prompt

PARTS = ("fewshot", "design", "shift")

# ---- the claims, in our translation of the explainer -------------------------------------------------------

CLAIMS = {
    "1": "Prompt tuning suits few-shot learning: it usually does well on small data sets and uses "
         "relatively little compute.",
    "2": "On some tasks prompt tuning performs almost as well as full fine-tuning, especially on few-shot "
         "and zero-shot tasks.",
    "3": "The design of the prompt directly affects the model's performance: a well-made prompt draws out "
         "more of the model's knowledge.",
    "4": "Prompt tuning is more robust than model tuning when the test domain differs from the training "
         "domain (Lester et al. 2021, section 5, Table 1).",
}

# ---- the methods: what a row of the few-shot curve is ------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """One way to adapt the frozen base model. kind picks the trainer (TRAINERS); "frozen" trains nothing.

    P-tuning v2 (deep prompts, `minipt.prefix.PrefixTuning`) is not among these methods yet: it becomes one more
    Method of a new kind with its trainer in TRAINERS (and its step in measure_compute), and the few-shot
    tables and the figure pick it up from SeedSetup.methods.
    """

    name: str
    kind: str  # "frozen" | "prompt" | "finetune"
    label: str
    init: str = ""  # prompt methods: the init of minipt.prompt.init_prompt


METHODS = {m.name: m for m in (
    Method("instruction", "frozen", "written instruction, frozen model (0 examples)"),
    Method("prompt-uniform", "prompt", "prompt tuning, uniform init", "uniform"),
    Method("prompt-label", "prompt", "prompt tuning, class-label init", "label"),
    Method("prompt-text", "prompt", "prompt tuning, init from a wording", "text"),
    Method("finetune", "finetune", "full fine-tuning"),
)}


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
    "parity": {"pretraining": "Is the number even or odd?", "paraphrase-1": "Is this number odd or even?",
               "paraphrase-2": "Tell me if the number is even or odd.",
               "misleading": "Is the sentiment positive or negative?", "empty": ""},
    "sentiment": {"pretraining": "Is the sentiment positive or negative?",
                  "paraphrase-1": "Is the mood negative or positive?",
                  "paraphrase-2": "Tell me if the sentence is positive or negative.",
                  "misleading": "Is the number even or odd?", "empty": ""},
    "upper": {"pretraining": "Write the letters in uppercase:", "paraphrase-1": "Write these letters in capitals:",
              "paraphrase-2": "Make every letter uppercase:", "misleading": "Reverse the letters:", "empty": ""},
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


def domain_label(task: str, domain: str | None) -> str:
    return DOMAINS[domain].description if domain else f"the {task} task's own inputs"


# ---- the setup ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SeedSetup:
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

    def fingerprint(self, bases: dict[str, GPT]) -> str:
        """A short hash of what decides a run's result: the setup, the wordings, the domains and the base model's
        weights (what experiments.RunRecorder checks). The method lists only choose which runs exist, and a
        run's key names its method, so adding a method (a P-tuning v2 row) keeps the recorded runs."""
        chosen = {k: v for k, v in asdict(self).items() if k not in ("methods", "shift_methods")}
        identity = {"setup": chosen, "wordings": WORDINGS, "shifts": SHIFTS,
                    "bases": {size: model_fingerprint(m) for size, m in sorted(bases.items())}}
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]


QUICK = SeedSetup(tasks=("parity",), sizes=(8, 32), steps=(10, 10), n_test=100, design_size=8, shift_size=32,
                  timing_rounds=2, timing_steps=3, tune=replace(TUNE_DEFAULTS, batch_size=16),
                  finetune=replace(FINETUNE_DEFAULTS, batch_size=16))


def train_config(base: TrainConfig, steps: int, seed: int) -> TrainConfig:
    """`base` with the step budget of a size: evaluate 10 times, warm up for the first tenth."""
    return replace(base, steps=steps, eval_every=max(1, steps // 10), warmup_steps=steps // 10, seed=seed,
                   progress=False)


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
            f"-{self.wording}" if self.wording else "")


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
def fixed_test(task: str, n: int, domain: str | None = None) -> tuple:
    """A fixed test set (seed 0): the same for every run, method and seed."""
    return tuple(make_split(task, "test", n, seed=0, domain=domain))


def run_data(run: Run, setup: SeedSetup) -> tuple[list, list, tuple]:
    """(train, val, test) of a run. The seed draws the training subset and a validation subset of the same
    size (at most val_cap): a few-shot learner gets no large validation set to pick its best step with."""
    domain = SHIFTS[run.task][0] if run.part == "shift" else None
    train_ex = make_split(run.task, "train", run.n_train, seed=run.seed, domain=domain)
    val_ex = make_split(run.task, "val", setup.n_val(run.n_train), seed=run.seed, domain=domain)
    return train_ex, val_ex, fixed_test(run.task, setup.n_test, domain)


# ---- training ----------------------------------------------------------------------------------------------


def _train_prompt(model, run: Run, setup: SeedSetup, cfg: TrainConfig, data):
    method = METHODS[run.method]
    if run.wording:  # start exactly where the written wording is: its tokens' embeddings, one slot per token
        text = wording_prefix(WORDINGS[run.task][run.wording])
        n_prompt = len(ByteTokenizer().encode(text))
        return tune_prompt(model, run.task, n_prompt, "text", cfg, data=data, init_text=text)
    return tune_prompt(model, run.task, setup.n_prompt, prompt_init(method, run.task), cfg, data=data)


def _finetune(model, run: Run, setup: SeedSetup, cfg: TrainConfig, data):
    return finetune(model, run.task, cfg, data=data)


# kind -> (trainer(model, run, setup, cfg, data) -> (tuned module, TrainResult), its base TrainConfig's name in
# SeedSetup); a deep-prompt kind goes here.
TRAINERS = {"prompt": (_train_prompt, "tune"), "finetune": (_finetune, "finetune")}


def execute(run: Run, setup: SeedSetup, model: GPT) -> dict:
    """Train one run and score it on the test set (and, for a shift run, on the shifted test set)."""
    t0 = time.perf_counter()
    tok = ByteTokenizer()
    method = METHODS[run.method]
    data = run_data(run, setup)
    trainer, base_config = TRAINERS[method.kind]
    cfg = train_config(getattr(setup, base_config), setup.steps_for(run.n_train), run.seed)
    tuned, result = trainer(model, run, setup, cfg, data)
    record = {"test": exact_match_accuracy(tuned, data[2], tok), "val": result.best_metric,
              "best_step": result.best_step, "steps": cfg.steps, "n_val": len(data[1]),
              "trainable": sum(p.numel() for _, p in trainable_parameters(tuned)),
              "final_loss": result.losses[-1]}
    if run.part == "shift":
        record["shifted"] = exact_match_accuracy(tuned, fixed_test(run.task, setup.n_test, SHIFTS[run.task][1]), tok)
    record["seconds"] = round(time.perf_counter() - t0, 2)
    return record


# ---- compute: trainable numbers, optimizer state, time per step --------------------------------------------


def optimizer_state_bytes(module, batch, cfg: TrainConfig) -> int:
    """Bytes the optimizer keeps after one step (AdamW: two moments per trainable number, and a step count)."""
    params = [p for _, p in trainable_parameters(module)]
    optimizer = make_optimizer(params, cfg)
    module.loss(*batch).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return sum(t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values()
               if torch.is_tensor(t))


def measure_compute(model: GPT, task: str, setup: SeedSetup) -> dict:
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
    return {kind: {"trainable": sum(p.numel() for _, p in trainable_parameters(module)),
                   "optimizer_state_bytes": optimizer_state_bytes(module, get_batch(0), cfgs[kind]),
                   "seconds_per_step": statistics.median(times[kind])}
            for kind, module in modules.items()}


# ---- running -----------------------------------------------------------------------------------------------


def run_seed_claims(setup: SeedSetup = SeedSetup(), results_dir="benchmarks/results", work="runs/seed-claims",
                    base=None, command: str | None = None, progress: bool = True, threads: int | None = None
                    ) -> dict:
    """Train every planned run (skipping recorded ones), then write seed-{fewshot,design,shift}.json and
    seed-claims.png into results_dir; returns the three results by part. threads: torch threads for the call."""
    t0 = time.perf_counter()
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        model = load_base(base)
        recorder = RunRecorder.open(work, setup, {"tiny": model})
        planned = planned_runs(setup)
        todo = [run for run in planned if run.key not in recorder.runs]
        print(f"[seed-claims] {len(planned)} runs planned, {len(todo)} to train (tasks {', '.join(setup.tasks)}; "
              f"sizes {list(setup.sizes)}; seeds {list(setup.seeds)}; {torch.get_num_threads()} threads)")
        for task in setup.tasks:
            if f"compute-{task}" not in recorder.runs:
                recorder.add(f"compute-{task}", measure_compute(model, task, setup))
        bar = tqdm(todo, desc="seed-claims", disable=not progress)
        for run in bar:
            bar.set_postfix_str(run.key)
            recorder.add(run.key, execute(run, setup, model))
        results = summarise(setup, model, recorder)
        meta = {"command": command or "minipt experiment seed-claims", "setup": asdict(setup),
                "wordings": WORDINGS, "shifts": {t: list(d) for t, d in SHIFTS.items()},
                "base": {"params": model.num_params(), "fingerprint": model_fingerprint(model)},
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
                "threads": torch.get_num_threads(), "cpu": device_name("cpu"),
                "train_seconds": round(sum(recorder.runs[r.key]["seconds"] for r in planned), 1),
                "wall_seconds_this_call": round(time.perf_counter() - t0, 1)}
    finally:
        torch.set_num_threads(old_threads)
    results_dir = Path(results_dir)
    files = {part: {"experiment": part, **meta, **results[part]} for part in PARTS}
    for part, content in files.items():
        text = json.dumps(content, indent=1) + "\n"
        atomic_write(results_dir / f"seed-{part}.json", lambda tmp, text=text: Path(tmp).write_text(text))
    plot_seed_claims(files, results_dir / "seed-claims.png")
    print(format_verdicts(verdicts(files["fewshot"], files["design"], files["shift"])))
    print(f"[seed-claims] wrote {results_dir}/seed-{{{','.join(PARTS)}}}.json and seed-claims.png "
          f"({meta['wall_seconds_this_call']:.0f} s)")
    return files


# ---- summarising -------------------------------------------------------------------------------------------


def _mean_over_tasks(per_task: dict[str, list[float]]) -> list[float]:
    """Per seed, the mean over tasks: the 'all' row of each table."""
    return [statistics.fmean(column) for column in zip(*per_task.values())]


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

    return {"fewshot": summarise_fewshot(setup, model, recorder, values),
            "design": summarise_design(setup, model, values),
            "shift": summarise_shift(setup, model, values)}


def summarise_fewshot(setup, model, recorder, values) -> dict:
    """The few-shot curve by method, size and task; the written instruction per task; the compute records."""
    rows = []
    for method in setup.methods:
        for n in setup.sizes:
            per_task = {t: values(lambda s, t=t: Run("fewshot", method, t, n, s)) for t in setup.tasks}
            for task, v in {**per_task, "all": _mean_over_tasks(per_task)}.items():
                rows.append({"task": task, "method": method, "n_train": n, "steps": setup.steps_for(n),
                             "n_val": setup.n_val(n), **spread(v)})
    instruction = {t: _frozen_accuracy(model, t, get_task(t).instruction, fixed_test(t, setup.n_test))
                   for t in setup.tasks}
    instruction["all"] = statistics.fmean(instruction.values())
    compute = {t: recorder.runs[f"compute-{t}"] for t in setup.tasks}
    seconds = {kind: {m: round(sum(recorder.runs[Run("fewshot", m, t, n, s).key]["seconds"] for t in setup.tasks
                                   for n in setup.sizes for s in setup.seeds), 1)
                      for m in setup.methods if METHODS[m].kind == kind} for kind in ("prompt", "finetune")}
    return {"rows": rows,
            "instruction": [{"task": t, "method": "instruction", "n_train": 0, "test": a}
                            for t, a in instruction.items()],
            "compute": {"per_task": compute, "train_seconds_by_method": seconds,
                        "note": "seconds_per_step: the median of timing_rounds rounds of timing_steps steps "
                                "(batch of tune.batch_size, n_prompt slots), methods interleaved"}}


def _ranges(per_wording: dict[str, list[float]], names) -> list[float]:
    """Per seed: best minus worst over the wordings in `names`."""
    columns = list(zip(*(per_wording[w] for w in names)))
    return [max(c) - min(c) for c in columns]


def summarise_design(setup, model, values) -> dict:
    """Per task and wording: the frozen model reading it, and the prompt tuned from it; then per task the range
    (best minus worst) over the paraphrases and over all wordings, before and after tuning."""
    rows, ranges = [], []
    tuned_ranges, tuned_ranges_par, frozen_ranges, frozen_ranges_par, seed_stds = {}, {}, {}, {}, {}
    for task in setup.tasks:
        tests = fixed_test(task, setup.n_test)
        frozen = {w: _frozen_accuracy(model, task, text, tests) for w, text in WORDINGS[task].items()}
        tuned = {w: values(lambda s, w=w: design_run(setup, task, w, s)) for w in WORDINGS[task]}
        for w, text in WORDINGS[task].items():
            rows.append({"task": task, "wording": w, "text": text, "frozen": frozen[w],
                         "prompt_init": "text" if text else "uniform",
                         "n_prompt": len(ByteTokenizer().encode(wording_prefix(text))) or setup.n_prompt,
                         "tuned": spread(tuned[w])})
        wordings = list(WORDINGS[task])
        frozen_ranges[task] = max(frozen.values()) - min(frozen.values())
        frozen_ranges_par[task] = max(frozen[w] for w in PARAPHRASES) - min(frozen[w] for w in PARAPHRASES)
        tuned_ranges[task] = _ranges(tuned, wordings)
        tuned_ranges_par[task] = _ranges(tuned, PARAPHRASES)
        seed_stds[task] = statistics.fmean(spread(v)["std"] for v in tuned.values())
    for task in (*setup.tasks, "all"):
        pick = (lambda d: d[task]) if task != "all" else (lambda d: statistics.fmean(d.values()))
        pick_seeds = (lambda d: d[task]) if task != "all" else _mean_over_tasks
        ranges.append({"task": task, "frozen_range": pick(frozen_ranges),
                       "frozen_range_paraphrases": pick(frozen_ranges_par),
                       "tuned_range": spread(pick_seeds(tuned_ranges)),
                       "tuned_range_paraphrases": spread(pick_seeds(tuned_ranges_par)),
                       "seed_std": pick(seed_stds)})
    return {"rows": rows, "ranges": ranges,
            "note": "range: best minus worst wording (per seed for the tuned prompts); the empty wording's soft "
                    "prompt has no text to start from and uses uniform init, n_prompt slots"}


def summarise_shift(setup, model, values) -> dict:
    """In-domain, shifted and drop (in minus shifted, per seed) by method and task (Lester et al. Table 1), and
    the frozen model with its instruction on both domains (no seed: nothing trained)."""
    rows = []
    for method in setup.shift_methods:
        per_task = {}
        for task in setup.tasks:
            ins = values(lambda s: Run("shift", method, task, setup.shift_size, s), "test")
            out = values(lambda s: Run("shift", method, task, setup.shift_size, s), "shifted")
            per_task[task] = (ins, out, [a - b for a, b in zip(ins, out)])
        per_task["all"] = tuple(_mean_over_tasks({t: v[i] for t, v in per_task.items()}) for i in range(3))
        for task, (ins, out, drop) in per_task.items():
            rows.append({"task": task, "method": method, **_domains(task), "n_train": setup.shift_size,
                         "in_domain": spread(ins), "shifted": spread(out), "drop": spread(drop)})
    frozen = []
    for task in setup.tasks:
        tuned_on, shifted = SHIFTS[task]
        text = get_task(task).instruction
        ins = _frozen_accuracy(model, task, text, fixed_test(task, setup.n_test, tuned_on))
        out = _frozen_accuracy(model, task, text, fixed_test(task, setup.n_test, shifted))
        frozen.append({"task": task, "method": "instruction", **_domains(task), "in_domain": ins, "shifted": out,
                       "drop": ins - out})
    return {"rows": rows, "instruction": frozen}


def _domains(task: str) -> dict:
    if task == "all":
        return {"train_domain": "", "shifted_domain": ""}
    tuned_on, shifted = SHIFTS[task]
    return {"train_domain": domain_label(task, tuned_on), "shifted_domain": domain_label(task, shifted)}


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


def _row(rows, **where) -> dict:
    return next(r for r in rows if all(r[k] == v for k, v in where.items()))


def _pm(s: dict) -> str:
    return f"{s['mean']:.1%} ± {s['std']:.1%}"


def _points(s: dict) -> str:
    return f"{s['mean'] * 100:+.1f} ± {s['std'] * 100:.1f} points"


def _few_shot_sizes(setup: dict) -> list[int]:
    return [n for n in setup["sizes"] if n <= setup["few_shot_max"]]


def _mean_over_sizes(fewshot: dict, method: str, sizes, task: str = "all") -> list[float]:
    """Per seed, the test accuracy of `method` on `task` averaged over the training-set sizes `sizes`."""
    columns = [_row(fewshot["rows"], task=task, method=method, n_train=n)["values"] for n in sizes]
    return [statistics.fmean(c) for c in zip(*columns)]


def _few_shot_mean(fewshot: dict, method: str, task: str = "all") -> dict:
    """Mean and spread over seeds of the accuracy averaged over the few-shot sizes (n <= few_shot_max)."""
    return spread(_mean_over_sizes(fewshot, method, _few_shot_sizes(fewshot["setup"]), task))


def _gap(fewshot: dict, sizes, task: str = "all") -> dict:
    """Fine-tuning minus class-label prompt tuning, per seed, averaged over the training-set sizes `sizes`."""
    ft, pt = (_mean_over_sizes(fewshot, m, sizes, task) for m in ("finetune", "prompt-label"))
    return spread([f - p for f, p in zip(ft, pt)])


def retained(row: dict) -> dict:
    """Per seed, the share of its in-domain accuracy a method keeps on the shifted domain (shifted / in-domain;
    0 where it learned nothing in-domain, as there was nothing to keep)."""
    pairs = zip(row["in_domain"]["values"], row["shifted"]["values"])
    return spread([out / ins if ins > 0 else 0.0 for ins, out in pairs])


ZERO = {"mean": 0.0, "std": 0.0}


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

    pt, ft = _few_shot_mean(fewshot, "prompt-label"), _few_shot_mean(fewshot, "finetune")
    ahead = [t for t in tasks if beyond_noise(_few_shot_mean(fewshot, "prompt-label", t),
                                              _few_shot_mean(fewshot, "finetune", t))]
    per_task = ", ".join(f"{t} {-_gap(fewshot, small, t)['mean'] * 100:+.1f}" for t in tasks)
    verdict = compare(pt, ft, "holds", "does not hold")
    out.append({"id": "1a", "claim": "suits few-shot learning: does well on small data sets",
                "measurement": f"{sizes_text}, mean over tasks: prompt tuning {_pm(pt)}, fine-tuning {_pm(ft)} "
                               f"(prompt minus fine-tuning, points: {per_task})",
                "verdict": f"{verdict} on the mean; clearly ahead on {len(ahead)} of {len(tasks)} tasks"
                           + (f" ({', '.join(ahead)})" if ahead else ""),
                "numbers": {"prompt": pt, "finetune": ft, "ahead_tasks": ahead}})

    computes = fewshot["compute"]["per_task"].values()
    ratio = {k: statistics.fmean(c["prompt"][k] / c["finetune"][k] for c in computes)
             for k in ("trainable", "optimizer_state_bytes", "seconds_per_step")}
    cheaper_memory = ratio["trainable"] < 1 and ratio["optimizer_state_bytes"] < 1
    faster = ratio["seconds_per_step"] < 1
    out.append({"id": "1b", "claim": "uses little compute",
                "measurement": f"prompt tuning / fine-tuning: trainable numbers {ratio['trainable']:.2%}, optimizer "
                               f"state {ratio['optimizer_state_bytes']:.2%}, time per step "
                               f"{ratio['seconds_per_step']:.2f}x",
                "verdict": ("holds" if cheaper_memory and faster else
                            "holds for memory, not for time per step" if cheaper_memory else "does not hold"),
                "numbers": ratio})

    gap_large, gap_small = _gap(fewshot, [largest]), _gap(fewshot, small)
    near_full = [t for t in tasks if not beyond_noise(_gap(fewshot, [largest], t), ZERO)]
    near_few = [t for t in tasks if not beyond_noise(_gap(fewshot, small, t), ZERO)]
    especially = beyond_noise(gap_large, gap_small)
    verdict2 = ("holds" if near_full and especially else
                f"holds for {sizes_text} only" if near_few and especially else
                "holds in part" if near_full or near_few else "does not hold")
    out.append({"id": "2", "claim": "almost as good as full fine-tuning on some tasks, especially few-shot",
                "measurement": f"fine-tuning minus prompt tuning, mean over tasks: {_points(gap_large)} at "
                               f"{largest} examples, {_points(gap_small)} at {sizes_text}; prompt tuning not "
                               f"clearly behind at {largest} on {', '.join(near_full) or 'no task'}, at "
                               f"{sizes_text} on {', '.join(near_few) or 'no task'}",
                "verdict": verdict2, "numbers": {"gap_largest": gap_large, "gap_few_shot": gap_small,
                                                 "near_largest": near_full, "near_few_shot": near_few}})

    ranges = _row(design["ranges"], task="all")
    noise = 2 * math.sqrt(0.5 / design["setup"]["n_test"])
    out.append({"id": "3a", "claim": "the design of the prompt directly affects performance",
                "measurement": f"frozen model, mean over tasks: best minus worst of 3 paraphrases of the "
                               f"instruction {ranges['frozen_range_paraphrases'] * 100:.1f} points (test noise at "
                               f"most {noise * 100:.1f}); of all 5 wordings {ranges['frozen_range'] * 100:.1f}",
                "verdict": "holds" if ranges["frozen_range_paraphrases"] > noise else "does not hold",
                "numbers": {"frozen_range_paraphrases": ranges["frozen_range_paraphrases"],
                            "frozen_range": ranges["frozen_range"], "noise": noise}})

    before, after = {"mean": ranges["frozen_range"], "std": 0.0}, ranges["tuned_range"]
    removed = after["mean"] <= 2 * ranges["seed_std"]
    verdict3b = ("holds: the wordings differ no more than seeds do" if removed else
                 "holds in part: reduced, not removed" if beyond_noise(before, after) else "does not hold")
    out.append({"id": "3b", "claim": "(the question it raises) tuning removes the sensitivity to the wording",
                "measurement": f"best minus worst of 5 wordings, mean over tasks: "
                               f"{ranges['frozen_range'] * 100:.1f} points frozen, {after['mean'] * 100:.1f} ± "
                               f"{after['std'] * 100:.1f} after tuning from each "
                               f"({design['setup']['design_size']} examples; seed std of one wording "
                               f"{ranges['seed_std'] * 100:.1f})",
                "verdict": verdict3b, "numbers": {"before": before["mean"], "after": after,
                                                  "seed_std": ranges["seed_std"]}})

    rows = {m: _row(shift["rows"], task="all", method=m) for m in ("prompt-label", "finetune")}
    kept = {m: spread(_mean_over_tasks({t: retained(_row(shift["rows"], task=t, method=m))["values"]
                                        for t in tasks})) for m in rows}
    out.append({"id": "4", "claim": "more robust than model tuning under domain shift (Lester et al. §5)",
                "measurement": f"share of in-domain accuracy kept on the shifted domain, mean over tasks: prompt "
                               f"tuning {_pm(kept['prompt-label'])}, fine-tuning {_pm(kept['finetune'])} (drop: "
                               f"{rows['prompt-label']['drop']['mean'] * 100:.1f} and "
                               f"{rows['finetune']['drop']['mean'] * 100:.1f} points, from in-domain "
                               f"{rows['prompt-label']['in_domain']['mean']:.1%} and "
                               f"{rows['finetune']['in_domain']['mean']:.1%})",
                "verdict": compare(kept["prompt-label"], kept["finetune"], "holds", "does not hold"),
                "numbers": {"retained": kept, "drop": {m: r["drop"] for m, r in rows.items()},
                            "in_domain": {m: r["in_domain"] for m, r in rows.items()}}})
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


# ---- the figure --------------------------------------------------------------------------------------------


def plot_seed_claims(files: dict, path=None):
    """Top row: the few-shot curves, one panel per task and one for the mean over tasks (mean ± std over
    seeds; dashed: the written instruction on the frozen model). Bottom row: prompt design (frozen vs tuned,
    per wording), domain shift (in-domain vs shifted per method), compute (time per step and trainable numbers).
    files: the contents of seed-{fewshot,design,shift}.json by part (what run_seed_claims returns)."""
    from .plots import _grouped_bars, _pyplot

    plt = _pyplot()
    fewshot, design, shift = files["fewshot"], files["design"], files["shift"]
    tasks = [*fewshot["setup"]["tasks"], "all"]
    ncols = max(len(tasks), 3)
    fig, axes = plt.subplots(2, ncols, figsize=(4.2 * ncols, 8.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        _plot_curve(ax, fewshot, task)
    for ax in axes[0][len(tasks):]:
        ax.axis("off")
    ax_design, ax_shift, ax_compute, *rest = axes[1]
    for ax in rest:
        ax.axis("off")

    design_rows = [{"task": r["wording"], "kind": kind, **(r["tuned"] if kind == "after tuning" else
                                                             {"mean": r["frozen"], "std": 0.0})}
                   for r in _all_task_design_rows(design) for kind in ("frozen", "after tuning")]
    _grouped_bars(ax_design, design_rows, "kind", [r["wording"] for r in _all_task_design_rows(design)])
    ax_design.set_ylim(0, 1.0)
    ax_design.tick_params(axis="x", labelrotation=25, labelsize=8)
    ax_design.set(ylabel="test exact match (mean over tasks)",
                  title=f"prompt design: 5 wordings, frozen vs tuned\n({design['setup']['design_size']} examples)")

    shift_rows = [{"task": METHODS[r["method"]].label.replace("prompt tuning, ", "PT, "), "kind": kind,
                   **r[key]} for r in shift["rows"] if r["task"] == "all"
                  for kind, key in (("in-domain", "in_domain"), ("shifted", "shifted"))]
    _grouped_bars(ax_shift, shift_rows, "kind", list(dict.fromkeys(r["task"] for r in shift_rows)))
    ax_shift.set_ylim(0, 1.0)
    ax_shift.set(ylabel="test exact match (mean over tasks)",
                 title=f"domain shift (Lester et al. Table 1)\n({shift['setup']['shift_size']} examples)")

    per_task = fewshot["compute"]["per_task"]
    kinds = ["prompt", "finetune"]
    ms = [1000 * statistics.fmean(c[k]["seconds_per_step"] for c in per_task.values()) for k in kinds]
    trainable = [next(iter(per_task.values()))[k]["trainable"] for k in kinds]
    bars = ax_compute.bar(["prompt tuning", "full fine-tuning"], ms, color=["C1", "C2"])
    for bar, n in zip(bars, trainable):
        ax_compute.annotate(f"{n:,} trainable", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=8)
    ax_compute.set(ylabel="ms per training step (median)", title="compute per step")
    fig.tight_layout()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    return fig


def _plot_curve(ax, fewshot: dict, task: str) -> None:
    for j, method in enumerate(fewshot["setup"]["methods"]):
        rows = [r for r in fewshot["rows"] if r["task"] == task and r["method"] == method]
        ax.errorbar([r["n_train"] for r in rows], [r["mean"] for r in rows], [r["std"] for r in rows],
                    marker="o", capsize=3, color=f"C{j}", label=METHODS[method].label)
    frozen = _row(fewshot["instruction"], task=task)["test"]
    ax.axhline(frozen, color="grey", ls="--", label=METHODS["instruction"].label)
    sizes = fewshot["setup"]["sizes"]
    ax.set_xscale("log")
    ax.set_xticks(sizes, [str(n) for n in sizes])
    ax.minorticks_off()
    ax.set(xlabel="training examples", ylabel="test exact match", ylim=(-0.02, 1.02),
           title=f"few-shot: {task if task != 'all' else 'mean over tasks'}")
    if task == "all":
        ax.legend(fontsize=7, loc="lower right")


def _all_task_design_rows(design: dict) -> list[dict]:
    """Per wording, the frozen and tuned accuracies averaged over tasks (the tuned ones per seed)."""
    tasks = design["setup"]["tasks"]
    out = []
    for wording in WORDINGS[tasks[0]]:
        rows = [_row(design["rows"], task=t, wording=wording) for t in tasks]
        out.append({"wording": wording, "frozen": statistics.fmean(r["frozen"] for r in rows),
                    "tuned": spread(_mean_over_tasks({r["task"]: r["tuned"]["values"] for r in rows}))})
    return out
