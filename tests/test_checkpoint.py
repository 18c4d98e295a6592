"""Tests for minipt.checkpoint: round trips, atomic writes, and a clear error for every unusable file."""

import json
import os

import pytest
import torch

from minipt import GPT, GPTConfig, PromptTuning
from minipt.checkpoint import (
    CheckpointError,
    atomic_write,
    load_tensors,
    load_train_state,
    save_tensors,
    save_train_state,
)
from minipt.model import load_model

CFG = dict(n_layer=2, n_head=2, n_embd=32, vocab_size=260, block_size=64)


def make_model(seed=0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**CFG)).eval()


def data_offset(path) -> int:
    """Where the tensor bytes start in a safetensors file: after the 8-byte length and the JSON header."""
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def leftovers(folder) -> list[str]:
    return [name for name in os.listdir(folder) if name.endswith(".tmp")]


# --- round trips -------------------------------------------------------------------------------------


def test_model_round_trip(tmp_path):
    model = make_model()
    path = tmp_path / "base.safetensors"
    model.save(path, extra_metadata={"note": "hello"})
    loaded = GPT.from_checkpoint(path)
    assert loaded.config == model.config
    assert loaded.fingerprint() == model.fingerprint()
    assert loaded.lm_head.weight is loaded.transformer.wte.weight  # still tied after loading
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    idx = torch.randint(260, (2, 10), generator=torch.Generator().manual_seed(0))
    assert torch.equal(model(idx)[0], loaded.eval()(idx)[0])
    _, meta = load_tensors(path, kind="gpt")
    assert meta["note"] == "hello" and meta["fingerprint"] == model.fingerprint()
    assert json.loads(meta["config"]) == model.config.to_dict()


def test_fingerprint_tells_models_apart():
    a, b = make_model(0), make_model(1)
    assert a.fingerprint() != b.fingerprint()
    assert len(a.fingerprint()) == 16
    c = make_model(0)
    assert c.fingerprint() == a.fingerprint()
    with torch.no_grad():
        c.transformer.h[1].mlp.c_fc.bias[3] += 1e-6  # one weight, barely changed
    assert c.fingerprint() != a.fingerprint()


def test_train_state_round_trip(tmp_path):
    p = torch.nn.Parameter(torch.randn(3, 4))
    opt = torch.optim.AdamW([p], lr=0.1)
    p.grad = torch.ones_like(p)
    opt.step()
    state = {
        "step": 7,
        "trainable": {"prompt": p.detach().clone()},
        "optimizer": opt.state_dict(),
        "result": {"losses": [1.5, 1.25], "best_metric": None},
        "best": None,
    }
    path = tmp_path / "state.pt"
    save_train_state(path, state)
    loaded = load_train_state(path)
    assert loaded["step"] == 7 and loaded["result"] == state["result"] and loaded["best"] is None
    assert torch.equal(loaded["trainable"]["prompt"], p.detach())
    exp_avg = opt.state_dict()["state"][0]["exp_avg"]
    assert torch.equal(loaded["optimizer"]["state"][0]["exp_avg"], exp_avg)
    assert not leftovers(tmp_path)


# --- atomic writes -----------------------------------------------------------------------------------


def test_atomic_write_failure_keeps_the_old_file(tmp_path):
    path = tmp_path / "base.safetensors"
    make_model(0).save(path)
    before = path.read_bytes()

    def failing_writer(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half a file")  # a crash in the middle of writing
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        atomic_write(path, failing_writer)
    assert path.read_bytes() == before
    assert not leftovers(tmp_path)
    assert load_model(path).fingerprint() == make_model(0).fingerprint()


def test_atomic_write_interrupted_save_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "base.safetensors"
    make_model(0).save(path)
    before = path.read_bytes()

    def interrupted(tensors, filename, metadata=None):
        open(filename, "wb").write(b"\x00" * 10)
        raise KeyboardInterrupt  # BaseException too: Ctrl-C in the middle of a save

    monkeypatch.setattr("minipt.checkpoint.save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        make_model(1).save(path)
    assert path.read_bytes() == before
    assert not leftovers(tmp_path)


def test_atomic_write_replaces_and_creates_folders(tmp_path):
    path = tmp_path / "new" / "dir" / "state.pt"
    save_train_state(path, {"step": 1})
    save_train_state(path, {"step": 2})
    assert load_train_state(path)["step"] == 2
    assert not leftovers(path.parent)


# --- unusable files ----------------------------------------------------------------------------------


@pytest.mark.parametrize("keep", [0.5, 0.99, 12, 4, 0])
def test_truncated_model_file(tmp_path, keep):
    path = tmp_path / "base.safetensors"
    make_model().save(path)
    data = path.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else keep
    path.write_bytes(data[:n])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        load_model(path)


def test_flipped_byte_in_tensor_data_is_caught(tmp_path):
    path = tmp_path / "base.safetensors"
    make_model().save(path)
    data = bytearray(path.read_bytes())
    start = data_offset(path)
    for where in (start, (start + len(data)) // 2, len(data) - 1):
        broken = bytearray(data)
        broken[where] ^= 0x01  # one bit: the file still parses, only the hash can tell
        path.write_bytes(bytes(broken))
        with pytest.raises(CheckpointError, match="corrupted"):
            load_model(path)


def test_garbage_file(tmp_path):
    path = tmp_path / "base.safetensors"
    path.write_bytes(b"this is not a safetensors file at all" * 10)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_model(path)


def test_wrong_kind(tmp_path):
    model = make_model()
    prompt_file = tmp_path / "prompt.safetensors"
    PromptTuning(model, n_prompt=4, init="uniform", backend="reference").save(prompt_file)
    with pytest.raises(CheckpointError, match="holds 'prompt', expected a minipt 'gpt' file"):
        load_model(prompt_file)
    model_file = tmp_path / "base.safetensors"
    make_model().save(model_file)
    with pytest.raises(CheckpointError, match="holds 'gpt', expected a minipt 'prompt' file"):
        PromptTuning.load(make_model(), model_file)
    plain = tmp_path / "plain.safetensors"  # a safetensors file that minipt did not write
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(plain))
    with pytest.raises(CheckpointError, match="holds None"):
        load_model(plain)


def test_model_file_with_weights_that_do_not_fit_the_config(tmp_path):
    model = make_model()
    tensors = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    del tensors["transformer.ln_f.weight"]
    path = tmp_path / "bad.safetensors"
    save_tensors(path, tensors, kind="gpt", metadata={"config": json.dumps(model.config.to_dict())})
    with pytest.raises(CheckpointError, match="missing.*ln_f.weight"):
        load_model(path)
    save_tensors(path, tensors, kind="gpt", metadata={})
    with pytest.raises(CheckpointError, match="model config in the metadata is missing"):
        load_model(path)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint file"):
        load_model(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError, match="no such checkpoint file"):
        GPT.from_checkpoint(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError, match="no such training checkpoint"):
        load_train_state(tmp_path / "nope.pt")


def test_truncated_train_state(tmp_path):
    path = tmp_path / "state.pt"
    save_train_state(path, {"step": 3, "trainable": {"prompt": torch.randn(20, 32)}})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable training checkpoint"):
        load_train_state(path)


def test_an_atomic_write_replaces_a_symlink_never_its_target(tmp_path):
    """Writing to a path that is a symlink replaces the link itself: the file it pointed to is left alone."""
    from minipt.checkpoint import atomic_write

    outside = tmp_path / "elsewhere.txt"
    outside.write_text("keep me")
    link = tmp_path / "out.txt"
    link.symlink_to(outside)
    atomic_write(link, lambda tmp: open(tmp, "w").write("new"))
    assert outside.read_text() == "keep me"
    assert not link.is_symlink() and link.read_text() == "new"
