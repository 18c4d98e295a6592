"""Tests that each kill planted bugs that mutation testing (`make mutate MODULE=minipt/checks.py`) found in
minipt/checks.py: every test here fails on a bug the rest of its suite (test_bad_inputs, test_prompt) let through.
check_ids and check_batch are called directly, on tiny CPU tensors: the whole file runs in well under a second."""

import re

import pytest
import torch

from minipt.checks import check_batch, check_ids

IDS = torch.tensor([[1, 2, 3], [4, 5, 6]])
LIMITS = dict(vocab_size=10, block_size=8)


def refused(error, message, *args, **kwargs):
    """check_batch(*args, **kwargs) raises `error` with exactly `message`."""
    with pytest.raises(error, match=f"^{re.escape(message)}$"):
        check_batch(*args, **{**LIMITS, **kwargs})


# ---- check_ids: metadata ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "idx, error, message",
    [
        ([[1, 2]], TypeError, "ids must be a torch.Tensor of token ids, got list"),
        (IDS.to(torch.int16), TypeError, "ids must hold integer token ids (int64 or int32), got dtype torch.int16"),
        (
            torch.empty(2, 3, dtype=torch.long, device="meta"),
            ValueError,
            "ids is on the meta device (shapes only, no values); give a tensor with values",
        ),
        (IDS[0], ValueError, "ids must have shape (B, T), got (3,)"),
        (IDS[None], ValueError, "ids must have shape (B, T), got (1, 2, 3)"),
        (IDS[:0], ValueError, "ids is empty (shape (0, 3)); need at least one token per example"),
        (IDS[:, :0], ValueError, "ids is empty (shape (2, 0)); need at least one token per example"),
    ],
)
def test_bad_ids_are_refused_with_a_message_that_names_them(idx, error, message):
    with pytest.raises(error, match=f"^{re.escape(message)}$"):
        check_ids(idx, "ids")


def test_the_messages_name_idx_unless_told_another_name():
    with pytest.raises(TypeError, match="^idx must be a torch.Tensor of token ids, got list$"):
        check_ids([[1, 2]])
    with pytest.raises(
        TypeError, match=r"^ids must hold integer token ids \(int64 or int32\), got dtype torch.float32$"
    ):
        check_batch(IDS.float(), name="ids", **LIMITS)


def test_one_token_per_example_is_enough():
    check_ids(IDS[:, :1])
    check_ids(IDS[:1])


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_int64_and_int32_ids_are_accepted(dtype):
    check_ids(IDS.to(dtype))
    assert check_batch(IDS.to(dtype), **LIMITS) is None  # no targets: nothing to count


# ---- check_batch: lengths and ids ---------------------------------------------------------------------------


def test_a_sequence_may_fill_the_block_but_not_exceed_it():
    assert check_batch(IDS, vocab_size=10, block_size=3) is None
    assert check_batch(IDS, vocab_size=10, block_size=5, n_prefix=2) is None
    refused(ValueError, "sequence length 3 = 3 exceeds block_size 2", IDS, block_size=2)
    refused(ValueError, "n_prompt (3) + sequence length (3) = 6 exceeds block_size 5", IDS, block_size=5, n_prefix=3)
    refused(
        ValueError,
        "n_prefix (3) + sequence length (3) = 6 exceeds block_size 5",
        IDS,
        block_size=5,
        n_prefix=3,
        prefix_name="n_prefix",
    )


def test_ids_must_lie_in_zero_to_vocab_size():
    assert check_batch(torch.tensor([[0, 9]]), **LIMITS) is None  # both ends of [0, 10)
    refused(ValueError, "idx holds token id 10, outside [0, vocab_size=10)", torch.tensor([[0, 10]]))
    refused(ValueError, "idx holds token id -1, outside [0, vocab_size=10)", torch.tensor([[-1, 9]]))
    refused(ValueError, "ids holds token id -1, outside [0, vocab_size=10)", torch.tensor([[-1, 9]]), name="ids")


# ---- check_batch: the attention mask ------------------------------------------------------------------------


def test_a_mask_that_is_not_a_tensor_of_the_shape_of_idx_is_refused():
    refused(ValueError, "attention_mask must have the shape of idx (2, 3), got list", IDS, attention_mask=[[1] * 3] * 2)
    refused(
        ValueError,
        "attention_mask must have the shape of idx (2, 3), got (2, 2)",
        IDS,
        attention_mask=torch.ones(2, 2, dtype=torch.long),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64])
def test_a_mask_of_floats_is_refused(dtype):
    message = f"attention_mask must hold integers or bools (1 = token, 0 = pad), got dtype {dtype}"
    refused(TypeError, message, IDS, attention_mask=torch.ones(2, 3, dtype=dtype))


def test_a_mask_on_another_device_is_refused():
    mask = torch.ones(2, 3, dtype=torch.long, device="meta")
    refused(ValueError, "attention_mask is on meta, idx on cpu; put both on one", IDS, attention_mask=mask)


@pytest.mark.parametrize("dtype", [torch.bool, torch.int64, torch.int32, torch.uint8])
def test_right_padded_masks_of_ones_and_zeros_are_accepted(dtype):
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=dtype)
    assert check_batch(IDS, IDS, mask, **LIMITS) == 4


@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32, torch.uint64])
def test_masks_of_wide_unsigned_integers_are_read_like_any_other(dtype):
    # torch has no `>` for these dtypes on the CPU: the right-padding check must read the mask as int64
    assert check_batch(IDS, IDS, torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=dtype), **LIMITS) == 4
    left_padded = torch.tensor([[0, 1, 1], [1, 1, 1]], dtype=dtype)
    refused(ValueError, "attention_mask must be right-padded (ones, then zeros in every row)", IDS, IDS, left_padded)


@pytest.mark.parametrize(
    "mask, message",
    [
        ([[1, 1, 2], [1, 0, 0]], "attention_mask must hold only 0 and 1"),
        ([[1, 1, -1], [1, 1, 1]], "attention_mask must hold only 0 and 1"),
        ([[0, 1, 1], [1, 1, 1]], "attention_mask must be right-padded (ones, then zeros in every row)"),
        ([[1, 0, 1], [1, 1, 1]], "attention_mask must be right-padded (ones, then zeros in every row)"),
        ([[0, 0, 0], [1, 1, 1]], "attention_mask has 1 row(s) of zeros only: every row needs at least one token"),
        ([[0, 0, 0], [0, 0, 0]], "attention_mask has 2 row(s) of zeros only: every row needs at least one token"),
    ],
)
def test_bad_masks_are_refused_saying_what_is_wrong(mask, message):
    refused(ValueError, message, IDS, attention_mask=torch.tensor(mask))


# ---- check_batch: the targets -------------------------------------------------------------------------------


def test_the_count_of_supervised_positions_leaves_out_ignored_targets_and_padding():
    targets = torch.tensor([[-100, 2, 3], [4, 5, -100]])
    assert check_batch(IDS, targets, **LIMITS) == 4
    assert check_batch(IDS, targets, torch.tensor([[1, 1, 0], [1, 1, 1]]), **LIMITS) == 3
    assert check_batch(IDS, targets, torch.tensor([[1, 1, 1], [1, 0, 0]]), **LIMITS) == 3


def test_targets_must_lie_in_zero_to_vocab_size_where_a_loss_is_taken():
    assert check_batch(IDS, torch.tensor([[0, 9, -100], [9, 0, 0]]), **LIMITS) == 5
    refused(
        ValueError,
        "targets holds token id 10, outside [0, vocab_size=10) (use -100 where no loss is taken)",
        IDS,
        torch.tensor([[0, 10, 1], [1, 1, 1]]),
    )
    refused(
        ValueError,
        "targets holds token id -1, outside [0, vocab_size=10) (use -100 where no loss is taken)",
        IDS,
        torch.tensor([[0, 9, 1], [1, 1, -1]]),
    )
    # under padding (mask 0) a target is not read: any value passes
    assert (
        check_batch(IDS, torch.tensor([[1, 1, 10], [1, -1, -5]]), torch.tensor([[1, 1, 0], [1, 0, 0]]), **LIMITS) == 3
    )


def test_targets_with_nothing_supervised_are_refused():
    refused(ValueError, "targets has no supervised position (every entry is -100)", IDS, torch.full((2, 3), -100))
    targets, padding = torch.tensor([[-100, 2, 3], [-100, 5, 6]]), torch.tensor([[1, 0, 0], [1, 0, 0]])
    refused(ValueError, "targets has no supervised position (every entry is -100)", IDS, targets, padding)


def test_a_vocabulary_of_one_token_takes_ignored_and_padded_targets_as_no_id_at_all():
    # vocab_size=1 (GPTConfig allows it): 0 is the only id, so a -100 or padded target read as any id would be refused
    ids = torch.zeros(2, 3, dtype=torch.long)
    assert check_batch(ids, torch.tensor([[0, -100, 0], [-100, -100, 0]]), vocab_size=1, block_size=3) == 3
    padding = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert check_batch(ids, torch.tensor([[0, 0, 7], [0, -100, 5]]), padding, vocab_size=1, block_size=3) == 3
    message = "targets holds token id 1, outside [0, vocab_size=1) (use -100 where no loss is taken)"
    refused(ValueError, message, ids, torch.tensor([[0, -100, 1], [0, 0, 0]]), vocab_size=1)
