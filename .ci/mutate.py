"""Mutation testing of one module: `make mutate MODULE=minipt/serve.py` runs `python .ci/mutate.py minipt/serve.py`.

mutmut ([tool.mutmut] in pyproject.toml) plants one small bug at a time in the module (a `<` made `<=`, a `*`
made `/`, a constant changed, an argument dropped, ...) and runs the tests that reach the changed function; a bug
that no test notices has "survived". [tool.minipt.mutate] in pyproject.toml names each module's tests. mutmut
reads its settings from the pyproject.toml of the folder it runs in, so each module gets a folder,
mutants/MODULE/, holding a copy of the sources and tests and a pyproject.toml that names that module and its tests.
`mutmut results` and `mutmut show NAME` (run in that folder) list the survivors and show each one's change.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
COPIED = ("minipt", "kernels", "tests", "benchmarks", "notebooks")  # notebooks: the grader's tests run them


def toml_table(name: str, table: dict) -> str:
    """A TOML table of strings, numbers, booleans and lists of strings (all [tool.mutmut] holds)."""
    return f"[{name}]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in table.items())


def main(argv: list[str]) -> int:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    table = config["tool"]["minipt"]["mutate"]
    if len(argv) != 1 or argv[0] not in table:
        print(f"usage: make mutate MODULE=M, with M one of: {', '.join(table)}", file=sys.stderr)
        return 2
    module = argv[0]
    work = ROOT / "mutants" / module.replace("/", "-").removesuffix(".py")
    for name in COPIED:  # a fresh copy of the sources; mutmut keeps its results in work/mutants/ between runs
        shutil.rmtree(work / name, ignore_errors=True)
        shutil.copytree(ROOT / name, work / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    mutmut = {**config["tool"]["mutmut"], "only_mutate": [module], "pytest_add_cli_args_test_selection": table[module]}
    (work / "pyproject.toml").write_text(
        toml_table("tool.mutmut", mutmut)
        + "\n"
        + toml_table("tool.pytest.ini_options", config["tool"]["pytest"]["ini_options"])
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-m", "mutmut", "run", "--max-children", "2"], cwd=work, env=env)
    subprocess.run([sys.executable, "-m", "mutmut", "results"], cwd=work, env=env)
    return run.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
