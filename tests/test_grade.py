"""`minipt exercises check` on notebooks that go wrong: a kernel that dies, a cell that runs too long, a file
that is not a notebook, Ctrl-C. Each gives a grade or one line, never a traceback; the kernel talks over
Unix sockets, so ipykernel's warning about unencrypted TCP is never printed."""

import os
import signal
import subprocess
import sys
import time

import pytest

nbformat = pytest.importorskip("nbformat")
pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

from helpers import as_from_a_terminal  # noqa: E402
from minipt.exercises.__main__ import main  # noqa: E402

CHECK_CONCAT = """
import torch
from minipt import exercises

def concat(prompt, wte, idx, wpe):
    B, n = idx.shape
    x = torch.cat([prompt.to(wte.dtype).expand(B, -1, -1), wte[idx]], dim=1)
    return x + wpe[: x.shape[1]]

print(exercises.check("concat", concat))
"""


def notebook(folder, name, *sources):
    path = folder / name
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in sources]), path)
    return path


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def test_a_dead_kernel_keeps_the_grade_of_the_cells_before_it(tmp_path, capsys):
    path = notebook(tmp_path, "01_math.ipynb", CHECK_CONCAT, "import os\nos._exit(1)", "print('never')")
    assert main(["check", str(path)]) == 1
    captured = capsys.readouterr()
    assert "concat                 passed." in captured.out
    assert "cell 2: the kernel died while running it" in captured.out
    assert "concat_backward        not checked" in captured.out
    assert "1 of 4 exercises passed" in captured.out
    assert "Traceback" not in captured.out + captured.err and "TCP" not in captured.err


def test_a_cell_past_the_timeout_is_named_and_the_rest_still_runs(tmp_path, capsys):
    path = notebook(tmp_path, "01_math.ipynb", "import time\ntime.sleep(60)", CHECK_CONCAT)
    start = time.perf_counter()
    assert main(["check", str(path), "--timeout", "5"]) == 1
    assert time.perf_counter() - start < 50
    captured = capsys.readouterr()
    assert "error in cell 1: ran longer than 5 s and was interrupted; the cells after it still ran" in captured.out
    assert "KeyboardInterrupt" not in captured.out
    assert "concat                 passed." in captured.out
    assert "Traceback" not in captured.out + captured.err and "TCP" not in captured.err


@pytest.mark.parametrize(
    "content, reason", [("{}", "not a Jupyter notebook"), ("print('hi')\n", "not a Jupyter"), (None, "no such file")]
)
def test_not_a_notebook_gives_one_line(tmp_path, capsys, content, reason):
    path = tmp_path / "homework.ipynb"
    if content is not None:
        path.write_text(content)
    assert main(["check", str(path)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and reason in lines[0], captured.err
    assert captured.out == ""


def test_ctrl_c_gives_one_line_and_exit_130(tmp_path):
    started = tmp_path / "started"
    path = notebook(tmp_path, "01_math.ipynb", f"open({str(started)!r}, 'w').close()\nimport time\ntime.sleep(120)")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "minipt.exercises", "check", str(path)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=as_from_a_terminal,  # a background test run ignores SIGINT, and its children would too
    )
    deadline = time.time() + 120
    while not started.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert started.exists(), proc.communicate()
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (out, err)
    assert err.strip().splitlines() == ["minipt exercises check: interrupted; no grade"], err
    assert "Traceback" not in out + err
