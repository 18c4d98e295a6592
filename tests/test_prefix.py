"""Deep prompts (minipt.prefix): a trainable key/value prefix at every layer of a frozen GPT, and P-tuning."""

import json
import os

import pytest
import torch

from helpers import random_gpt
from minipt import GPT, PromptTuning
from minipt.checkpoint import CheckpointError
from minipt.frozen import snapshot, trainable_parameters
from minipt.loss import lm_loss
from minipt.model import KVCache
from minipt.prefix import PrefixTuning, from_peft_layout, to_peft_layout
from minipt.train import TrainConfig, train

CFG = dict(n_layer=2, n_head=2, n_embd=16, vocab_size=40, block_size=32)


def model64(seed=0):
    return random_gpt(CFG, seed=seed, std=0.5).double()


def ids(B, n, seed=0):
    return torch.randint(CFG["vocab_size"], (B, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("reparam", [None, "mlp"])
def test_only_the_prefix_trains_and_the_base_stays_bit_identical(reparam):
    model = random_gpt(CFG, std=0.5)
    before = snapshot(model)
    pf = PrefixTuning(model, n_prefix=3, reparam=reparam, hidden=8)
    names = [name for name, _ in trainable_parameters(pf)]
    assert names == (
        ["prefix"] if reparam is None else ["table", "mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias"]
    )
    batch = (ids(4, 6), ids(4, 6, seed=1))
    result = train(pf, lambda step: batch, TrainConfig(steps=6, batch_size=4, lr=0.05, warmup_steps=1, progress=False))
    assert result.losses[-1] < result.losses[0]
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    width = CFG["n_layer"] * 2 * CFG["n_embd"]
    assert pf.prefix_embeddings().shape == (3, width)
    assert (pf.num_trainable() == 3 * width) == (reparam is None)


def test_fp64_gradcheck_of_the_prefix_gradient():
    model = model64()
    idx, targets = ids(2, 5), ids(2, 5, seed=1)
    start = PrefixTuning(model, n_prefix=3).prefix.detach().double()

    assert torch.autograd.gradcheck(
        lambda p: _loss_through_cache(model, p, idx, targets), (start.clone().requires_grad_(True),)
    )
    # and the module's own loss and gradient are the same function
    pf = PrefixTuning.from_tensor(model, start).double()
    pf.loss(idx, targets).backward()
    p = start.clone().requires_grad_(True)
    _loss_through_cache(model, p, idx, targets).backward()
    torch.testing.assert_close(pf.prefix.grad, p.grad, rtol=1e-10, atol=1e-12)


def _loss_through_cache(model, prefix, idx, targets):
    k, v = from_peft_layout(prefix, model.config)  # (n_layer, n_head, n_prefix, head_dim) each
    cache = KVCache.for_model(model, idx.shape[0], prefix.shape[0] + idx.shape[1], dtype=torch.float64)
    cache.set_prefix(slice(None), k, v)
    h = model.body(model.embed(idx, start_pos=prefix.shape[0]), cache)  # (B, n, D)
    return lm_loss(model.head(h), targets)


def test_a_prefix_of_real_tokens_equals_running_those_tokens():
    """The prefix a frozen model makes from tokens, fed back as a prefix, gives the logits of the full run:
    a soft prompt is a special case of a prefix."""
    model = model64()
    pf = PrefixTuning(model, n_prefix=4, init="vocab", seed=1).double()
    first = pf.init_ids[None]  # (1, 4): the tokens the init ran
    idx = ids(1, 6)
    full, _ = model(torch.cat([first, idx], dim=1))  # (1, 10, V)
    logits, _ = pf(idx)  # (1, 6, V)
    torch.testing.assert_close(logits, full[:, 4:], rtol=1e-5, atol=1e-5)  # the prefix is kept in fp32


def test_cache_equals_no_cache_equals_greedy_over_forward_with_a_mask():
    model = model64()
    pf = PrefixTuning(model, n_prefix=3).double().eval()
    idx = ids(3, 6)
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[1, 4:] = 0
    with_cache = pf.generate(idx, 5, temperature=0.0, attention_mask=mask)
    without = pf.generate(idx, 5, temperature=0.0, attention_mask=mask, use_cache=False)
    assert torch.equal(with_cache, without)
    for b, n in enumerate(mask.sum(1).tolist()):  # greedy over forward, each row alone and unpadded
        row = idx[b : b + 1, :n]
        for _ in range(5):
            row = torch.cat([row, pf(row)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
        assert torch.equal(row[0, n:], with_cache[b, 6:])


def test_save_load_and_the_layout_round_trip(tmp_path):
    model = random_gpt(CFG, std=0.5)
    pf = PrefixTuning(model, n_prefix=3, reparam="mlp", hidden=8)
    pf.save(tmp_path / "p.safetensors")
    back = PrefixTuning.load(model, tmp_path / "p.safetensors")
    assert back.reparam is None and back.num_trainable() == pf.prefix_embeddings().numel()  # no MLP in the file
    torch.testing.assert_close(back.prefix_embeddings(), pf.prefix_embeddings().detach())
    idx = ids(2, 5)
    torch.testing.assert_close(back(idx)[0], pf(idx)[0])
    k, v = from_peft_layout(back.prefix, model.config)
    assert torch.equal(to_peft_layout(k, v), back.prefix)
    with pytest.raises(CheckpointError, match="another base model"):
        PrefixTuning.load(random_gpt(CFG, seed=5, std=0.5), tmp_path / "p.safetensors")
    with pytest.raises(CheckpointError, match="another model"):
        PrefixTuning.load(random_gpt(dict(CFG, n_embd=8), std=0.5), tmp_path / "p.safetensors")


def test_ptuning_saves_a_plain_prompt_with_equal_logits(tmp_path):
    model = random_gpt(CFG, std=0.5)
    pt = PromptTuning(model, n_prompt=4, init="uniform", reparam="mlp", hidden=8, backend="reference")
    names = [name for name, _ in trainable_parameters(pt)]
    assert names[0] == "prompt" and any(n.startswith("encoder.") for n in names)
    batch = (ids(4, 6), ids(4, 6, seed=1))
    train(pt, lambda step: batch, TrainConfig(steps=3, batch_size=4, lr=0.01, warmup_steps=1, progress=False))
    pt.save(tmp_path / "p.safetensors")
    plain = PromptTuning.load(model, tmp_path / "p.safetensors", backend="reference")
    assert plain.reparam is None and plain.num_trainable() == 4 * CFG["n_embd"]
    idx = ids(2, 5, seed=3)
    torch.testing.assert_close(plain(idx)[0], pt.eval()(idx)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(n_prefix=0), "n_prefix must be"),
        (dict(n_prefix=32), "n_prefix must be"),
        (dict(n_prefix=2.5), "n_prefix must be"),
        (dict(reparam="lstm"), "reparam must be"),
        (dict(init="uniform"), "init must be one of"),
        (dict(reparam="mlp", hidden=0), "hidden must be"),
    ],
)
def test_bad_arguments_are_named(bad, match):
    with pytest.raises(ValueError, match=match):
        PrefixTuning(random_gpt(CFG), **{"n_prefix": 3, **bad})


def test_a_prefix_too_long_for_the_input_is_refused_before_work():
    pf = PrefixTuning(random_gpt(CFG), n_prefix=20)
    with pytest.raises(ValueError, match=r"n_prefix \(20\) \+ sequence length \(13\) = 33 exceeds block_size 32"):
        pf(ids(1, 13))
    with pytest.raises(ValueError, match="n_prefix \\+ idx length"):
        pf.generate(ids(1, 10), max_new_tokens=5)


# ---- PEFT's PREFIX_TUNING adapters -------------------------------------------------------------------------

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
from minipt.hf import to_hf  # noqa: E402
from minipt.peft_io import targets_from_labels  # noqa: E402


@pytest.mark.parametrize("n_layer, n_head, n_embd", [(2, 2, 16), (3, 4, 32)])
def test_minipt_prefix_in_peft_gives_the_same_loss_and_back(tmp_path, n_layer, n_head, n_embd):
    cfg = dict(CFG, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
    model = random_gpt(cfg, std=0.3).eval()
    pf = PrefixTuning(model, n_prefix=4, init="normal", seed=2).eval()
    pf.save_peft(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PREFIX_TUNING" and config["num_virtual_tokens"] == 4
    peft_model = peft.PeftModel.from_pretrained(to_hf(model), tmp_path / "adapter").eval()
    input_ids = ids(3, 9, seed=4)
    labels = input_ids.clone()
    labels[0, :3] = -100
    mask = torch.ones_like(input_ids)
    with torch.no_grad():
        theirs = peft_model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        ours = pf(input_ids, targets=targets_from_labels(labels))[1]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    back = PrefixTuning.from_peft(model, tmp_path / "adapter")  # PEFT's folder into minipt
    torch.testing.assert_close(back.prefix, pf.prefix.detach())


def test_a_peft_folder_of_another_type_or_shape_is_refused(tmp_path):
    model = random_gpt(CFG, std=0.3)
    PromptTuning(model, n_prompt=3, init="uniform").save_peft(tmp_path / "prompt")
    with pytest.raises(CheckpointError, match="peft_type is 'PROMPT_TUNING'"):
        PrefixTuning.from_peft(model, tmp_path / "prompt")
    PrefixTuning(model, n_prefix=3).save_peft(tmp_path / "prefix")
    with pytest.raises(CheckpointError, match="made for another model"):
        PrefixTuning.from_peft(random_gpt(dict(CFG, n_layer=3), std=0.3), tmp_path / "prefix")


def test_a_peft_trained_prefix_loads_into_minipt_with_the_same_loss(tmp_path):
    model = random_gpt(CFG, std=0.3).eval()
    config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    peft_model = peft.get_peft_model(to_hf(model), config)
    with torch.no_grad():
        peft_model.prompt_encoder["default"].embedding.weight.normal_(0, 1, generator=torch.Generator().manual_seed(0))
    peft_model.eval().save_pretrained(tmp_path / "theirs")
    pf = PrefixTuning.from_peft(model, tmp_path / "theirs").eval()
    input_ids = ids(2, 7, seed=5)
    with torch.no_grad():
        theirs = peft_model(input_ids=input_ids, labels=input_ids).loss
        ours = pf(input_ids, targets=targets_from_labels(input_ids))[1]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


# ---- the command line and the experiment -------------------------------------------------------------------


@pytest.mark.parametrize("method", ["prompt", "ptuning", "ptuning-v2", "prefix"])
def test_cli_tune_each_method_end_to_end(tmp_path, method, capsys):
    from minipt.apps.cli import main
    from minipt.tuned import load_tuned

    base = tmp_path / "base.safetensors"
    random_gpt(dict(CFG, vocab_size=260, block_size=64), std=0.3).save(base)
    out = tmp_path / f"{method}.safetensors"
    assert (
        main(
            [
                "tune",
                "--task",
                "parity",
                "--base",
                str(base),
                "--method",
                method,
                "--n-prompt",
                "3",
                "--steps",
                "2",
                "--batch-size",
                "4",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    assert "saved" in capsys.readouterr().out
    model = GPT.from_checkpoint(base)
    tuned = load_tuned(model, out)
    assert isinstance(tuned, PrefixTuning if method in ("ptuning-v2", "prefix") else PromptTuning)
    assert tuned.num_trainable() == (3 * 2 * 2 * 16 if method in ("ptuning-v2", "prefix") else 3 * 16)
    assert main(["eval", "--task", "parity", "--base", str(base), "--prompt", str(out), "-n", "8"]) == 0
    assert "exact match" in capsys.readouterr().out


@pytest.mark.slow
def test_depth_quick_runs_and_resumes(tmp_path, capsys):
    from minipt.apps.cli import main

    args = [
        "experiment",
        "depth",
        "--quick",
        "--results",
        str(tmp_path / "r"),
        "--work",
        str(tmp_path / "w"),
        "--no-progress",
        "--threads",
        "1",
    ]
    assert main(args) == 0
    results = json.loads((tmp_path / "r" / "depth.json").read_text())
    methods = {r["method"] for r in results["scale"]}
    assert methods == {"ptuning-v2", "ptuning"}
    v2 = next(r for r in results["scale"] if r["method"] == "ptuning-v2" and r["size"] == "nano" and r["task"] == "all")
    nano = GPT.from_checkpoint(__import__("minipt.assets", fromlist=["base_path"]).base_path("nano"))
    assert v2["trainable"] == nano.config.n_layer * 2 * 5 * nano.config.n_embd
    assert [r["n_prefix"] for r in results["length"] if r["task"] == "all"] == [1, 5]
    assert (tmp_path / "r" / "depth.png").is_file()
    capsys.readouterr()
    assert main(args) == 0  # a resume trains nothing
    assert "0 to train" in capsys.readouterr().out
