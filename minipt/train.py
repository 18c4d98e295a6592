"""One training loop for pretraining, prompt tuning and full fine-tuning.

The mode is whatever is trainable: a GPT trains all its weights; a PromptTuning trains only its prompt
(the base model is frozen, so its parameters never reach the optimizer).

    for step in range(steps):
        idx, targets = get_batch(step)            # a pure function of the step: resuming replays the same data
        loss = module.loss(idx, targets)          # stop with an error if it is NaN or inf
        loss.backward(); clip; optimizer.step()   # AdamW (default) or Adafactor (Lester et al.), lr warmup+cosine
        every eval_every steps: metric = evaluate(); keep the best trainable tensors; write a checkpoint

Checkpoints hold the trainable tensors, the optimizer state, the step and the best-so-far, and are written
atomically, so an interrupted run resumes (`resume=True`) to the same final result as an uninterrupted one.

Nothing non-finite is kept: a NaN/inf loss or gradient norm stops training before the optimizer step, and the
trainable tensors are checked after every step (read back with the loss, so no extra host sync), so a
checkpoint of NaN or inf values is never written.

A checkpoint knows its run (`run_identity`): the caller's `run_id` (task or data hash, base fingerprint,
n_prompt, init), the training config and the trainable tensors' names and shapes. Resume refuses a mismatch
and names the field. `steps` is part of the identity: the learning-rate schedule (warmup, then cosine decay to
the last step) depends on it, so resuming with other steps would give a run that equals no uninterrupted one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .checkpoint import check_same_run, load_train_state, save_train_state
from .frozen import trainable_parameters

__all__ = [
    "TrainConfig",
    "TrainResult",
    "train",
    "lr_at",
    "make_optimizer",
    "optimizer_state_bytes",
    "run_identity",
    "NOT_RUN_IDENTITY",
]


@dataclass
class TrainConfig:
    steps: int = 300
    batch_size: int = 32
    lr: float = 3e-3
    optimizer: str = "adamw"  # "adamw" | "adafactor"
    weight_decay: float = 0.0
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1  # cosine decay from lr to lr * min_lr_ratio
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    eval_every: int = 100  # steps between evaluations (and checkpoints)
    seed: int = 0
    progress: bool = True  # show a tqdm bar

    def __post_init__(self):
        """Check every field before any work, with a message that names it (minipt.checks rule 1)."""
        for name in ("steps", "batch_size", "eval_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be an integer >= 1, got {value!r}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"TrainConfig.warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"TrainConfig.lr must be a finite number > 0, got {self.lr!r}")
        for name in ("weight_decay", "grad_clip"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"TrainConfig.{name} must be a finite number >= 0, got {value!r}")
        if not (isinstance(self.min_lr_ratio, (int, float)) and 0 <= self.min_lr_ratio <= 1):
            raise ValueError(f"TrainConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if self.optimizer not in ("adamw", "adafactor"):
            raise ValueError(f"TrainConfig.optimizer must be 'adamw' or 'adafactor', got {self.optimizer!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise ValueError(f"TrainConfig.seed must be an integer in [0, 2**32), got {self.seed!r}")


# Fields that may differ between a run and its resumption (they do not change what is computed).
NOT_RUN_IDENTITY = ("progress",)


def run_identity(cfg: TrainConfig, named, run_id: dict | None = None) -> dict:
    """What identifies a run, for a checkpoint to be resumed only by the same run (see the module docstring)."""
    config = {k: v for k, v in asdict(cfg).items() if k not in NOT_RUN_IDENTITY}
    shapes = {name: list(p.shape) for name, p in named}
    return {**(run_id or {}), **{f"config.{k}": v for k, v in config.items()}, "trainable": shapes}


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)  # one per step
    evals: list[tuple[int, float]] = field(default_factory=list)  # (step, metric)
    best_metric: float | None = None
    best_step: int | None = None
    seconds: float = 0.0


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup for warmup_steps, then cosine decay to lr * min_lr_ratio at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def make_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adafactor":  # Lester et al. use Adafactor; torch has it from 2.5 on
        if not hasattr(torch.optim, "Adafactor"):
            raise RuntimeError(f"optimizer='adafactor' needs torch >= 2.5 (this is {torch.__version__})")
        return torch.optim.Adafactor(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"optimizer must be 'adamw' or 'adafactor', got {cfg.optimizer!r}")


def optimizer_state_bytes(module: nn.Module, batch: tuple, cfg: TrainConfig) -> int:
    """Bytes cfg's optimizer keeps after one step of `module.loss(*batch)` (AdamW: two moments per trainable
    number, and a step count); the step changes module's trainable tensors."""
    optimizer = make_optimizer([p for _, p in trainable_parameters(module)], cfg)
    module.loss(*batch).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    state = optimizer.state.values()
    return sum(t.numel() * t.element_size() for s in state for t in s.values() if torch.is_tensor(t))


def train(
    module: nn.Module,
    get_batch: Callable[[int], tuple],
    cfg: TrainConfig,
    evaluate: Callable[[], float] | None = None,
    checkpoint_path=None,
    resume: bool = False,
    callbacks: list[Callable[[int, float], None]] = (),
    run_id: dict | None = None,
    write_checkpoint: bool = True,
) -> TrainResult:
    """Train the parameters of `module` that require grad; see the module docstring.

    get_batch(step) -> (idx, targets) or (idx, targets, attention_mask); module.loss(*batch) -> the loss
    (GPT.loss, PromptTuning.loss, or any module with such a method).
    evaluate() -> a metric where higher is better (e.g. validation accuracy); the best state is restored at
    the end. callbacks are called as cb(step, loss) after each step. run_id: what else identifies the run
    (JSON-like values), stored in the checkpoint and compared on resume. write_checkpoint=False: read the
    checkpoint on resume but never write it (the ranks other than 0 of a data-parallel run).
    """
    named = trainable_parameters(module)
    if not named:
        raise ValueError("module has no parameter that requires grad: nothing to train")
    params = [p for _, p in named]
    optimizer = make_optimizer(params, cfg)
    result = TrainResult()
    best_state: dict[str, torch.Tensor] | None = None
    start = 0
    identity = run_identity(cfg, named, run_id)
    last_checkpoint = None  # the checkpoint file that holds this run's last good state, once there is one
    if resume and checkpoint_path is not None and Path(checkpoint_path).exists():
        state = load_train_state(checkpoint_path)
        check_same_run(state.get("run", {}), identity, checkpoint_path)
        last_checkpoint = checkpoint_path
        with torch.no_grad():
            for name, p in named:
                p.copy_(state["trainable"][name])
        optimizer.load_state_dict(state["optimizer"])
        start = state["step"]
        result = TrainResult(**state["result"])
        best_state = state["best"]
        if "rng" in state:  # dropout draws from these: restore them so the resumed steps draw the same masks
            torch.set_rng_state(state["rng"])
            if "cuda_rng" in state and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["cuda_rng"])

    t0 = time.perf_counter() - result.seconds
    module.train()
    bar = tqdm(
        range(start, cfg.steps), initial=start, total=cfg.steps, disable=not cfg.progress, desc="train", leave=False
    )
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        batch = get_batch(step)
        loss = module.loss(*batch)
        if not torch.isfinite(loss):
            _stop(f"loss is {loss.item()}", step, last_checkpoint)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # Clip to grad_clip; with grad_clip 0 the norm is still checked (max_norm inf scales by exactly 1), so
        # an inf/NaN gradient never reaches the optimizer and a checkpoint of NaN weights is never written.
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        if not torch.isfinite(norm):
            _stop(f"gradient norm is {norm.item()}", step, last_checkpoint)
        optimizer.step()
        # The loss and "every trainable tensor is finite after the step", in one host read.
        loss_value, params_finite = torch.stack([loss.detach().float(), _all_finite(params)]).tolist()
        if not params_finite:
            _stop(
                "a trainable tensor became NaN or inf after the optimizer step (learning rate too large?)",
                step,
                last_checkpoint,
            )
        result.losses.append(loss_value)
        bar.set_postfix(loss=f"{loss_value:.4f}")
        done = step + 1
        at_eval = done % cfg.eval_every == 0 or done == cfg.steps  # evaluate and checkpoint together
        if evaluate is not None and at_eval:
            module.eval()  # no dropout while scoring
            metric = float(evaluate())
            module.train()
            result.evals.append((done, metric))
            if result.best_metric is None or metric > result.best_metric:
                result.best_metric, result.best_step = metric, done
                best_state = {name: p.detach().clone() for name, p in named}
        if checkpoint_path is not None and at_eval and write_checkpoint:
            result.seconds = time.perf_counter() - t0
            save_train_state(
                checkpoint_path,
                {
                    "step": done,
                    "trainable": {name: p.detach().clone() for name, p in named},
                    "optimizer": optimizer.state_dict(),
                    "result": asdict(result),
                    "best": best_state,
                    "config": asdict(cfg),
                    "run": identity,
                    "rng": torch.get_rng_state(),
                    **({"cuda_rng": torch.cuda.get_rng_state_all()} if torch.cuda.is_available() else {}),
                },
            )
        if checkpoint_path is not None and at_eval:
            last_checkpoint = checkpoint_path
        for cb in callbacks:
            cb(step, loss_value)
    bar.close()
    if best_state is not None:  # keep-best: end on the parameters that scored best on validation
        with torch.no_grad():
            for name, p in named:
                p.copy_(best_state[name])
    module.eval()
    result.seconds = time.perf_counter() - t0
    return result


def _all_finite(params) -> torch.Tensor:
    """A 0-d float tensor: 1.0 if every element of every tensor is finite, else 0.0 (no host read)."""
    return torch.stack([torch.isfinite(p.detach()).all() for p in params]).all().float()


def _stop(what: str, step: int, last_checkpoint) -> None:
    kept = (
        f"; the last good checkpoint ({last_checkpoint}) is kept" if last_checkpoint else "; no checkpoint was written"
    )
    raise FloatingPointError(f"{what} at step {step}: training stopped{kept}")
