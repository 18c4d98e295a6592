"""Tests that each kill planted bugs that mutation testing (`make mutate MODULE=minipt/prefix.py`) found in
minipt/prefix.py: every test here fails on a bug tests/test_prefix.py let through. The arguments and their
messages, what the seed fixes, where the parameters live, the checks of forward and loss, and what a file or a
PEFT folder carries. Models are tiny and random, as in tests/test_prefix.py: the whole file runs in seconds."""

import json
import re

import pytest
import torch

from helpers import count_host_syncs, random_gpt
from minipt import PromptTuning
from minipt.checkpoint import CheckpointError, load_tensors, save_tensors
from minipt.peft_io import read_peft
from minipt.prefix import PrefixTuning
from minipt.tuned import base_identity

CFG = dict(n_layer=2, n_head=2, n_embd=16, vocab_size=40, block_size=32)
WIDTH = CFG["n_layer"] * 2 * CFG["n_embd"]  # one row of the prefix


def model(seed=0, **config):
    return random_gpt({**CFG, **config}, seed=seed, std=0.5)


def ids(B, n, seed=0):
    return torch.randint(CFG["vocab_size"], (B, n), generator=torch.Generator().manual_seed(seed))


def refused(error, message):
    return pytest.raises(error, match=f"^{re.escape(message)}$")


# ---- the arguments ---------------------------------------------------------------------------------------------


def test_the_defaults_are_ten_positions_from_seed_zero():
    m = model()
    pf = PrefixTuning(m)
    assert pf.n_prefix == 10 and pf.prefix.shape == (10, WIDTH)
    assert torch.equal(pf.prefix, PrefixTuning(m, n_prefix=10, seed=0).prefix)
    assert not torch.equal(pf.prefix, PrefixTuning(m, n_prefix=10, seed=1).prefix)  # the seed matters


def test_a_model_that_is_not_a_minipt_gpt_is_named_by_its_type():
    with refused(TypeError, "model must be a minipt GPT, got Linear"):
        PrefixTuning(torch.nn.Linear(2, 2))


def test_a_hidden_width_of_one_is_allowed():
    pf = PrefixTuning(model(), n_prefix=2, reparam="mlp", hidden=1)
    assert pf.mlp[0].weight.shape == (1, CFG["n_embd"]) and pf.prefix_embeddings().shape == (2, WIDTH)


@pytest.mark.parametrize(
    "prefix, message",
    [
        (
            torch.zeros(3, WIDTH + 1),
            f"prefix must have shape (n_prefix, n_layer * 2 * n_embd) = (3, {WIDTH}), got (3, 65)",
        ),
        (torch.zeros(3), "prefix must be a 2-D tensor (n_prefix, n_layer * 2 * n_embd), got (3,)"),
        (torch.zeros(3, WIDTH, 1), "prefix must be a 2-D tensor (n_prefix, n_layer * 2 * n_embd), got (3, 64, 1)"),
        ([[0.0] * WIDTH], "prefix must be a 2-D tensor (n_prefix, n_layer * 2 * n_embd), got list"),
    ],
)
def test_a_prefix_of_the_wrong_shape_or_type_is_refused_by_from_tensor(prefix, message):
    with refused(ValueError, message):
        PrefixTuning.from_tensor(model(), prefix)


def test_from_tensor_passes_its_options_on():
    pf = PrefixTuning.from_tensor(model(), torch.ones(2, WIDTH), init="normal")
    assert pf.init == "normal" and torch.equal(pf.prefix, torch.ones(2, WIDTH))


# ---- what the seed fixes ---------------------------------------------------------------------------------------


def test_normal_init_is_a_standard_normal_draw_from_the_seed_alone():
    m = model()
    torch.manual_seed(123)  # the global RNG plays no part
    pf = PrefixTuning(m, n_prefix=3, init="normal", seed=7)
    expected = torch.randn(3, WIDTH, generator=torch.Generator().manual_seed(7))
    assert torch.equal(pf.prefix, expected)
    assert not hasattr(pf, "init_ids")  # no tokens were run


@pytest.mark.parametrize("reparam", [None, "mlp"])
@pytest.mark.parametrize("init", ["vocab", "normal"])
def test_the_same_seed_gives_the_same_start_whatever_the_global_rng(reparam, init):
    m = model()
    made = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        made.append(PrefixTuning(m, n_prefix=4, reparam=reparam, init=init, seed=3))
    a, b = made
    if init == "vocab":
        assert torch.equal(a.init_ids, b.init_ids)
    if reparam == "mlp":
        assert torch.equal(a.table, b.table)
        assert all(torch.equal(p, q) for p, q in zip(a.mlp.parameters(), b.mlp.parameters()))
    torch.testing.assert_close(a.prefix_embeddings(), b.prefix_embeddings(), rtol=0, atol=0)


@pytest.mark.parametrize("reparam", [None, "mlp"])
def test_building_a_prefix_runs_no_dropout_and_leaves_the_global_rng_alone(reparam):
    """init="vocab" starts from the keys and values the model makes for its tokens: those of the model in eval
    mode, even when it has dropout and is in train mode; the model is left in the mode it was in."""
    m = model(dropout=0.5).train()
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    pf = PrefixTuning(m, n_prefix=4, reparam=reparam, init="vocab", seed=3)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert m.training
    if reparam is None:
        m.eval()
        torch.testing.assert_close(pf.prefix, PrefixTuning(m, n_prefix=4, seed=3).prefix, rtol=0, atol=0)
        assert not m.training


def test_vocab_init_never_starts_from_a_special_token():
    special = list(range(35))  # 5 ordinary tokens left for 5 positions: every one of them is taken
    for reparam in (None, "mlp"):
        pf = PrefixTuning(model(), n_prefix=5, reparam=reparam, special_ids=special)
        if reparam is None:
            assert sorted(pf.init_ids.tolist()) == [35, 36, 37, 38, 39]
        else:  # the MLP's table: the embeddings of those five tokens, in some order
            wte = pf.model.transformer.wte.weight
            rows = {tuple(r.tolist()) for r in pf.table}
            assert rows == {tuple(wte[i].tolist()) for i in range(35, 40)}


def test_too_few_tokens_for_vocab_init_names_n_prefix():
    with refused(ValueError, "only 5 candidate tokens for init='vocab', need n_prefix=6"):
        PrefixTuning(model(), n_prefix=6, special_ids=range(35))


# ---- where the parameters live --------------------------------------------------------------------------------


@pytest.mark.parametrize("init", ["vocab", "normal"])
def test_the_trained_tensors_live_on_the_models_device(init):
    """A model on the meta device (shapes only) stands in for a GPU: every new tensor must follow the model."""
    m = model().to("meta")
    pf = PrefixTuning(m, n_prefix=3, init=init)
    assert pf.prefix.device.type == "meta"
    if init == "vocab":
        assert pf.init_ids.device.type == "meta"
    mlp = PrefixTuning(m, n_prefix=3, init=init, reparam="mlp")
    assert {p.device.type for p in mlp.parameters() if p.requires_grad} == {"meta"}


# ---- forward and loss check their inputs ----------------------------------------------------------------------


@pytest.mark.parametrize("how", ["forward", "loss"])
def test_forward_and_loss_check_the_targets_and_the_mask(how):
    pf = PrefixTuning(model(), n_prefix=2)
    idx, targets, mask = ids(2, 5), ids(2, 5, seed=1), torch.ones(2, 5, dtype=torch.long)
    call = (lambda t, m: pf(idx, t, m)) if how == "forward" else (lambda t, m: pf.loss(idx, t, m))
    with refused(ValueError, "targets holds token id 99, outside [0, vocab_size=40) (use -100 where no loss is taken)"):
        call(torch.full((2, 5), 99), mask)
    with refused(ValueError, "attention_mask must have the shape of idx (2, 5), got (2, 4)"):
        call(targets, mask[:, :4])


@pytest.mark.parametrize("how", ["forward", "loss"])
def test_a_masked_position_takes_no_loss(how):
    """The mask's zeros count as targets of -100: the loss is the one of the rows' real tokens alone."""
    pf = PrefixTuning(model().double(), n_prefix=2).double()
    idx, targets = ids(2, 6), ids(2, 6, seed=1)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, 4:] = 0
    ignored = targets.clone()
    ignored[0, 4:] = -100
    loss = (lambda t, m: pf(idx, t, m)[1]) if how == "forward" else (lambda t, m: pf.loss(idx, t, m))
    torch.testing.assert_close(loss(targets, mask), loss(ignored, None), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(loss(targets, None), loss(ignored, None))  # the masked targets would count


def test_the_loss_reads_the_device_once():
    """The count of supervised positions comes from the batch check; the loss does not read it a second time."""
    pf = PrefixTuning(model(), n_prefix=2)
    idx, targets = ids(2, 5), ids(2, 5, seed=1)
    with count_host_syncs() as syncs:
        pf.loss(idx, targets)
    assert syncs.total == 1, syncs.by_op


# ---- files ------------------------------------------------------------------------------------------------------


def test_a_file_carries_its_length_reparam_init_and_extra_metadata(tmp_path):
    m = model()
    pf = PrefixTuning(m, n_prefix=3, reparam="mlp", init="normal", hidden=4)
    pf.save(tmp_path / "p.safetensors", extra_metadata={"note": "hello"})
    _, meta = load_tensors(tmp_path / "p.safetensors", kind="prefix")
    assert (meta["n_prefix"], meta["reparam"], meta["init"], meta["note"]) == ("3", "mlp", "normal", "hello")
    assert PrefixTuning.load(m, tmp_path / "p.safetensors").init == "normal"
    PrefixTuning(m, n_prefix=2).save(tmp_path / "v2.safetensors")
    assert load_tensors(tmp_path / "v2.safetensors", kind="prefix")[1]["reparam"] == "None"


def test_a_file_without_an_init_loads_as_vocab(tmp_path):
    m = model()
    save_tensors(tmp_path / "p.safetensors", {"prefix": torch.ones(2, WIDTH)}, kind="prefix", metadata=base_identity(m))
    back = PrefixTuning.load(m, tmp_path / "p.safetensors")
    assert back.init == "vocab" and torch.equal(back.prefix, torch.ones(2, WIDTH))


def test_load_refuses_a_file_of_another_kind_by_name(tmp_path):
    m = model()
    path = tmp_path / "prompt.safetensors"
    PromptTuning(m, n_prompt=2, init="uniform").save(path)
    with refused(CheckpointError, f"{path} holds 'prompt', expected a minipt 'prefix' file"):
        PrefixTuning.load(m, path)


@pytest.mark.parametrize(
    "tensors, got",
    [
        ({"other": torch.ones(2, WIDTH)}, "nothing"),
        ({"prefix": torch.ones(2, 8)}, "(2, 8)"),
        ({"prefix": torch.ones(2, WIDTH, 1)}, f"(2, {WIDTH}, 1)"),
    ],
)
def test_load_says_what_the_file_holds_instead_of_a_prefix(tmp_path, tensors, got):
    m = model()
    path = tmp_path / "p.safetensors"
    save_tensors(path, tensors, kind="prefix", metadata=base_identity(m))
    message = (
        f"{path}: expected a prefix (n_prefix, n_layer * 2 * n_embd = {WIDTH}), got {got}; "
        "it was made for another model"
    )
    with refused(CheckpointError, message):
        PrefixTuning.load(m, path)


def test_load_names_the_file_of_a_nan_prefix_and_of_another_base_model(tmp_path):
    m = model()
    path = tmp_path / "p.safetensors"
    save_tensors(path, {"prefix": torch.full((2, WIDTH), float("nan"))}, kind="prefix", metadata=base_identity(m))
    with refused(CheckpointError, f"{path}: the tensor 'prefix' holds NaN or inf"):
        PrefixTuning.load(m, path)
    PrefixTuning(m, n_prefix=2).save(path)
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(path))}: the prefix was made for another base model"):
        PrefixTuning.load(model(seed=1), path)


# ---- PEFT folders -----------------------------------------------------------------------------------------------


def test_the_adapter_config_has_every_key_of_peft_prefix_tuning_config(tmp_path):
    peft = pytest.importorskip("peft")
    theirs = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3).to_dict()
    pf = PrefixTuning(model(), n_prefix=3)
    ours = pf.peft_config("my/base")
    assert set(ours) == set(theirs)
    assert ours["base_model_name_or_path"] == "my/base"
    for key in ("encoder_hidden_size", "init_weights", "prefix_projection"):  # prefix_projection False, not None
        assert ours[key] is theirs[key]
    pf.save_peft(tmp_path / "a", base_model_name_or_path="my/base")
    written = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert written["base_model_name_or_path"] == "my/base" and written["prefix_projection"] is False


def test_a_peft_folder_carries_the_base_identity_and_extra_metadata(tmp_path):
    m = model()
    PrefixTuning(m, n_prefix=2).save_peft(tmp_path / "a", extra_metadata={"note": "hello"})
    meta = read_peft(tmp_path / "a", "PREFIX_TUNING")[1]["minipt"]
    assert meta["note"] == "hello" and meta["base_fingerprint"] == base_identity(m)["base_fingerprint"]
    message = f"{tmp_path / 'a'}: the prefix was made for another base model"
    with pytest.raises(CheckpointError, match=f"^{re.escape(message)}"):
        PrefixTuning.from_peft(model(seed=1), tmp_path / "a")
