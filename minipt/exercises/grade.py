"""Grading a notebook: run it top to bottom in a fresh kernel, then read the result of every check.

Each check cell calls `exercises.check(...)`, which keeps the last result of each exercise in the kernel and,
when the grader runs the notebook, also appends it as a line of JSON to the file named by RESULTS_ENV. That
file is what the grade is made of: a cell that raised, a check never run, or a check that is "not yet" all
count as not passed. Because each result is written as its check runs, a cell that kills the kernel (or runs
past the timeout) still leaves the grade of every check before it, and one line naming the cell.

The kernel is the "python3" kernelspec (the Python that runs the grader when ipykernel is installed in it),
started in the notebook's folder, without TRITON_INTERPRET in its environment (the kernel notebook sets that
itself, the others must not depend on it), and talking to the grader over Unix sockets in a private temporary
folder rather than TCP ports: nothing else on the machine can connect to it, and ipykernel has no reason to
warn about unencrypted TCP.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import EXERCISES, RESULTS_ENV
from .result import CheckResult

__all__ = ["Grade", "NotebookError", "execute", "grade", "kernel_env", "kernel_manager", "read_notebook"]


class NotebookError(ValueError):
    """The path is not a notebook the grader can run (missing, a folder, not JSON, not a Jupyter notebook)."""


@dataclass
class Grade:
    notebook: str
    seconds: float
    results: dict = field(default_factory=dict)  # exercise id -> CheckResult or None (never checked)
    errors: list = field(default_factory=list)  # "cell 7: NameError: ..." for each cell that raised

    @property
    def all_passed(self) -> bool:
        return not self.errors and bool(self.results) and all(r is not None and r.passed for r in self.results.values())

    def report(self) -> str:
        lines = [f"{self.notebook}: ran in {self.seconds:.1f} s"]
        for ex_id, result in self.results.items():
            if result is None:
                lines.append(f"  {ex_id:<22} not checked (its check cell did not run)")
            else:
                first = str(result).splitlines()[0].split(": ", 1)[1]
                lines.append(f"  {ex_id:<22} {first}")
        lines.extend(f"  error in {e}" for e in self.errors)
        passed = sum(1 for r in self.results.values() if r is not None and r.passed)
        lines.append(f"{passed} of {len(self.results)} exercises passed")
        return "\n".join(lines)


def kernel_env(results_file: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if results_file:
        env[RESULTS_ENV] = results_file
    return env


def read_notebook(path: Path):
    """The notebook at `path`, or NotebookError with one line naming the file and what is wrong with it."""
    import nbformat

    if not path.exists():
        raise NotebookError(f"{path}: no such file")
    if not path.is_file():
        raise NotebookError(f"{path}: not a file")
    try:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
    except Exception as err:  # noqa: BLE001 - JSON, encoding and schema errors all mean the same to a student
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise NotebookError(f"{path}: not a Jupyter notebook ({reason})") from None
    if not any(cell.cell_type == "code" for cell in nb.cells):
        raise NotebookError(f"{path}: the notebook has no code cells, so there is nothing to grade")
    return nb


def kernel_manager(folder: str):
    """A python3 kernel manager on Unix-socket (IPC) transport, its sockets inside `folder` (POSIX), else TCP."""
    from jupyter_client.manager import AsyncKernelManager as KernelManager  # nbclient awaits its client

    if os.name == "posix":
        return KernelManager(kernel_name="python3", transport="ipc", ip=os.path.join(folder, "kernel"))
    return KernelManager(kernel_name="python3")


def execute(path: Path, timeout: int = 120):
    """Run the notebook at `path`: (the executed notebook, its seconds, the results its checks wrote, and a line
    for each cell that was interrupted or killed the kernel). Cells that raise do not stop the run; a cell that runs
    past `timeout` seconds is interrupted and counts as raising; a cell that kills the kernel ends the run."""
    import nbclient
    from nbclient.exceptions import DeadKernelError

    path = Path(path)
    nb = read_notebook(path)
    stopped, timed_out = None, []
    with tempfile.TemporaryDirectory(prefix="minipt-grade-") as folder:
        results_file = os.path.join(folder, "results.jsonl")
        quiet = logging.getLogger("minipt.exercises.grade")
        quiet.setLevel(logging.CRITICAL)  # nbclient logs a timeout as an error; the report says it once
        client = nbclient.NotebookClient(
            nb,
            km=kernel_manager(folder),
            timeout=timeout,
            allow_errors=True,
            record_timing=False,
            interrupt_on_timeout=True,
            log=quiet,
            error_on_timeout={
                "ename": "Timeout",
                "evalue": f"the cell ran longer than {timeout} s and was interrupted",
                "traceback": [],
            },
            resources={"metadata": {"path": str(path.resolve().parent)}},
        )
        start = time.perf_counter()
        with client.setup_kernel(env=kernel_env(results_file)):
            try:
                for index, cell in enumerate(nb.cells):
                    began = time.perf_counter()
                    try:
                        client.execute_cell(cell, index)
                    except DeadKernelError:
                        stopped = (
                            f"cell {index + 1}: the kernel died while running it (os._exit, a crash, or "
                            f"out of memory?); the cells after it did not run"
                        )
                        break
                    if time.perf_counter() - began >= timeout:  # interrupted: say so, not "KeyboardInterrupt"
                        cell.outputs = [o for o in cell.outputs if o.output_type != "error"]
                        timed_out.append(
                            f"cell {index + 1}: ran longer than {timeout} s and was interrupted; "
                            f"the cells after it still ran"
                        )
            except KeyboardInterrupt:  # Ctrl-C: kill the kernel at once (no polite shutdown to wait for)
                process = getattr(getattr(client.km, "provisioner", None), "process", None)
                if process is not None:
                    process.kill()
                raise
        seconds = time.perf_counter() - start
        rows = []
        if os.path.exists(results_file):
            with open(results_file, encoding="utf-8") as f:
                rows = [json.loads(line) for line in f if line.strip()]
    return nb, seconds, rows, timed_out + ([stopped] if stopped else [])


def grade(path, timeout: int = 120) -> Grade:
    """Run the notebook at `path` and collect the result of each of its exercises (NotebookError if it is not
    a notebook)."""
    path = Path(path)
    nb, seconds, rows, stopped = execute(path, timeout)  # stopped: lines naming the cells that stopped early
    errors = []
    for number, cell in enumerate(nb.cells, start=1):
        for out in cell.get("outputs", []):
            if out.output_type == "error":
                errors.append(f"cell {number}: {out.ename}: {out.evalue}"[:300])
    errors.extend(stopped)
    found = {}
    for row in rows:  # the last result of each exercise counts, as in the notebook
        found[row["exercise"]] = CheckResult(row["exercise"], row["passed"], row["message"], tuple(row["tried"]))
    expected = [ex.id for ex in EXERCISES.values() if ex.notebook == path.stem]
    results = {ex_id: found.get(ex_id) for ex_id in expected or found}
    results.update({k: v for k, v in found.items() if k not in results})
    return Grade(path.name, seconds, results, errors)
