"""The base models that ship with minipt, and where a base model comes from.

minipt/assets/SIZE.safetensors holds one byte-level GPT per size of the scale ladder (pico, nano, micro, tiny),
each pretrained on the task mixture by `minipt pretrain --preset SIZE --seed 0` (the README gives the recipe).
"tiny" is the default base model of every command.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ..model import GPT
from ..tokenizer import ByteTokenizer

__all__ = [
    "DEFAULT_SIZE",
    "base_path",
    "shipped_base_path",
    "load_base",
    "load_bases",
    "load_base_and_tokenizer",
    "load_hf_base",
]

DEFAULT_SIZE = "tiny"
SIZES = ("pico", "nano", "micro", "tiny")  # the scale ladder, smallest first


def base_path(size: str = DEFAULT_SIZE, bases_dir=None) -> Path:
    """Where the base model of a ladder size is: bases_dir/SIZE.safetensors, else the shipped one."""
    folder = Path(bases_dir) if bases_dir is not None else Path(resources.files("minipt") / "assets")
    return folder / f"{size}.safetensors"


def shipped_base_path() -> Path:
    """The tiny base model that ships with the package."""
    return base_path(DEFAULT_SIZE)


def load_base(path=None) -> GPT:
    """The given base model file, else the shipped tiny one."""
    if path is not None:
        return GPT.from_checkpoint(path)  # an explicit file that is missing is an error
    if not shipped_base_path().is_file():
        raise FileNotFoundError(
            f"the shipped base model {shipped_base_path()} is missing; make one with "
            f"`minipt pretrain --preset tiny --out {shipped_base_path()}` or pass --base"
        )
    return GPT.from_checkpoint(shipped_base_path())


def load_bases(sizes, bases_dir=None) -> dict[str, GPT]:
    """{size: GPT} for the ladder sizes, from bases_dir or the shipped files."""
    bases = {}
    for size in sizes:
        path = base_path(size, bases_dir)
        if not path.is_file():
            raise FileNotFoundError(
                f"base model {path} is missing; make the ladder with "
                f"`minipt experiment lester-bases --out DIR` and pass --bases DIR"
            )
        bases[size] = GPT.from_checkpoint(path)
    return bases


def load_base_and_tokenizer(base=None):
    """(model, tokenizer): a minipt file (or the shipped model) with ByteTokenizer, or "hf:NAME_OR_FOLDER" for a
    GPT-2 and its tokenizer from the local Hugging Face cache or a folder (never downloads)."""
    if base is not None and str(base).startswith("hf:"):
        return load_hf_base(str(base)[len("hf:") :])
    return load_base(base), ByteTokenizer()


def load_hf_base(name_or_path: str, sep: str = "\n"):
    """(GPT, HFTokenizer): a GPT-2 and its tokenizer from a local folder or the local cache (`--base hf:NAME`)."""
    from ..hf import HFTokenizer

    model = GPT.from_pretrained(name_or_path)
    tok = HFTokenizer.from_pretrained(name_or_path, sep=sep)
    if tok.vocab_size > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} tokens but the model only {model.config.vocab_size}")
    return model, tok
