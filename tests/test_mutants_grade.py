"""Tests that each kill planted bugs that mutation testing (`make mutate MODULE=minipt/exercises/grade.py`) found
in minipt/exercises/grade.py, the grader a course grades students with: the report's every line, when a grade
counts as passed, which notebooks are refused and with what message, and what `execute` hands back from a kernel.
`grade` is run on a made-up execution (no kernel); `execute` runs two small notebooks whose cells write results
themselves (no torch in the kernel): the whole file runs in a few seconds."""

import contextlib
import json
import logging
import os
import re
import signal

import pytest

nbformat = pytest.importorskip("nbformat")
pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

from minipt.exercises import EXERCISES, RESULTS_ENV, CheckResult  # noqa: E402
from minipt.exercises import grade as grading  # noqa: E402
from minipt.exercises.grade import Grade, NotebookError, execute, grade, kernel_env, read_notebook  # noqa: E402

MATH = [ex.id for ex in EXERCISES.values() if ex.notebook == "01_math"]  # the exercises 01_math.ipynb checks


def passed(ex_id, message="3 cases match the reference."):
    return CheckResult(ex_id, True, message, ("B=1", "B=2"))


def not_yet(ex_id, message):
    return CheckResult(ex_id, False, message, ("B=1",))


# ---- Grade: the verdict and the report ----------------------------------------------------------------------


def test_all_passed_needs_every_exercise_checked_and_passed_and_no_error():
    assert Grade("a.ipynb", 1.0, {"x": passed("x"), "y": passed("y")}).all_passed is True
    assert Grade("a.ipynb", 1.0, {"x": passed("x"), "y": not_yet("y", "no")}).all_passed is False
    assert Grade("a.ipynb", 1.0, {"x": passed("x"), "y": None}).all_passed is False
    assert Grade("a.ipynb", 1.0, {"x": passed("x")}, ["cell 2: NameError: name 'q' is not defined"]).all_passed is False
    assert Grade("a.ipynb", 1.0, {}).all_passed is False  # nothing graded is not a pass


def test_the_report_has_a_line_per_exercise_the_errors_and_the_count():
    results = {
        "concat": passed("concat"),
        "causal_attention": not_yet("causal_attention", "case B=2: y: first difference at (b=0): expected 1, got 2"),
        "frozen_head_backward": None,
    }
    errors = ["cell 3: ValueError: boom", "cell 5: the kernel died while running it"]
    report = Grade("01_math.ipynb", 12.34, results, errors).report()
    assert report.splitlines() == [
        "01_math.ipynb: ran in 12.3 s",
        "  concat                 passed. 3 cases match the reference.",  # the id padded to 22 characters
        # only the first line of the result, and everything after its first ": " (the message's own colons kept)
        "  causal_attention       not yet. Case B=2: y: first difference at (b=0): expected 1, got 2",
        "  frozen_head_backward   not checked (its check cell did not run)",
        "  error in cell 3: ValueError: boom",
        "  error in cell 5: the kernel died while running it",
        "1 of 3 exercises passed",
    ]
    assert Grade("b.ipynb", 0.05, {"concat": None}).report().splitlines() == [
        "b.ipynb: ran in 0.1 s",
        "  concat                 not checked (its check cell did not run)",
        "0 of 1 exercises passed",
    ]


# ---- kernel_env and kernel_manager --------------------------------------------------------------------------


def test_the_kernel_gets_the_environment_without_triton_interpret_and_with_the_results_file(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("MINIPT_TEST_VARIABLE", "kept")
    monkeypatch.delenv(RESULTS_ENV, raising=False)
    env = kernel_env("results.jsonl")
    assert "TRITON_INTERPRET" not in env and env["MINIPT_TEST_VARIABLE"] == "kept"
    assert env[RESULTS_ENV] == "results.jsonl"
    assert RESULTS_ENV not in kernel_env() and RESULTS_ENV not in kernel_env("")
    assert {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} == kernel_env()


@pytest.mark.skipif(os.name != "posix", reason="Unix sockets: POSIX only")
def test_the_kernel_talks_over_unix_sockets_in_the_private_folder(tmp_path):
    from jupyter_client.manager import AsyncKernelManager

    km = grading.kernel_manager(str(tmp_path))
    assert isinstance(km, AsyncKernelManager)
    assert (km.kernel_name, km.transport, km.ip) == ("python3", "ipc", os.path.join(str(tmp_path), "kernel"))


def test_elsewhere_the_kernel_talks_over_tcp(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "name", "nt")  # what kernel_manager reads to tell Windows from POSIX
    km = grading.kernel_manager(str(tmp_path))
    assert (km.kernel_name, km.transport) == ("python3", "tcp")


# ---- read_notebook: what is not a notebook ------------------------------------------------------------------


def code_notebook(path, *sources, markdown=()):
    cells = [nbformat.v4.new_markdown_cell(s) for s in markdown] + [nbformat.v4.new_code_cell(s) for s in sources]
    nbformat.write(nbformat.v4.new_notebook(cells=cells), path)
    return path


def not_a_notebook(path, message):
    with pytest.raises(NotebookError, match=f"^{re.escape(message)}$"):
        read_notebook(path)


def test_a_notebook_with_code_is_read(tmp_path):
    nb = read_notebook(code_notebook(tmp_path / "a.ipynb", "x = 1", markdown=["# title"]))
    assert [c.cell_type for c in nb.cells] == ["markdown", "code"] and nb.cells[1].source == "x = 1"


def test_a_missing_path_or_a_folder_is_named(tmp_path):
    not_a_notebook(tmp_path / "nb.ipynb", f"{tmp_path / 'nb.ipynb'}: no such file")
    not_a_notebook(tmp_path, f"{tmp_path}: not a file")


def test_a_notebook_without_code_cells_has_nothing_to_grade(tmp_path):
    for path in (code_notebook(tmp_path / "md.ipynb", markdown=["# only text"]), code_notebook(tmp_path / "0.ipynb")):
        not_a_notebook(path, f"{path}: the notebook has no code cells, so there is nothing to grade")


def test_a_notebook_that_reads_but_breaks_the_schema_is_refused(tmp_path):
    path = code_notebook(tmp_path / "a.ipynb", "x = 1")
    nb = json.loads(path.read_text())
    nb["cells"][0]["cell_type"] = "spreadsheet"  # nbformat.read takes it; only nbformat.validate refuses it
    path.write_text(json.dumps(nb))
    with pytest.raises(NotebookError, match=f"^{re.escape(str(path))}: not a Jupyter notebook \\(.+\\)$"):
        read_notebook(path)


def test_the_reason_is_the_first_line_of_the_error_cut_at_200_characters(tmp_path, monkeypatch):
    path = code_notebook(tmp_path / "a.ipynb", "x = 1")
    line = "bad byte " + "x" * 300

    def fail(error):
        def read(*args, **kwargs):
            raise error

        monkeypatch.setattr(nbformat, "read", read)

    fail(ValueError(f"  {line}\nsecond line\n"))
    not_a_notebook(path, f"{path}: not a Jupyter notebook ({line[:200]})")
    fail(UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"))
    not_a_notebook(path, f"{path}: not a Jupyter notebook ('utf-8' codec can't decode byte 0xff in position 0: "
                         f"invalid start byte)")  # fmt: skip
    fail(KeyError())  # no text at all: the type names it
    not_a_notebook(path, f"{path}: not a Jupyter notebook (KeyError)")
    fail(OSError(" \n "))
    not_a_notebook(path, f"{path}: not a Jupyter notebook (OSError)")


# ---- grade: from an execution to a Grade ---------------------------------------------------------------------


def executed(*cells):
    """A notebook as `execute` returns it: cells given as (cell_type, [error (ename, evalue), ...])."""
    nb = nbformat.v4.new_notebook()
    for cell_type, errors in cells:
        if cell_type == "markdown":
            nb.cells.append(nbformat.v4.new_markdown_cell("text"))
            continue
        cell = nbformat.v4.new_code_cell("pass")
        cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="hi\n")]
        cell.outputs += [nbformat.v4.new_output("error", ename=n, evalue=v, traceback=[]) for n, v in errors]
        nb.cells.append(cell)
    return nb


def row(ex_id, passed, message="", tried=()):
    return {"exercise": ex_id, "passed": passed, "message": message, "tried": list(tried)}


def fake_execute(monkeypatch, nb, rows, stopped=(), seconds=4.25):
    calls = []

    def run(path, timeout=120):
        calls.append((path, timeout))
        return nb, seconds, rows, list(stopped)

    monkeypatch.setattr(grading, "execute", run)
    return calls


def test_grade_keeps_the_last_result_of_each_exercise_in_the_notebooks_order(tmp_path, monkeypatch):
    rows = [
        row(MATH[1], False, "not this one", ["B=1"]),
        row(MATH[0], True, "4 cases match the reference.", ["B=1", "B=2"]),
        row(MATH[1], True, "the last result counts", ["B=3"]),
    ]
    calls = fake_execute(monkeypatch, executed(("code", [])), rows)
    result = grade(str(tmp_path / "01_math.ipynb"), timeout=7)
    assert calls == [(tmp_path / "01_math.ipynb", 7)]  # the path as a Path, the timeout passed on
    assert isinstance(result, Grade) and (result.notebook, result.seconds, result.errors) == ("01_math.ipynb", 4.25, [])
    assert list(result.results) == MATH  # every exercise of the notebook, in its order, checked or not
    assert result.results[MATH[0]] == CheckResult(MATH[0], True, "4 cases match the reference.", ("B=1", "B=2"))
    assert result.results[MATH[1]] == CheckResult(MATH[1], True, "the last result counts", ("B=3",))
    assert all(result.results[ex_id] is None for ex_id in MATH[2:])
    assert not result.all_passed


def test_grade_names_each_cell_that_raised_counting_every_cell_then_the_cells_that_stopped(tmp_path, monkeypatch):
    nb = executed(
        ("markdown", []),
        ("code", [("NameError", "name 'x' is not defined")]),
        ("code", []),
        ("code", [("ValueError", "v" * 400)]),
    )
    stopped = ["cell 5: the kernel died while running it"]
    calls = fake_execute(monkeypatch, nb, [row(ex_id, True) for ex_id in MATH], stopped)
    result = grade(tmp_path / "01_math.ipynb")
    assert calls == [(tmp_path / "01_math.ipynb", 120)]  # the default: 120 s a cell
    assert result.errors == [
        "cell 2: NameError: name 'x' is not defined",
        ("cell 4: ValueError: " + "v" * 400)[:300],  # each cut at 300 characters
        "cell 5: the kernel died while running it",
    ]
    assert all(r.passed for r in result.results.values()) and not result.all_passed


def test_grade_of_a_notebook_of_no_known_exercises_lists_what_was_checked(tmp_path, monkeypatch):
    rows = [row("ensemble_vote", False, "no"), row("concat", True, "yes")]
    fake_execute(monkeypatch, executed(("code", [])), rows)
    result = grade(tmp_path / "homework.ipynb")
    assert list(result.results) == ["ensemble_vote", "concat"]
    assert [r.passed for r in result.results.values()] == [False, True]
    # a check of another notebook's exercise is kept too, after the notebook's own
    fake_execute(monkeypatch, executed(("code", [])), [row("ensemble_vote", True), row(MATH[0], True)])
    result = grade(tmp_path / "01_math.ipynb")
    assert list(result.results) == [*MATH, "ensemble_vote"] and result.results["ensemble_vote"].passed
    assert result.results[MATH[0]].passed and result.results[MATH[1]] is None


# ---- execute ------------------------------------------------------------------------------------------------


def test_execute_asks_nbclient_to_keep_errors_interrupt_slow_cells_and_run_in_the_notebooks_folder(
    tmp_path, monkeypatch
):
    import nbclient

    seen = {}

    class Stop(Exception):
        pass

    class Client(nbclient.NotebookClient):
        def __init__(self, nb, km=None, **kwargs):
            seen.update(kwargs, nb=nb, km=km)
            raise Stop  # before any kernel starts

    monkeypatch.setattr(nbclient, "NotebookClient", Client)
    monkeypatch.chdir(tmp_path)
    code_notebook(tmp_path / "nb.ipynb", "x = 1")
    with pytest.raises(Stop):
        execute("nb.ipynb")  # a relative path, as a string
    assert [c.source for c in seen["nb"].cells] == ["x = 1"]
    assert seen["km"].transport == ("ipc" if os.name == "posix" else "tcp")  # kernel_manager's, not nbclient's own
    assert (seen["timeout"], seen["allow_errors"], seen["interrupt_on_timeout"], seen["record_timing"]) == (
        120,
        True,
        True,
        False,
    )
    message = "the cell ran longer than 120 s and was interrupted"
    assert seen["error_on_timeout"] == {"ename": "Timeout", "evalue": message, "traceback": []}
    assert seen["resources"] == {"metadata": {"path": str(tmp_path.resolve())}}  # the kernel's working folder
    assert (seen["log"].name, seen["log"].level) == ("minipt.exercises.grade", logging.CRITICAL)  # silenced


WRITE = "import json, os\nwith open(os.environ[{env!r}], 'a') as f:\n    f.write({line!r})\n"


def test_a_notebook_whose_checks_never_ran_gives_no_rows(tmp_path, monkeypatch):
    import nbclient

    class Client(nbclient.NotebookClient):  # no kernel: no cell writes a result, so no results file is made
        @contextlib.contextmanager
        def setup_kernel(self, **kwargs):
            yield

        def execute_cell(self, cell, index, **kwargs):
            return cell

    monkeypatch.setattr(nbclient, "NotebookClient", Client)
    nb, seconds, rows, stopped = execute(code_notebook(tmp_path / "nb.ipynb", "x = 1"))
    assert (rows, stopped) == ([], []) and [c.source for c in nb.cells] == ["x = 1"] and seconds >= 0


def test_execute_runs_every_cell_names_the_slow_one_and_stops_at_a_dead_kernel(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    folders = []

    def manager(folder):
        folders.append(folder)
        return kernel_manager(folder)

    kernel_manager = grading.kernel_manager
    monkeypatch.setattr(grading, "kernel_manager", manager)
    first, second = row("concat", True, "yes"), row("concat", False, "no")
    path = code_notebook(
        tmp_path / "nb.ipynb",
        "import os\nprint(os.getcwd(), os.environ.get('TRITON_INTERPRET'))",
        WRITE.format(env=RESULTS_ENV, line=json.dumps(first) + "\n\n"),  # a blank line is skipped
        "raise ValueError('boom')",
        "import time\ntime.sleep(60)",
        WRITE.format(env=RESULTS_ENV, line=json.dumps(second) + "\n"),
        "os._exit(1)",
        "print('never')",
    )
    root_level = logging.getLogger().level
    nb, seconds, rows, stopped = execute(path, timeout=2)
    assert logging.getLogger().level == root_level  # only the grader's own logger is silenced
    assert rows == [first, second]
    assert stopped == [
        "cell 4: ran longer than 2 s and was interrupted; the cells after it still ran",
        "cell 6: the kernel died while running it (os._exit, a crash, or out of memory?); the cells after it did "
        "not run",
    ]
    assert nb.cells[0].outputs[0].text.split() == [str(tmp_path), "None"]  # in the notebook's folder, no Triton
    assert [o.ename for o in nb.cells[2].outputs] == ["ValueError"]  # a cell that raised keeps its error
    assert [o.output_type for o in nb.cells[3].outputs] == []  # the interrupt is said once, in `stopped`
    assert nb.cells[6].outputs == []
    assert 2 <= seconds < 60
    assert len(folders) == 1 and os.path.basename(folders[0]).startswith("minipt-grade-")
    assert not os.path.exists(folders[0])  # the results file and sockets go with their folder


def test_ctrl_c_kills_the_kernel_at_once_and_is_raised(tmp_path, monkeypatch):
    import nbclient

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    processes = []

    class Client(nbclient.NotebookClient):
        def execute_cell(self, cell, index, **kwargs):
            if index == 1:  # Ctrl-C while the second cell runs
                processes.append(self.km.provisioner.process)
                raise KeyboardInterrupt
            return super().execute_cell(cell, index, **kwargs)

    monkeypatch.setattr(nbclient, "NotebookClient", Client)
    with pytest.raises(KeyboardInterrupt):
        execute(code_notebook(tmp_path / "nb.ipynb", "x = 1", "x = 2"))
    assert processes[0].wait(timeout=10) == -signal.SIGKILL  # killed, not asked to shut down
