"""The notebooks: each runs top to bottom, in time, and the committed files are clean.

`test_notebook_runs` executes a notebook with nbclient in a fresh Jupyter kernel and fails on the first cell that
raises (an `assert` of the notebook included), or when the whole run takes more than 180 s (issue 5: at most 3
minutes on a 2-core laptop CPU), or when a cell prints other than its committed output (on CPU; timings masked, see
VARIES), so committed outputs cannot go stale. The kernel is the "python3" kernelspec, which jupyter_client resolves
to the Python running pytest when ipykernel is installed in it; a cell appended to the run checks that from inside
the kernel. The kernel's environment is this process's without TRITON_INTERPRET (tests/conftest.py sets it when
there is no GPU): notebook 2 sets it itself, and the others must not depend on it.

`test_committed_notebook` reads the files as committed: outputs of a real run (every code cell executed, a plot
in the outputs), no error output, no absolute path of the machine that ran them, at least five asserts.

One test per notebook: `pytest -n 2` runs two notebooks at once, each kernel then on one thread.
"""

import ast
import os
import re
import sys
import time
from pathlib import Path

import pytest
import torch

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = [
    "01_prompt_tuning_math.ipynb",
    "02_fused_kernel.ipynb",
    "03_tuning_a_frozen_gpt.ipynb",
    "04_kernel_benchmarks.ipynb",
    "05_the_paper_in_miniature.ipynb",
    "06_the_seed_claims_tested.ipynb",
]
TIME_LIMIT_S = 180
MIN_ASSERTS = 5
# Absolute paths of a machine: POSIX home, temp and work folders, macOS and Windows ones.
ROOT_FOLDERS = ("home", "Users", "root", "tmp", "work", "private", "var/folders", "opt", "usr")
ABSOLUTE_PATH = re.compile(
    r"(?<![\w.~])(" + "|".join(f"/{name}/" for name in ROOT_FOLDERS) + r"|site-packages|[A-Za-z]:\\)"
)


def code_cells(nb):
    return [cell for cell in nb.cells if cell.cell_type == "code"]


# What may differ between two CPU runs of a notebook: live timings (seconds, milliseconds, ratios of times; a timing's
# width moves the columns after it) and the installed transformers version. Everything else a cell prints is
# deterministic and compared as committed.
VARIES = re.compile(r" *\d[\d,.]*\s?(?:s|ms|x)\b|transformers \S+")  # leading spaces too: columns align


def printed(cell) -> str:
    """What a code cell printed to stdout or returned as text, with the parts in VARIES masked."""
    if cell.cell_type != "code":
        return ""
    parts = [out.text for out in cell.outputs if out.output_type == "stream" and out.name == "stdout"]
    parts += [out.data["text/plain"] for out in cell.outputs if "text/plain" in out.get("data", {})]
    return VARIES.sub("<varies>", "".join(parts))


def output_text(cell) -> str:
    """Everything a code cell printed or displayed, as text (images excluded)."""
    parts = []
    for out in cell.get("outputs", []):
        if out.output_type == "stream":
            parts.append(out.text)
        elif out.output_type == "error":
            parts.append("\n".join([out.ename, out.evalue, *out.traceback]))
        else:
            parts.extend(v for k, v in out.get("data", {}).items() if k.startswith("text/") and isinstance(v, str))
    return "\n".join(parts)


def count_asserts(nb) -> int:
    n = 0
    for cell in code_cells(nb):
        python = "\n".join(line for line in cell.source.splitlines() if not line.lstrip().startswith(("%", "!")))
        n += sum(isinstance(node, ast.Assert) for node in ast.walk(ast.parse(python)))
    return n


def kernel_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if os.environ.get("PYTEST_XDIST_WORKER"):
        env.setdefault("OMP_NUM_THREADS", "1")  # several notebooks at once: one thread each
    return env


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook(name):
    path = NOTEBOOK_DIR / name
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    cells = code_cells(nb)
    assert all(cell.execution_count is not None for cell in cells), f"{name}: commit it with the outputs of a run"
    errors = [out for cell in cells for out in cell.outputs if out.output_type == "error"]
    assert not errors, f"{name}: error output {errors[0].ename}: {errors[0].evalue}"
    assert any("image/png" in out.get("data", {}) for cell in cells for out in cell.outputs), f"{name}: no plot"
    assert str(ROOT) not in path.read_text(), f"{name} contains the absolute path of this checkout"
    for cell in nb.cells:
        found = ABSOLUTE_PATH.search(cell.source + "\n" + (output_text(cell) if cell.cell_type == "code" else ""))
        assert found is None, f"{name}: absolute path {found.group(0)!r} in a cell:\n{cell.source[:200]}"
    assert count_asserts(nb) >= MIN_ASSERTS, f"{name}: only {count_asserts(nb)} asserts"


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name):
    if name.startswith("02_"):
        pytest.importorskip("triton", reason="notebook 2 runs and compiles the Triton kernel (Linux only)")
    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    committed = [printed(cell) for cell in nb.cells]
    nb.cells.append(nbformat.v4.new_code_cell("import sys\nprint(sys.executable)"))
    client = nbclient.NotebookClient(
        nb,
        timeout=TIME_LIMIT_S,
        kernel_name="python3",
        record_timing=False,
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
    )
    start = time.perf_counter()
    client.execute(env=kernel_env())  # raises CellExecutionError at the first failing cell
    seconds = time.perf_counter() - start
    print(f"{name}: {seconds:.1f} s")

    kernel_python = output_text(nb.cells.pop()).strip()
    assert os.path.samefile(kernel_python, sys.executable), (
        f"the notebook ran in {kernel_python}, not in {sys.executable}: install ipykernel in this environment"
    )
    assert seconds <= TIME_LIMIT_S, f"{name} took {seconds:.0f} s, more than {TIME_LIMIT_S} s"
    if not torch.cuda.is_available():  # the committed outputs are a CPU run's: a GPU prints its own figures
        for i, (cell, before) in enumerate(zip(nb.cells, committed)):
            assert printed(cell) == before, (
                f"{name}, cell {i}: the committed output is stale (run the notebook again and commit it)\n"
                f"committed:\n{before[:800]}\nnow:\n{printed(cell)[:800]}"
            )
    for cell in code_cells(nb):
        assert not any(out.output_type == "error" for out in cell.outputs)
        found = ABSOLUTE_PATH.search(output_text(cell))
        assert found is None, f"{name}: a cell printed an absolute path ({found.group(0)!r}):\n{cell.source[:200]}"


POINTER = re.compile(r"exercise (\d+), `(\w+)` in `exercises/(\w+)\.ipynb` \((\d+) min\)")  # in a "Practise it" cell


def test_every_exercise_is_pointed_to_from_the_walkthrough():
    """Reading leads to doing: each exercise has a "Practise it" pointer in a walkthrough notebook, and the pointer's
    number, notebook and minutes are the exercise's own (a renumbered or moved exercise fails here)."""
    from minipt.exercises import EXERCISES

    number = {exercise_id: i for i, exercise_id in enumerate(EXERCISES, 1)}
    pointed = set()
    for path in sorted(NOTEBOOK_DIR.glob("*.ipynb")):
        for cell in nbformat.read(path, as_version=4).cells:
            if cell.cell_type != "markdown" or "**Practise it:**" not in cell.source:
                continue
            for n, exercise_id, notebook, minutes in POINTER.findall(cell.source):
                assert exercise_id in EXERCISES, f"{path.name} points to an unknown exercise {exercise_id!r}"
                ex = EXERCISES[exercise_id]
                assert (int(n), notebook, int(minutes)) == (number[exercise_id], ex.notebook, ex.minutes), (
                    f"{path.name}: the pointer to {exercise_id} says exercise {n} in {notebook} ({minutes} min), "
                    f"not exercise {number[exercise_id]} in {ex.notebook} ({ex.minutes} min)"
                )
                pointed.add(exercise_id)
    assert pointed == set(EXERCISES), f"no walkthrough section points to {sorted(set(EXERCISES) - pointed)}"
