"""The three ways minipt trains a model, each a few lines over `minipt.train.train`:

    pretrain(preset)          a base model from scratch on the task mixture, with written instructions
    tune_prompt(model, task)  a soft prompt on the frozen base model, for one task without its instruction
    finetune(model, task)     every weight of a copy of the base model, same data: the comparison point

`tune_prompt` is the one tuning function: `minipt tune` (one process or torchrun), the demo and the experiments
all call it. It owns the initialisation policy (which labels and token counts each init starts from).
Defaults are the ones the demo and the shipped base model use; the CLI exposes them as flags.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
from dataclasses import replace

import torch

from ..data import batch_fn, exact_match_accuracy, token_frequencies
from ..distributed import DataParallelPrompt, DistInfo, shard_rows, sharded_accuracy
from ..model import GPT, GPTConfig
from ..prefix import PREFIX_INITS, PrefixTuning
from ..prompt import PromptTuning
from ..tasks import HELD_OUT_TASK, TASKS, get_task, make_split, pretraining_mixture
from ..tokenizer import ByteTokenizer
from ..train import TrainConfig, TrainResult, train
from ..tuned import method_class

__all__ = [
    "PRETRAIN_DEFAULTS",
    "PRETRAIN_EXAMPLES",
    "TUNE_DEFAULTS",
    "FINETUNE_DEFAULTS",
    "METHODS",
    "METHOD_DEFAULTS",
    "MAX_LABELS",
    "pretrain",
    "pretraining_token_counts",
    "task_data",
    "tuned_module",
    "tune_prompt",
    "finetune",
]

# The shipped base model (minipt/assets/tiny.safetensors) is `minipt pretrain` with these settings.
PRETRAIN_DEFAULTS = TrainConfig(
    steps=3000, batch_size=64, lr=3e-3, weight_decay=0.1, warmup_steps=100, eval_every=250, seed=0
)
PRETRAIN_EXAMPLES = 60_000
# Prompt tuning takes a much larger learning rate than model tuning (Lester et al. use 0.3 with Adafactor).
TUNE_DEFAULTS = TrainConfig(steps=300, batch_size=32, lr=0.1, warmup_steps=20, eval_every=50, seed=0)
FINETUNE_DEFAULTS = TrainConfig(steps=300, batch_size=32, lr=1e-3, warmup_steps=20, eval_every=50, seed=0)
# Each method's defaults. Adam's step is about lr in parameter units: a prompt and a bare prefix live on the scale
# of the embeddings and keys, so they take a large rate; through an MLP every step moves many weights at once, so
# the rate is 10x smaller. The rates are the best of {0.003, 0.01, 0.03, 0.1} (prefix, P-tuning: of {3e-4 ..
# 1e-2}) in 150-step runs on `sentiment` with the shipped tiny model.
METHODS = (*PromptTuning.methods, *PrefixTuning.methods)  # "prompt", "ptuning", "ptuning-v2", "prefix"
METHOD_DEFAULTS = {
    "prompt": TUNE_DEFAULTS,
    "ptuning": replace(TUNE_DEFAULTS, lr=1e-2),
    "ptuning-v2": replace(TUNE_DEFAULTS, lr=1e-1),
    "prefix": replace(TUNE_DEFAULTS, lr=1e-2),
}
MAX_LABELS = 20  # init="label" on your own data: more distinct outputs than this is not a classification data set


def pretrain(
    preset: str = "tiny",
    cfg: TrainConfig = PRETRAIN_DEFAULTS,
    n_examples: int = PRETRAIN_EXAMPLES,
    checkpoint_path=None,
    resume: bool = False,
) -> tuple[GPT, TrainResult]:
    """A base model trained from scratch on every task but the held-out one, instructions included."""
    torch.manual_seed(cfg.seed)
    tok = ByteTokenizer()
    model = GPT(GPTConfig.preset(preset, vocab_size=tok.vocab_size))
    data = pretraining_mixture(n_examples, seed=cfg.seed)
    val = [ex for name in TASKS if name != HELD_OUT_TASK for ex in make_split(name, "val", 64, seed=cfg.seed)]
    get_batch = batch_fn(data, tok, cfg.batch_size, seed=cfg.seed, instruction=True)
    result = train(
        model,
        get_batch,
        cfg,
        evaluate=lambda: exact_match_accuracy(model, val, tok, instruction=True),
        checkpoint_path=checkpoint_path,
        resume=resume,
        run_id={"recipe": "pretrain", "preset": preset, "n_examples": n_examples},
    )
    return model, result


@functools.lru_cache(maxsize=1)
def pretraining_token_counts() -> torch.Tensor:
    """Token frequencies of the pretraining corpus, for the sampled-vocabulary init (Lester et al. 2.1)."""
    return token_frequencies(pretraining_mixture(5000, seed=0), ByteTokenizer())


def task_data(task: str, n_train: int = 2000, n_val: int = 200, n_test: int = 500, seed: int = 0):
    """Train, val and test examples of one task (disjoint inputs)."""
    return (
        make_split(task, "train", n_train, seed=seed),
        make_split(task, "val", n_val, seed=seed),
        make_split(task, "test", n_test, seed=seed),
    )


def _class_labels(task: str | None, train_ex) -> tuple[str, ...]:
    """The class labels for init="label": a built-in task's own, else the distinct answers of the data."""
    if task in TASKS:
        labels = get_task(task).labels
        if not labels:
            raise ValueError(f"init='label' needs a classification task; {task!r} has no class labels")
        return labels
    labels = tuple(sorted({ex.answer for ex in train_ex}))
    if len(labels) > MAX_LABELS:
        raise ValueError(
            f"--init label needs classification data (at most {MAX_LABELS} distinct outputs); "
            f"the data has {len(labels)}"
        )
    return labels


def _init_token_counts(tokenizer, train_ex, n_prompt: int):
    """Token counts for init="vocab"/"label" (Lester et al.'s most frequent tokens): the pretraining corpus's for
    the byte tokenizer, else this data's; None (the whole vocabulary) when too few distinct tokens occur."""
    if isinstance(tokenizer, ByteTokenizer):
        return pretraining_token_counts()
    counts = token_frequencies(train_ex, tokenizer)
    return counts if int((counts > 0).sum()) >= n_prompt else None


def _examples_sha256(examples) -> str:
    """16 hex digits that identify a list of examples (task, input, answer), in order."""
    digest = hashlib.sha256()
    for ex in examples:
        digest.update(json.dumps([ex.task, ex.input, ex.answer]).encode())
    return digest.hexdigest()[:16]


def _tune_run_id(
    model: GPT, task, train_ex, n_prompt: int, init: str, init_text, world_size: int, method: str = "prompt"
) -> dict:
    """What identifies a prompt-tuning run besides its TrainConfig (stored in, and checked on, resume)."""
    return {
        "recipe": "tune_prompt",
        "task": task,
        "data_sha256": _examples_sha256(train_ex),
        "base_fingerprint": model.fingerprint(),
        "n_prompt": n_prompt,
        "init": init,
        "init_text": init_text,
        "world_size": world_size,
        "method": method,
    }


def tuned_module(method: str, model: GPT, n_prompt: int, init: str, seed: int, tokenizer, **prompt_kwargs):
    """The module a method trains on the frozen model: a soft prompt (through an MLP for P-tuning) or a deep
    key/value prefix at every layer (P-tuning v2; through an MLP for Li & Liang's prefix tuning)."""
    cls, reparam = method_class(method)  # the classes say which methods they are (minipt.tuned)
    if cls is PromptTuning:
        return PromptTuning(
            model, n_prompt=n_prompt, init=init, tokenizer=tokenizer, seed=seed, reparam=reparam, **prompt_kwargs
        )
    if init not in PREFIX_INITS:
        raise ValueError(
            f"--init {init} is for soft prompts; --method {method} starts from {' or '.join(PREFIX_INITS)}"
        )
    return PrefixTuning(
        model,
        n_prefix=n_prompt,
        reparam=reparam,
        init=init,
        seed=seed,
        special_ids=getattr(tokenizer, "special_ids", ()),
    )


def tune_prompt(
    model: GPT,
    task: str | None = None,
    n_prompt: int = 20,
    init: str = "vocab",
    cfg: TrainConfig | None = None,
    *,
    data=None,
    tokenizer=None,
    init_text: str | None = None,
    info: DistInfo = DistInfo(),
    backend: str = "auto",
    recompute: bool = False,
    method: str = "prompt",
    checkpoint_path=None,
    resume: bool = False,
) -> tuple[PromptTuning | PrefixTuning, TrainResult]:
    """A soft prompt (or a deep prompt: `method`) on the frozen `model`, trained without any instruction, on one
    process or W (`info`).

    method: "prompt" (Lester et al.), "ptuning" (the prompt through an MLP), "ptuning-v2" (a key/value prefix at
    every layer), "prefix" (that prefix through an MLP); n_prompt is the prompt's or the prefix's length, cfg
    defaults to the method's METHOD_DEFAULTS. data: (train, val, ...) examples, default the built-in `task`'s
    splits. tokenizer: default ByteTokenizer.
    With W processes (info from `minipt.distributed.init_from_env`) the prompt equals the one-process prompt
    with the same global batch, up to float rounding.
    """
    tok = tokenizer or ByteTokenizer()
    cfg = cfg or METHOD_DEFAULTS.get(method, TUNE_DEFAULTS)
    train_ex, val_ex = (data if data is not None else task_data(task, seed=cfg.seed))[:2]
    model = model.to(info.device)
    options = {}  # a soft prompt's init and kernel options; a prefix takes none of them
    if method_class(method)[0] is PromptTuning:
        labels = _class_labels(task, train_ex) if init == "label" else None
        counts = _init_token_counts(tok, train_ex, n_prompt) if init in ("vocab", "label") else None
        options = dict(init_text=init_text, token_counts=counts, backend=backend, labels=labels, recompute=recompute)
    pt = tuned_module(method, model, n_prompt, init, cfg.seed, tok, **options)
    get_batch = batch_fn(train_ex, tok, cfg.batch_size, seed=cfg.seed, instruction=False, device=info.device)
    resuming = dict(
        checkpoint_path=checkpoint_path,
        resume=resume,
        run_id=_tune_run_id(model, task, train_ex, n_prompt, init, init_text, info.world_size, method),
    )
    if info.world_size == 1:
        result = train(
            pt, get_batch, cfg, **resuming, evaluate=lambda: exact_match_accuracy(pt, val_ex, tok, device=info.device)
        )
        return pt, result
    shard_rows(cfg.batch_size, info.rank, info.world_size)  # fail early on an indivisible batch
    module = DataParallelPrompt(pt, info.rank, info.world_size)
    try:  # every rank reads the checkpoint on resume; only rank 0 writes it
        result = train(
            module,
            get_batch,
            replace(cfg, progress=cfg.progress and info.is_main),
            **resuming,
            write_checkpoint=info.is_main,
            evaluate=lambda: sharded_accuracy(pt, val_ex, tok, info),
        )
    finally:
        module.close()
    return pt, result


def finetune(model: GPT, task: str, cfg: TrainConfig = FINETUNE_DEFAULTS, data=None) -> tuple[GPT, TrainResult]:
    """Full fine-tuning of a copy of `model` on the same data (the base model itself is left untouched)."""
    tok = ByteTokenizer()
    train_ex, val_ex, _ = data if data is not None else task_data(task, seed=cfg.seed)
    tuned = copy.deepcopy(model)
    for p in tuned.parameters():
        p.requires_grad_(True)
    get_batch = batch_fn(train_ex, tok, cfg.batch_size, seed=cfg.seed, instruction=False)
    result = train(tuned, get_batch, cfg, evaluate=lambda: exact_match_accuracy(tuned, val_ex, tok))
    return tuned, result
