"""Soft prompts as PEFT adapter folders: write them for Hugging Face `peft`, read the ones it writes.

A PEFT prompt-tuning adapter is a folder with two files:

    adapter_config.json         {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": n_p,
                                 "token_dim": D, "num_transformer_submodules": 1, ...}
    adapter_model.safetensors   one tensor, "prompt_embeddings" (n_p, D)

which is exactly minipt's prompt P (n_p, D). `pt.save_peft(dir)` writes such a folder (no `peft` needed);
`PeftModel.from_pretrained(hf_gpt2, dir)` loads it onto the equivalent transformers GPT-2.
`PromptTuning.from_peft(model, dir)` reads one back; the result trains further like any minipt prompt.

What PEFT's files lack: the base model's fingerprint. minipt checks the width and the declared prompt length,
but cannot tell which base model a prompt PEFT wrote was tuned on; load it onto the right one. A folder
minipt writes carries, in the weights file's safetensors metadata (which PEFT ignores), the base model's
identity and a hash of the tensor, that metadata and the config's content: it is proven on load like any
minipt file.

The one difference in the loss
------------------------------
PEFT's causal-LM loss with `labels` (B, n) prepends n_p labels of -100 for the virtual tokens, then shifts as
usual, so the *last prompt slot* predicts labels[:, 0]: with labels = input_ids, the first input token is
scored from the prompt. minipt's `pt(idx, targets)` never takes a loss at a prompt position (the prompt is
context; targets[:, t] is predicted from input position t), so it has no such term. Both are offered:

    pt(idx, targets_from_labels(labels))    == PEFT's loss with labels[:, 0] = -100  (minipt's convention)
    peft_loss(pt, input_ids, labels)        == PEFT's loss with the labels as given (differentiable, trainable)

For the usual supervised data, where labels are -100 over the input and only the answer is scored, the two
are the same number.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .checkpoint import (HASH_KEY, CheckpointError, _read_metadata, atomic_write, base_identity, check_base,
                         check_values, tensors_sha256)
from .loss import lm_loss
from .model import GPT

CONFIG_HASH_KEY = "minipt.config_sha256"  # the config's content, hashed into the weights file's metadata
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
TENSOR_NAME = "prompt_embeddings"
# minipt init -> PEFT's PromptTuningInit. PEFT's "TEXT" requires a tokenizer name to validate, which minipt
# does not know, so a text-initialised prompt is recorded as "RANDOM" (the init does not matter once trained).
_PEFT_INIT = {"uniform": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "RANDOM"}
_MINIPT_INIT = {"RANDOM": "uniform", "SAMPLE_VOCAB": "vocab", "TEXT": "text"}


def peft_config(pt, base_model_name_or_path: str | None = None) -> dict:
    """The adapter_config.json of a PromptTuning (or a PrefixTuning), with the keys PEFT's config writes."""
    cfg = pt.model.config
    if hasattr(pt, "prefix_embeddings"):  # a deep prompt: PEFT's PrefixTuningConfig, saved materialised
        return {"auto_mapping": None, "base_model_name_or_path": base_model_name_or_path, "encoder_hidden_size": None,
                "inference_mode": True, "init_weights": None, "modules_to_save": None,
                "num_attention_heads": cfg.n_head, "num_layers": cfg.n_layer, "num_transformer_submodules": 1,
                "num_virtual_tokens": pt.n_prefix, "peft_type": "PREFIX_TUNING", "peft_version": None,
                "prefix_projection": False,  # the MLP of reparam="mlp" is never saved: the prefix itself is
                "revision": None, "task_type": "CAUSAL_LM", "token_dim": cfg.n_embd}
    return {
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,  # PEFT writes True on save; from_pretrained(..., is_trainable=True) flips it
        "modules_to_save": None,
        "num_attention_heads": cfg.n_head,
        "num_layers": cfg.n_layer,
        "num_transformer_submodules": 1,  # a decoder-only model has one embedding stream
        "num_virtual_tokens": pt.n_prompt,
        "peft_type": "PROMPT_TUNING",
        "peft_version": None,
        "prompt_tuning_init": _PEFT_INIT.get(pt.init, "RANDOM"),
        "prompt_tuning_init_text": None,
        "revision": None,
        "task_type": "CAUSAL_LM",
        "token_dim": pt.prompt.shape[-1],
        "tokenizer_kwargs": None,
        "tokenizer_name_or_path": None,
    }


def save_peft(pt, directory, base_model_name_or_path: str | None = None, extra_metadata: dict | None = None) -> Path:
    """Write adapter_config.json and adapter_model.safetensors (fp32 prompt) into `directory`, atomically each.

    The weights file's metadata also carries minipt's proof (minipt.checkpoint): the base model's identity and
    a hash of the tensor, the metadata and the config's content, checked by read_peft and load_peft."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tuned = pt.prefix_embeddings() if hasattr(pt, "prefix_embeddings") else pt.prompt_embeddings()
    prompt = tuned.detach().float().cpu().contiguous()  # (n_prompt, D), or a prefix (n_prefix, n_layer * 2 * D)
    text = json.dumps(peft_config(pt, base_model_name_or_path), indent=2, sort_keys=True) + "\n"
    meta = {"format": "pt", **base_identity(pt.model), **(extra_metadata or {}),
            CONFIG_HASH_KEY: _config_sha256(json.loads(text))}
    meta[HASH_KEY] = tensors_sha256({TENSOR_NAME: prompt}, meta)
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file({TENSOR_NAME: prompt}, tmp, metadata=meta))
    atomic_write(directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))
    return directory


def read_peft(directory, peft_type: str = "PROMPT_TUNING") -> tuple[torch.Tensor, dict]:
    """(prompt_embeddings, adapter config) of a PEFT adapter folder of `peft_type`, checked; no model needed.

    PROMPT_TUNING: prompt_embeddings (n_p, D). PREFIX_TUNING: (n_prefix, n_layer * 2 * D), minipt.prefix's layout.
    """
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}: not a PEFT adapter folder")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{config_path} is not UTF-8 text (byte {e.start}): not an adapter config") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_path} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path} must hold a JSON object, got {type(config).__name__}")
    if config.get("peft_type") != peft_type:
        what = "a soft prompt" if peft_type == "PROMPT_TUNING" else "a key/value prefix"
        raise CheckpointError(f"{config_path}: peft_type is {config.get('peft_type')!r}; {what} comes from "
                              f"{peft_type} adapters")
    if peft_type == "PREFIX_TUNING" and config.get("prefix_projection"):
        raise CheckpointError(f"{config_path}: prefix_projection is true; minipt reads the materialised prefix "
                              f"(PEFT saves it so only with prefix_projection false, or in inference mode)")
    if config.get("task_type") not in (None, "CAUSAL_LM"):
        raise CheckpointError(f"{config_path}: task_type is {config.get('task_type')!r}; minipt's GPT is a CAUSAL_LM")
    if config.get("num_transformer_submodules") not in (None, 1):
        raise CheckpointError(f"{config_path}: num_transformer_submodules is "
                              f"{config['num_transformer_submodules']}; a decoder-only GPT has 1")
    if not weights_path.is_file():
        old = " (adapter_model.bin is the old pickle format: re-save it with safe_serialization=True)" \
            if (directory / "adapter_model.bin").is_file() else ""
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory}{old}")
    try:
        tensors = load_file(str(weights_path))
        meta = _read_metadata(weights_path)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights_path} is not a readable safetensors file: {e}") from e
    prompt = tensors.get(TENSOR_NAME)
    if prompt is None or prompt.dim() != 2:
        raise CheckpointError(f"{weights_path}: no (num_virtual_tokens, token_dim) tensor named {TENSOR_NAME!r} "
                              f"(found {sorted(tensors)})")
    check_values({TENSOR_NAME: prompt}, weights_path)
    declared = (config.get("num_virtual_tokens"), config.get("token_dim"))
    if peft_type == "PREFIX_TUNING" and isinstance(config.get("num_layers"), int) and isinstance(declared[1], int):
        declared = (declared[0], config["num_layers"] * 2 * declared[1])  # (n_prefix, n_layer * 2 * D)
    if declared != tuple(prompt.shape):
        raise CheckpointError(f"{directory}: the config declares (num_virtual_tokens, token_dim) = {declared} "
                              f"but {TENSOR_NAME} has shape {tuple(prompt.shape)}")
    if HASH_KEY in meta:  # written by minipt: its proof covers the tensor, the metadata and the config
        if meta[HASH_KEY] != tensors_sha256(tensors, meta) or meta.get(CONFIG_HASH_KEY) != _config_sha256(config):
            raise CheckpointError(f"{directory} is corrupted or was edited: its files do not match the hash minipt "
                                  f"stored in {WEIGHTS_NAME}")
    config["minipt"] = meta  # the weights file's metadata, for load_peft's base-model check
    return prompt, config


def load_peft(model: GPT, directory, backend: str = "auto"):
    """PromptTuning.from_peft: a trainable PromptTuning on `model` with the prompt of a PEFT adapter folder."""
    from .prompt import PromptTuning

    prompt, config = read_peft(directory)
    D = model.config.n_embd
    if prompt.shape[1] != D:
        raise CheckpointError(f"{directory}: the prompt has token_dim {prompt.shape[1]} but the model has "
                              f"n_embd={D}; it was made for another model")
    if "base_fingerprint" in config["minipt"]:  # a folder minipt wrote knows its base model; PEFT's do not
        check_base(config["minipt"], model, f"{directory}: the prompt")
    # kept fp32 and requiring grad: it can be trained further
    return PromptTuning.from_tensor(model, prompt, init=_MINIPT_INIT.get(str(config.get("prompt_tuning_init")),
                                                                         "unknown"), backend=backend)


def load_peft_prefix(model: GPT, directory):
    """PrefixTuning.from_peft: a trainable PrefixTuning (P-tuning v2) on `model` from a PREFIX_TUNING folder."""
    from .prefix import PrefixTuning

    prefix, config = read_peft(directory, "PREFIX_TUNING")
    c = model.config
    shape = (config.get("num_layers"), config.get("num_attention_heads"), config.get("token_dim"))
    if shape != (c.n_layer, c.n_head, c.n_embd):
        raise CheckpointError(f"{directory}: the adapter is for (num_layers, num_attention_heads, token_dim) = "
                              f"{shape}, the model has ({c.n_layer}, {c.n_head}, {c.n_embd}); made for another model")
    if "base_fingerprint" in config["minipt"]:
        check_base(config["minipt"], model, f"{directory}: the prefix")
    return PrefixTuning.from_tensor(model, prefix)


def _config_sha256(config: dict) -> str:
    """The config's content (not its layout: reformatting the JSON keeps it)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


# ---- PEFT's loss convention --------------------------------------------------------------------------------


def targets_from_labels(labels: torch.Tensor) -> torch.Tensor:
    """minipt targets (B, n) from Hugging Face labels (B, n): targets[:, t] = labels[:, t + 1], last = -100.

    Hugging Face labels are aligned with input_ids (labels[:, t] is the token at t; the model shifts), minipt
    targets are already shifted (targets[:, t] is the token after t). So a minipt batch (idx, targets) from
    `minipt.tasks.collate`, whose last target is not in idx, becomes a Hugging Face batch only with that
    token appended to input_ids. labels[:, 0] is dropped: in minipt no prompt slot predicts anything.
    """
    targets = torch.full_like(labels, -100)
    targets[:, :-1] = labels[:, 1:]
    return targets


def peft_loss(pt, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The loss PEFT's PeftModelForCausalLM computes for (input_ids, labels), with minipt's modules.

    The positions n_p - 1 .. n_p + n - 2 predict labels[:, 0 .. n - 1]: the last prompt slot scores labels[:, 0].
    Mean cross-entropy over labels != -100 (put -100 at padded positions, as with transformers).
    """
    pt.check(input_ids, labels, name="input_ids")
    h = pt.hidden(input_ids)  # (B, n_p + n, D)
    logits = pt.model.head(h[:, pt.n_prompt - 1: -1])  # (B, n, V): slot n_p-1 predicts labels[:, 0]
    return lm_loss(logits, labels)
