"""Tests for ByteTokenizer: round trips, special tokens, batch padding, errors."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minipt.tokenizer import ByteTokenizer

tok = ByteTokenizer()


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_round_trip_any_text(text):
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(torch.tensor(ids, dtype=torch.long)) == text


@settings(max_examples=100, deadline=None)
@given(st.text(), st.text())
def test_specials_between_texts_are_dropped_or_named(a, b):
    ids = tok.encode(a, add_bos=True) + [tok.sep_id] + tok.encode(b, add_eos=True)
    assert tok.decode(ids) == a + b
    assert tok.decode(ids, skip_special=False) == f"<|bos|>{a}<|sep|>{b}<|eos|>"


def test_vocab_and_special_ids():
    assert tok.vocab_size == 260
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.sep_id) == (256, 257, 258, 259)
    assert tok.special_ids == frozenset({256, 257, 258, 259})
    assert isinstance(tok.special_ids, frozenset)
    assert tok.SPECIALS == {"<|pad|>": 256, "<|bos|>": 257, "<|eos|>": 258, "<|sep|>": 259}


def test_encode_is_utf8_bytes():
    assert tok.encode("hi") == [104, 105]
    assert tok.encode("hi", add_bos=True, add_eos=True) == [257, 104, 105, 258]
    assert tok.encode("é") == [0xC3, 0xA9]  # two bytes, one character
    assert tok.encode("") == []


def test_decode_invalid_utf8_uses_replacement_char():
    assert tok.decode([0xC3]) == "\ufffd"  # a lone lead byte
    # a special token splits a multi-byte character: each half is decoded on its own
    assert tok.decode([0xC3, tok.eos_id, 0xA9]) == "\ufffd\ufffd"


def test_decode_rejects_out_of_range_ids():
    with pytest.raises(ValueError, match="260"):
        tok.decode([104, 260])
    with pytest.raises(ValueError, match="-1"):
        tok.decode(torch.tensor([-1]))
    with pytest.raises(ValueError, match="1-D"):
        tok.decode(torch.zeros(2, 2, dtype=torch.long))
