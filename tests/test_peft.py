"""PEFT prompt-tuning adapter folders: minipt -> PEFT and PEFT -> minipt give the same loss; loaded prompts train on.

The base is a random tiny GPT-2 built here; nothing is downloaded.
"""

import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from minipt import GPT, PromptTuning  # noqa: E402
from minipt.checkpoint import CheckpointError  # noqa: E402
from minipt.frozen import snapshot  # noqa: E402
from minipt.peft_io import peft_loss, targets_from_labels  # noqa: E402
from minipt.train import TrainConfig, train  # noqa: E402

V, N_PROMPT = 97, 5


def tiny_hf_gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=32, vocab_size=V, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(cfg).eval()


def batch(seed=1, B=3, n=12):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, V, (B, n), generator=g)
    labels = input_ids.clone()
    labels[0, :4] = -100  # some positions unscored, as with supervised data
    return input_ids, labels


def peft_model_loss(peft_model, input_ids, labels):
    return peft_model(input_ids=input_ids, labels=labels).loss


def trained_minipt_prompt(model, steps=3):
    pt = PromptTuning(model, n_prompt=N_PROMPT, init="uniform", seed=3)
    input_ids, labels = batch(seed=7)
    train(
        pt,
        lambda step: (input_ids, targets_from_labels(labels)),
        TrainConfig(steps=steps, lr=0.05, warmup_steps=1, progress=False),
    )
    return pt


def test_minipt_prompt_loaded_by_peft_gives_the_same_loss(tmp_path):
    hf = tiny_hf_gpt2()
    pt = trained_minipt_prompt(GPT.from_hf(hf)).eval()
    pt.save_peft(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PROMPT_TUNING" and config["num_virtual_tokens"] == N_PROMPT
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    torch.testing.assert_close(peft_model.get_prompt_embedding_to_save("default"), pt.prompt.detach())

    input_ids, labels = batch()
    with torch.no_grad():
        # like for like: with labels[:, 0] = -100, PEFT scores exactly what minipt scores
        labels_no_first = labels.clone()
        labels_no_first[:, 0] = -100
        theirs = peft_model_loss(peft_model, input_ids, labels_no_first)
        ours = pt(input_ids, targets=targets_from_labels(labels))[1]
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
        # PEFT's own convention, with the first token scored from the last prompt slot
        torch.testing.assert_close(
            peft_loss(pt, input_ids, labels), peft_model_loss(peft_model, input_ids, labels), atol=1e-5, rtol=0
        )
        assert abs(peft_loss(pt, input_ids, labels) - ours) > 1e-4  # the extra term is real


def test_peft_prompt_loaded_by_minipt_gives_the_same_loss_and_trains_further(tmp_path):
    hf = tiny_hf_gpt2()
    peft_model = peft.get_peft_model(hf, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N_PROMPT))
    with torch.no_grad():  # a non-trivial prompt, as if PEFT had trained it
        emb = peft_model.prompt_encoder["default"].embedding.weight
        emb.copy_(torch.randn(emb.shape, generator=torch.Generator().manual_seed(5)) * 0.3)
    peft_model.save_pretrained(tmp_path / "adapter")

    model = GPT.from_hf(hf)
    pt = PromptTuning.from_peft(model, tmp_path / "adapter").eval()
    assert pt.prompt.shape == (N_PROMPT, 32) and pt.prompt.requires_grad and pt.init == "uniform"
    input_ids, labels = batch(seed=2)
    peft_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            peft_loss(pt, input_ids, labels), peft_model_loss(peft_model, input_ids, labels), atol=1e-5, rtol=0
        )

    # Unlike a PEFT adapter loaded for inference, a loaded minipt prompt is an ordinary trainable prompt.
    frozen_before = snapshot(model)
    with torch.no_grad():
        before = pt(input_ids, targets=targets_from_labels(labels))[1].item()
    train(
        pt,
        lambda step: (input_ids, targets_from_labels(labels)),
        TrainConfig(steps=4, lr=0.05, warmup_steps=1, progress=False),
    )
    with torch.no_grad():
        after = pt(input_ids, targets=targets_from_labels(labels))[1].item()
    assert after < before
    assert all(torch.equal(frozen_before[k], v) for k, v in model.state_dict().items())
    # and round-trips through the PEFT files again
    pt.save_peft(tmp_path / "again")
    again = PromptTuning.from_peft(model, tmp_path / "again")
    assert torch.equal(again.prompt, pt.prompt)


def test_peft_loss_is_differentiable_in_the_prompt_only():
    model = GPT.from_hf(tiny_hf_gpt2())
    pt = PromptTuning(model, n_prompt=N_PROMPT, init="uniform")
    input_ids, labels = batch()
    peft_loss(pt, input_ids, labels).backward()
    assert pt.prompt.grad is not None and pt.prompt.grad[-1].abs().sum() > 0  # the last slot is scored
    assert all(p.grad is None for p in model.parameters())


def test_bad_adapter_folders_are_refused(tmp_path):
    model = GPT.from_hf(tiny_hf_gpt2())
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        PromptTuning.from_peft(model, tmp_path)
    pt = PromptTuning(model, n_prompt=N_PROMPT, init="uniform")
    pt.save_peft(tmp_path / "a")
    cfg_path = tmp_path / "a" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())

    cfg_path.write_text(json.dumps({**cfg, "peft_type": "LORA"}))
    with pytest.raises(CheckpointError, match="PROMPT_TUNING"):
        PromptTuning.from_peft(model, tmp_path / "a")
    cfg_path.write_text(json.dumps({**cfg, "num_virtual_tokens": N_PROMPT + 1}))
    with pytest.raises(CheckpointError, match="declares"):
        PromptTuning.from_peft(model, tmp_path / "a")
    cfg_path.write_text(json.dumps(cfg))
    other = GPT.from_hf(
        transformers.GPT2LMHeadModel(
            transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=V, n_positions=32)
        )
    )
    with pytest.raises(CheckpointError, match="n_embd=16"):
        PromptTuning.from_peft(other, tmp_path / "a")
