"""Grading a notebook: run it top to bottom in a fresh kernel, then read the result of every check.

Each check cell calls `exercises.check(...)`, which keeps the last result of each exercise in the kernel.
After the notebook's own cells, one more cell prints those results as a line of JSON, and that line is what
the grade is made of: a cell that raised, a check never run, or a check that is "not yet" all count as not
passed. The kernel is the "python3" kernelspec (the Python that runs the grader when ipykernel is
installed in it), started in the notebook's folder, without TRITON_INTERPRET in its environment: the kernel
notebook sets that itself, the others must not depend on it.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import EXERCISES
from .result import CheckResult

RESULTS_TAG = "MINIPT-EXERCISE-RESULTS "
REPORT_CELL = (
    "import json as _json\n"
    "from minipt import exercises as _exercises\n"
    f"print({RESULTS_TAG!r} + _json.dumps([r.to_dict() for r in _exercises.results().values()]))"
)


@dataclass
class Grade:
    notebook: str
    seconds: float
    results: dict = field(default_factory=dict)  # exercise id -> CheckResult or None (never checked)
    errors: list = field(default_factory=list)  # "cell 7: NameError: ..." for each cell that raised

    @property
    def all_passed(self) -> bool:
        return not self.errors and bool(self.results) and all(r is not None and r.passed
                                                              for r in self.results.values())

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


def kernel_env() -> dict:
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def execute(path: Path, timeout: int = 120):
    """The executed notebook (cells that raise do not stop the run) and the seconds it took."""
    import nbclient
    import nbformat

    nb = nbformat.read(path, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(REPORT_CELL))
    client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3", allow_errors=True,
                                     record_timing=False,
                                     resources={"metadata": {"path": str(Path(path).resolve().parent)}})
    start = time.perf_counter()
    client.execute(env=kernel_env())
    return nb, time.perf_counter() - start


def grade(path, timeout: int = 120) -> Grade:
    """Run the notebook at `path` and collect the result of each of its exercises."""
    path = Path(path)
    nb, seconds = execute(path, timeout)
    report = nb.cells.pop()
    errors = []
    for number, cell in enumerate(nb.cells, start=1):
        for out in cell.get("outputs", []):
            if out.output_type == "error":
                errors.append(f"cell {number}: {out.ename}: {out.evalue}"[:300])
    found = {}
    for out in report.get("outputs", []):
        if out.output_type == "stream" and RESULTS_TAG in out.text:
            line = next(l for l in out.text.splitlines() if l.startswith(RESULTS_TAG))
            for row in json.loads(line[len(RESULTS_TAG):]):
                found[row["exercise"]] = CheckResult(row["exercise"], row["passed"], row["message"],
                                                     tuple(row["tried"]))
    if not any(out.output_type == "stream" and RESULTS_TAG in out.text for out in report.get("outputs", [])):
        errors.append("the results could not be read back (is minipt importable in the notebook's kernel?)")
    expected = [ex.id for ex in EXERCISES.values() if ex.notebook == path.stem]
    results = {ex_id: found.get(ex_id) for ex_id in expected or found}
    results.update({k: v for k, v in found.items() if k not in results})
    return Grade(path.name, seconds, results, errors)
