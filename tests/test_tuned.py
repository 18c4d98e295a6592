"""minipt.tuned: one contract for the tuned modules (a soft prompt, a deep prompt)."""

from pathlib import Path

import pytest
import torch

from helpers import random_gpt
from minipt import PrefixTuning, PromptTuning
from minipt.apps.recipes import METHODS, tuned_module
from minipt.checkpoint import CheckpointError
from minipt.tokenizer import ByteTokenizer
from minipt.tuned import load_tuned, method_class, module_class

CFG = dict(n_layer=2, n_head=2, n_embd=16, vocab_size=260, block_size=32)
PACKAGE = Path(__file__).resolve().parents[1] / "minipt"


def tuned_pair(model):
    pt = PromptTuning(model, n_prompt=3, init="uniform", backend="reference")
    pf = PrefixTuning(model, n_prefix=2, init="normal")
    with torch.no_grad():
        pt.prompt.add_(1.0)
        pf.prefix.add_(1.0)
    return pt, pf


@pytest.mark.parametrize("as_peft", [False, True])
def test_load_tuned_reads_what_a_file_or_folder_holds(tmp_path, as_peft):
    model = random_gpt(CFG)
    for module in tuned_pair(model):
        path = tmp_path / f"{module.kind}{'' if as_peft else '.safetensors'}"
        module.save_peft(path) if as_peft else module.save(path)
        assert module_class(path) is type(module)
        loaded = load_tuned(model, path)
        assert type(loaded) is type(module)
        name = "prompt" if module.kind == "prompt" else "prefix"
        assert torch.equal(getattr(loaded, name).detach(), getattr(module, name).detach())


def test_load_tuned_refuses_what_is_not_a_tuned_module(tmp_path):
    model = random_gpt(CFG)
    model.save(tmp_path / "base.safetensors")
    with pytest.raises(
        CheckpointError,
        match="holds a minipt 'gpt' file; a tuned module is a minipt 'prefix' or "
        "'prompt' file or a PEFT adapter folder",
    ):
        load_tuned(model, tmp_path / "base.safetensors")
    (tmp_path / "garbage").write_bytes(b"not a file of ours")
    with pytest.raises(CheckpointError, match="garbage holds no minipt kind"):
        load_tuned(model, tmp_path / "garbage")
    with pytest.raises(FileNotFoundError, match="no such checkpoint file"):
        load_tuned(model, tmp_path / "missing.safetensors")
    folder = tmp_path / "lora"
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    with pytest.raises(CheckpointError, match="type 'LORA'; minipt reads PREFIX_TUNING and PROMPT_TUNING"):
        load_tuned(model, folder)


def test_every_tuned_file_is_refused_on_another_base_model(tmp_path):
    model, other = random_gpt(CFG, seed=0), random_gpt(CFG, seed=1)
    for module in tuned_pair(model):
        path = tmp_path / f"{module.kind}.safetensors"
        module.save(path)
        with pytest.raises(CheckpointError, match=f"the {module.kind} was made for another base model"):
            load_tuned(other, path)


def test_each_method_builds_the_class_that_declares_it():
    model, tok = random_gpt(CFG), ByteTokenizer()
    assert METHODS == ("prompt", "ptuning", "ptuning-v2", "prefix")
    expected = {
        "prompt": (PromptTuning, None),
        "ptuning": (PromptTuning, "mlp"),
        "ptuning-v2": (PrefixTuning, None),
        "prefix": (PrefixTuning, "mlp"),
    }
    for method, (cls, reparam) in expected.items():
        assert method_class(method) == (cls, reparam)
        module = tuned_module(method, model, 2, "normal" if cls is PrefixTuning else "uniform", 0, tok)
        assert type(module) is cls and module.reparam == reparam
    with pytest.raises(ValueError, match="method must be one of .*'prefix'.*, got 'lora'"):
        method_class("lora")


def test_the_identity_check_and_the_metadata_are_written_once():
    """One home: the refusal and the base-model metadata appear in minipt/tuned.py and nowhere else in minipt/."""
    homes = {
        phrase: sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if phrase in p.read_text())
        for phrase in ("made for another base model (fingerprint", '"base_config"', "_CLASSES[")
    }
    assert homes == {phrase: ["tuned.py"] for phrase in homes}
