"""Tests that each kill planted bugs mutation testing (`make mutate MODULE=minipt/checkpoint.py`, README "Mutation
testing") found in minipt/checkpoint.py: the output-path checks, the removal of the temporary files a killed write
left, the atomic write itself, and what the files' hash covers and their errors say.

The tests may run as root, whom no permission bit stops: a folder or file that cannot be written is one that
`os.access` (monkeypatched by `refuse`) says cannot be."""

import os
import re
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from helpers import random_gpt
from minipt.checkpoint import (
    CheckpointError,
    _read_metadata,
    atomic_write,
    check_output_dir,
    check_output_path,
    check_values,
    load_tensors,
    model_fingerprint,
    read_proven,
    remove_stale_temps,
    save_tensors,
)

DEAD = 99_999_999  # above every system's largest process id (Linux allows at most 2**22): no process has it


def e(path) -> str:
    return re.escape(str(path))


def refuse(monkeypatch, path, mode):
    """os.access answers no for `mode` (os.W_OK, os.X_OK) on `path`, as it would for a user without that right."""
    real = os.access

    def access(p, m, *args, **kwargs):
        return False if Path(p) == Path(path) and m & mode else real(p, m, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)


# ---- check_output_path and check_output_dir: refuse a bad output before any work ------------------------------


@pytest.mark.parametrize("path", ["", "."])
def test_an_empty_output_path_is_refused_as_empty(path):
    with pytest.raises(ValueError, match=r"^--out is empty: give a file name$"):
        check_output_path(path)


def test_a_folder_or_a_device_is_not_an_output_file(tmp_path):
    with pytest.raises(ValueError, match=rf"^--out {e(tmp_path)} is a folder; give the path of a file$"):
        check_output_path(tmp_path)
    with pytest.raises(ValueError, match=rf"^--out {e(os.devnull)} is not a regular file \(a device, socket or pipe\)"):
        check_output_path(os.devnull)


def test_a_file_where_a_folder_should_be_is_named(tmp_path):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "a" / "b.safetensors"
    with pytest.raises(ValueError, match=rf"^--model {e(out)}: {e(tmp_path / 'file')} is a file, not a folder$"):
        check_output_path(out, "--model")


@pytest.mark.parametrize("mode", [os.W_OK, os.X_OK])
def test_a_folder_one_cannot_write_in_or_enter_is_refused(tmp_path, monkeypatch, mode):
    (tmp_path / "ro").mkdir()
    refuse(monkeypatch, tmp_path / "ro", mode)
    out = tmp_path / "ro" / "new" / "p.safetensors"  # the nearest folder that exists is the one checked
    with pytest.raises(ValueError, match=rf"^--out {e(out)}: the folder {e(tmp_path / 'ro')} is not writable$"):
        check_output_path(out)


def test_a_read_only_file_in_a_writable_folder_can_be_replaced(tmp_path, monkeypatch):
    """The write renames a new file over the old one: that needs the folder's permission, not the file's."""
    (tmp_path / "old.safetensors").write_text("x")
    refuse(monkeypatch, tmp_path / "old.safetensors", os.W_OK)
    assert check_output_path(tmp_path / "old.safetensors") == tmp_path / "old.safetensors"


def test_an_adapter_folder_may_exist_or_be_new_but_not_be_a_file(tmp_path):
    assert check_output_dir(tmp_path, "--peft-out") == tmp_path
    assert check_output_dir(tmp_path / "new", "--peft-out") == tmp_path / "new"
    (tmp_path / "file").write_text("x")
    with pytest.raises(
        ValueError, match=rf"^--peft-out {e(tmp_path / 'file')} is an existing file; give the path of a folder \("
    ):
        check_output_dir(tmp_path / "file", "--peft-out")
    config = tmp_path / "file" / "adapter" / "adapter_config.json"
    with pytest.raises(ValueError, match=rf"^--peft-out {e(config)}: {e(tmp_path / 'file')} is a file, not a folder$"):
        check_output_dir(tmp_path / "file" / "adapter", "--peft-out")


def test_an_adapter_folder_whose_config_file_is_a_folder_is_refused(tmp_path):
    (tmp_path / "adapter_config.json").mkdir()
    with pytest.raises(ValueError, match=rf"^--peft-out {e(tmp_path / 'adapter_config.json')} is a folder"):
        check_output_dir(tmp_path, "--peft-out")


# ---- remove_stale_temps: the temporary files of killed writes -------------------------------------------------


def temp(folder: Path, name: str) -> Path:
    (folder / name).write_text("half a file")
    return folder / name


def test_the_temp_files_of_writers_that_no_longer_run_are_removed_and_returned(tmp_path):
    dead = temp(tmp_path, f".out.safetensors.{DEAD}.a1b2.tmp")
    mine = temp(tmp_path, f".out.safetensors.{os.getpid()}.c3d4.tmp")  # this process writes no such file now
    assert sorted(remove_stale_temps(tmp_path / "out.safetensors")) == sorted([dead, mine])
    assert not dead.exists() and not mine.exists()


def default_signals():
    """In the child: hang-up and terminate kill it (nohup, as `make mutate` may run under, ignores hang-ups)."""
    for sig in (signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)


def test_temp_files_of_running_writers_and_files_of_other_names_are_kept(tmp_path):
    writer = subprocess.Popen(["sleep", "30"], preexec_fn=default_signals)  # a writer that still runs
    try:
        kept = [
            temp(tmp_path, f".out.safetensors.{writer.pid}.a1b2.tmp"),  # its writer runs
            temp(tmp_path, f".other.safetensors.{DEAD}.a1b2.tmp"),  # another file's
            temp(tmp_path, f".out.safetensors.{DEAD}.a1b2.txt"),  # not a temporary file
            temp(tmp_path, f".out.safetensors.x{DEAD}.a1b2.tmp"),  # no process id
        ]
        (tmp_path / f".out.safetensors.{DEAD}.a1b2.tmp").mkdir()  # a folder, whatever its name
        assert remove_stale_temps(tmp_path / "out.safetensors") == []
        writer.terminate()
        assert writer.wait() == -signal.SIGTERM  # asking whether the writer runs sent it no signal
    finally:
        writer.kill()
        writer.wait()
    assert all(f.exists() for f in kept) and (tmp_path / f".out.safetensors.{DEAD}.a1b2.tmp").is_dir()


def test_the_temp_file_of_another_users_writer_is_kept(tmp_path, monkeypatch):
    def kill(pid, sig):
        raise PermissionError(1, "Operation not permitted")  # what os.kill says of a process of another user

    monkeypatch.setattr(os, "kill", kill)
    kept = temp(tmp_path, f".out.safetensors.{DEAD}.a1b2.tmp")
    assert remove_stale_temps(tmp_path / "out.safetensors") == [] and kept.exists()


def test_a_stale_temp_file_another_writer_removes_first_is_no_error(tmp_path, monkeypatch):
    stale = temp(tmp_path, f".out.safetensors.{DEAD}.a1b2.tmp")
    real_is_file = Path.is_file

    def is_file(self):
        found = real_is_file(self)
        if self == stale:
            self.unlink()  # a second write of the same file cleans up between this check and the removal
        return found

    monkeypatch.setattr(Path, "is_file", is_file)
    assert remove_stale_temps(tmp_path / "out.safetensors") == [stale]


# ---- atomic_write ---------------------------------------------------------------------------------------------


def test_the_temp_file_is_named_for_its_target_and_writer_in_the_targets_folder(tmp_path):
    seen = []
    atomic_write(tmp_path / "out.bin", lambda tmp: (seen.append(Path(tmp)), Path(tmp).write_bytes(b"x")))
    (tmp,) = seen
    assert tmp.parent == tmp_path  # one file system: the rename is atomic
    assert re.fullmatch(rf"\.out\.bin\.{os.getpid()}\.[^.]+\.tmp", tmp.name)  # what remove_stale_temps looks for


def test_an_atomic_write_calls_its_target_output_in_errors(tmp_path):
    with pytest.raises(ValueError, match=rf"^output {e(tmp_path)} is a folder"):
        atomic_write(tmp_path, lambda tmp: None)


def test_the_file_is_flushed_through_a_handle_that_may_write_before_the_rename(tmp_path, monkeypatch):
    """Windows cannot flush a file opened read-only."""
    fcntl = pytest.importorskip("fcntl")
    path, flushed, real_fsync = tmp_path / "out.bin", [], os.fsync

    def fsync(fd):
        flushed.append((fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE, path.exists()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(b"x"))
    assert flushed == [(os.O_RDWR, False)] and path.read_bytes() == b"x"


def test_a_temp_file_that_cannot_be_made_raises_its_own_error(tmp_path, monkeypatch):
    def mkstemp(**kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    with pytest.raises(OSError, match="No space left on device"):
        atomic_write(tmp_path / "out.bin", lambda tmp: None)


# ---- what a file's hash covers, and what its errors say -------------------------------------------------------


def test_an_edited_metadata_value_is_caught_by_the_hash(tmp_path):
    path = tmp_path / "p.safetensors"
    save_tensors(path, {"prompt": torch.ones(2, 4)}, kind="prompt", metadata={"n_prompt": "2"})
    data = path.read_bytes()
    assert data.count(b'"n_prompt":"2"') == 1
    path.write_bytes(data.replace(b'"n_prompt":"2"', b'"n_prompt":"3"'))  # the same length: a valid header
    with pytest.raises(CheckpointError, match="is corrupted: its tensors or metadata do not match the hash"):
        load_tensors(path, "prompt")


def test_a_safetensors_file_minipt_did_not_write_is_refused_as_such(tmp_path):
    path = tmp_path / "p.safetensors"
    save_file({"prompt": torch.ones(2, 4)}, path, metadata={"minipt.kind": "prompt"})
    with pytest.raises(CheckpointError, match=r"carries no minipt\.sha256: not a file minipt wrote, or its header"):
        load_tensors(path, "prompt")


def test_a_proven_file_is_read_onto_the_cpu_by_default(tmp_path):
    save_tensors(tmp_path / "p.safetensors", {"prompt": torch.ones(2, 4)}, kind="prompt")
    tensors, meta = read_proven(tmp_path / "p.safetensors")
    assert tensors["prompt"].device.type == "cpu" and meta["minipt.kind"] == "prompt"


def test_values_that_are_not_finite_floats_are_refused_by_name():
    check_values({"w": torch.ones(2)}, "f.safetensors")
    with pytest.raises(CheckpointError, match=r"^f: the tensor 'w' holds torch\.int64 values; a trained tensor is"):
        check_values({"w": torch.ones(2, dtype=torch.int64)}, "f")
    with pytest.raises(CheckpointError, match=r"^f: the tensor 'w' holds NaN or inf$"):
        check_values({"w": torch.tensor([1.0, float("inf")])}, "f")


def test_a_header_that_is_not_safetensors_says_what_is_wrong(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes((100).to_bytes(8, "little") + b"{}")
    with pytest.raises(ValueError, match=r"^header length 100 runs past the end of the file$"):
        _read_metadata(path)
    header = b'{"__metadata__": [1, 2]}'
    path.write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(ValueError, match=r"^the header's __metadata__ is not a mapping$"):
        _read_metadata(path)


def test_a_model_in_float64_has_the_fingerprint_of_its_float32_self():
    model = random_gpt(dict(n_layer=1, n_head=2, n_embd=16, vocab_size=50, block_size=32), seed=0)
    fingerprint = model_fingerprint(model)
    assert model_fingerprint(model.double()) == fingerprint
