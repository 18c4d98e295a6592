"""Student notebooks, generated from the solution notebooks (in the manner of nbgrader).

A solution is written once, in `notebooks/exercises/solutions/NAME.ipynb`, between two marker lines:

    def concat(prompt, wte, idx, wpe):
        ### BEGIN SOLUTION
        ...
        ### END SOLUTION

The student notebook `notebooks/exercises/NAME.ipynb` is the same notebook with each marked block replaced,
at the block's indentation, by

        # YOUR CODE HERE
        raise NotImplementedError("...")

and with every output, execution count and cell metadata (tags kept) removed: a student receives clean
cells. Student notebooks are committed exactly as generated (never executed), so `build(check=True)`
compares whole files: any edit of a solution notebook's cells that is not rebuilt shows up as stale.

A student's work is never replaced: each generated notebook records, in its metadata, a hash of its cells
as generated. A notebook whose cells no longer match that hash has been filled in (or edited) and `build`
keeps it and says so (`status`); only `force=True` (`build --force`) replaces it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

__all__ = [
    "PLACEHOLDER",
    "STUDENT_METADATA",
    "build",
    "cells_sha256",
    "default_folder",
    "notebook_text",
    "plan",
    "status",
    "strip_solutions",
    "student_notebook",
]

BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
PLACEHOLDER = ("# YOUR CODE HERE", 'raise NotImplementedError("fill in the lines marked YOUR CODE HERE")')
STUDENT_METADATA = {
    "kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"},
    "language_info": {"name": "python"},
}


def default_folder() -> Path:
    """notebooks/exercises/ of this checkout (the package lives in minipt/exercises/)."""
    return Path(__file__).resolve().parents[2] / "notebooks" / "exercises"


def strip_solutions(source: str, where: str = "a cell") -> str:
    """The source with every BEGIN/END SOLUTION block replaced by the placeholder, at its indentation."""
    out, inside, indent = [], False, ""
    for number, line in enumerate(source.split("\n"), start=1):
        marker = line.strip()
        if marker == BEGIN:
            if inside:
                raise ValueError(f"{where}, line {number}: {BEGIN} inside another solution block")
            inside, indent = True, line[: len(line) - len(line.lstrip())]
            out.extend(indent + text for text in PLACEHOLDER)
        elif marker == END:
            if not inside:
                raise ValueError(f"{where}, line {number}: {END} without {BEGIN}")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise ValueError(f"{where}: {BEGIN} is never closed by {END}")
    return "\n".join(out)


def student_notebook(solution):
    """A new notebook: the solution's cells, solutions stripped, outputs and run metadata removed."""
    import nbformat

    nb = nbformat.v4.new_notebook(metadata=dict(STUDENT_METADATA))
    for number, cell in enumerate(solution.cells, start=1):
        metadata = {"tags": list(cell.metadata["tags"])} if cell.metadata.get("tags") else {}
        if cell.cell_type == "code":
            new = nbformat.v4.new_code_cell(strip_solutions(cell.source, f"code cell {number}"), metadata=metadata)
        elif cell.cell_type == "markdown":
            new = nbformat.v4.new_markdown_cell(cell.source, metadata=metadata)
        else:
            new = nbformat.v4.new_raw_cell(cell.source, metadata=metadata)
        if "id" in cell:
            new["id"] = cell["id"]
        nb.cells.append(new)
    nb.metadata["minipt"] = {"generated_cells_sha256": cells_sha256(nb)}  # tells "untouched" from "filled"
    return nb


def notebook_text(nb) -> str:
    """The file's text exactly as nbformat.write would produce it."""
    import nbformat

    text = nbformat.writes(nb)
    return text if text.endswith("\n") else text + "\n"


def cells_sha256(nb) -> str:
    """A hash of a notebook's cells as a student edits them (type and source; not outputs or run counts)."""
    cells = [[cell.cell_type, cell.source] for cell in nb.cells]
    return hashlib.sha256(json.dumps(cells).encode()).hexdigest()


def status(target: Path, text: str) -> str:
    """What building `target` from the generated `text` would do to it:

    new      no such file yet
    fresh    the file is exactly the generated text
    stale    the file is an older generated notebook, untouched since (its cells still hash to the value
             recorded in its metadata when it was generated), or its cells are those build writes now:
             replacing it loses nothing
    filled   the file's cells differ from what was generated for it (a student's work, or an edit): never
             replaced without force
    """
    import nbformat

    if not target.exists():
        return "new"
    if target.read_text(encoding="utf-8", errors="replace") == text:
        return "fresh"
    try:
        nb = nbformat.read(target, as_version=4)
        recorded = nb.metadata.get("minipt", {}).get("generated_cells_sha256")
    except Exception:  # unreadable: nothing proves it is an untouched generated notebook
        return "filled"
    # untouched since it was generated, or its cells are the ones build writes now: replacing it loses nothing
    now = json.loads(text).get("metadata", {}).get("minipt", {}).get("generated_cells_sha256") if text else None
    return "stale" if cells_sha256(nb) in (recorded, now) else "filled"


def plan(folder: Path | None = None) -> list[tuple[Path, str, str]]:
    """(student notebook, status, generated text) for every solution notebook of `folder`."""
    import nbformat

    folder = Path(folder) if folder is not None else default_folder()
    solutions = sorted((folder / "solutions").glob("*.ipynb"))
    if not solutions:
        raise FileNotFoundError(f"no solution notebooks in {folder / 'solutions'}")
    out = []
    for path in solutions:
        text = notebook_text(student_notebook(nbformat.read(path, as_version=4)))
        target = folder / path.name
        out.append((target, status(target, text), text))
    return out


def build(folder: Path | None = None, check: bool = False, force: bool = False) -> list[Path]:
    """Write (or with check=True only list) the new and stale student notebooks; returns their paths.

    A filled notebook (`status`) is kept, and left out of the list, unless force=True replaces it too."""
    from ..checkpoint import atomic_write

    touched = []
    for target, state, text in plan(folder):
        if state in ("new", "stale") or (state == "filled" and force):
            touched.append(target)
            if not check:
                atomic_write(target, lambda tmp, text=text: Path(tmp).write_text(text, encoding="utf-8"))
    return touched
