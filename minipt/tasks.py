"""The built-in synthetic task suite: generators and splits (minipt.data turns examples into tensors).

We pretrain a ~1M-parameter byte-level GPT on a mixture of these tasks, each example written as

    <instruction> <input><|sep|><answer><|eos|>        e.g.  "Reverse the letters: abc<|sep|>cba<|eos|>"

and then freeze it and tune soft prompts that replace the instruction.

Why the letter tasks share one input distribution
-------------------------------------------------
``copy``, ``reverse``, ``sort``, ``shift`` and ``upper`` all take a lowercase string of 3 to 7 letters.
Seeing only "abc<|sep|>" the model cannot know whether "abc", "cba", "bcd" or "ABC" is wanted: the task is
carried by the instruction alone. Drop the instruction and accuracy collapses to about one task in five;
a soft prompt that recovers it has learnt to *say which task is meant*, which is exactly what prompt
tuning claims to do. ``palindrome`` (``HELD_OUT_TASK``) is never pretrained on, for experiments on a task
the base model has never seen.

Why splits come from a hash of the input
----------------------------------------
Each input string is assigned to train / val / test by ``sha256(input)`` alone (bucket mod 10: 0-7 train,
8 val, 9 test). So the splits are disjoint by construction, and identical for every task, seed and Python
process (Python's built-in ``hash()`` of a str is salted per process, so it would not do). Because the
letter tasks share inputs, a test string such as "qzv" is a test string for all of them: the pretrained
model has never seen it under any instruction.

Everything random takes an explicit seed and uses its own ``random.Random``; the global RNG is never used.
"""

from __future__ import annotations

import hashlib
import random
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

__all__ = [
    "Task",
    "Example",
    "Domain",
    "SPLITS",
    "HELD_OUT_TASK",
    "TASKS",
    "get_task",
    "get_domain",
    "split_of",
    "make_split",
    "pretraining_mixture",
    "POSITIVE_WORDS",
    "NEGATIVE_WORDS",
    "NEUTRAL_WORDS",
    "UNSEEN_NEUTRAL_WORDS",
]

SPLITS = ("train", "val", "test")
HELD_OUT_TASK = "palindrome"

# ---------------------------------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """One task: how to draw an input and how to answer it.

    ``kind`` is "generation" (free-form answer) or "classification" (the answer is one of ``labels``, the
    verbalizer words). The two behaviours are plain functions stored on the task, so each task below is
    a few readable lines.
    """

    name: str
    instruction: str
    kind: str
    labels: tuple[str, ...]
    _sample: Callable[[random.Random], str] = field(repr=False, compare=False)
    _answer: Callable[[str], str] = field(repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in ("generation", "classification"):
            raise ValueError(f"task {self.name!r}: kind must be 'generation' or 'classification'")
        if (self.kind == "classification") != bool(self.labels):
            raise ValueError(f"task {self.name!r}: classification tasks (and only those) need labels")

    def sample_input(self, rng: random.Random) -> str:
        """Draw one input string using ``rng`` (and nothing else)."""
        return self._sample(rng)

    def answer(self, input: str) -> str:
        """The correct answer for ``input``."""
        return self._answer(input)


# --- input generators ------------------------------------------------------------------------------


def _letters(rng: random.Random, n_min: int = 3, n_max: int = 7) -> str:
    """A lowercase a-z string of length n_min..n_max: the input of every letter task."""
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(n_min, n_max)))


def _addition(rng: random.Random) -> str:
    return f"{rng.randint(0, 99)}+{rng.randint(0, 99)}"


def _number(rng: random.Random) -> str:
    return str(rng.randint(0, 99_999))  # even and odd equally likely


def _maybe_with_digit(rng: random.Random) -> str:
    """4..8 lowercase letters; in half the cases one of them is replaced by a digit."""
    chars = list(_letters(rng, 4, 8))
    if rng.random() < 0.5:
        chars[rng.randrange(len(chars))] = rng.choice(string.digits)
    return "".join(chars)


def _maybe_palindrome(rng: random.Random) -> str:
    """3..7 lowercase letters: a palindrome with probability exactly 1/2."""
    n = rng.randint(3, 7)
    if rng.random() < 0.5:
        half = _letters(rng, (n + 1) // 2, (n + 1) // 2)  # first ceil(n/2) letters, mirrored
        return half + half[: n // 2][::-1]
    while True:  # a random string is a palindrome by chance (1 in 26 for n=3): redraw those
        s = _letters(rng, n, n)
        if s != s[::-1]:
            return s


POSITIVE_WORDS = (
    "good", "great", "happy", "lovely", "nice", "fun", "kind", "bright",
    "calm", "warm", "joyful", "sweet", "brave", "clever", "cheerful",
)  # fmt: skip
NEGATIVE_WORDS = (
    "bad", "awful", "sad", "ugly", "nasty", "dull", "cruel", "gloomy",
    "angry", "bitter", "rude", "grim", "boring", "lazy", "horrible",
)  # fmt: skip
NEUTRAL_WORDS = (
    "table", "chair", "blue", "round", "paper", "window", "river", "metal",
    "train", "seven", "green", "street", "box", "cloud", "stone",
)  # fmt: skip

# (positive, negative, neutral) word counts of a 3-word sentence whose non-neutral words have a strict
# majority. The list is symmetric under swapping positive and negative, so both labels are equally likely.
_SENTIMENT_COUNTS = ((1, 0, 2), (0, 1, 2), (2, 0, 1), (0, 2, 1), (3, 0, 0), (0, 3, 0), (2, 1, 0), (1, 2, 0))


def _sentence(rng: random.Random, counts=_SENTIMENT_COUNTS, neutral_words=NEUTRAL_WORDS) -> str:
    n_pos, n_neg, n_neu = rng.choice(counts)
    words = (
        [rng.choice(POSITIVE_WORDS) for _ in range(n_pos)]
        + [rng.choice(NEGATIVE_WORDS) for _ in range(n_neg)]
        + [rng.choice(neutral_words) for _ in range(n_neu)]
    )
    rng.shuffle(words)
    return " ".join(words)


# --- answers ---------------------------------------------------------------------------------------


def _shift(s: str) -> str:
    """Each lowercase letter moves one step on: a->b, ..., z->a. Other characters are kept."""
    return "".join(chr((ord(c) - ord("a") + 1) % 26 + ord("a")) if "a" <= c <= "z" else c for c in s)


def _add(s: str) -> str:
    a, b = s.split("+")
    return str(int(a) + int(b))


def _sentiment(s: str) -> str:
    words = s.split()
    n_pos = sum(w in POSITIVE_WORDS for w in words)
    n_neg = sum(w in NEGATIVE_WORDS for w in words)
    if n_pos == n_neg:
        raise ValueError(f"sentiment of {s!r} is undecided: {n_pos} positive and {n_neg} negative words")
    return "positive" if n_pos > n_neg else "negative"


def _yes_no(condition: bool) -> str:
    return "yes" if condition else "no"


# --- the suite -------------------------------------------------------------------------------------

_GEN, _CLS = "generation", "classification"
TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("copy", "Copy the letters:", _GEN, (), _letters, lambda s: s),
        Task("reverse", "Reverse the letters:", _GEN, (), _letters, lambda s: s[::-1]),
        Task("sort", "Sort the letters:", _GEN, (), _letters, lambda s: "".join(sorted(s))),
        Task("shift", "Shift each letter by one:", _GEN, (), _letters, _shift),
        Task("upper", "Write the letters in uppercase:", _GEN, (), _letters, str.upper),
        Task("add", "Add the numbers:", _GEN, (), _addition, _add),
        Task("parity", "Is the number even or odd?", _CLS, ("even", "odd"), _number,
             lambda s: "even" if int(s) % 2 == 0 else "odd"),
        Task("contains_digit", "Does it contain a digit?", _CLS, ("yes", "no"), _maybe_with_digit,
             lambda s: _yes_no(any(c.isdigit() for c in s))),
        Task("sentiment", "Is the sentiment positive or negative?", _CLS, ("positive", "negative"),
             _sentence, _sentiment),
        Task("palindrome", "Is it a palindrome?", _CLS, ("yes", "no"), _maybe_palindrome,
             lambda s: _yes_no(s == s[::-1])),
    )
}  # fmt: skip


def get_task(name: str) -> Task:
    """Look a task up by name; an unknown name raises ValueError listing the valid ones."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
    return TASKS[name]


# --- shifted domains (Lester et al. 2021, section 5) -----------------------------------------------
#
# A domain is another input distribution for some tasks, with the same answer rule. Tune on one domain and test
# on another (`make_split(..., domain=NAME)`): the drop from the in-domain test split to the shifted one measures
# robustness to domain shift. The number and letter domains split the pretraining inputs by length, so the
# frozen model knows both sides of the shift and only the tuning data is narrow; "unseen-words" goes outside
# the pretraining data altogether.

UNSEEN_NEUTRAL_WORDS = (
    "lamp",
    "door",
    "pencil",
    "garden",
    "bottle",
    "carpet",
    "ladder",
    "basket",
    "mirror",
    "wheel",
    "forest",
    "button",
    "candle",
    "bridge",
    "tower",
)  # fmt: skip  (disjoint from the word lists above: no pretraining sentence holds one)

# The sentence shapes with at least one neutral word, so every shifted sentence holds an unseen word.
_SENTIMENT_COUNTS_WITH_NEUTRAL = tuple(c for c in _SENTIMENT_COUNTS if c[2] > 0)


def _number_of_digits(lo: int, hi: int) -> Callable[[random.Random], str]:
    """A sampler of numbers with lo..hi digits (the digit count drawn first, uniformly)."""

    def sample(rng: random.Random) -> str:
        n_digits = rng.randint(lo, hi)
        return str(rng.randint(10 ** (n_digits - 1), 10**n_digits - 1))

    return sample


@dataclass(frozen=True)
class Domain:
    """A named input distribution for ``tasks``: ``sample_input(rng)`` draws one of its inputs."""

    name: str
    tasks: tuple[str, ...]
    description: str
    _sample: Callable[[random.Random], str] = field(repr=False, compare=False)

    def sample_input(self, rng: random.Random) -> str:
        return self._sample(rng)


_LETTER_TASKS = ("copy", "reverse", "sort", "shift", "upper")
DOMAINS: dict[str, Domain] = {
    d.name: d
    for d in (
        Domain("short-numbers", ("parity",), "numbers of 3 or 4 digits", _number_of_digits(3, 4)),
        Domain("five-digit-numbers", ("parity",), "numbers of 5 digits", _number_of_digits(5, 5)),
        Domain("short-letters", _LETTER_TASKS, "3 to 5 letters", lambda rng: _letters(rng, 3, 5)),
        Domain("long-letters", _LETTER_TASKS, "6 or 7 letters", lambda rng: _letters(rng, 6, 7)),
        Domain("unseen-words", ("sentiment",), "sentences with 1 or 2 neutral words never seen in pretraining",
               lambda rng: _sentence(rng, _SENTIMENT_COUNTS_WITH_NEUTRAL, UNSEEN_NEUTRAL_WORDS)),
    )
}  # fmt: skip


def get_domain(name: str, task_name: str) -> Domain:
    """Look a shifted domain up by name; it must be one of ``task_name``'s (a ValueError lists those)."""
    ok = [d.name for d in DOMAINS.values() if task_name in d.tasks]
    if name not in DOMAINS or task_name not in DOMAINS[name].tasks:
        raise ValueError(f"unknown domain {name!r} for task {task_name!r}; its domains: {', '.join(ok) or 'none'}")
    return DOMAINS[name]


# ---------------------------------------------------------------------------------------------------
# Examples and splits
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    """One example of a task: ``answer`` is the target text (without <|sep|> or <|eos|>)."""

    task: str
    input: str
    answer: str


def split_of(input: str) -> str:
    """The split ("train", "val" or "test") an input string belongs to, for every task and seed.

    bucket = first 8 bytes of sha256(input) mod 10:  0-7 -> train (80%), 8 -> val, 9 -> test.
    """
    bucket = int.from_bytes(hashlib.sha256(input.encode("utf-8")).digest()[:8], "big") % 10
    return "train" if bucket < 8 else ("val" if bucket == 8 else "test")


def _rng(*parts: object) -> random.Random:
    """A random.Random seeded from ``parts`` through sha256, the same in every Python process."""
    key = "/".join(str(p) for p in parts).encode("utf-8")
    return random.Random(int.from_bytes(hashlib.sha256(key).digest()[:8], "big"))


def make_split(
    task_name: str, split: str, n: int, seed: int = 0, unique: bool = True, domain: str | None = None
) -> list[Example]:
    """Draw ``n`` examples of ``task_name`` whose inputs belong to ``split``.

    Inputs are rejection-sampled: draw one, keep it only if ``split_of(input) == split`` (and, with
    ``unique``, it was not drawn before). For classification tasks the i-th example must have label
    ``labels[i % len(labels)]``, so the labels alternate and every prefix of the list is balanced.
    The same (task, split, n, seed) always gives the same list, and a smaller n its first n examples (so
    training sets of growing size are nested); another seed gives another sample. ``domain`` draws the
    inputs from a shifted domain of the task instead (``DOMAINS``), with the same split rule.
    If the split runs out of distinct inputs (e.g. ``add`` has only ~1,000 val inputs) a ValueError
    says so after a bounded number of attempts, instead of looping forever.
    """
    task = get_task(task_name)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    # A shifted domain draws its inputs from its own generator and its own seed stream; the split rule is the
    # same hash, so a shifted test input is never a train or val input of any domain.
    sample = task.sample_input if domain is None else get_domain(domain, task_name).sample_input
    rng = _rng(task_name, split, seed) if domain is None else _rng(task_name, domain, split, seed)
    max_attempts = 50_000 + 100 * n  # far more than a feasible request needs (~20 draws per example)
    examples: list[Example] = []
    seen: set[str] = set()
    for _ in range(max_attempts):
        if len(examples) == n:
            return examples
        x = sample(rng)
        if split_of(x) != split or (unique and x in seen):
            continue
        y = task.answer(x)
        if task.labels and y != task.labels[len(examples) % len(task.labels)]:
            continue  # not the label we need next: keeps the classes balanced
        seen.add(x)
        examples.append(Example(task_name, x, y))
    if len(examples) == n:
        return examples
    raise ValueError(
        f"could only draw {len(examples)} of n={n} distinct {split!r} inputs for task {task_name!r} "
        f"in {max_attempts} attempts; ask for fewer examples or pass unique=False"
    )


def pretraining_mixture(n: int, seed: int = 0, exclude: Sequence[str] = (HELD_OUT_TASK,)) -> list[Example]:
    """``n`` train-split examples spread evenly over every task not in ``exclude``, shuffled.

    Task i (in ``TASKS`` order) gets ``n // k`` examples, plus one for the first ``n % k`` tasks.
    Inputs may repeat within a task (``unique=False``): a pretraining stream can be longer than a small
    input space such as ``add``'s.
    """
    for name in exclude:
        get_task(name)  # a typo in exclude should fail loudly, not silently include the task
    names = [name for name in TASKS if name not in exclude]
    if not names:
        raise ValueError("exclude removes every task; nothing left to pretrain on")
    k = len(names)
    examples: list[Example] = []
    for i, name in enumerate(names):
        examples += make_split(name, "train", n // k + (1 if i < n % k else 0), seed=seed, unique=False)
    _rng("mixture", seed).shuffle(examples)
    return examples
