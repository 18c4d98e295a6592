"""Your own data for `minipt tune --data FILE.jsonl`: one JSON record a line, read strictly (`read_objects`
is the one JSONL reader: serve's requests go through it too).

    {"input": "great movie, loved it", "output": "positive"}
    {"input": "abc", "output": "cba", "task": "reverse"}          "task" is optional (default "user")

Each record becomes an `Example(task, input, answer=output)` and is trained like the built-in tasks without
their instruction: `input<sep>output<eos>`, loss on the output and the <eos> only.

Strict on purpose: nothing is silently skipped. A line that is not a JSON object, lacks "input" or "output",
has a value that is not a string, an empty "output", or a key other than input/output/task is an error that
names its line (`data.jsonl:7: ...`). Blank lines between records are errors too (a lost record is more
likely than an intended gap); blank lines at the very end of the file hold no record and are accepted.

Validation: `--val-data FILE.jsonl`, or else a deterministic `val_fraction` of the records (a shuffle seeded
by `seed`, the same split on every run and machine).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from .checkpoint import atomic_write
from .data import encode_example
from .tasks import Example

__all__ = [
    "DataError",
    "KEYS",
    "check_fits",
    "read_jsonl",
    "read_objects",
    "select_task",
    "split_validation",
    "training_data",
    "write_jsonl",
]

KEYS = ("input", "output", "task")


class DataError(ValueError):
    """A data file that cannot be used as it is; the message names the file and line."""


def read_objects(source, what: str = "data") -> list[tuple[str, object]]:
    """Every line of a JSONL file (a path, or a binary or text stream such as stdin) parsed as JSON:
    [(where, value)], where = "FILE:LINE" for messages. The one reader of the format (--data, --val-data,
    serve's --requests), strict as the module docstring says; `what` names the file in messages."""
    if hasattr(source, "read"):
        name = getattr(source, "name", "<stdin>")
        raw = getattr(source, "buffer", source).read()  # a text stream's bytes, so UTF-8 is checked here
        raw = raw.encode("utf-8") if isinstance(raw, str) else raw
    else:
        name = source
        if not Path(source).is_file():
            raise FileNotFoundError(f"no such {what} file: {source}")
        raw = Path(source).read_bytes()
    lines = _utf8_lines(raw, name)
    while lines and not lines[-1].strip():  # blank lines at the end hold no record
        lines.pop()
    if not lines:
        raise DataError(f"{name} holds no records (one JSON object a line is expected)")
    values = []
    for lineno, line in enumerate(lines, start=1):
        where = f"{name}:{lineno}"
        if not line.strip():
            raise DataError(f"{where}: blank line between records; remove it (nothing is skipped silently)")
        try:
            values.append((where, json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    return values


def read_jsonl(path, default_task: str = "user") -> list[Example]:
    """Every record of a .jsonl file as an Example, in file order; DataError naming the line otherwise."""
    return [_example(record, where, default_task) for where, record in read_objects(path)]


def _utf8_lines(raw: bytes, name) -> list[str]:
    """The lines of a file's bytes, split on "\n" only: JSON strings may hold U+2028 or U+0085, which
    str.splitlines would also split on. A byte that is not UTF-8 is an error naming its line."""
    lines = []
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        try:
            lines.append(line.decode("utf-8").removesuffix("\r"))
        except UnicodeDecodeError as e:
            raise DataError(
                f"{name}:{lineno}: not UTF-8 text (byte {e.start + 1} of the line); save the file as UTF-8"
            ) from None
    if lines and lines[0].startswith("\ufeff"):
        lines[0] = lines[0][1:]  # a byte-order mark some editors write
    return lines


def _example(record, where: str, default_task: str) -> Example:
    if not isinstance(record, dict):
        raise DataError(
            f'{where}: expected a JSON object like {{"input": ..., "output": ...}}, got {type(record).__name__}'
        )
    unknown = sorted(set(record) - set(KEYS))
    if unknown:
        raise DataError(f"{where}: unknown key(s) {unknown}; a record has 'input', 'output' and optionally 'task'")
    for key in ("input", "output"):
        if key not in record:
            raise DataError(f"{where}: missing {key!r}")
    for key in KEYS:
        if key in record and not isinstance(record[key], str):
            raise DataError(f"{where}: {key!r} must be a string, got {type(record[key]).__name__}")
    if not record["output"]:
        raise DataError(f"{where}: 'output' is empty; there would be nothing to learn but <eos>")
    task = record.get("task", default_task)
    if not task:
        raise DataError(f"{where}: 'task' is empty")
    return Example(task, record["input"], record["output"])


def select_task(examples: list[Example], task: str | None) -> list[Example]:
    """The records of one task. With task=None the file must hold a single task (else: say which exist)."""
    tasks = sorted({ex.task for ex in examples})
    if task is None:
        if len(tasks) > 1:
            raise DataError(
                f"the data holds {len(tasks)} tasks {tasks}; one prompt is tuned per task: pick one with --task"
            )
        return examples
    chosen = [ex for ex in examples if ex.task == task]
    if not chosen:
        raise DataError(f"no record has task {task!r}; the data holds {tasks}")
    return chosen


def split_validation(examples: list[Example], val_fraction: float = 0.1, seed: int = 0):
    """(train, val): a deterministic val_fraction of the records (at least one) for validation, the rest to train."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if len(examples) < 2:
        raise DataError(
            f"{len(examples)} record(s): need at least 2 to hold one out for validation, or pass --val-data"
        )
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = min(len(examples) - 1, max(1, round(val_fraction * len(examples))))
    val = sorted(order[:n_val])
    train = sorted(order[n_val:])
    return [examples[i] for i in train], [examples[i] for i in val]


def check_fits(examples: list[Example], tokenizer, n_prompt: int, block_size: int, where: str = "data") -> None:
    """DataError naming the first record whose encoding with the prompt does not fit in block_size.

    Pass the records as read_jsonl returns them: record i is then line i + 1 of the file `where`.
    """

    for i, ex in enumerate(examples):
        n = len(encode_example(ex, tokenizer, instruction=False)[0])
        if n_prompt + n > block_size:
            raise DataError(
                f"{where}:{i + 1}: the record encodes to {n} tokens; with the {n_prompt} prompt vectors "
                f"that is more than the model's block_size {block_size} (nothing is cut silently)"
            )


def training_data(
    path,
    tokenizer,
    n_prompt: int,
    block_size: int,
    task: str | None = None,
    val_path=None,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> tuple[list[Example], list[Example]]:
    """(train, val) examples of `minipt tune --data FILE`: the records of `task` (needed when the file holds
    several tasks), every one checked to fit block_size after the prompt; validation from `val_path`, else a
    `val_fraction` of the records (split_validation)."""
    records = read_jsonl(path)
    check_fits(records, tokenizer, n_prompt, block_size, path)
    train_ex = select_task(records, task)
    if val_path is None:
        return split_validation(train_ex, val_fraction, seed=seed)
    val_records = read_jsonl(val_path)
    check_fits(val_records, tokenizer, n_prompt, block_size, val_path)
    return train_ex, select_task(val_records, train_ex[0].task)


def write_jsonl(path, records: list[dict]) -> None:
    """One JSON object a line, written atomically like every output: a Ctrl-C or a full disk leaves the old
    file or the new one (minipt.checkpoint.atomic_write)."""
    text = "".join(json.dumps(record) + "\n" for record in records)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
