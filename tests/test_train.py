"""Tests for minipt.train and minipt.recipes: frozen means frozen, keep-best, NaN stops, exact resume, the
learning-rate schedule, full fine-tuning, Adafactor, and a pretraining run whose loss falls."""

import importlib
import math
import os

import pytest
import torch
import torch.nn as nn

from helpers import random_gpt
from minipt import GPT, GPTConfig, PromptTuning
from minipt.apps import recipes
from minipt.checkpoint import load_train_state
from minipt.data import batch_fn
from minipt.frozen import snapshot
from minipt.tokenizer import ByteTokenizer
from minipt.train import TrainConfig, lr_at, optimizer_state_bytes, train

# `minipt.train` is also the name of the re-exported function, so fetch the module itself
train_mod = importlib.import_module("minipt.train")
tok = ByteTokenizer()
SMALL = dict(n_layer=2, n_head=2, n_embd=32, vocab_size=260, block_size=64)
DATA = recipes.task_data("reverse", n_train=200, n_val=16, n_test=8)


def small_model(seed=0, std=None, **overrides) -> GPT:
    """A small GPT (see helpers.random_gpt for `std`)."""
    return random_gpt({**SMALL, **overrides}, seed=seed, std=std)


def quick(**kw) -> TrainConfig:
    """A few steps, small batches, no progress bar."""
    return TrainConfig(**{**dict(steps=6, batch_size=8, lr=0.1, warmup_steps=2, eval_every=3, progress=False), **kw})


@pytest.fixture
def optimizers(monkeypatch):
    """Every optimizer that `train` builds, with the parameters it was handed (cloned at that moment)."""
    made = []
    real = train_mod.make_optimizer

    def spy(params, cfg):
        opt = real(params, cfg)
        made.append((opt, [p.detach().clone() for p in params]))
        return opt

    monkeypatch.setattr(train_mod, "make_optimizer", spy)
    return made


def held_by(opt) -> list[torch.Tensor]:
    return [p for group in opt.param_groups for p in group["params"]]


def assert_unchanged(model, before):
    after = snapshot(model)
    assert after.keys() == before.keys()
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), f"{name} changed"


# --- frozen means frozen -----------------------------------------------------------------------------


def test_prompt_tuning_leaves_every_base_tensor_untouched(optimizers):
    model = small_model()
    before = snapshot(model)
    pt, result = recipes.tune_prompt(
        model, "reverse", n_prompt=8, init="vocab", cfg=quick(), data=DATA, backend="reference"
    )
    assert pt.model is model and len(result.losses) == 6
    # 1. every base tensor is bit-identical to before
    assert_unchanged(model, before)
    # 2. no base parameter has a gradient, while the prompt got one
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    assert pt.prompt.grad is not None
    # 3. the optimizer holds the prompt and nothing else, and has state for it alone
    ((opt, handed),) = optimizers
    assert len(held_by(opt)) == 1 and held_by(opt)[0] is pt.prompt
    assert list(opt.state.keys()) == [pt.prompt]
    assert not torch.equal(pt.prompt.detach(), handed[0])  # and the prompt did train


def test_training_a_gpt_trains_every_weight(optimizers):
    model = small_model()
    get_batch = batch_fn(DATA[0], tok, 8, instruction=True)
    train(model, get_batch, quick(lr=1e-3))
    ((opt, _),) = optimizers
    assert len(held_by(opt)) == len(list(model.parameters()))  # the tied head counted once
    assert {id(p) for p in held_by(opt)} == {id(p) for p in model.parameters()}


def test_nothing_to_train():
    model = small_model()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="nothing to train"):
        train(model, lambda step: None, quick())


# --- keep-best ---------------------------------------------------------------------------------------


def fixed_batch_pt(seed=0, n_prompt=4):
    """A PromptTuning on a small model and one fixed batch to train it on."""
    pt = PromptTuning(small_model(seed, std=0.3), n_prompt=n_prompt, init="uniform", backend="reference")
    g = torch.Generator().manual_seed(seed)
    idx, targets = torch.randint(256, (4, 8), generator=g), torch.randint(256, (4, 8), generator=g)
    return pt, lambda step: (idx, targets)


def test_keep_best_restores_the_best_scoring_parameters():
    pt, get_batch = fixed_batch_pt()
    scripted = iter([0.2, 0.9, 0.4, 0.9, 0.5])  # the best (0.9) comes at step 4; a tie later does not win
    seen = []

    def evaluate():
        seen.append(pt.prompt.detach().clone())
        return next(scripted)

    result = train(pt, get_batch, quick(steps=10, eval_every=2, lr=0.05), evaluate=evaluate)
    assert result.evals == [(2, 0.2), (4, 0.9), (6, 0.4), (8, 0.9), (10, 0.5)]
    assert (result.best_metric, result.best_step) == (0.9, 4)
    assert torch.equal(pt.prompt.detach(), seen[1])
    assert not torch.equal(seen[1], seen[-1])  # the last parameters were really different


def test_without_evaluate_the_last_parameters_are_kept():
    pt, get_batch = fixed_batch_pt()
    last = []
    train(pt, get_batch, quick(steps=5), callbacks=[lambda step, loss: last.append(pt.prompt.detach().clone())])
    assert torch.equal(pt.prompt.detach(), last[-1])


# --- NaN / inf stops training ------------------------------------------------------------------------


class Quadratic(nn.Module):
    """loss = |w - 1|^2; the batch is the step number, and at `bad_step` the loss (or its gradient) breaks."""

    def __init__(self, bad_step=None, bad="nan"):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(4))
        self.bad_step, self.bad = bad_step, bad

    def loss(self, step):
        loss = ((self.w - torch.arange(4.0)) ** 2).sum()
        if step == self.bad_step:
            if self.bad == "grad":  # a finite loss (sqrt(0) = 0) whose gradient is inf
                loss = loss + torch.sqrt(self.w - self.w.detach()).sum()
            else:
                loss = loss * float(self.bad)
        return loss


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, bad):
    path = tmp_path / "state.pt"
    module = Quadratic(bad_step=5, bad=bad)
    after_step = {}
    cfg = quick(steps=10, eval_every=2, lr=0.1, warmup_steps=0)
    with pytest.raises(FloatingPointError, match=rf"loss is {bad} at step 5.*last good checkpoint \({path}\)"):
        train(
            module,
            lambda step: (step,),
            cfg,
            checkpoint_path=path,
            callbacks=[lambda step, loss: after_step.setdefault(step, module.w.detach().clone())],
        )
    state = load_train_state(path)  # intact and loadable: the one written after step index 3 (4 steps done)
    assert state["step"] == 4
    assert torch.equal(state["trainable"]["w"], after_step[3])
    assert len(state["result"]["losses"]) == 4 and all(math.isfinite(x) for x in state["result"]["losses"])
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]

    # the checkpoint is good: resuming from it with the problem gone ends where a clean run ends
    resumed = Quadratic()
    train(resumed, lambda step: (step,), cfg, checkpoint_path=path, resume=True)
    clean = Quadratic()
    train(clean, lambda step: (step,), cfg)
    assert torch.equal(resumed.w, clean.w)


@pytest.mark.parametrize("grad_clip", [1.0, 0.0])  # 0: no clipping, but the gradient is still checked
def test_non_finite_gradient_stops_training(tmp_path, grad_clip):
    module = Quadratic(bad_step=3, bad="grad")
    path = tmp_path / "state.pt"
    with pytest.raises(FloatingPointError, match="gradient norm is (inf|nan) at step 3"):
        train(
            module,
            lambda step: (step,),
            quick(steps=6, eval_every=2, warmup_steps=0, grad_clip=grad_clip),
            checkpoint_path=path,
        )
    assert torch.isfinite(module.w).all()  # the broken step was not applied
    assert load_train_state(path)["step"] == 2  # nor written to a checkpoint


def test_no_clipping_changes_nothing_for_finite_gradients():
    results = []
    for grad_clip in (0.0, 1e9):  # off, and a limit never reached
        module = Quadratic()
        train(module, lambda step: (step,), quick(steps=5, warmup_steps=0, grad_clip=grad_clip))
        results.append(module.w.detach().clone())
    assert torch.equal(*results)


# --- resume ------------------------------------------------------------------------------------------


class Interrupt(Exception):
    pass


def resumable_run(tmp_path, interrupt_after=None, resume=False, prompt_seed=0, dropout=0.0):
    """Prompt tuning with real batches, validation loss as the (negated) metric, checkpoints every 2 steps."""
    model = small_model(seed=0, dropout=dropout)
    pt = PromptTuning(model, n_prompt=6, init="uniform", seed=prompt_seed, backend="reference")
    get_batch = batch_fn(DATA[0], tok, batch_size=8, seed=3)
    val_idx, val_targets, val_mask = batch_fn(DATA[1], tok, batch_size=16, seed=4)(0)

    @torch.no_grad()
    def evaluate():
        pt.eval()  # train() puts it back in training mode
        return -pt(val_idx, val_targets, val_mask)[1].item()

    def stop(step, loss):
        if step == interrupt_after:
            raise Interrupt

    cfg = quick(steps=8, eval_every=2, lr=0.1, warmup_steps=2, seed=0)
    torch.manual_seed(123)  # the global RNG (dropout) as a fresh process would leave it
    result = train(
        pt, get_batch, cfg, evaluate=evaluate, checkpoint_path=tmp_path / "state.pt", resume=resume, callbacks=[stop]
    )
    return pt, result


@pytest.mark.parametrize("dropout", [0.0, 0.1])  # with dropout, the RNG state must be resumed too
def test_resume_gives_the_same_final_prompt_as_an_uninterrupted_run(tmp_path, dropout):
    straight, straight_result = resumable_run(tmp_path / "a", dropout=dropout)

    with pytest.raises(Interrupt):
        resumable_run(tmp_path / "b", interrupt_after=3, dropout=dropout)  # after the checkpoint of step 4
    assert load_train_state(tmp_path / "b" / "state.pt")["step"] == 4
    # a fresh process would build the module again; another init proves the prompt comes from the file
    resumed, resumed_result = resumable_run(tmp_path / "b", resume=True, prompt_seed=1, dropout=dropout)

    assert torch.equal(resumed.prompt, straight.prompt)
    assert resumed_result.losses == straight_result.losses
    assert resumed_result.evals == straight_result.evals
    assert resumed_result.best_step == straight_result.best_step
    assert len(straight_result.losses) == 8


def test_resume_from_a_checkpoint_of_another_module(tmp_path):
    path = tmp_path / "state.pt"
    train(Quadratic(), lambda step: (step,), quick(steps=2, eval_every=2), checkpoint_path=path)
    pt, get_batch = fixed_batch_pt()
    with pytest.raises(
        ValueError, match=r"another run: .*trainable is \{'w': \[4\]\} there, \{'prompt': \[\d+, \d+\]\}"
    ):
        train(pt, get_batch, quick(steps=2, eval_every=2), checkpoint_path=path, resume=True)


# --- learning-rate schedule --------------------------------------------------------------------------


def test_lr_schedule_warmup_then_cosine_to_min_ratio():
    cfg = TrainConfig(steps=25, lr=2.0, warmup_steps=5, min_lr_ratio=0.1)
    lrs = [lr_at(step, cfg) for step in range(26)]
    assert lrs[:5] == pytest.approx([0.4, 0.8, 1.2, 1.6, 2.0])  # linear warmup
    assert lrs[5] == pytest.approx(2.0)  # the peak
    assert all(a > b for a, b in zip(lrs[5:], lrs[6:]))  # then strictly down
    assert lrs[15] == pytest.approx(0.2 + 1.8 * 0.5)  # half way: the cosine's midpoint
    assert lrs[25] == pytest.approx(0.2)  # lr * min_lr_ratio at the end
    assert min(lrs) >= 0.2 - 1e-12
    assert lr_at(100, cfg) == pytest.approx(0.2)  # and it stays there


def test_train_applies_the_schedule(optimizers):
    pt, get_batch = fixed_batch_pt()
    cfg = quick(steps=12, warmup_steps=3, lr=0.3, min_lr_ratio=0.2)
    used = []
    train(pt, get_batch, cfg, callbacks=[lambda step, loss: used.append(optimizers[0][0].param_groups[0]["lr"])])
    assert used == [lr_at(step, cfg) for step in range(12)]


# --- full fine-tuning, optimizers --------------------------------------------------------------------


def test_finetune_leaves_the_original_model_untouched():
    model = small_model()
    PromptTuning(model, n_prompt=4, init="uniform", backend="reference")  # as in the demo: the base is frozen
    before = snapshot(model)
    tuned, result = recipes.finetune(model, "reverse", cfg=quick(lr=1e-2), data=DATA)
    assert tuned is not model and len(result.losses) == 6
    assert_unchanged(model, before)
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in tuned.parameters())
    assert tuned.lm_head.weight is tuned.transformer.wte.weight  # still tied in the copy
    changed = [k for k, v in snapshot(tuned).items() if not torch.equal(v, before[k])]
    assert len(changed) == len(before)  # every weight of the copy trained


def test_adafactor_option():
    pt, get_batch = fixed_batch_pt()
    cfg = quick(steps=15, optimizer="adafactor", lr=0.3, warmup_steps=1)
    if hasattr(torch.optim, "Adafactor"):
        assert isinstance(train_mod.make_optimizer([pt.prompt], cfg), torch.optim.Adafactor)
        result = train(pt, get_batch, cfg)
        assert result.losses[-1] < result.losses[0] - 0.1
    else:
        with pytest.raises(RuntimeError, match="optimizer='adafactor' needs torch >= 2.5"):
            train(pt, get_batch, cfg)
    with pytest.raises(ValueError, match="optimizer must be 'adamw' or 'adafactor'"):
        train(pt, get_batch, quick(optimizer="sgd"))


def test_adamw_prompt_tuning_loss_falls():
    pt, get_batch = fixed_batch_pt()
    result = train(pt, get_batch, quick(steps=15, lr=0.1, warmup_steps=1))
    assert result.losses[-1] < result.losses[0] - 0.1
    assert not pt.training  # train() hands the module back in eval mode


# --- the shipped base model is re-derivable ------------------------------------------------------------


def test_pretrain_recipe_loss_falls():
    cfg = TrainConfig(steps=40, batch_size=16, lr=3e-3, eval_every=40, progress=False)
    model, result = recipes.pretrain("nano", cfg, n_examples=2000)
    assert model.config == GPTConfig.preset("nano", vocab_size=260)
    assert len(result.losses) == 40 and len(result.evals) == 1
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert first > math.log(260) - 0.5  # starts near chance: a uniform guess over 260 tokens
    assert last < first - 1.5, (first, last)


def test_optimizer_state_bytes_counts_what_adamw_keeps_for_the_trainable_numbers_only():
    model = random_gpt(dict(n_layer=1, n_head=2, n_embd=16, vocab_size=40, block_size=32))
    pt = PromptTuning(model, n_prompt=3, init="uniform")
    idx, targets = torch.randint(40, (2, 5)), torch.randint(40, (2, 5))
    before = pt.prompt.detach().clone()
    # exp_avg and exp_avg_sq (float32) per prompt number, and the step count (one float32)
    assert optimizer_state_bytes(pt, (idx, targets), TrainConfig(lr=0.1)) == 2 * 4 * 3 * 16 + 4
    assert not torch.equal(pt.prompt, before)  # it took the step
