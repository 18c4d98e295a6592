"""What a tuned module is: the contract a soft prompt (minipt.prompt) and a deep prompt (minipt.prefix) share.

A tuned module is a frozen base model (`self.model`) and a few trained tensors. Whatever its kind, it keeps one
promise: it runs only on the base model it was tuned on. So every file of one carries its base model's identity,

    base_fingerprint   16 hex digits of the base model's config and weights (minipt.checkpoint.model_fingerprint)
    base_config        the base model's config as JSON, to say what the file was made for
    base_dtype         the dtype of its weights when the file was written
    base_sketch        [norm, projection] per weight tensor, which survive a cast to bf16 or fp16 (model_sketch)

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

from .checkpoint import CheckpointError, file_kind, model_fingerprint, model_tensors, save_tensors
from .peft_io import adapter_type

__all__ = [
    "TunedModule",
    "base_identity",
    "check_base",
    "load_tuned",
    "method_class",
    "model_sketch",
    "module_class",
    "same_base",
    "save_tuned",
]

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


# The sketch's tolerance, relative to each tensor's norm: bf16 rounds each weight by at most 2**-9 of itself
# (2**-8 of its ulp), so the norm and the projection move by about 2**-9 of the norm; 2**-5 leaves room
# sixteen times over, while another model's projections differ by about the norm itself.
SKETCH_TOLERANCE = 2.0**-5


def model_sketch(model) -> list[list[float]]:
    """[norm, projection] per weight tensor (sorted names): the projection is the dot product with a fixed
    random +-1 vector. Unlike the fingerprint these survive rounding to bf16 or fp16 within SKETCH_TOLERANCE."""
    out = []
    for _name, t in sorted(model_tensors(model).items()):
        w = t.detach().cpu().double().reshape(-1)  # (n,)
        signs = torch.randint(0, 2, w.shape, generator=torch.Generator().manual_seed(len(out))).double() * 2 - 1
        out.append([float(f"{w.norm():.9g}"), float(f"{(w @ signs):.9g}")])
    return out


def base_identity(model) -> dict[str, str]:
    """What a tuned file stores about its base model (metadata strings): fingerprint, config, dtype, sketch."""
    return {
        "base_fingerprint": model_fingerprint(model),
        "base_config": json.dumps(model.config.to_dict()),
        "base_dtype": str(model.transformer.wte.weight.dtype).removeprefix("torch."),
        "base_sketch": json.dumps(model_sketch(model)),
    }


def same_base(meta: dict, model) -> bool:
    """Whether `model` is the base model described by `meta` (base_identity's keys): the same fingerprint, or,
    when either side was not float32, the same config and a sketch within SKETCH_TOLERANCE."""
    if meta.get("base_fingerprint") == model_fingerprint(model):
        return True
    here = base_identity(model)
    if "float32" == meta.get("base_dtype", "float32") == here["base_dtype"] or "base_sketch" not in meta:
        return False
    try:
        same_config = json.loads(meta["base_config"]) == model.config.to_dict()
        saved = json.loads(meta["base_sketch"])
    except (KeyError, ValueError, TypeError):
        return False
    sketch = json.loads(here["base_sketch"])
    return (
        same_config
        and len(saved) == len(sketch)
        and all(
            abs(a - b) <= SKETCH_TOLERANCE * abs(n) + 1e-12
            for (n, p), (m, q) in zip(saved, sketch)
            for a, b in ((n, m), (p, q))
        )
    )


def check_base(meta: dict, model, subject: str) -> None:
    """CheckpointError unless the file whose metadata is `meta` was made for `model` (`same_base`); `subject`
    starts the message ("FILE: the prompt")."""
    if not same_base(meta, model):
        raise CheckpointError(
            f"{subject} was made for another base model (fingerprint "
            f"{meta.get('base_fingerprint')}, this model is {model_fingerprint(model)}); load the "
            f"base model it was tuned on"
        )


def save_tuned(
    module: TunedModule, path, tensors: dict[str, torch.Tensor], extra_metadata: dict | None = None, **metadata
) -> Path:
    """A tuned module's file: its tensors, its kind, its own metadata and its base model's identity, atomically."""
    meta = {**metadata, **base_identity(module.model), **(extra_metadata or {})}
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
        raise CheckpointError(
            f"{path}: a PEFT adapter of type {found!r}; minipt reads "
            f"{' and '.join(sorted(c.peft_type for c in _CLASSES.values()))} adapters"
        )
    if not path.is_file():
        raise FileNotFoundError(f"no such checkpoint file: {path}")
    kind = file_kind(path)
    if kind not in _CLASSES:
        held = "no minipt kind (not a minipt file, or unreadable)" if kind is None else f"a minipt {kind!r} file"
        raise CheckpointError(
            f"{path} holds {held}; a tuned module is a minipt "
            f"{' or '.join(repr(k) for k in sorted(_CLASSES))} file or a PEFT adapter folder"
        )
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
