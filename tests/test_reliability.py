"""Nothing is ever lost: outputs checked before training, nothing non-finite kept, resume only the same run,
Ctrl-C and SIGKILL handled cleanly. See README, "What minipt promises"."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from helpers import as_from_a_terminal
from minipt import GPT, GPTConfig, PromptTuning
from minipt.apps.cli import main
from minipt.apps.recipes import tune_prompt
from minipt.checkpoint import CheckpointError, load_train_state
from minipt.tasks import make_split
from minipt.train import TrainConfig, train

TESTS = Path(__file__).parent
SMALL = dict(n_layer=1, n_head=2, n_embd=32, vocab_size=260, block_size=64)


class Line(nn.Module):
    """loss = -w: AdamW moves w by +lr every step; started near float32's largest value (3.4e38) with lr 1e37,
    w is finite after the first step and inf after the second."""

    def __init__(self, start=0.0):
        super().__init__()
        self.w = nn.Parameter(torch.full((1,), start))

    def loss(self, step):
        return -self.w.sum()


LINE_CFG = TrainConfig(steps=8, batch_size=1, lr=1.0, warmup_steps=0, eval_every=2, progress=False)


# ---- outputs ------------------------------------------------------------------------------------------------


def test_steps_0_never_replaces_a_trained_prompt(tmp_path, capsys):
    out = tmp_path / "p.safetensors"
    out.write_bytes(b"a trained prompt")
    with pytest.raises(SystemExit) as info:
        main(["tune", "--task", "parity", "--steps", "0", "--out", str(out)])
    assert info.value.code == 2 and "--steps" in capsys.readouterr().err
    assert out.read_bytes() == b"a trained prompt"


@pytest.mark.parametrize("flag, where", [("--out", "dir"), ("--peft-out", "file"), ("--checkpoint", "dir")])
def test_output_paths_are_checked_before_any_model_is_built(tmp_path, capsys, monkeypatch, flag, where):
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("x")

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the output paths were checked")

    monkeypatch.setattr("minipt.assets.load_base_and_tokenizer", no_model)
    argv = ["tune", "--task", "parity", "--out", str(tmp_path / "p.safetensors"), flag, str(tmp_path / where)]
    t0 = time.perf_counter()
    assert main(argv) == 2
    assert time.perf_counter() - t0 < 1.0
    assert flag in capsys.readouterr().err


# ---- non-finite training ---------------------------------------------------------------------------------


def test_a_non_finite_step_never_reaches_a_checkpoint(tmp_path):
    path = tmp_path / "state.pt"
    module = Line(start=3.3e38)
    cfg = TrainConfig(steps=8, batch_size=1, lr=1e37, warmup_steps=0, eval_every=1, progress=False)
    with pytest.raises(
        FloatingPointError, match=rf"NaN or inf after the optimizer step .*at step 1.*\({path}\) is kept"
    ):
        train(module, lambda step: (step,), cfg, checkpoint_path=path)
    state = load_train_state(path)
    assert state["step"] == 1 and torch.isfinite(state["trainable"]["w"]).all()


def test_the_message_names_a_kept_checkpoint_only_when_there_is_one(tmp_path):
    cfg = TrainConfig(steps=8, batch_size=1, lr=1e37, warmup_steps=0, eval_every=5, progress=False)
    with pytest.raises(FloatingPointError, match="no checkpoint was written") as info:
        train(Line(start=3.3e38), lambda step: (step,), cfg, checkpoint_path=tmp_path / "state.pt")
    assert "kept" not in str(info.value) and not (tmp_path / "state.pt").exists()


# ---- resume knows its run --------------------------------------------------------------------------------


def _tune(tmp_path, task="parity", n_prompt=3, init="uniform", steps=2, model_seed=0, resume=False):
    torch.manual_seed(model_seed)
    model = GPT(GPTConfig(**SMALL))
    data = (make_split(task, "train", 16), make_split(task, "val", 4))
    cfg = TrainConfig(steps=steps, batch_size=4, lr=0.05, warmup_steps=1, eval_every=2, progress=False)
    return tune_prompt(
        model,
        task,
        n_prompt,
        init,
        cfg,
        data=data,
        backend="reference",
        checkpoint_path=tmp_path / "state.pt",
        resume=resume,
    )


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(task="reverse"), "task"),
        (dict(n_prompt=4), "n_prompt"),
        (dict(init="vocab"), "init"),
        (dict(steps=4), "config.steps"),
        (dict(model_seed=1), "base_fingerprint"),
    ],
)
def test_resume_refuses_another_run_and_names_the_field(tmp_path, change, field):
    _tune(tmp_path)
    with pytest.raises(CheckpointError, match=rf"checkpoint of another run: .*\b{field} is "):
        _tune(tmp_path, resume=True, **change)


def test_resume_of_the_same_run_is_accepted(tmp_path):
    first, _ = _tune(tmp_path)
    again, _ = _tune(tmp_path, resume=True)  # nothing left to do: the checkpoint's state is the result
    assert torch.equal(first.prompt, again.prompt)


def test_a_file_that_is_not_a_training_checkpoint_is_named_as_such(tmp_path):
    torch.save({"step": 3}, tmp_path / "state.pt")
    with pytest.raises(CheckpointError, match="is not a minipt training checkpoint"):
        _tune(tmp_path, resume=True)


# ---- interruption ------------------------------------------------------------------------------------------


def _env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")]))
    return env


def _wait_for(path: Path, proc, seconds=120):
    t0 = time.monotonic()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - t0 < seconds, "no checkpoint appeared"
        time.sleep(0.05)


def _small_run(tmp_path):
    """A tiny base model and data file for a CLI run."""
    torch.manual_seed(0)
    GPT(GPTConfig(**SMALL)).save(tmp_path / "base.safetensors")
    (tmp_path / "d.jsonl").write_text(
        "".join(
            json.dumps({"input": w, "output": w[::-1]}) + "\n"
            for w in ["abc", "hello", "xyz", "prompt", "tune", "minipt"] * 3
        )
    )
    return [
        "tune",
        "--data",
        "d.jsonl",
        "--base",
        "base.safetensors",
        "--n-prompt",
        "3",
        "--init",
        "uniform",
        "--batch-size",
        "4",
        "--no-progress",
    ]


def test_ctrl_c_prints_one_line_with_the_resume_command_and_exits_130(tmp_path):
    argv = _small_run(tmp_path) + [
        "--steps",
        "100000",
        "--eval-every",
        "2",
        "--checkpoint",
        "state.pt",
        "--out",
        "p.safetensors",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "minipt", *argv],
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=as_from_a_terminal,
    )
    _wait_for(tmp_path / "state.pt", proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "the last checkpoint is state.pt" in err and "--resume" in err and "minipt tune" in err
    assert not (tmp_path / "p.safetensors").exists()
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


DYING_WRITER = """
import os, signal, sys, torch
from minipt.train import train
from test_reliability import Line, LINE_CFG

real_save, writes = torch.save, []
def dying_save(obj, f):  # the second checkpoint write is killed half-way
    writes.append(f)
    if len(writes) == 2:
        with open(f, "wb") as half:
            half.write(b"half a checkpoint")
        os.kill(os.getpid(), signal.SIGKILL)
    real_save(obj, f)
torch.save = dying_save
train(Line(), lambda step: (step,), LINE_CFG, checkpoint_path=sys.argv[1])
"""


def test_sigkill_during_a_checkpoint_write_then_resume_leaves_no_temp_file(tmp_path):
    path = tmp_path / "state.pt"
    proc = subprocess.run(
        [sys.executable, "-c", DYING_WRITER, str(path)], env=_env(), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert len(list(tmp_path.glob(".state.pt.*.tmp"))) == 1  # the killed write's temp file
    assert load_train_state(path)["step"] == 2  # the first checkpoint, intact

    resumed = Line()
    train(resumed, lambda step: (step,), LINE_CFG, checkpoint_path=path, resume=True)
    straight = Line()
    train(straight, lambda step: (step,), LINE_CFG)
    assert torch.equal(resumed.w, straight.w)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]  # the stale temp file is gone


def _kill_all(torchrun: subprocess.Popen) -> None:
    """SIGKILL torchrun and its workers, as a crash of the machine would. torchrun starts each worker in a
    session of its own (start_new_session), so killing torchrun's process group alone leaves the workers
    training on: rank 0 would go on writing state.pt, and its outputs, while the test reads them and the
    resumed run overwrites them."""
    import psutil  # installed with ipykernel (the dev extra)

    workers = psutil.Process(torchrun.pid).children(recursive=True)  # all started: state.pt exists
    os.killpg(torchrun.pid, signal.SIGKILL)
    for worker in workers:
        try:
            os.killpg(worker.pid, signal.SIGKILL)  # the worker's own session, with anything it started
        except ProcessLookupError:
            pass
    torchrun.wait(timeout=60)
    gone, alive = psutil.wait_procs(workers, timeout=60)
    assert not alive, f"workers still running: {alive}"


@pytest.mark.slow
def test_two_processes_resume_to_the_uninterrupted_result(tmp_path):
    """--checkpoint/--resume under torchrun (gloo): rank 0 writes, both ranks read; killed + resumed = straight."""
    argv = _small_run(tmp_path) + ["--steps", "40", "--eval-every", "2", "--lr", "0.05"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "minipt"]
    straight = subprocess.run(
        [*torchrun, *argv, "--out", "a.safetensors"],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert straight.returncode == 0, straight.stderr

    killed = subprocess.Popen(
        [*torchrun, *argv, "--checkpoint", "state.pt", "--out", "b.safetensors"],
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    _wait_for(tmp_path / "state.pt", killed)
    _kill_all(killed)
    step = load_train_state(tmp_path / "state.pt")["step"]
    assert step < 40 and not (tmp_path / "b.safetensors").exists()

    resumed = subprocess.run(
        [*torchrun, *argv, "--checkpoint", "state.pt", "--resume", "--out", "b.safetensors"],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    model = GPT.from_checkpoint(tmp_path / "base.safetensors")
    a = PromptTuning.load(model, tmp_path / "a.safetensors").prompt
    b = PromptTuning.load(model, tmp_path / "b.safetensors").prompt
    assert torch.equal(a, b), f"killed at step {step}"
