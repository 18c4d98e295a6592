"""Files: safetensors with metadata, written atomically, read back with clear errors.

Every minipt file carries, in its safetensors metadata (a str -> str mapping):
    "minipt.kind"    "gpt" | "prompt" | ...      what the file holds
    "minipt.sha256"  hash of every tensor's bytes, so a flipped or cut byte is caught on load
plus what the kind needs (a model's config, a prompt's n_prompt and base-model fingerprint).

Writes go to a temporary file in the same folder, are flushed to disk, then renamed over the target with
`os.replace`, which is atomic on POSIX and Windows: a crash leaves either the old file or the new one, never
half of one.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


class CheckpointError(ValueError):
    """A file that exists but cannot be used: corrupted, truncated, or made for something else."""


def atomic_write(path, write: Callable[[str], None]) -> Path:
    """Call write(tmp_path), fsync it, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file private (0600); give it the usual mode
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read the umask is to set it and put it back
    os.umask(mask)
    return mask


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names and raw bytes of the tensors, in sorted name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def save_tensors(path, tensors: dict[str, torch.Tensor], kind: str, metadata: dict | None = None) -> Path:
    """Write tensors and metadata as one safetensors file, atomically."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta["minipt.kind"] = kind
    meta["minipt.sha256"] = tensors_sha256(tensors)
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_tensors(path, kind: str, map_location="cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a file written by save_tensors; check its kind and its content hash."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such checkpoint file: {path}")
    try:
        tensors = load_file(str(path), device=str(map_location))
        with open(path, "rb") as f:  # the metadata sits in the JSON header after an 8-byte length
            header_len = int.from_bytes(f.read(8), "little")
            meta = json.loads(f.read(header_len)).get("__metadata__") or {}
    except (SafetensorError, ValueError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupted?): {e}") from e
    found = meta.get("minipt.kind")
    if found != kind:
        raise CheckpointError(f"{path} holds {found!r}, expected a minipt {kind!r} file")
    if tensors_sha256(tensors) != meta.get("minipt.sha256"):
        raise CheckpointError(f"{path} is corrupted: its tensors do not match the hash stored in the file")
    return tensors, meta


# ---- base models --------------------------------------------------------------------------------------


def _model_tensors(model) -> dict[str, torch.Tensor]:
    # lm_head.weight is the same tensor as transformer.wte.weight (tied); store it once.
    return {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}


def model_fingerprint(model) -> str:
    """16 hex digits that identify a base model: its config and every weight."""
    digest = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    digest.update(tensors_sha256(_model_tensors(model)).encode())
    return digest.hexdigest()[:16]


def save_model(model, path, extra_metadata: dict | None = None) -> Path:
    meta = {"config": json.dumps(model.config.to_dict()), "fingerprint": model_fingerprint(model)}
    meta.update(extra_metadata or {})
    return save_tensors(path, _model_tensors(model), kind="gpt", metadata=meta)


def load_model(path, map_location="cpu"):
    from .model import GPT, GPTConfig

    tensors, meta = load_tensors(path, kind="gpt", map_location=map_location)
    try:
        config = GPTConfig(**json.loads(meta["config"]))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: the model config in the metadata is missing or invalid ({e})") from e
    model = GPT(config).to(map_location)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not fit the config (missing {missing}, unexpected {unexpected})")
    return model


# ---- training state (for resuming) --------------------------------------------------------------------


def save_train_state(path, state: dict) -> Path:
    """Trainable tensors, optimizer state, step and RNG states, for `train(..., resume=True)`."""
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_train_state(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such training checkpoint: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a cut or garbled file
        raise CheckpointError(f"{path} is not a readable training checkpoint (truncated or corrupted?): {e}") from e
