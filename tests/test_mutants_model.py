"""Tests that each kill planted bugs that mutation testing (`make mutate MODULE=minipt/model.py`) found in
minipt/model.py: the methods its other tests reach only through a wrapper or not at all (GPT.loss, GPT.save,
GPT.from_checkpoint, GPT.from_hf and GPT.from_pretrained), and what each refuses. GPT-2 weights are made from a
tiny random minipt model in the Hugging Face layout (no transformers needed); the whole file runs in seconds."""

import json
import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import minipt.hf
import minipt.model
from helpers import random_gpt
from minipt import GPT, GPTConfig
from minipt.checkpoint import CheckpointError, load_tensors, model_tensors, save_tensors
from minipt.hf import TRANSPOSED
from minipt.model import generate_without_cache, load_model, sample_next

CFG = dict(n_layer=2, n_head=2, n_embd=16, vocab_size=20, block_size=12)
IDS = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])


def f64_model(seed=0):
    return random_gpt(CFG, seed=seed, std=0.5).double().eval()


def hf_state(model):
    """The model's weights as a GPT-2 state dict of transformers: Conv1D weights (in, out), lm_head tied."""
    return {name: t.t().contiguous() if name.endswith(TRANSPOSED) else t for name, t in model.state_dict().items()}


# ---- GPT.loss -----------------------------------------------------------------------------------------------


def test_loss_is_the_mean_cross_entropy_over_the_supervised_unpadded_targets():
    model = f64_model()
    targets = torch.tensor([[2, 3, -100, 5], [6, 7, 8, 9]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    logits = model(IDS)[0]
    keep = (targets != -100) & (mask == 1)
    expected = F.cross_entropy(logits[keep], targets[keep])  # 5 positions: 2 dropped (ignored, then padded)
    torch.testing.assert_close(model.loss(IDS, targets, mask), expected)
    torch.testing.assert_close(
        model.loss(IDS, targets), F.cross_entropy(logits[targets != -100], targets[targets != -100])
    )


def test_loss_checks_its_batch_first():
    with pytest.raises(ValueError, match=r"^targets has no supervised position \(every entry is -100\)$"):
        f64_model().loss(IDS, torch.full_like(IDS, -100))


# ---- GPT.save and GPT.from_checkpoint -----------------------------------------------------------------------


def test_save_and_from_checkpoint_give_back_the_same_model_and_metadata(tmp_path):
    model = random_gpt(CFG, std=0.5).eval()  # float32: a model file is loaded into a float32 model
    path = tmp_path / "m.safetensors"
    model.save(path, extra_metadata={"note": "kept"})
    _, meta = load_tensors(path, kind="gpt")
    assert meta["note"] == "kept" and meta["fingerprint"] == model.fingerprint()
    loaded = GPT.from_checkpoint(path)
    assert isinstance(loaded, GPT) and loaded.config == model.config
    torch.testing.assert_close(loaded(IDS)[0], model(IDS)[0], rtol=0, atol=0)


def test_from_checkpoint_passes_map_location_on(monkeypatch):
    calls = []
    monkeypatch.setattr(minipt.model, "load_model", lambda path, map_location="cpu": calls.append((path, map_location)))
    GPT.from_checkpoint("m.safetensors", map_location="cuda:1")
    GPT.from_checkpoint("n.safetensors")
    assert calls == [("m.safetensors", "cuda:1"), ("n.safetensors", "cpu")]


def test_a_file_of_another_kind_is_not_read_as_a_model(tmp_path):
    path = save_tensors(tmp_path / "p.safetensors", {"prompt": torch.zeros(2, 16)}, kind="prompt")
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(path))} holds 'prompt', expected a minipt 'gpt' file$"):
        GPT.from_checkpoint(path)


# ---- load_model: what a model file must prove ---------------------------------------------------------------


def model_file(path, model, tensors=None, **metadata):
    """A gpt file of `model`'s config (or the metadata given) holding `tensors` (default: the model's)."""
    metadata = {"config": json.dumps(model.config.to_dict()), **metadata}
    return save_tensors(path, model_tensors(model) if tensors is None else tensors, kind="gpt", metadata=metadata)


def refused(path, message, error=CheckpointError):
    with pytest.raises(error, match=f"^{re.escape(message)}$"):
        load_model(path)


def test_a_model_file_without_a_fingerprint_loads_and_reads_onto_map_location(tmp_path, monkeypatch):
    model = random_gpt(CFG, std=0.5).eval()
    path = model_file(tmp_path / "m.safetensors", model)
    reads, moves = [], []
    real_read, real_to = minipt.model.load_tensors, GPT.to
    monkeypatch.setattr(minipt.model, "load_tensors", lambda *a, **k: reads.append(k) or real_read(*a, **k))
    monkeypatch.setattr(GPT, "to", lambda self, *a, **k: moves.append(a) or real_to(self, *a, **k))
    loaded = load_model(path, map_location=torch.device("cpu"))
    assert reads == [{"kind": "gpt", "map_location": torch.device("cpu")}] and moves == [(torch.device("cpu"),)]
    torch.testing.assert_close(loaded(IDS)[0], model(IDS)[0], rtol=0, atol=0)


def test_missing_embeddings_are_named_before_a_model_is_built(tmp_path):
    model = random_gpt(CFG)
    for name, field in (("transformer.wte.weight", "vocab_size=20"), ("transformer.wpe.weight", "block_size=12")):
        tensors = {k: v for k, v in model_tensors(model).items() if k != name}
        path = model_file(tmp_path / f"{field}.safetensors", model, tensors)
        refused(path, f"{path}: the config says {field} but the weights have None; the file was changed")


def test_the_embedding_width_is_the_last_dimension_of_wte(tmp_path):
    model = random_gpt(CFG)
    tensors = {**model_tensors(model), "transformer.wte.weight": torch.zeros(20, 3, 16)}  # a width of 16, but 3-D
    path = model_file(tmp_path / "m.safetensors", model, tensors)
    with pytest.raises(CheckpointError, match=r"the weights do not fit the model config in the file \(size mismatch"):
        load_model(path)


def test_a_model_config_that_is_missing_or_invalid_is_named(tmp_path):
    model = random_gpt(CFG)
    path = save_tensors(tmp_path / "a.safetensors", model_tensors(model), kind="gpt")
    refused(path, f"{path}: the model config in the metadata is missing or invalid ('config')")
    path = model_file(tmp_path / "b.safetensors", model, config=json.dumps({**CFG, "n_head": 3}))
    refused(path, f"{path}: the model config in the metadata is missing or invalid (n_embd (16) must be divisible "
                  f"by n_head (3))")  # fmt: skip


def test_a_config_that_does_not_fit_the_tensors_is_named(tmp_path):
    model = random_gpt(CFG)
    path = model_file(tmp_path / "m.safetensors", model, config=json.dumps({**CFG, "n_layer": 3}))
    refused(path, f"{path}: the config says n_layer=3 but the weights have 2; the file was changed")


def test_a_weight_of_nan_is_named(tmp_path):
    model = random_gpt(CFG)
    tensors = model_tensors(model)
    tensors["transformer.ln_f.bias"] = torch.full((16,), float("nan"))
    path = model_file(tmp_path / "m.safetensors", model, tensors)
    refused(path, f"{path}: the tensor 'transformer.ln_f.bias' holds NaN or inf")


def test_weights_of_the_wrong_shape_are_named_by_the_last_line_of_torchs_error(tmp_path):
    model = random_gpt(CFG)
    tensors = model_tensors(model)
    tensors["transformer.h.0.ln_1.weight"], tensors["transformer.h.1.ln_2.bias"] = torch.ones(5), torch.ones(3)
    path = model_file(tmp_path / "m.safetensors", model, tensors)
    # torch lists one size mismatch a line, in the order of the model's parameters: the last one is shown
    last = (
        "size mismatch for transformer.h.1.ln_2.bias: copying a param with shape torch.Size([3]) from checkpoint, "
        "the shape in current model is torch.Size([16])."
    )
    refused(path, f"{path}: the weights do not fit the model config in the file ({last})")


def test_missing_and_unexpected_weights_are_named(tmp_path):
    model = random_gpt(CFG)
    tensors = model_tensors(model)
    del tensors["transformer.h.0.ln_1.bias"]
    path = model_file(tmp_path / "a.safetensors", model, tensors)
    refused(path, f"{path}: weights do not fit the config (missing ['transformer.h.0.ln_1.bias'], unexpected [])")
    tensors = {**model_tensors(model), "transformer.h.0.extra": torch.zeros(2)}
    path = model_file(tmp_path / "b.safetensors", model, tensors)
    refused(path, f"{path}: weights do not fit the config (missing [], unexpected ['transformer.h.0.extra'])")


def test_a_fingerprint_of_other_weights_is_refused(tmp_path):
    model = random_gpt(CFG)
    path = model_file(tmp_path / "m.safetensors", model, fingerprint=random_gpt(CFG, seed=1).fingerprint())
    refused(path, f"{path}: the model does not match the fingerprint stored in the file (its config or weights were "
                  f"changed)")  # fmt: skip
    assert (
        load_model(model_file(tmp_path / "n.safetensors", model, fingerprint=model.fingerprint())).config
        == model.config
    )


# ---- generate_without_cache: the reference decoder -----------------------------------------------------------


def test_the_reference_decoder_samples_with_top_k_and_the_generator_given():
    model = f64_model()
    idx = IDS[:, :2]
    logits = lambda ids, rows: model(ids)[0]  # noqa: E731
    greedy = generate_without_cache(logits, idx, 6, temperature=0)
    torch.manual_seed(1)
    assert torch.equal(generate_without_cache(logits, idx, 6, temperature=2.0, top_k=1), greedy)  # top 1: the argmax
    torch.manual_seed(1)
    sampled = generate_without_cache(logits, idx, 6, temperature=1.0, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(2)  # the global RNG is not what draws
    again = generate_without_cache(logits, idx, 6, temperature=1.0, generator=torch.Generator().manual_seed(0))
    cached = model.generate(idx, 6, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sampled, again) and torch.equal(sampled, cached) and not torch.equal(sampled, greedy)


def test_the_reference_decoder_keeps_the_input_and_fills_each_row_with_eos_after_its_first():
    model = f64_model()
    logits = lambda ids, rows: model(ids)[0]  # noqa: E731
    free = generate_without_cache(logits, IDS, 6, temperature=0)  # (2, 4 + 6)
    eos = int(free[0, 5])  # row 0's second new token
    out = generate_without_cache(logits, IDS, 6, temperature=0, eos_id=eos)
    assert torch.equal(out[:, :4], IDS)
    for b in range(2):
        new = free[b, 4:].tolist()
        if eos in new:
            first = new.index(eos)
            new = new[: first + 1] + [eos] * (len(new) - first - 1)
        assert out[b, 4:].tolist() == new
    assert out[0, 5:].tolist() == [eos] * 5


# ---- generation's arguments -----------------------------------------------------------------------------------


def test_a_generation_may_fill_the_block_but_not_exceed_it():
    model = f64_model()
    assert model.generate(IDS, 8, temperature=0).shape == (2, 12)  # 4 + 8 = block_size 12
    with pytest.raises(ValueError, match=r"^idx length 4 \+ max_new_tokens 9 exceeds block_size 12$"):
        model.generate(IDS, 9, temperature=0)


def test_top_k_is_checked_before_any_work_even_when_nothing_is_sampled():
    with pytest.raises(ValueError, match=r"^top_k must be >= 1 or None, got 0$"):
        f64_model().generate(IDS, 0, top_k=0)
    with pytest.raises(ValueError, match=r"^top_k must be >= 1 or None, got 0$"):
        sample_next(torch.zeros(2, 20), 1.0, 0)


# ---- GPT.from_hf --------------------------------------------------------------------------------------------


def same_model(a, b):
    assert a.config == b.config and not a.training
    assert a.lm_head.weight is a.transformer.wte.weight  # still tied
    torch.testing.assert_close(a(IDS)[0], b(IDS)[0], rtol=0, atol=0)


def test_from_hf_takes_a_state_dict_with_a_config():
    model = f64_model()
    state = hf_state(model)
    same_model(GPT.from_hf(state, config=model.config), model)  # a GPTConfig
    hf_config = SimpleNamespace(model_type="gpt2", n_layer=2, n_head=2, n_embd=16, vocab_size=20, n_positions=12)
    same_model(GPT.from_hf(state, config=hf_config), model)  # a GPT2Config's fields
    loaded = GPT.from_hf({k: v.float() for k, v in state.items()}, config=model.config)
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}  # the dtype of the weights


def test_from_hf_takes_a_model_and_reads_its_config_unless_given_one():
    model = f64_model()
    hf = SimpleNamespace(state_dict=lambda: hf_state(model), config=model.config)
    same_model(GPT.from_hf(hf), model)
    wrong = SimpleNamespace(state_dict=lambda: hf_state(model), config=GPTConfig(**{**CFG, "n_layer": 3}))
    same_model(GPT.from_hf(wrong, config=model.config), model)  # config= wins over the model's own


def test_from_hf_refuses_a_state_dict_without_a_config():
    message = "from a state dict, pass config= (a GPT2Config or GPTConfig): n_head is not in the shapes"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        GPT.from_hf(hf_state(f64_model()))


def test_from_hf_names_the_weights_that_do_not_fit():
    model = f64_model()
    state = hf_state(model)
    del state["transformer.h.1.mlp.c_fc.bias"]
    state["transformer.h.0.attn.extra"] = torch.zeros(1)
    message = (
        "the GPT-2 weights do not fit the configuration (missing ['transformer.h.1.mlp.c_fc.bias'], "
        "unexpected ['transformer.h.0.attn.extra'])"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        GPT.from_hf(state, config=model.config)
    state = hf_state(model)
    del state["transformer.ln_f.weight"]
    with pytest.raises(ValueError, match=re.escape("(missing ['transformer.ln_f.weight'], unexpected [])")):
        GPT.from_hf(state, config=model.config)


# ---- GPT.from_pretrained ------------------------------------------------------------------------------------


def test_from_pretrained_loads_through_the_local_hugging_face_reader(monkeypatch):
    model = f64_model()
    calls = []

    def local(name_or_path, cache_dir=None):
        calls.append((name_or_path, cache_dir))
        return SimpleNamespace(state_dict=lambda: hf_state(model), config=model.config)

    monkeypatch.setattr(minipt.hf, "hf_gpt2_from_pretrained", local)
    same_model(GPT.from_pretrained(), model)
    same_model(GPT.from_pretrained("some/folder", cache_dir="cache"), model)
    assert calls == [("gpt2", None), ("some/folder", "cache")]
