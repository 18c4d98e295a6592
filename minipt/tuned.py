"""What a tuned module is: the contract a soft prompt (minipt.prompt) and a deep prompt (minipt.prefix) share.

A tuned module is a frozen base model (`self.model`) and a few trained tensors. Whatever its kind, it keeps one
promise: it runs only on the base model it was tuned on. So every file of one carries its base model's identity,

    base_fingerprint   16 hex digits of the base model's config and weights (minipt.checkpoint.model_fingerprint)
    base_config        the base model's config as JSON, to say what the file was made for

and every loader checks it (`check_base`) before the tensors are used.

Each class says what it is with three class attributes; this module reads them, never a class's name:

    kind        the file kind in a minipt file's metadata ("prompt", "prefix"): what a file holds
    peft_type   the PEFT adapter type ("PROMPT_TUNING", "PREFIX_TUNING"): what an adapter folder holds
    methods     {training method: reparam}: the `minipt tune --method` names that train it

A class registers itself when it is defined (`__init_subclass__`), so this module imports neither class. Importing
`minipt.tuned` runs `minipt/__init__.py` first, which defines both, so the registry is never empty when it is read.
Each class owns its own conversions (`save` / `load`, `save_peft` / `from_peft`), written with the helpers here.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from .checkpoint import CheckpointError, file_kind, model_fingerprint, save_tensors
from .peft_io import adapter_type

__all__ = ["TunedModule", "check_base", "load_tuned", "method_class", "module_class", "save_tuned"]

_CLASSES: dict[str, type] = {}  # kind -> class, filled as the classes are defined


class TunedModule(nn.Module):
    """The base of PromptTuning and PrefixTuning: a frozen `self.model` and trainable tensors (module docstring)."""

    kind: str = ""
    peft_type: str = ""
    methods: dict[str, str | None] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.kind:
            _CLASSES[cls.kind] = cls

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


# ---- the base model's identity ----------------------------------------------------------------------------


def check_base(expected: str | None, model, what: str, found: str | None = None) -> None:
    """Refuse a tuned tensor made for another base model: `expected` is the fingerprint it was tuned on, `what`
    names it in the message. `found`: the model's fingerprint, when the caller has it already (it hashes every
    weight)."""
    found = found if found is not None else model_fingerprint(model)
    if expected != found:
        raise CheckpointError(f"{what} was made for another base model (fingerprint {expected}, this model is "
                              f"{found}); load the base model it was tuned on")


def save_tuned(module: TunedModule, path, tensors: dict[str, torch.Tensor], **metadata) -> Path:
    """A tuned module's file: its tensors, its kind, its own metadata and its base model's identity, atomically."""
    meta = {**metadata, "base_fingerprint": model_fingerprint(module.model),
            "base_config": json.dumps(module.model.config.to_dict())}
    return save_tensors(path, tensors, kind=module.kind, metadata=meta)


# ---- what a file or folder holds --------------------------------------------------------------------------


def module_class(path) -> type:
    """The TunedModule class a path holds: a PEFT adapter folder by its peft_type, a minipt file by its kind."""
    path = Path(path)
    if path.is_dir():
        found = adapter_type(path)
        for cls in _CLASSES.values():
            if cls.peft_type == found:
                return cls
        raise CheckpointError(f"{path}: a PEFT adapter of type {found!r}; minipt reads "
                              f"{' and '.join(sorted(c.peft_type for c in _CLASSES.values()))} adapters")
    if not path.is_file():
        raise FileNotFoundError(f"no such checkpoint file: {path}")
    kind = file_kind(path)
    if kind not in _CLASSES:
        held = "no minipt kind (not a minipt file, or unreadable)" if kind is None else f"a minipt {kind!r} file"
        raise CheckpointError(f"{path} holds {held}; a tuned module is a minipt "
                              f"{' or '.join(repr(k) for k in sorted(_CLASSES))} file or a PEFT adapter folder")
    return _CLASSES[kind]


def load_tuned(model, path) -> TunedModule:
    """Whatever tuned module `path` holds, on `model`: a prompt or prefix file (`minipt tune --out`), or a PEFT
    adapter folder (`--peft-out`). Refuses a file made for another base model."""
    cls = module_class(path)
    return cls.from_peft(model, path) if Path(path).is_dir() else cls.load(model, path)


def method_class(method: str) -> tuple[type, str | None]:
    """(class, reparam) of a training method: "prompt", "ptuning", "ptuning-v2" or "prefix"."""
    for cls in _CLASSES.values():
        if method in cls.methods:
            return cls, cls.methods[method]
    known = [m for cls in _CLASSES.values() for m in cls.methods]
    raise ValueError(f"method must be one of {tuple(known)}, got {method!r}")
