"""The README runs as written: its API block, its walkthrough, its Python blocks, and the form of every command.

A newcomer copies these blocks into a fresh folder right after `make demo`. Each test does the same in a temporary
folder: `.venv` there links to the environment running the tests, so `.venv/bin/minipt ...` means what it means in
the repository. Blocks that need a download (GPT-2 weights) are the only ones not run; long jobs (the experiments,
pretraining, the benchmarks) have their command lines parsed, not run.
"""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from minipt.apps.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def blocks(language):
    return [(m.start(), m.group(2)) for m in BLOCK.finditer(README) if m.group(1) == language]


def block_after(heading, language):
    start = README.index(heading)
    return next(text for pos, text in blocks(language) if pos > start)


def needs_download(code):
    return "from_pretrained(" in code and "PeftModel" not in code


def commands(text):
    """The shell commands of a bash block: comments dropped, continued lines joined."""
    text = text.replace("\\\n", " ")
    return [line.split("  #")[0].strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


@pytest.fixture(scope="module")
def newcomer(tmp_path_factory):
    """A fresh folder with `.venv` pointing at this environment, as `make demo` leaves the repository."""
    folder = tmp_path_factory.mktemp("newcomer")
    (folder / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    return folder


def run(args, cwd, stdin=None, shell=False):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    done = subprocess.run(
        args,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        shell=shell,
        input=stdin,
        executable="/bin/bash" if shell else None,
    )
    assert done.returncode == 0, f"{args}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_the_api_block_has_at_most_20_lines_and_runs_in_a_fresh_folder(newcomer):
    code = block_after("## The API in 20 lines", "python")
    assert len(code.strip().splitlines()) <= 20
    out = run([sys.executable, "-c", code], cwd=newcomer)
    assert out.startswith("2560 ")  # the trainable numbers it prints: 20 vectors of 128
    assert (newcomer / "parity.safetensors").is_file()


@pytest.mark.slow
def test_the_walkthrough_runs_as_written_and_gives_what_it_says(newcomer):
    # About a minute: one `minipt tune` of 300 steps, as a newcomer types it.
    walkthrough = block_after("(`PromptBank` and `PrefixTuning` are in `minipt` too.)", "bash")
    outputs = {}
    for line in walkthrough.splitlines():
        command, _, comment = line.partition("  #")
        assert command.startswith(".venv/bin/"), command  # works right after `make demo`, no activation needed
        outputs[command.strip()] = (run(command, cwd=newcomer, shell=True), comment.strip())
    for command, (out, comment) in outputs.items():
        if " eval " in command:  # the comment quotes what eval prints; the figure holds within 2 points
            stated = float(re.search(r"exact match ([\d.]+)%", comment).group(1))
            measured = float(re.search(r"exact match ([\d.]+)%", out).group(1))
            assert abs(measured - stated) <= 2.0, (out, comment)
        if " generate " in command:
            assert out.strip() == comment, (out, comment)
    assert (newcomer / "runs" / "parity-peft" / "adapter_config.json").is_file()

    # The Python blocks that read what the walkthrough wrote: PEFT folders, serving
    for heading in ("### PEFT adapter files", "## Serving many prompts"):
        code = block_after(heading, "python")
        run([sys.executable, "-c", code], cwd=newcomer)


def test_every_python_block_is_run_by_a_test_or_needs_a_download():
    run_by_tests = {
        block_after(h, "python")
        for h in ("## The API in 20 lines", "### PEFT adapter files", "## Serving many prompts")
    }
    for _, code in blocks("python"):
        assert code in run_by_tests or needs_download(code), code


def test_every_shell_command_has_a_form_that_works_after_make_demo(newcomer):
    """Each command starts from the repository's environment, and its arguments parse as the program reads them."""
    parser = build_parser()
    checked = 0
    for _, text in blocks("bash"):
        for command in commands(text):
            words = shlex.split(command.split(" > ")[0])
            if words[0] == "make":
                assert words[1:] in (["demo"], ["test"]), command  # the README's two commands
                continue
            if words[:2] == ["bash", "benchmarks/gpu_check.sh"]:
                run(["bash", "-n", str(ROOT / words[1])], cwd=ROOT)  # its syntax; tests/test_gpu_check.py dry-runs it
                checked += 1
                continue
            assert words[0].startswith(".venv/bin/"), command
            program, args = words[0].removeprefix(".venv/bin/"), words[1:]
            if program == "torchrun":
                args = args[args.index("minipt") + 1 :]  # torchrun ... -m minipt ARGS
                program = "minipt"
            if program == "minipt":
                parser.parse_args(args)  # an unknown flag or choice exits here
            elif program == "python" and args[0] == "-c":
                run(command, cwd=newcomer, shell=True)  # a one-line data maker: cheap, so run
            elif program == "python":
                run([sys.executable, str(ROOT / args[0]), *args[1:], "--parse-only"], cwd=ROOT)
            else:
                pytest.fail(f"unexpected program in the README: {command}")
            checked += 1
    assert checked >= 12
