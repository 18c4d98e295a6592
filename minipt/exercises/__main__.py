"""python -m minipt.exercises list | build [--check] | check NOTEBOOK.ipynb

list                   the exercises: id, minutes, notebook, title
build                  regenerate the student notebooks from notebooks/exercises/solutions/; a notebook a
                       student filled in is kept (--force replaces it)
build --check          only report stale or filled student notebooks (exit 1 if any)
check NOTEBOOK.ipynb   run a notebook in a fresh kernel and print each exercise's result (exit 0 if all pass)
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="minipt exercises", description="Self-grading prompt-tuning exercises.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the exercises")
    p_build = sub.add_parser("build", help="generate the student notebooks from the solution notebooks")
    p_build.add_argument("--check", action="store_true", help="only report stale notebooks; exit 1 if any")
    p_build.add_argument("--folder", default=None, help="the exercises folder (default: notebooks/exercises)")
    p_build.add_argument(
        "--force",
        action="store_true",
        help="also replace notebooks that differ from what build generated (a student's work)",
    )
    p_check = sub.add_parser("check", help="run a notebook and grade its exercises")
    p_check.add_argument("notebook", help="a student (or solution) notebook, e.g. 01_math.ipynb")
    p_check.add_argument("--timeout", type=int, default=120, help="seconds allowed per cell (default 120)")
    args = parser.parse_args(argv)

    if args.command == "list":
        from . import EXERCISES

        for ex in EXERCISES.values():
            print(f"{ex.id:<22} {ex.minutes:>3} min  {ex.notebook:<12} {ex.title}")
        print(f"{len(EXERCISES)} exercises, {sum(ex.minutes for ex in EXERCISES.values())} minutes in all")
        return 0
    if args.command == "build":
        from .build import build, plan

        try:
            filled = [path for path, state, _ in plan(args.folder) if state == "filled"]
            touched = build(args.folder, check=args.check, force=args.force)
        except (OSError, ValueError) as e:  # no solutions folder, a bad solution notebook, an unwritable file
            print(f"minipt exercises build: error: {e}", file=sys.stderr)
            return 2
        for path in touched:
            print(f"{'stale' if args.check else 'wrote'}: {path.name}")
        for path in filled if not args.force else []:
            print(
                f"kept: {path.name} differs from the notebook build generated (filled in, or edited): it is "
                f"never replaced; move it away, or pass --force, to regenerate it"
            )
        if args.check and touched:
            print("run `python -m minipt.exercises build` to regenerate them", file=sys.stderr)
        if args.check and (touched or filled):
            return 1
        if not touched and not filled:
            print("student notebooks are up to date")
        return 0
    from .grade import NotebookError, grade

    try:
        result = grade(args.notebook, timeout=args.timeout)
    except NotebookError as err:
        print(f"minipt exercises check: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: the kernel was killed on the way out; one line, no traceback
        print("\nminipt exercises check: interrupted; no grade", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(130)  # at once: no helper thread of the kernel client is left to wait for
    print(result.report())
    return 0 if result.all_passed else 1


if __name__ == "__main__":
    sys.exit(main())
