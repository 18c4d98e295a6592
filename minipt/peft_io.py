"""Soft prompts as PEFT adapter folders: write them for Hugging Face `peft`, read the ones it writes.

A PEFT prompt-tuning adapter is a folder with two files:

    adapter_config.json         {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": n_p,
                                 "token_dim": D, "num_transformer_submodules": 1, ...}
    adapter_model.safetensors   one tensor, "prompt_embeddings" (n_p, D)

which is exactly minipt's prompt P (n_p, D). `pt.save_peft(dir)` writes such a folder (no `peft` needed);
`PeftModel.from_pretrained(hf_gpt2, dir)` loads it onto the equivalent transformers GPT-2.
`PromptTuning.from_peft(model, dir)` reads one back; the result trains further like any minipt prompt.
A PREFIX_TUNING folder holds a deep prompt the same way (minipt.prefix). This module knows the folder format
only; each class converts itself (`save_peft`, `from_peft`), so this module imports neither.

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

from .checkpoint import HASH_KEY, CheckpointError, _read_metadata, atomic_write, check_values, tensors_sha256
from .loss import lm_loss
from .model import GPT

CONFIG_HASH_KEY = "minipt.config_sha256"  # the config's content, hashed into the weights file's metadata
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
TENSOR_NAME = "prompt_embeddings"

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "adapter_config",
    "adapter_type",
    "peft_loss",
    "read_peft",
    "targets_from_labels",
    "write_adapter",
]


def adapter_config(
    model: GPT, peft_type: str, num_virtual_tokens: int, base_model_name_or_path: str | None = None, **fields
) -> dict:
    """The adapter_config.json of an adapter of `peft_type` on `model`, with the keys PEFT's config writes; each
    tuned class adds its own `fields` (PromptTuning.peft_config, PrefixTuning.peft_config)."""
    cfg = model.config
    return {
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,  # PEFT writes True on save; from_pretrained(..., is_trainable=True) flips it
        "modules_to_save": None,
        "num_attention_heads": cfg.n_head,
        "num_layers": cfg.n_layer,
        "num_transformer_submodules": 1,  # a decoder-only model has one embedding stream
        "num_virtual_tokens": num_virtual_tokens,
        "peft_type": peft_type,
        "peft_version": None,
        "revision": None,
        "task_type": "CAUSAL_LM",
        "token_dim": cfg.n_embd,
        **fields,
    }


def write_adapter(directory, tensor: torch.Tensor, config: dict, metadata: dict | None = None) -> Path:
    """Write adapter_config.json and adapter_model.safetensors (the tensor in fp32) into `directory`, atomically
    each. tensor: a prompt (n_prompt, D), or a prefix (n_prefix, n_layer * 2 * D).

    The weights file's metadata also carries `metadata` (the class passes its base model's identity,
    minipt.tuned.base_identity) and minipt's proof: a hash of the tensor, the metadata and the config's
    content, checked by read_peft."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    prompt = tensor.detach().float().cpu().contiguous()
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    meta = {"format": "pt", **(metadata or {}), CONFIG_HASH_KEY: _config_sha256(json.loads(text))}
    meta[HASH_KEY] = tensors_sha256({TENSOR_NAME: prompt}, meta)
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file({TENSOR_NAME: prompt}, tmp, metadata=meta))
    atomic_write(directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))
    return directory


def _read_config(directory) -> dict:
    """A PEFT adapter folder's adapter_config.json, as a dict; clear errors for anything else."""
    config_path = Path(directory) / CONFIG_NAME
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
    return config


def adapter_type(directory) -> str | None:
    """The peft_type a PEFT adapter folder declares ("PROMPT_TUNING", "PREFIX_TUNING", ...)."""
    return _read_config(directory).get("peft_type")


def read_peft(directory, peft_type: str = "PROMPT_TUNING") -> tuple[torch.Tensor, dict]:
    """(prompt_embeddings, adapter config) of a PEFT adapter folder of `peft_type`, checked; no model needed.

    PROMPT_TUNING: prompt_embeddings (n_p, D). PREFIX_TUNING: (n_prefix, n_layer * 2 * D), minipt.prefix's layout.
    """
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    config = _read_config(directory)
    if config.get("peft_type") != peft_type:
        what = "a soft prompt" if peft_type == "PROMPT_TUNING" else "a key/value prefix"
        raise CheckpointError(
            f"{config_path}: peft_type is {config.get('peft_type')!r}; {what} comes from {peft_type} adapters"
        )
    if peft_type == "PREFIX_TUNING" and config.get("prefix_projection"):
        raise CheckpointError(
            f"{config_path}: prefix_projection is true; minipt reads the materialised prefix "
            f"(PEFT saves it so only with prefix_projection false, or in inference mode)"
        )
    if config.get("task_type") not in (None, "CAUSAL_LM"):
        raise CheckpointError(f"{config_path}: task_type is {config.get('task_type')!r}; minipt's GPT is a CAUSAL_LM")
    if config.get("num_transformer_submodules") not in (None, 1):
        raise CheckpointError(
            f"{config_path}: num_transformer_submodules is "
            f"{config['num_transformer_submodules']}; a decoder-only GPT has 1"
        )
    if not weights_path.is_file():
        old = (
            " (adapter_model.bin is the old pickle format: re-save it with safe_serialization=True)"
            if (directory / "adapter_model.bin").is_file()
            else ""
        )
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory}{old}")
    try:
        tensors = load_file(str(weights_path))
        meta = _read_metadata(weights_path)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights_path} is not a readable safetensors file: {e}") from e
    prompt = tensors.get(TENSOR_NAME)
    if prompt is None or prompt.dim() != 2:
        raise CheckpointError(
            f"{weights_path}: no (num_virtual_tokens, token_dim) tensor named {TENSOR_NAME!r} (found {sorted(tensors)})"
        )
    check_values({TENSOR_NAME: prompt}, weights_path)
    declared = (config.get("num_virtual_tokens"), config.get("token_dim"))
    if peft_type == "PREFIX_TUNING" and isinstance(config.get("num_layers"), int) and isinstance(declared[1], int):
        declared = (declared[0], config["num_layers"] * 2 * declared[1])  # (n_prefix, n_layer * 2 * D)
    if declared != tuple(prompt.shape):
        raise CheckpointError(
            f"{directory}: the config declares (num_virtual_tokens, token_dim) = {declared} "
            f"but {TENSOR_NAME} has shape {tuple(prompt.shape)}"
        )
    if HASH_KEY in meta:  # written by minipt: its proof covers the tensor, the metadata and the config
        if meta[HASH_KEY] != tensors_sha256(tensors, meta) or meta.get(CONFIG_HASH_KEY) != _config_sha256(config):
            raise CheckpointError(
                f"{directory} is corrupted or was edited: its files do not match the hash minipt "
                f"stored in {WEIGHTS_NAME}"
            )
    config["minipt"] = meta  # the weights file's metadata, for the classes' base-model check (from_peft)
    return prompt, config


def _config_sha256(config: dict) -> str:
    """The config's content (not its layout: reformatting the JSON keeps it)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


# ---- PEFT's loss convention --------------------------------------------------------------------------------


def targets_from_labels(labels: torch.Tensor) -> torch.Tensor:
    """minipt targets (B, n) from Hugging Face labels (B, n): targets[:, t] = labels[:, t + 1], last = -100.

    Hugging Face labels are aligned with input_ids (labels[:, t] is the token at t; the model shifts), minipt
    targets are already shifted (targets[:, t] is the token after t). So a minipt batch (idx, targets) from
    `minipt.data.collate`, whose last target is not in idx, becomes a Hugging Face batch only with that
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
    logits = pt.model.head(h[:, pt.n_prompt - 1 : -1])  # (B, n, V): slot n_p-1 predicts labels[:, 0]
    return lm_loss(logits, labels)
