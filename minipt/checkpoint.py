"""Files: safetensors with metadata, written atomically, read back with clear errors.

Every minipt file carries, in its safetensors metadata (a str -> str mapping):
    "minipt.kind"    "gpt" | "prompt" | ...      what the file holds
    "minipt.sha256"  hash of every tensor's bytes and of the rest of the metadata, so a flipped or cut byte
                     anywhere (a model's config included) is caught on load
plus what the kind needs (a model's config and fingerprint, a prompt's n_prompt and base-model identity,
minipt.tuned.base_identity).
Loaders prove a file before building anything large from it (minipt.model.load_model), and refuse tuned tensors that
are not finite floating-point numbers (`check_values`).

Writes go to a temporary file in the same folder, are flushed to disk, then renamed over the target with
`os.replace`, which is atomic on POSIX and Windows: a crash leaves either the old file or the new one, never
half of one. The temporary file's name holds the writer's process id; a later write of the same file removes
the temporary files of writers that no longer run (a write killed with SIGKILL cannot clean up after itself).

`check_output_path` is what programs call on every output path *before* any work: the file can be written
(its folder exists or can be made, is writable) and the path is a regular file or nothing yet, never a folder
or a device. Only regular files are ever written.

Training state (`save_train_state`) carries the identity of its run (`run`: task or data hash, base-model
fingerprint, n_prompt, init, the training config, the trainable tensors' names and shapes); `check_same_run`
refuses to resume a different run and says which field differs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

__all__ = [
    "CheckpointError",
    "HASH_KEY",
    "TRAIN_STATE_KIND",
    "atomic_write",
    "check_output_dir",
    "check_output_path",
    "check_same_run",
    "check_values",
    "file_kind",
    "load_tensors",
    "load_train_state",
    "model_fingerprint",
    "model_tensors",
    "read_proven",
    "remove_stale_temps",
    "save_model",
    "save_tensors",
    "save_train_state",
    "tensors_sha256",
]


class CheckpointError(ValueError):
    """A file that exists but cannot be used: corrupted, truncated, or made for something else."""


def check_output_path(path, what: str = "--out") -> Path:
    """Fail now, before any work, if `path` cannot be written as a regular file (`what` names it in messages).

    Nothing is created or changed, except the missing folders above `path`, which the write would make anyway.
    """
    path = Path(path)
    if str(path) in ("", "."):
        raise ValueError(f"{what} is empty: give a file name")
    if path.exists() and not path.is_file():
        kind = "a folder" if path.is_dir() else "not a regular file (a device, socket or pipe)"
        raise ValueError(f"{what} {path} is {kind}; give the path of a file")
    parent = path.parent
    for above in (parent, *parent.parents):  # the nearest folder that exists must be a folder, and writable
        if above.exists():
            if not above.is_dir():
                raise ValueError(f"{what} {path}: {above} is a file, not a folder")
            if not os.access(above, os.W_OK | os.X_OK):
                raise ValueError(f"{what} {path}: the folder {above} is not writable")
            break
    if path.exists() and not os.access(path, os.W_OK) and not os.access(parent, os.W_OK):
        raise ValueError(f"{what} {path} is not writable")
    return path


def check_output_dir(path, what: str) -> Path:
    """Like check_output_path, for an output that is a folder of files (a PEFT adapter)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {path} is an existing file; give the path of a folder (made if missing)")
    check_output_path(path / "adapter_config.json", what)
    return path


def _temp_prefix(path: Path) -> str:
    return f".{path.name}."


def remove_stale_temps(path) -> list[Path]:
    """Remove the temporary files an earlier, killed write of `path` left behind; return what was removed.

    A temporary file is named .NAME.PID.RANDOM.tmp; it is stale when process PID no longer runs.
    """
    path = Path(path)
    removed = []
    if not path.parent.is_dir():
        return removed
    for tmp in path.parent.glob(f"{_temp_prefix(path)}*.tmp"):
        pid = tmp.name[len(_temp_prefix(path)) :].split(".")[0]
        if pid.isdigit() and not _process_runs(int(pid)) and tmp.is_file():
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _process_runs(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process is not writing that file now: any temp file of its pid is left over
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists, owned by someone else (or cannot tell): leave its file alone
    return True


def atomic_write(path, write: Callable[[str], None]) -> Path:
    """Call write(tmp_path), fsync it, then rename it over `path` (a regular file or nothing yet)."""
    path = check_output_path(path, "output")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    with _no_ctrl_c():  # a Ctrl-C waits until the file is whole (or gone), then interrupts
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(prefix=f"{_temp_prefix(path)}{os.getpid()}.", suffix=".tmp", dir=path.parent)
            os.close(fd)
            write(tmp)
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file private (0600); give it the usual mode
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if tmp is not None and os.path.exists(tmp):
                os.remove(tmp)
            raise
    return path


@contextlib.contextmanager
def _no_ctrl_c():
    """Hold SIGINT back while a file is written (POSIX, main thread): it is delivered, as KeyboardInterrupt,
    when the block ends. Elsewhere (Windows, other threads) the write's own cleanup removes a half file."""
    can_block = hasattr(signal, "pthread_sigmask") and threading.current_thread() is threading.main_thread()
    if can_block:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        if can_block:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read the umask is to set it and put it back
    os.umask(mask)
    return mask


def tensors_sha256(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """sha256 over names and raw bytes of the tensors, in sorted name order, then over the metadata (sorted
    keys, the hash's own key left out): a flipped byte anywhere in a file, config included, changes it."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().data)
    if metadata is not None:
        digest.update(json.dumps({k: v for k, v in metadata.items() if k != HASH_KEY}, sort_keys=True).encode())
    return digest.hexdigest()


HASH_KEY = "minipt.sha256"


def save_tensors(path, tensors: dict[str, torch.Tensor], kind: str, metadata: dict | None = None) -> Path:
    """Write tensors and metadata as one safetensors file, atomically; the hash covers both."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta["minipt.kind"] = kind
    meta[HASH_KEY] = tensors_sha256(tensors, meta)
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def _read_metadata(path) -> dict[str, str]:
    """A safetensors file's metadata: it sits in the JSON header, after an 8-byte little-endian length."""
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        if header_len > os.path.getsize(path) - 8:  # not a safetensors file: never read past its end
            raise ValueError(f"header length {header_len} runs past the end of the file")
        header = json.loads(f.read(header_len))
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, (dict, type(None))):
        raise ValueError("the header's __metadata__ is not a mapping")
    return meta or {}


def file_kind(path) -> str | None:
    """What a minipt file holds ("gpt", "prompt", "prefix", ...), None when it says nothing or is unreadable;
    load_tensors checks the rest."""
    try:
        return _read_metadata(path).get("minipt.kind")
    except (ValueError, OSError):
        return None


def read_proven(path, kind: str | None = None, map_location="cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a minipt safetensors file (of `kind`, when given) whose stored hash proves both;
    CheckpointError otherwise.

    Files written before the hash covered the metadata carry a hash of the tensors alone, still accepted
    (their model config is proven by the model fingerprint, `load_model`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such checkpoint file: {path}")
    try:
        tensors = load_file(str(path), device=str(map_location))
        meta = _read_metadata(path)
    except (SafetensorError, ValueError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupted?): {e}") from e
    found = meta.get("minipt.kind")
    if kind is not None and found != kind:
        raise CheckpointError(f"{path} holds {found!r}, expected a minipt {kind!r} file")
    stored = meta.get(HASH_KEY)
    if stored is None:
        raise CheckpointError(f"{path} carries no {HASH_KEY}: not a file minipt wrote, or its header was edited")
    if stored != tensors_sha256(tensors, meta) and stored != tensors_sha256(tensors):
        raise CheckpointError(f"{path} is corrupted: its tensors or metadata do not match the hash stored in the file")
    return tensors, meta


def load_tensors(path, kind: str, map_location="cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a file written by save_tensors; check its kind and its content hash."""
    return read_proven(path, kind, map_location)


def check_values(tensors: dict[str, torch.Tensor], path) -> None:
    """Trained numbers are floating point and finite: a file of ints, bools, NaN or inf is refused by name."""
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise CheckpointError(
                f"{path}: the tensor {name!r} holds {t.dtype} values; a trained tensor is floating point"
            )
        if not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{path}: the tensor {name!r} holds NaN or inf")


# ---- base models --------------------------------------------------------------------------------------


def model_tensors(model) -> dict[str, torch.Tensor]:
    """The weights a model file stores and the fingerprint hashes: the state dict without the tied lm_head."""
    # lm_head.weight is the same tensor as transformer.wte.weight (tied); store it once.
    return {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}


def model_fingerprint(model) -> str:
    """16 hex digits that identify a base model: its config and every weight, read as float32 (so the same
    model in float64 has the same fingerprint; bf16 and fp16 round the weights: see `same_base`)."""
    digest = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    tensors = {k: v.float() if v.is_floating_point() else v for k, v in model_tensors(model).items()}
    digest.update(tensors_sha256(tensors).encode())
    return digest.hexdigest()[:16]


def save_model(model, path, extra_metadata: dict | None = None) -> Path:
    """A base model's file (GPT.save); minipt.model.load_model reads it back (this module knows no GPT class)."""
    meta = {"config": json.dumps(model.config.to_dict()), "fingerprint": model_fingerprint(model)}
    meta.update(extra_metadata or {})
    return save_tensors(path, model_tensors(model), kind="gpt", metadata=meta)


# ---- training state (for resuming) --------------------------------------------------------------------


TRAIN_STATE_KIND = "minipt.train_state"


def save_train_state(path, state: dict) -> Path:
    """Trainable tensors, optimizer state, step, RNG states and the run's identity, for `train(..., resume=True)`."""
    for name, t in state.get("trainable", {}).items():
        if not torch.isfinite(t).all():  # never write a checkpoint of non-finite values over a good one
            raise FloatingPointError(f"not writing {path}: the trainable tensor {name!r} holds NaN or inf")
    return atomic_write(path, lambda tmp: torch.save({"kind": TRAIN_STATE_KIND, **state}, tmp))


def load_train_state(path) -> dict:
    path = Path(path)
    if path.exists() and not path.is_file():
        raise CheckpointError(f"{path} is not a file: --checkpoint names the training-state file")
    if not path.is_file():
        raise FileNotFoundError(f"no such training checkpoint: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a cut or garbled file
        raise CheckpointError(f"{path} is not a readable training checkpoint (truncated or corrupted?): {e}") from e
    if not isinstance(state, dict) or state.get("kind") != TRAIN_STATE_KIND:
        raise CheckpointError(f"{path} is not a minipt training checkpoint (a file written by --checkpoint)")
    return state


def check_same_run(saved: dict, current: dict, path) -> None:
    """Refuse to resume from a checkpoint of another run: name every field that differs."""
    differ = [
        f"{key} is {saved.get(key)!r} there, {current.get(key)!r} in this run"
        for key in sorted(set(saved) | set(current))
        if saved.get(key) != current.get(key)
    ]
    if differ:
        raise CheckpointError(
            f"{path} is the checkpoint of another run: {'; '.join(differ)}. Use another "
            f"--checkpoint, or the settings of that run"
        )
