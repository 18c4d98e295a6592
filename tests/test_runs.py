"""Tests for minipt.apps.runs, the experiments' shared machinery: one definition of each shared piece, the
record of finished runs (damaged files, earlier records kept), Ctrl-C, and the checks made before any work."""

import ast
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import random_gpt
from minipt.apps import depth, runs
from minipt.apps.cli import main
from minipt.apps.experiments import QUICK, pretrain_bases, run_lester
from minipt.apps.runs import RunRecorder, Setup, run_experiment
from minipt.model import PRESETS

APPS = Path(runs.__file__).parent
PROGRAMS = ("experiments", "depth", "seed_claims")
SHARED = (
    "Setup",
    "fingerprint",
    "RunRecorder",
    "Record",
    "read_records",
    "run_experiment",
    "save_results",
    "torch_threads",
    "train_and_score",
    "spread",
    "mean_over_tasks",
    "with_all",
    "find_row",
    "pm",
    "command_line",
    "_pyplot",
    "_grouped_bars",
    "_save",
)


def definitions() -> dict[str, list[str]]:
    """name -> the apps files that define it (functions, classes and methods, at any depth)."""
    found = {}
    for path in sorted(APPS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                found.setdefault(node.name, []).append(path.stem)
    return found


def test_each_shared_piece_is_defined_once():
    found = definitions()
    for name in SHARED:
        assert len(found.get(name, [])) == 1, f"{name} is defined in {found.get(name)}; it belongs in one place"
    assert found["RunRecorder"] == ["runs"] and found["fingerprint"] == ["runs"]
    plots = {name: files for name, files in found.items() if name.startswith("plot_")}
    assert plots and all(files == ["plots"] for files in plots.values()), plots  # every plot in plots.py


def test_no_program_imports_another_program_or_a_private_name():
    for path in sorted(APPS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if path.stem in PROGRAMS:
                    assert node.module not in PROGRAMS, f"{path.name} imports the program {node.module}"
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{path.name} imports {private} from .{node.module}"
    for program in PROGRAMS:  # the fingerprint's hash and the loop's progress bar live in runs.py only
        source = (APPS / f"{program}.py").read_text()
        assert "hashlib" not in source and "tqdm" not in source and "atomic_write" not in source, program


def test_the_fingerprints_did_not_move():
    """Recorded runs of earlier versions are still reused: the hashes are those the programs computed before."""
    bases = {"pico": random_gpt(PRESETS["pico"], seed=0)}
    assert QUICK.fingerprint(bases) != depth.DEPTH_QUICK.fingerprint(bases)
    assert len(QUICK.fingerprint(bases)) == 12 and QUICK.fingerprint(bases) == QUICK.fingerprint(dict(bases))


# ---- the record of finished runs ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TinySetup(Setup):
    n: int = 3


@dataclass(frozen=True)
class TinyRun:
    i: int

    @property
    def key(self) -> str:
        return f"run-{self.i}"


BASES = {"pico": random_gpt(PRESETS["pico"], seed=0)}


@pytest.mark.parametrize(
    "content, says",
    [
        ("[1, 2]", "expected"),
        ('{"setup_id": "abc"}', "expected"),
        ('{"setup_id": "abc", "runs": {"run-0": [0.5]}}', "'run-0' is a list"),
        ('{"setup_id": "abc", "runs": {"run-0": {"test": 0.5}', "not valid JSON"),  # a cut file
        ("\xff\xfe", "not valid JSON"),
    ],
)
def test_a_damaged_record_file_is_refused_by_name(tmp_path, content, says):
    path = tmp_path / "runs.json"
    path.write_bytes(content.encode("latin-1"))
    with pytest.raises(ValueError, match=says) as e:
        RunRecorder.open(tmp_path, TinySetup(), BASES)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    assert path.read_bytes() == content.encode("latin-1")  # left as it was


def test_a_record_missing_a_field_names_the_file_the_run_and_the_field(tmp_path):
    setup = TinySetup()
    (tmp_path / "runs.json").write_text(
        json.dumps({"setup_id": setup.fingerprint(BASES), "runs": {"run-0": {"val": 0.5, "nested": {"a": 1}}}})
    )
    recorder = RunRecorder.open(tmp_path, setup, BASES)
    with pytest.raises(ValueError, match=r"runs\.json: run 'run-0' has no field 'test'"):
        recorder.runs["run-0"]["test"]
    with pytest.raises(ValueError, match=r"run 'run-0'\['nested'\] has no field 'b'"):
        recorder.runs["run-0"]["nested"]["b"]
    # through the loop: the run counts as recorded, and the summary's read of its missing field names the file
    with pytest.raises(ValueError, match="runs.json: run 'run-0' has no field 'test'"):
        run_experiment(
            "tiny",
            setup,
            BASES,
            [TinyRun(0)],
            lambda run, rec: {},
            lambda rec: rec.runs["run-0"]["test"],
            work=tmp_path,
            progress=False,
        )


def test_every_earlier_record_is_kept_under_a_new_name(tmp_path, capsys):
    contents = []
    for n in (1, 2, 3):  # three setups in turn: the records of the first two are both kept
        recorder = RunRecorder.open(tmp_path, TinySetup(n), BASES)
        recorder.add("run-0", {"test": n / 10})
        (tmp_path / "prompts").mkdir(exist_ok=True)
        (tmp_path / "prompts" / "p.safetensors").write_text(str(n))
        contents.append((tmp_path / "runs.json").read_text())
    assert json.loads((tmp_path / "runs.old.json").read_text())["runs"] == {"run-0": {"test": 0.1}}
    assert json.loads((tmp_path / "runs.old-2.json").read_text())["runs"] == {"run-0": {"test": 0.2}}
    assert (tmp_path / "prompts.old" / "p.safetensors").read_text() == "1"  # a prompt goes with its record
    assert (tmp_path / "prompts.old-2" / "p.safetensors").read_text() == "2"
    out = capsys.readouterr().out
    assert "kept as " + str(tmp_path / "runs.old.json") in out and "kept as " + str(tmp_path / "runs.old-2.json") in out


# ---- Ctrl-C and the checks before any work -----------------------------------------------------------------


def test_ctrl_c_says_how_many_runs_are_kept_and_they_resume(tmp_path):
    calls = []

    def execute(run, recorder):
        calls.append(run.i)
        if run.i == 1:
            raise KeyboardInterrupt
        return {"test": 1.0}

    planned = [TinyRun(i) for i in range(3)]
    with pytest.raises(
        KeyboardInterrupt,
        match=r"1 of 3 runs are finished and kept in .*runs\.json; the same "
        r"command continues from them",
    ):
        run_experiment("tiny", TinySetup(), BASES, planned, execute, dict, work=tmp_path, progress=False)
    calls.clear()
    results, meta = run_experiment(
        "tiny",
        TinySetup(),
        BASES,
        planned,
        lambda run, rec: {"test": 0.5},
        lambda rec: {k: r["test"] for k, r in rec.runs.items()},
        work=tmp_path,
        progress=False,
    )
    assert results == {"run-0": 1.0, "run-1": 0.5, "run-2": 0.5}  # the finished run was not trained again
    assert meta["command"] == "minipt experiment tiny" and meta["setup"] == {"n": 3}


def test_ctrl_c_in_an_experiment_prints_one_line_and_exits_130(tmp_path, monkeypatch, capsys):
    def interrupted(run, setup, bases, data):
        raise KeyboardInterrupt

    monkeypatch.setattr(depth, "execute", interrupted)
    work = tmp_path / "work"
    code = main(
        ["experiment", "depth", "--quick", "--results", str(tmp_path / "r"), "--work", str(work), "--no-progress"]
    )
    err = capsys.readouterr().err
    assert code == 130 and err.count("\n") == 1, err
    assert f"interrupted; 0 of 5 runs are finished and kept in {work / 'runs.json'}" in err
    assert "nothing was saved" not in err


@pytest.mark.parametrize("threads", ["0", "-1", "two"])
def test_threads_below_one_are_refused_before_any_work(tmp_path, threads, capsys):
    with pytest.raises(SystemExit) as e:
        main(["experiment", "lester", "--quick", "--threads", threads, "--work", str(tmp_path)])
    assert e.value.code == 2 and "argument --threads" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("threads", [0, -1, 1.5, True])
def test_the_api_refuses_the_same_threads_before_loading_anything(tmp_path, threads):
    with pytest.raises(ValueError, match="threads must be an integer >= 1"):
        run_lester(QUICK, tmp_path / "r", tmp_path / "w", bases_dir=tmp_path / "none", threads=threads)


def test_an_unknown_size_is_refused_before_pretraining(tmp_path, capsys):
    code = main(["experiment", "lester-bases", "--sizes", "pico", "bogus", "--out", str(tmp_path / "bases")])
    err = capsys.readouterr().err  # refused by the run machinery before any pretraining; the message names the ladder
    assert code == 2 and "sizes: expected some of pico, nano, micro, tiny, got pico bogus" in err
    assert not (tmp_path / "bases").exists()
    with pytest.raises(ValueError, match="sizes"):
        pretrain_bases(tmp_path, ())


def test_a_spread_reads_as_percent_mean_plus_minus_std():
    assert runs.pm({"mean": 0.5, "std": 0.025, "values": [0.475, 0.525]}) == "50.0% ± 2.5%"
