"""A clean, repeatable install: the lock covers every platform it promises, the environment is the lock, the
build prints no warning of ours, and every `--help` shows its defaults as values.

`make demo` and `make test` install with `--constraint requirements-lock.txt`; `make lock` writes that file. The
check that the running environment equals the lock is off in `make test-latest` (MINIPT_UNLOCKED=1), whose point
is to run with newer versions.
"""

import argparse
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from minipt.apps.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements-lock.txt"
tomllib = pytest.importorskip("tomllib")  # Python 3.11+; CI runs 3.11
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

# The platforms the lock must hold for: Linux (x86_64, aarch64) and macOS (arm64), each Python the project allows.
PLATFORMS = [
    dict(sys_platform=sp, platform_system=ps, platform_machine=m)
    for sp, ps, m in (("linux", "Linux", "x86_64"), ("linux", "Linux", "aarch64"), ("darwin", "Darwin", "arm64"))
]
PYTHONS = ("3.10", "3.11", "3.12", "3.13")


def lock_pins():
    """Every `name==version ; marker` line of the lock, as Requirements."""
    lines = [line.strip() for line in LOCK.read_text().splitlines()]
    return [Requirement(line) for line in lines if line and not line.startswith("#")]


def environment(platform, python):
    env = dict(default_environment(), **platform, python_version=python, python_full_version=f"{python}.0")
    env["implementation_name"] = env["platform_python_implementation"] = "cpython"
    return env


def pins_for(env):
    """{name: version} of the pins whose markers hold in `env`; a name pinned twice there is an error."""
    pins = {}
    for req in lock_pins():
        if req.marker is None or req.marker.evaluate(env):
            name = canonicalize_name(req.name)
            assert name not in pins, f"{req.name} is pinned twice for {env['sys_platform']}"
            (spec,) = req.specifier
            assert spec.operator == "==", req
            pins[name] = Version(spec.version)
    return pins


def project_requirements(env):
    """pyproject's dependencies and the dev and hf extras, those whose markers hold in `env`."""
    project = PYPROJECT["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    reqs += [Requirement(r) for extra in ("dev", "hf") for r in project["optional-dependencies"][extra]]
    return [r for r in reqs if r.marker is None or r.marker.evaluate(env)]


@pytest.mark.parametrize("platform", PLATFORMS, ids=lambda p: f"{p['sys_platform']}-{p['platform_machine']}")
@pytest.mark.parametrize("python", PYTHONS)
def test_the_lock_pins_every_requirement_within_its_range(platform, python):
    env = environment(platform, python)
    pins = pins_for(env)
    for req in project_requirements(env):
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not in the lock for {platform['sys_platform']}, Python {python}"
        assert req.specifier.contains(pins[name], prereleases=True), (req, pins[name])
    assert ("triton" in pins) == (platform["sys_platform"] == "linux")  # Triton ships for Linux only
    assert pins["torch"] == Version("2.13.0")  # CI's CPU wheel (.ci/constraints.txt)


def test_the_running_environment_is_the_lock():
    if os.environ.get("MINIPT_UNLOCKED"):
        pytest.skip("make test-latest runs the newest versions on purpose")
    pins = pins_for(default_environment())
    unpinned, different = [], []
    for dist in importlib.metadata.distributions():
        name = canonicalize_name(dist.metadata["Name"])
        if name in ("minipt", "pip"):
            continue
        if name not in pins:
            unpinned.append(name)
        elif Version(dist.version).public != str(pins[name]):  # 2.13.0+cpu is torch 2.13.0
            different.append(f"{name} {dist.version} (lock: {pins[name]})")
    hint = "install with `make test` (it uses requirements-lock.txt), or run `make lock` after changing pyproject.toml"
    assert not unpinned, f"installed but not in the lock: {unpinned}; {hint}"
    assert not different, f"installed at another version than the lock: {different}; {hint}"


def test_the_build_prints_no_warning_of_ours(tmp_path):
    # The warnings a newcomer read as breakage: a deprecated `license` table, a data folder missing from `packages`.
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-v",
            str(ROOT),
            "-w",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    output = done.stdout + done.stderr
    for sign in ("Deprecat", "BuildBackendWarning", "is absent from the `packages`"):
        assert sign not in output, [line for line in output.splitlines() if sign in line]
    import zipfile

    (wheel,) = tmp_path.glob("minipt-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "minipt/assets/tiny.safetensors" in names and "minipt/kernels/prompt_concat.py" in names
    assert not any(name.startswith("kernels/") for name in names)  # never a top-level `kernels` package


def test_every_package_folder_is_installed():
    packages = set(PYPROJECT["tool"]["setuptools"]["packages"])
    folders = {
        "minipt." + str(p.relative_to(ROOT / "minipt")).replace(os.sep, ".")
        for p in (ROOT / "minipt").rglob("*")
        if p.is_dir() and p.name != "__pycache__"
    }
    assert folders | {"minipt", "minipt.kernels"} == packages


def help_actions(parser, command="minipt"):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from help_actions(sub, f"{command} {name}")
        elif action.option_strings and not isinstance(action, argparse._HelpAction):
            yield command, action, parser


def test_every_help_default_is_shown_as_its_value():
    for command, action, parser in help_actions(build_parser()):
        text = parser._get_formatter()._expand_help(action) if action.help else ""
        assert "None" not in text, f"{command} {action.option_strings}: {text!r}"
        if action.default not in (None, False, argparse.SUPPRESS):
            assert "default" in text and str(action.default) in text.replace(",", ""), (
                f"{command} {action.option_strings} (default {action.default!r}): {text!r}"
            )
