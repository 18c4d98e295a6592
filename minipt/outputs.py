"""The one rule for a command's files, checked before any work: nothing a user types loses their work.

Every command names all its inputs and outputs first and calls `claim_outputs`:

    1. an output is never an input. Paths are compared resolved (symbolic links followed), and existing
       files by identity (`os.path.samefile`: a hard link is the same file), so `--out` can replace neither
       `--base`, nor `--data`, nor a prompt or requests file the command reads;
    2. no two outputs are one file (`--out DIR/adapter_model.safetensors --peft-out DIR`);
    3. an existing output is replaced only when it is this run's own earlier result, or with `--overwrite`.
       "This run's own": the file carries this run's stamp (`run_stamp`: a hash of the command's settings
       and of its input files' bytes, written into the file's metadata), so running the same command again
       is allowed, while a prompt of another run, a base model, or a file minipt did not write is kept,
       and the message names it. A file format without metadata (serve's answers) is replaced only with
       `--overwrite`.

Each refusal happens before anything is read or written, so every existing file is byte-identical after it.
Writes themselves are atomic (minipt.checkpoint.atomic_write), and replace a symbolic link, never its target.
`claim_command` applies the rule for one command (its settings stamp its outputs); `claim_training_outputs`
adds the training commands' checks of --out, --peft-out and the --checkpoint that --resume continues from.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

__all__ = [
    "NOT_IN_STAMP",
    "STAMP_KEY",
    "claim_command",
    "claim_outputs",
    "claim_training_outputs",
    "run_stamp",
    "same_file",
    "stamp_of",
]

STAMP_KEY = "minipt.run_stamp"  # the safetensors metadata key that holds a file's run stamp
# Settings that do not change what a run writes: left out of its stamp.
NOT_IN_STAMP = ("overwrite", "no_progress", "resume", "checkpoint")


def run_stamp(command: str, settings: Mapping, inputs: Iterable = ()) -> str:
    """16 hex digits naming one run: its command, its settings (JSON-like values) and its input files' bytes.

    An input that is not a file (hf:NAME, stdin) enters by its name only."""
    digest = hashlib.sha256(
        json.dumps({"command": command, "settings": dict(settings)}, sort_keys=True, default=str).encode()
    )
    for path in inputs:
        if path is not None and os.path.isfile(path):
            with open(path, "rb") as f:
                digest.update(
                    hashlib.file_digest(f, "sha256").digest()
                    if hasattr(hashlib, "file_digest")
                    else hashlib.sha256(f.read()).digest()
                )
        else:
            digest.update(f"not a file: {path}".encode())
    return digest.hexdigest()[:16]


def stamp_of(path) -> str | None:
    """The run stamp a file carries (a safetensors file written with one), None otherwise."""
    from .checkpoint import _read_metadata

    try:
        return _read_metadata(path).get(STAMP_KEY)
    except (ValueError, OSError, UnicodeDecodeError):  # not a safetensors file: it carries none
        return None


def same_file(a, b) -> bool:
    """Whether two paths name one file: by identity when both exist, else by their resolved paths."""
    a, b = Path(a), Path(b)
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def _paths(value) -> list[Path]:
    """A flag's paths: one path, or the files of a folder output (a PEFT adapter's two files)."""
    if value is None or str(value) == "-":  # "-" is stdin / stdout
        return []
    if isinstance(value, (str, os.PathLike)):
        return [Path(value)]
    return [Path(v) for v in value]


def claim_outputs(
    inputs: Mapping,
    outputs: Mapping,
    *,
    stamp: str | None = None,
    overwrite: bool = False,
    may_exist: Iterable[str] = (),
) -> None:
    """Apply the module's rule; ValueError naming the flags and the file otherwise. Nothing is changed.

    inputs, outputs: flag -> a path, a list of paths (a folder output's files), or None / "-" (none).
    A folder output's files share one stamp: the first one found among them (a PEFT adapter_config.json is
    plain JSON; its adapter_model.safetensors carries the stamp for both). may_exist: flags left out of rule 3,
    whose existing file the command handles itself (a --checkpoint that --resume continues from).
    """
    outs = [(flag, p) for flag, value in outputs.items() for p in _paths(value)]
    ins = [(flag, p) for flag, value in inputs.items() for p in _paths(value)]
    for out_flag, out in outs:  # rule 1
        for in_flag, path in ins:
            if same_file(out, path):
                raise ValueError(
                    f"{out_flag} {out} is the same file as {in_flag} {path}: writing it would replace "
                    f"the input; nothing was changed, give another path"
                )
    for i, (flag_a, a) in enumerate(outs):  # rule 2
        for flag_b, b in outs[i + 1 :]:
            if same_file(a, b):
                raise ValueError(f"{flag_a} and {flag_b} both write {a}; give two different paths")
    if overwrite:
        return
    for flag, value in outputs.items():  # rule 3
        if flag in may_exist:
            continue
        files = _paths(value)
        existing = [p for p in files if p.exists() or p.is_symlink()]
        if not existing:
            continue
        found = next((s for s in map(stamp_of, existing) if s is not None), None)
        if stamp is None or found != stamp:
            raise ValueError(
                f"{flag} {existing[0]} exists and is not this run's earlier result (another run's "
                f"file, or not one minipt wrote); nothing was changed. Give another path, or add "
                f"--overwrite to replace it"
            )


def _hf_files(base: str) -> list[Path]:
    """The files of an hf:FOLDER base model (its weights, config, tokenizer), none for a hub name."""
    folder = Path(base[len("hf:") :])
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []


def claim_command(
    command: str,
    settings: Mapping,
    inputs: Mapping,
    outputs: Mapping,
    *,
    stamped: bool = True,
    overwrite: bool = False,
    may_exist: Iterable[str] = (),
) -> str | None:
    """`claim_outputs` for one command, before any work; returns the run stamp its outputs carry.

    settings: the command's flag -> value (those in NOT_IN_STAMP are left out of the stamp); an hf:FOLDER input
    counts with every file of the folder for rule 1, and by its name only in the stamp. stamped=False: the
    outputs carry no stamp (plain text), so an existing one is replaced only with `overwrite`.
    """
    inputs = {flag: _hf_files(path) if str(path or "").startswith("hf:") else path for flag, path in inputs.items()}
    kept = {k: v for k, v in settings.items() if k not in NOT_IN_STAMP}
    stamp = run_stamp(command, kept, [p for p in inputs.values() if not isinstance(p, list)]) if stamped else None
    claim_outputs(inputs, outputs, stamp=stamp, overwrite=overwrite, may_exist=may_exist)
    return stamp


def claim_training_outputs(
    command: str,
    settings: Mapping,
    inputs: Mapping,
    out,
    checkpoint=None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    peft_out=None,
) -> str:
    """Every output of a training command checked (minipt.checkpoint) and claimed (`claim_command`) before any
    model is built; returns the run stamp to write into them. An existing --checkpoint is the training state of
    an earlier run: it is continued only with `resume` and replaced only with `overwrite`."""
    from .checkpoint import check_output_dir, check_output_path
    from .peft_io import CONFIG_NAME, WEIGHTS_NAME

    check_output_path(out, "--out")
    outputs = {"--out": out, "--checkpoint": checkpoint}
    if peft_out:
        check_output_dir(peft_out, "--peft-out")
        outputs["--peft-out"] = [Path(peft_out) / CONFIG_NAME, Path(peft_out) / WEIGHTS_NAME]
    if checkpoint is not None:
        check_output_path(checkpoint, "--checkpoint")
        if Path(checkpoint).exists() and not resume and not overwrite:
            raise ValueError(
                f"--checkpoint {checkpoint} exists (the training state of an earlier run); add "
                f"--resume to continue from it, or --overwrite to start again and replace it"
            )
    elif resume:
        raise ValueError("--resume needs --checkpoint FILE (the training-state file to continue from)")
    return claim_command(command, settings, inputs, outputs, overwrite=overwrite, may_exist=("--checkpoint",))
