"""`minipt tune --data FILE.jsonl`: strict reading with line numbers, deterministic validation split, the CLI."""

import json

import pytest
import torch

from minipt import GPT, GPTConfig, PromptTuning, userdata
from minipt.apps.cli import main
from minipt.tasks import Example
from minipt.tokenizer import ByteTokenizer
from minipt.userdata import DataError, check_fits, read_jsonl, select_task, split_validation

RECORDS = [
    {"input": w, "output": w[::-1]}
    for w in ["abc", "hello", "xyz", "minipt", "prompt", "tune", "data", "line", "json", "torch"]
]


def write_jsonl(path, records, extra_lines=()):
    lines = [json.dumps(r) for r in records] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n")
    return path


def test_records_become_examples_in_file_order(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl", RECORDS[:2] + [{"input": "ab", "output": "2", "task": "count"}], extra_lines=["", "  "]
    )  # blank lines at the end hold no record: accepted
    examples = read_jsonl(path)
    assert examples == [Example("user", "abc", "cba"), Example("user", "hello", "olleh"), Example("count", "ab", "2")]


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"input": "a", "output": "b"', "not valid JSON"),
        ('["a", "b"]', "expected a JSON object"),
        ('{"input": "a"}', "missing 'output'"),
        ('{"input": "a", "ouput": "b"}', "unknown key"),
        ('{"input": 3, "output": "b"}', "'input' must be a string"),
        ('{"input": "a", "output": ""}', "'output' is empty"),
        ("", "blank line"),
    ],
)
def test_a_malformed_line_is_an_error_naming_its_line(tmp_path, bad_line, message):
    lines = [json.dumps(r) for r in RECORDS[:3]]
    lines.insert(2, bad_line)  # line 3
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=f"d.jsonl:3: .*{message}"):
        read_jsonl(path)


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="no records"):
        read_jsonl(tmp_path / "empty.jsonl")
    with pytest.raises(FileNotFoundError):
        read_jsonl(tmp_path / "missing.jsonl")


def test_task_selection_never_guesses():
    examples = [Example("a", "1", "x"), Example("b", "2", "y"), Example("a", "3", "z")]
    with pytest.raises(DataError, match="pick one with --task"):
        select_task(examples, None)
    assert select_task(examples, "a") == [examples[0], examples[2]]
    with pytest.raises(DataError, match="no record has task 'c'"):
        select_task(examples, "c")


def test_validation_split_is_deterministic_and_disjoint():
    examples = [Example("user", str(i), "x") for i in range(50)]
    train, val = split_validation(examples, 0.2, seed=0)
    assert (train, val) == split_validation(examples, 0.2, seed=0)
    assert len(val) == 10 and len(train) == 40 and not set(train) & set(val)
    assert split_validation(examples, 0.2, seed=1)[1] != val
    with pytest.raises(DataError, match="at least 2"):
        split_validation(examples[:1])


def test_too_long_records_are_an_error_not_cut():
    with pytest.raises(DataError, match="d.jsonl:2: .*block_size 16"):
        check_fits([Example("user", "a", "b"), Example("user", "a" * 20, "b")], ByteTokenizer(), 4, 16, "d.jsonl")


@pytest.fixture
def tiny_base(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "base.safetensors"
    GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=260, block_size=64)).save(path)
    return path


def test_cli_tune_on_a_jsonl_file(tmp_path, tiny_base, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", RECORDS)
    out = tmp_path / "prompt.safetensors"
    code = main(
        [
            "tune",
            "--data",
            str(data),
            "--base",
            str(tiny_base),
            "--steps",
            "3",
            "--batch-size",
            "4",
            "--n-prompt",
            "4",
            "--init",
            "uniform",
            "--out",
            str(out),
            "--peft-out",
            str(tmp_path / "peft"),
            "--no-progress",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "9 training / 1 validation examples" in printed and "best validation exact match" in printed
    model = GPT.from_checkpoint(tiny_base)
    pt = PromptTuning.load(model, out)
    assert pt.prompt.shape == (4, 32)
    assert (tmp_path / "peft" / "adapter_config.json").is_file()


def test_cli_tune_with_val_data_and_a_bad_line(tmp_path, tiny_base, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", RECORDS)
    val = write_jsonl(tmp_path / "val.jsonl", RECORDS[:2])
    out = tmp_path / "p.safetensors"
    args = [
        "tune",
        "--data",
        str(data),
        "--val-data",
        str(val),
        "--base",
        str(tiny_base),
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--n-prompt",
        "2",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(args) == 0
    assert "10 training / 2 validation examples" in capsys.readouterr().out
    (tmp_path / "val.jsonl").write_text('{"input": "a", "output": "b"}\n{"input": "a", "output": 5}\n')
    assert main(args + ["--overwrite"]) == 2  # other data: another run, which may replace p.safetensors
    assert "val.jsonl:2: 'output' must be a string" in capsys.readouterr().err


def test_cli_tune_needs_a_task_or_data(capsys):
    assert main(["tune", "--out", "x.safetensors"]) == 2
    assert "--task" in capsys.readouterr().err
    assert main(["tune", "--task", "nope", "--out", "x.safetensors"]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err


def test_cli_label_init_on_classification_data_and_its_refusal_elsewhere(tmp_path, tiny_base, capsys):
    labelled = [{"input": w, "output": "long" if len(w) > 4 else "short"} for w in [r["input"] for r in RECORDS]]
    data = write_jsonl(tmp_path / "cls.jsonl", labelled)
    out = tmp_path / "p.safetensors"
    assert (
        main(
            [
                "tune",
                "--data",
                str(data),
                "--base",
                str(tiny_base),
                "--steps",
                "2",
                "--batch-size",
                "2",
                "--n-prompt",
                "3",
                "--init",
                "label",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    model = GPT.from_checkpoint(tiny_base)
    wte = model.transformer.wte.weight.detach()
    tok = ByteTokenizer()
    initial = [wte[tok.encode(label)].mean(dim=0) for label in ("long", "short")]  # the sorted distinct outputs
    pt = PromptTuning.load(model, out)
    assert all(torch.allclose(pt.prompt[k], initial[k], atol=0.05) for k in range(2))  # 2 warmup steps move it < 0.05
    many = write_jsonl(tmp_path / "gen.jsonl", [{"input": f"x{i}", "output": f"y{i}"} for i in range(30)])
    capsys.readouterr()
    assert (
        main(
            [
                "tune",
                "--data",
                str(many),
                "--base",
                str(tiny_base),
                "--init",
                "label",
                "--out",
                str(out),
                "--overwrite",
                "--no-progress",
            ]
        )
        == 2
    )
    assert "--init label needs classification data" in capsys.readouterr().err


def test_write_jsonl_writes_what_the_strict_reader_reads(tmp_path):
    records = [{"input": "ünï", "output": "x"}, {"input": "b", "output": "y", "task": "t"}]
    userdata.write_jsonl(tmp_path / "o.jsonl", records)
    lines = (tmp_path / "o.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == records
    assert [(ex.task, ex.input) for ex in read_jsonl(tmp_path / "o.jsonl")] == [("user", "ünï"), ("t", "b")]
    assert [p.name for p in tmp_path.iterdir()] == ["o.jsonl"]  # no temporary file left
