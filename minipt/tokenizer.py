"""A byte-level tokenizer: UTF-8 bytes plus four special tokens. Nothing to download.

Token ids:

    0 .. 255   the byte values of the UTF-8 encoding of the text
    256        <|pad|>   padding (never a target)
    257        <|bos|>   beginning of sequence
    258        <|eos|>   end of sequence: generation stops here
    259        <|sep|>   separates a task's input from its answer

so ``vocab_size == 260``. Every string round-trips exactly: ``decode(encode(s)) == s``. A byte vocabulary
keeps the model small (the embedding table is 260 x D) and makes every tokenization step easy to check by
hand, which is what a teaching library wants; the price is longer sequences than with BPE.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["ByteTokenizer"]

_N_BYTES = 256


class ByteTokenizer:
    """Maps text to byte ids and back, with pad/bos/eos/sep special tokens after the 256 byte values.

    Example:
        >>> tok = ByteTokenizer()
        >>> tok.encode("hi", add_eos=True)
        [104, 105, 258]
        >>> tok.decode([104, 105, 258], skip_special=False)
        'hi<|eos|>'
    """

    # name -> id; the order here fixes the ids 256, 257, 258, 259
    SPECIALS: dict[str, int] = {
        "<|pad|>": _N_BYTES + 0,
        "<|bos|>": _N_BYTES + 1,
        "<|eos|>": _N_BYTES + 2,
        "<|sep|>": _N_BYTES + 3,
    }

    def __init__(self) -> None:
        self.pad_id = self.SPECIALS["<|pad|>"]
        self.bos_id = self.SPECIALS["<|bos|>"]
        self.eos_id = self.SPECIALS["<|eos|>"]
        self.sep_id = self.SPECIALS["<|sep|>"]
        self.special_ids = frozenset(self.SPECIALS.values())
        self.vocab_size = _N_BYTES + len(self.SPECIALS)  # 260
        self._names = {i: name for name, i in self.SPECIALS.items()}  # id -> name, for decode

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size})"

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Return the UTF-8 bytes of ``text`` as ids, optionally wrapped in <|bos|> ... <|eos|>."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids = list(text.encode("utf-8"))
        if add_bos:
            ids.insert(0, self.bos_id)
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special: bool = True) -> str:
        """Turn ids back into text.

        Runs of byte ids are decoded as UTF-8 (invalid sequences become U+FFFD, the replacement
        character). Special tokens are dropped, or written by name ("<|eos|>") when ``skip_special`` is
        False. ``ids`` may be a list of ints or a 1-D tensor.
        """
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"decode expects a 1-D tensor of ids, got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        pieces: list[str] = []
        run = bytearray()  # the current run of plain bytes, decoded together so multi-byte chars survive
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is out of range [0, {self.vocab_size})")
            if i < _N_BYTES:
                run.append(i)
                continue
            # a special token ends the current byte run
            pieces.append(run.decode("utf-8", errors="replace"))
            run.clear()
            if not skip_special:
                pieces.append(self._names[i])
        pieces.append(run.decode("utf-8", errors="replace"))
        return "".join(pieces)
