"""Every loader proves what it loads before it builds anything: a flipped byte anywhere (the config
included) is refused, tuned tensors must be finite floating-point numbers, and a base model's identity
survives a dtype cast while another model is still refused."""

import json
import time

import pytest
import torch

from minipt import GPT, GPTConfig, PromptTuning
from minipt.checkpoint import CheckpointError, save_tensors
from minipt.model import load_model
from minipt.prefix import PrefixTuning
from minipt.serve import PromptBank

SMALL = dict(n_layer=2, n_head=2, n_embd=32, vocab_size=260, block_size=64)


def base(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**SMALL))


def flip_in_header(path, old: bytes, new: bytes):
    """Replace bytes of the JSON header in place, same length: what a flipped byte on disk does."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = data[8 : 8 + n]
    assert len(old) == len(new) and header.count(old) >= 1, (old, header[:200])
    path.write_bytes(data[:8] + header.replace(old, new, 1) + data[8 + n :])


# (what, write the file, load it, bytes of its header to flip)
def _prompt(model, path):
    PromptTuning(model, n_prompt=3, init="uniform").save(path)


def _prefix(model, path):
    PrefixTuning(model, n_prefix=3).save(path)


def _peft(model, path):
    PromptTuning(model, n_prompt=3, init="uniform").save_peft(path)


LOADERS = {
    "model": (lambda m, p: m.save(p), lambda m, p: load_model(p), b'\\"n_head\\": 2', b'\\"n_head\\": 4'),
    "prompt": (_prompt, PromptTuning.load, b'"n_prompt":"3"', b'"n_prompt":"4"'),
    "prefix": (_prefix, PrefixTuning.load, b'\\"n_layer\\": 2', b'\\"n_layer\\": 3'),
    "peft": (_peft, PromptTuning.from_peft, b'\\"n_head\\": 2', b'\\"n_head\\": 4'),
}


def _header_file(path):
    return path / "adapter_model.safetensors" if path.is_dir() else path


@pytest.mark.parametrize("kind", LOADERS)
def test_a_flipped_config_byte_is_refused(tmp_path, kind):
    write, load, old, new = LOADERS[kind]
    model, path = base(), tmp_path / f"{kind}.file"
    write(model, path)
    load(model, path)  # its own file loads
    flip_in_header(_header_file(path), old, new)
    with pytest.raises(CheckpointError, match="corrupted"):
        load(model, path)


@pytest.mark.parametrize("kind", ["prompt", "prefix", "peft"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_own_files_load_after_a_dtype_cast_of_the_base_and_another_base_is_refused(tmp_path, kind, dtype):
    write, load, _, _ = LOADERS[kind]
    path = tmp_path / f"{kind}.file"
    write(base(0), path)
    load(base(0).to(dtype), path)
    with pytest.raises(CheckpointError, match="another base model"):
        load(base(1).to(dtype), path)
    if kind == "prompt":  # and a server of that cast base takes it too
        PromptBank(base(0).to(dtype), {"t": path})


def test_a_prompt_tuned_on_a_bf16_base_loads_on_its_float32_original(tmp_path):
    _prompt(base(0).to(torch.bfloat16), tmp_path / "p.safetensors")
    PromptTuning.load(base(0), tmp_path / "p.safetensors")
    with pytest.raises(CheckpointError, match="another base model"):
        PromptTuning.load(base(1), tmp_path / "p.safetensors")


BAD_VALUES = {
    "nan": torch.full((3, 32), float("nan")),
    "inf": torch.full((3, 32), float("inf")),
    "int": torch.ones(3, 32, dtype=torch.int64),
    "bool": torch.ones(3, 32, dtype=torch.bool),
}


@pytest.mark.parametrize("bad", BAD_VALUES)
def test_non_finite_and_non_float_tuned_tensors_are_refused(tmp_path, bad):
    """Files whose hash is right (written through save_tensors / save_peft) but whose numbers are not."""
    from minipt.peft_io import WEIGHTS_NAME
    from minipt.tuned import base_identity

    model = base()
    t = BAD_VALUES[bad]
    save_tensors(
        tmp_path / "p.safetensors",
        {"prompt": t},
        "prompt",
        {"n_prompt": 3, "n_embd": 32, "init": "uniform", **base_identity(model)},
    )
    with pytest.raises(CheckpointError, match="NaN or inf|floating point"):
        PromptTuning.load(model, tmp_path / "p.safetensors")
    with pytest.raises(CheckpointError, match="NaN or inf|floating point"):
        PromptBank(model, {"t": tmp_path / "p.safetensors"})
    width = SMALL["n_layer"] * 2 * SMALL["n_embd"]
    save_tensors(
        tmp_path / "x.safetensors",
        {"prefix": torch.zeros(3, width, dtype=t.dtype).fill_(t.flatten()[0])},
        "prefix",
        {"n_prefix": 3, "reparam": "None", "init": "vocab", **base_identity(model)},
    )
    with pytest.raises(CheckpointError, match="NaN or inf|floating point"):
        PrefixTuning.load(model, tmp_path / "x.safetensors")
    pt = PromptTuning(model, n_prompt=3, init="uniform")
    pt.save_peft(tmp_path / "pdir")
    from safetensors.torch import save_file

    save_file({"prompt_embeddings": t}, str(tmp_path / "pdir" / WEIGHTS_NAME))  # as PEFT would write it
    with pytest.raises(CheckpointError, match="NaN or inf|floating point"):
        PromptTuning.from_peft(model, tmp_path / "pdir")


def test_a_huge_config_is_refused_before_anything_is_built(tmp_path):
    """A config claiming 10**6 layers, with a hash recomputed to match: refused from the tensors' shapes."""
    model = base()
    tensors = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    config = {**model.config.to_dict(), "n_layer": 10**6}
    save_tensors(tmp_path / "m.safetensors", tensors, "gpt", {"config": json.dumps(config)})
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match="n_layer=1000000 but the weights have 2"):
        load_model(tmp_path / "m.safetensors")
    assert time.perf_counter() - t0 < 2.0


def test_a_model_whose_fingerprint_does_not_match_is_refused(tmp_path):
    """A config edit that keeps the shapes (n_head 2 -> 4), written with a fresh hash: the stored fingerprint
    (config and weights) still tells it is not the model that was saved."""
    model = base()
    model.save(tmp_path / "m.safetensors")
    from safetensors.torch import load_file

    from minipt.checkpoint import _read_metadata

    meta = _read_metadata(tmp_path / "m.safetensors")
    config = {**json.loads(meta["config"]), "n_head": 4}
    save_tensors(
        tmp_path / "m.safetensors",
        load_file(str(tmp_path / "m.safetensors")),
        "gpt",
        {"config": json.dumps(config), "fingerprint": meta["fingerprint"]},
    )
    with pytest.raises(CheckpointError, match="fingerprint"):
        load_model(tmp_path / "m.safetensors")


def test_an_edited_adapter_config_of_a_folder_minipt_wrote_is_refused(tmp_path):
    model = base()
    _peft(model, tmp_path / "a")
    config_path = tmp_path / "a" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(config))  # the same content, laid out anew: still proven
    PromptTuning.from_peft(model, tmp_path / "a")
    config_path.write_text(json.dumps({**config, "num_layers": 3}))
    with pytest.raises(CheckpointError, match="corrupted or was edited"):
        PromptTuning.from_peft(model, tmp_path / "a")
