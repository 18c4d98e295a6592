"""Tests that each kill planted bugs that mutation testing (`make mutate MODULE=minipt/apps/recipes.py`) found in
minipt/apps/recipes.py: which data task_data draws, the labels and token counts each init starts from, what
tuned_module builds for each method, what tune_prompt and finetune hand to the training loop (config, batches,
evaluation, run identity, checkpoint), and a data-parallel run in-process, torch.distributed's all_reduce
replaced by a recorder (one rank alone: a sum over ranks is the tensor itself). Models are tiny and random and
runs take a step or two: the whole file runs in seconds."""

import hashlib
import json
import re
from types import SimpleNamespace

import pytest
import torch

import minipt.distributed as D
from helpers import random_gpt
from minipt import PromptTuning
from minipt.apps import recipes
from minipt.checkpoint import CheckpointError, load_train_state
from minipt.data import batch_fn, exact_match_accuracy, token_frequencies
from minipt.distributed import DistInfo, sharded_accuracy
from minipt.prefix import PrefixTuning
from minipt.tasks import Example, get_task, make_split
from minipt.tokenizer import ByteTokenizer
from minipt.train import TrainConfig, TrainResult

tok = ByteTokenizer()
CFG = dict(n_layer=1, n_head=2, n_embd=16, vocab_size=tok.vocab_size, block_size=64)
DATA = (make_split("parity", "train", 12, seed=0), make_split("parity", "val", 4, seed=0))


def model(seed=0):
    return random_gpt(CFG, seed=seed, std=0.5)


def quick(**kw) -> TrainConfig:
    """One step, one evaluation, no progress bar."""
    return TrainConfig(**{**dict(steps=1, batch_size=4, lr=0.05, warmup_steps=0, eval_every=1, progress=False), **kw})


def refused(error, message):
    return pytest.raises(error, match=f"^{re.escape(message)}$")


def same_batch(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


class OtherTokenizer:
    """A tokenizer that is not the byte tokenizer (it encodes as one): its init counts come from the data."""

    def __init__(self):
        self._byte = ByteTokenizer()

    def __getattr__(self, name):
        return getattr(self._byte, name)


@pytest.fixture
def trained(monkeypatch):
    """Every call of the training loop from recipes, recorded, then run for real."""
    calls = []
    real = recipes.train

    def spy(module, get_batch, cfg, **kwargs):
        calls.append(SimpleNamespace(module=module, get_batch=get_batch, cfg=cfg, **kwargs))
        return real(module, get_batch, cfg, **kwargs)

    monkeypatch.setattr(recipes, "train", spy)
    return calls


@pytest.fixture
def not_trained(monkeypatch):
    """Every call of the training loop from recipes, recorded and not run (for the 300-step default configs)."""
    calls = []

    def fake(module, get_batch, cfg, **kwargs):
        calls.append(SimpleNamespace(module=module, get_batch=get_batch, cfg=cfg, **kwargs))
        return TrainResult()

    monkeypatch.setattr(recipes, "train", fake)
    return calls


# ---- task_data ---------------------------------------------------------------------------------------------------


def test_task_data_draws_train_val_and_test_of_the_task_with_the_seed():
    got = recipes.task_data("parity", 5, 3, 2, seed=4)
    assert got == tuple(make_split("parity", split, n, seed=4) for split, n in (("train", 5), ("val", 3), ("test", 2)))
    assert got[0] != make_split("parity", "train", 5, seed=0)  # the seed matters


def test_task_data_defaults_to_2000_200_and_500_examples_from_seed_zero(monkeypatch):
    drawn = []
    monkeypatch.setattr(recipes, "make_split", lambda *args, **kwargs: drawn.append((args, kwargs)) or [])
    assert recipes.task_data("parity") == ([], [], [])
    assert drawn == [
        (("parity", "train", 2000), {"seed": 0}),
        (("parity", "val", 200), {"seed": 0}),
        (("parity", "test", 500), {"seed": 0}),
    ]


# ---- the labels of init="label" ----------------------------------------------------------------------------------


def test_a_built_in_classification_task_gives_its_own_labels_in_its_order():
    assert recipes._class_labels("sentiment", [Example("sentiment", "x", "other")]) == ("positive", "negative")


def test_a_built_in_generation_task_has_no_labels_to_start_from():
    with refused(ValueError, "init='label' needs a classification task; 'reverse' has no class labels"):
        recipes._class_labels("reverse", DATA[0])


def test_own_data_gives_its_distinct_answers_sorted_up_to_twenty():
    data = [Example("own", str(i), f"label{i:02d}") for i in reversed(range(20))] * 2
    assert recipes._class_labels(None, data) == tuple(f"label{i:02d}" for i in range(20))
    with refused(ValueError, "--init label needs classification data (at most 20 distinct outputs); the data has 21"):
        recipes._class_labels(None, data + [Example("own", "x", "label20")])


def label_prompt(m, labels, n_prompt, seed=0):
    """The prompt init="label" should start from: the labels, then the pretraining corpus's frequent tokens."""
    counts = recipes.pretraining_token_counts()
    return PromptTuning(m, n_prompt, "label", tokenizer=tok, labels=labels, token_counts=counts, seed=seed).prompt


def test_label_init_on_own_data_starts_from_its_answers_then_frequent_tokens(not_trained):
    m = model()
    data = ([Example("own", "a", "odd"), Example("own", "b", "even")], DATA[1])
    pt, _ = recipes.tune_prompt(m, None, n_prompt=4, init="label", cfg=quick(seed=2), data=data)
    assert torch.equal(pt.prompt, label_prompt(m, ("even", "odd"), 4, seed=2))
    for i, label in enumerate(("even", "odd")):  # the first rows: the mean embedding of each label's bytes
        expected = m.transformer.wte.weight[torch.tensor(tok.encode(label))].mean(dim=0)
        torch.testing.assert_close(pt.prompt[i].detach(), expected.detach())


def test_label_init_on_a_built_in_task_takes_the_tasks_labels_not_the_datas(not_trained):
    m = model()
    odd_only = [ex for ex in DATA[0] if ex.answer == "odd"]
    pt, _ = recipes.tune_prompt(m, "parity", n_prompt=3, init="label", cfg=quick(), data=(odd_only, DATA[1]))
    assert torch.equal(pt.prompt, label_prompt(m, get_task("parity").labels, 3))


def test_label_init_on_a_generation_task_is_refused_by_tune_prompt():
    with refused(ValueError, "init='label' needs a classification task; 'reverse' has no class labels"):
        recipes.tune_prompt(model(), "reverse", init="label", cfg=quick(), data=DATA)


# ---- the token counts of init="vocab" ----------------------------------------------------------------------------


ONE = [Example("own", "ab", "c")]  # a, b, <|sep|>, c, <|eos|>: five distinct tokens, each once


def test_the_byte_tokenizer_counts_the_pretraining_corpus():
    assert recipes._init_token_counts(tok, ONE, 5) is recipes.pretraining_token_counts()


def test_another_tokenizer_counts_the_data_when_it_has_enough_distinct_tokens():
    other = OtherTokenizer()
    counts = recipes._init_token_counts(other, ONE, 5)  # exactly enough
    assert torch.equal(counts, token_frequencies(ONE, other)) and int(counts.sum()) == 5
    assert recipes._init_token_counts(other, ONE, 6) is None  # too few: the whole vocabulary


def test_vocab_init_with_another_tokenizer_starts_from_the_datas_tokens(not_trained):
    m, other = model(), OtherTokenizer()
    data = (ONE, ONE)
    pt, _ = recipes.tune_prompt(m, None, n_prompt=5, cfg=quick(), data=data, tokenizer=other)
    expected = PromptTuning(m, 5, "vocab", tokenizer=other, token_counts=token_frequencies(ONE, other)).prompt
    assert torch.equal(pt.prompt, expected)
    wte = m.transformer.wte.weight
    rows = {tuple(wte[i].tolist()) for i in tok.encode("abc") + [tok.sep_id, tok.eos_id]}
    assert {tuple(r.tolist()) for r in pt.prompt} == rows  # the five tokens of the data, each once
    pt, _ = recipes.tune_prompt(m, None, n_prompt=6, cfg=quick(), data=data, tokenizer=other)
    assert torch.equal(pt.prompt, PromptTuning(m, 6, "vocab", tokenizer=other).prompt)  # too few: any token


def test_vocab_init_with_the_byte_tokenizer_samples_the_pretraining_corpuss_frequent_tokens(not_trained):
    m = model()
    pt, _ = recipes.tune_prompt(m, "parity", n_prompt=6, init="vocab", cfg=quick(seed=3), data=DATA)
    counts = recipes.pretraining_token_counts()
    assert torch.equal(pt.prompt, PromptTuning(m, 6, "vocab", tokenizer=tok, token_counts=counts, seed=3).prompt)
    assert not torch.equal(pt.prompt, PromptTuning(m, 6, "vocab", tokenizer=tok, seed=3).prompt)


def test_an_init_that_reads_no_counts_does_not_count_the_corpus(not_trained):
    recipes.pretraining_token_counts.cache_clear()
    recipes.tune_prompt(model(), "parity", n_prompt=3, init="uniform", cfg=quick(), data=DATA)
    assert recipes.pretraining_token_counts.cache_info().currsize == 0


# ---- tuned_module ------------------------------------------------------------------------------------------------


def test_a_soft_prompt_gets_its_length_init_seed_and_tokenizer():
    m = model()
    pt = recipes.tuned_module("prompt", m, 3, "uniform", 5, tok)
    assert type(pt) is PromptTuning and pt.model is m and pt.n_prompt == 3 and pt.init == "uniform"
    assert pt.reparam is None and torch.equal(pt.prompt, PromptTuning(m, 3, "uniform", seed=5).prompt)
    assert not torch.equal(pt.prompt, PromptTuning(m, 3, "uniform", seed=0).prompt)
    pt = recipes.tuned_module("prompt", m, 3, "text", 5, tok, init_text="odd")  # needs the tokenizer
    assert torch.equal(pt.prompt, m.transformer.wte.weight[torch.tensor(tok.encode("odd"))].detach())


def test_p_tuning_is_a_soft_prompt_through_an_mlp():
    m = model()
    pt = recipes.tuned_module("ptuning", m, 3, "uniform", 5, tok)
    assert type(pt) is PromptTuning and pt.reparam == "mlp"
    expected = PromptTuning(m, 3, "uniform", seed=5, reparam="mlp")
    assert torch.equal(pt.prompt_embeddings(), expected.prompt_embeddings())


@pytest.mark.parametrize("method, reparam", [("ptuning-v2", None), ("prefix", "mlp")])
def test_a_prefix_gets_its_length_reparam_init_and_seed(method, reparam):
    m = model()
    pf = recipes.tuned_module(method, m, 3, "normal", 5, tok)
    expected = PrefixTuning(m, n_prefix=3, reparam=reparam, init="normal", seed=5, special_ids=tok.special_ids)
    assert type(pf) is PrefixTuning and pf.model is m
    assert (pf.n_prefix, pf.reparam, pf.init) == (3, reparam, "normal")
    assert torch.equal(pf.prefix_embeddings(), expected.prefix_embeddings())
    other_seed = PrefixTuning(m, 3, reparam, init="normal", special_ids=tok.special_ids)
    assert not torch.equal(pf.prefix_embeddings(), other_seed.prefix_embeddings())


def test_a_prefix_never_starts_from_the_tokenizers_special_tokens():
    m = random_gpt({**CFG, "vocab_size": 40}, std=0.5)
    specials = SimpleNamespace(special_ids=frozenset(range(4, 40)))  # leaves 0, 1, 2, 3
    pf = recipes.tuned_module("ptuning-v2", m, 4, "vocab", 5, specials)
    assert sorted(pf.init_ids.tolist()) == [0, 1, 2, 3]
    pf = recipes.tuned_module("ptuning-v2", m, 4, "vocab", 5, None)  # no tokenizer: no special tokens
    assert torch.equal(pf.init_ids, PrefixTuning(m, 4, init="vocab", seed=5).init_ids)


def test_a_soft_prompt_init_is_refused_for_a_prefix_by_name():
    with refused(ValueError, "--init uniform is for soft prompts; --method ptuning-v2 starts from vocab or normal"):
        recipes.tuned_module("ptuning-v2", model(), 3, "uniform", 0, tok)


# ---- tune_prompt: its defaults and options -----------------------------------------------------------------------


def test_tune_prompt_defaults_to_twenty_vocab_tokens_auto_backend_no_recompute(not_trained):
    pt, _ = recipes.tune_prompt(model(), "parity", cfg=quick(), data=DATA)
    assert (pt.n_prompt, pt.init, pt.backend, pt.recompute) == (20, "vocab", "auto", False)


def test_tune_prompt_passes_its_prompt_options_on(not_trained):
    m = model()
    pt, _ = recipes.tune_prompt(
        m, "parity", 3, "text", quick(), data=DATA, init_text="odd", backend="reference", recompute=True
    )
    assert (pt.n_prompt, pt.init, pt.backend, pt.recompute) == (3, "text", "reference", True)
    assert torch.equal(pt.prompt, m.transformer.wte.weight[torch.tensor(tok.encode("odd"))].detach())


@pytest.mark.parametrize("method", recipes.METHODS)
def test_each_method_defaults_to_its_own_config(not_trained, method):
    pt, _ = recipes.tune_prompt(model(), "parity", n_prompt=3, data=DATA, method=method)
    (call,) = not_trained
    assert call.cfg == recipes.METHOD_DEFAULTS[method] and call.module is pt
    assert type(pt) is (PromptTuning if method in ("prompt", "ptuning") else PrefixTuning)


def test_an_unknown_method_is_refused_by_name():
    with refused(ValueError, "method must be one of ('prompt', 'ptuning', 'ptuning-v2', 'prefix'), got 'lora'"):
        recipes.tune_prompt(model(), "parity", method="lora")


def test_tune_prompt_moves_the_model_and_the_batches_to_the_ranks_device(monkeypatch, trained):
    m = model()
    moved, made, scored = [], [], []
    real_to, real_batch_fn, real_accuracy = m.to, recipes.batch_fn, recipes.exact_match_accuracy
    monkeypatch.setattr(m, "to", lambda device: moved.append(device) or real_to(device), raising=False)
    monkeypatch.setattr(recipes, "batch_fn", lambda *a, **kw: made.append(kw["device"]) or real_batch_fn(*a, **kw))
    monkeypatch.setattr(
        recipes, "exact_match_accuracy", lambda *a, **kw: scored.append(kw["device"]) or real_accuracy(*a, **kw)
    )
    recipes.tune_prompt(m, "parity", 3, "uniform", quick(), data=DATA, info=DistInfo(device="cpu:0"))
    assert moved == made == scored == ["cpu:0"]


# ---- tune_prompt: what it trains on ------------------------------------------------------------------------------


def test_tune_prompt_trains_on_the_tasks_data_from_the_configs_seed_without_instruction(trained):
    cfg = quick(seed=3)
    pt, result = recipes.tune_prompt(model(), "parity", 3, "uniform", cfg)
    (call,) = trained
    train_ex, val_ex, _ = recipes.task_data("parity", seed=3)
    assert same_batch(call.get_batch(0), batch_fn(train_ex, tok, 4, seed=3, instruction=False)(0))
    assert not same_batch(call.get_batch(0), batch_fn(train_ex, tok, 4, seed=0, instruction=False)(0))
    assert not same_batch(call.get_batch(0), batch_fn(train_ex, tok, 4, seed=3, instruction=True)(0))
    assert result.evals == [(1, exact_match_accuracy(pt, val_ex, tok))] and len(val_ex) == 200


def test_tune_prompt_trains_on_the_data_it_is_given_and_scores_its_val(trained):
    pt, result = recipes.tune_prompt(model(), "parity", 3, "uniform", quick(seed=2), data=DATA)
    (call,) = trained
    assert same_batch(call.get_batch(0), batch_fn(DATA[0], tok, 4, seed=2)(0))
    assert result.evals == [(1, exact_match_accuracy(pt, DATA[1], tok))] and result.best_step == 1


# ---- tune_prompt: the run's identity, checkpoint and resume ------------------------------------------------------


def sha(examples) -> str:
    lines = b"".join(json.dumps([ex.task, ex.input, ex.answer]).encode() for ex in examples)
    return hashlib.sha256(lines).hexdigest()[:16]


def run_fields(path) -> dict:
    run = load_train_state(path)["run"]
    return {k: v for k, v in run.items() if not k.startswith("config.") and k != "trainable"}


def test_the_checkpoint_names_the_run(tmp_path):
    m = model()
    path = tmp_path / "state.pt"
    recipes.tune_prompt(
        m, "parity", 3, "text", quick(), data=DATA, init_text="odd", method="ptuning", checkpoint_path=path
    )
    assert run_fields(path) == {
        "recipe": "tune_prompt",
        "task": "parity",
        "data_sha256": sha(DATA[0]),
        "base_fingerprint": m.fingerprint(),
        "n_prompt": 3,
        "init": "text",
        "init_text": "odd",
        "world_size": 1,
        "method": "ptuning",
    }


def test_the_run_id_defaults_to_the_prompt_method():
    run = recipes._tune_run_id(model(), "parity", DATA[0], 3, "uniform", None, 1)
    assert run["method"] == "prompt" and run["data_sha256"] == sha(DATA[0]) and len(run["data_sha256"]) == 16


def test_without_resume_a_checkpoint_of_another_run_is_overwritten(tmp_path):
    path = tmp_path / "state.pt"
    recipes.tune_prompt(model(), "parity", 3, "uniform", quick(), data=DATA, checkpoint_path=path)
    other = (DATA[0][:6], DATA[1])
    _, result = recipes.tune_prompt(model(), "parity", 3, "uniform", quick(), data=other, checkpoint_path=path)
    assert len(result.losses) == 1 and run_fields(path)["data_sha256"] == sha(other[0])
    with pytest.raises(CheckpointError, match="another run: data_sha256 is "):
        recipes.tune_prompt(model(), "parity", 3, "uniform", quick(), data=DATA, checkpoint_path=path, resume=True)


# ---- tune_prompt on W processes (in-process: all_reduce recorded) -------------------------------------------------


@pytest.fixture
def reduced(monkeypatch):
    """torch.distributed's all_reduce, recorded; one rank alone leaves the tensor as it is."""
    seen = []
    monkeypatch.setattr(D.dist, "all_reduce", lambda t: seen.append(t.clone()))
    return seen


def tune_rank(rank, path, progress=False):
    info = DistInfo(rank=rank, world_size=2)
    cfg = quick(progress=progress, steps=2, eval_every=2)
    return recipes.tune_prompt(model(), "parity", 3, "uniform", cfg, data=DATA, info=info, checkpoint_path=path)


@pytest.mark.parametrize("rank", [0, 1])
def test_a_rank_trains_its_shard_scores_its_share_of_val_and_only_rank_0_writes(
    tmp_path, trained, reduced, capsys, rank
):
    path = tmp_path / "state.pt"
    pt, result = tune_rank(rank, path)
    (call,) = trained
    assert type(call.module) is D.DataParallelPrompt and call.module.pt is pt and call.module.rank == rank
    assert call.module.world_size == 2 and call.write_checkpoint == (rank == 0) and call.cfg.progress is False
    assert len(result.losses) == 2 and result.evals == [(2, sharded_accuracy(pt, DATA[1], tok, call_info(rank)))]
    assert path.exists() == (rank == 0) and capsys.readouterr().err == ""
    if rank == 0:
        assert run_fields(path)["world_size"] == 2
    n_reduced = len(reduced)
    assert n_reduced > 0  # the loss, the gradient and the val count were summed over ranks
    pt.loss(*call.get_batch(0)).backward()
    assert len(reduced) == n_reduced  # the hooks were removed when training ended


def call_info(rank):
    return DistInfo(rank=rank, world_size=2)


def test_only_rank_0_shows_progress(tmp_path, reduced, capsys):
    tune_rank(1, tmp_path / "one.pt", progress=True)
    assert capsys.readouterr().err == ""
    tune_rank(0, tmp_path / "zero.pt", progress=True)
    assert "train" in capsys.readouterr().err


def test_an_indivisible_batch_is_refused_before_any_training(trained, reduced):
    with refused(ValueError, "batch size 3 must be divisible by the number of processes 2"):
        recipes.tune_prompt(model(), "parity", 3, "uniform", quick(batch_size=3), data=DATA, info=call_info(1))
    assert trained == [] and reduced == []


# ---- finetune ----------------------------------------------------------------------------------------------------


def test_finetune_trains_on_the_data_it_is_given_without_instruction(trained):
    m = model()
    tuned, result = recipes.finetune(m, "parity", cfg=quick(seed=3), data=(*DATA, []))
    (call,) = trained
    assert call.module is tuned and tuned is not m
    assert same_batch(call.get_batch(0), batch_fn(DATA[0], tok, 4, seed=3, instruction=False)(0))
    assert not same_batch(call.get_batch(0), batch_fn(DATA[0], tok, 4, seed=0)(0))
    assert not same_batch(call.get_batch(0), batch_fn(DATA[0], tok, 4, seed=3, instruction=True)(0))
    assert result.evals == [(1, exact_match_accuracy(tuned, DATA[1], tok))]


def test_finetune_defaults_to_the_tasks_data_from_the_configs_seed(trained):
    tuned, result = recipes.finetune(model(), "parity", cfg=quick(seed=3))
    (call,) = trained
    train_ex, val_ex, _ = recipes.task_data("parity", seed=3)
    assert same_batch(call.get_batch(0), batch_fn(train_ex, tok, 4, seed=3)(0))
    assert result.evals == [(1, exact_match_accuracy(tuned, val_ex, tok))]
