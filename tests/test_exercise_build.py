"""`minipt exercises build` never replaces a student's work: a filled notebook is kept and named, `--check` does
not call it stale, and `--force` is the only way to replace it."""

import shutil

import nbformat

from minipt.exercises.__main__ import main
from minipt.exercises.build import build, default_folder, status


def _copy(tmp_path):
    folder = tmp_path / "exercises"
    shutil.copytree(default_folder(), folder)
    return folder


def _fill(path, answer="    return prompt  # my answer"):
    nb = nbformat.read(path, as_version=4)
    cell = next(c for c in nb.cells if c.cell_type == "code" and "YOUR CODE HERE" in c.source)
    cell.source = cell.source.replace(
        'raise NotImplementedError("fill in the lines marked YOUR CODE HERE")', answer.strip()
    )
    cell.outputs, cell.execution_count = [], 3
    nbformat.write(nb, path)
    return path.read_bytes()


def _edit_solution(folder):
    """An instructor's edit of a solution notebook outside the solution block: every student copy is stale."""
    path = folder / "solutions" / "01_math.ipynb"
    nb = nbformat.read(path, as_version=4)
    cell = next(c for c in nb.cells if c.cell_type == "markdown")
    cell.source += "\n\nOne more sentence."
    nbformat.write(nb, path)


def test_a_filled_notebook_survives_build_and_check_says_so(tmp_path, capsys):
    folder = _copy(tmp_path)
    mine = _fill(folder / "01_math.ipynb")
    _edit_solution(folder)
    assert status(folder / "01_math.ipynb", "") == "filled"

    assert main(["build", "--check", "--folder", str(folder)]) == 1
    out = capsys.readouterr()
    assert "stale: 01_math" not in out.out and "kept: 01_math.ipynb" in out.out
    assert "exercises build` to regenerate" not in out.err  # no advice that would replace the work

    assert main(["build", "--folder", str(folder)]) == 0
    assert "kept: 01_math.ipynb" in capsys.readouterr().out
    assert (folder / "01_math.ipynb").read_bytes() == mine

    assert main(["build", "--force", "--folder", str(folder)]) == 0
    assert "One more sentence." in (folder / "01_math.ipynb").read_text()


def test_an_untouched_generated_notebook_is_stale_and_rebuilt(tmp_path, capsys):
    folder = _copy(tmp_path)
    _edit_solution(folder)
    assert [p.name for p in build(folder, check=True)] == ["01_math.ipynb"]
    assert main(["build", "--check", "--folder", str(folder)]) == 1
    assert "stale: 01_math.ipynb" in capsys.readouterr().out
    assert main(["build", "--folder", str(folder)]) == 0
    assert "One more sentence." in (folder / "01_math.ipynb").read_text()
    assert build(folder, check=True) == []


def test_a_missing_solutions_folder_is_one_line(tmp_path, capsys):
    assert main(["build", "--folder", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no solution notebooks" in err


def test_a_notebook_with_todays_cells_and_an_old_hash_is_stale_not_filled(tmp_path):
    """A merge can bring today's cells with the hash of an older generation: replacing it loses nothing."""
    folder = _copy(tmp_path)
    path = folder / "01_math.ipynb"
    nb = nbformat.read(path, as_version=4)
    nb.metadata["minipt"]["generated_cells_sha256"] = "0" * 64
    nbformat.write(nb, path)
    assert [p.name for p in build(folder, check=True)] == ["01_math.ipynb"]
    build(folder)
    assert build(folder, check=True) == []
