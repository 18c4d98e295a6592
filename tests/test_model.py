"""Tests for minipt.model: presets, shapes, the loss, padding, generation with and without a KV cache, the
embed/body/head split, and a clear error for every bad input."""

import pytest
import torch
import torch.nn.functional as F

from helpers import random_gpt
from minipt.model import GPT, PRESETS, GPTConfig

SMALL = dict(n_layer=2, n_head=2, n_embd=32, vocab_size=260, block_size=64)


def small_model(seed: int = 0, std: float | None = None, **overrides) -> GPT:
    """A small GPT in eval mode (see helpers.random_gpt for `std`)."""
    return random_gpt({**SMALL, **overrides}, seed=seed, std=std).eval()


def random_idx(B, T, V=260, seed=0):
    return torch.randint(V, (B, T), generator=torch.Generator().manual_seed(seed))


# --- configuration -----------------------------------------------------------------------------------


def test_tiny_preset_has_about_one_million_parameters():
    cfg = GPTConfig.preset("tiny")
    assert cfg.vocab_size == 260  # byte vocabulary: 256 bytes + 4 specials
    n = GPT(cfg).num_params()
    assert 0.7e6 <= n <= 1.3e6, n


def test_gpt2_preset_has_the_gpt2_small_shape():
    cfg = GPTConfig.preset("gpt2")
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.vocab_size, cfg.block_size) == (12, 12, 768, 50257, 1024)
    assert cfg.bias and cfg.dropout == 0.0
    with torch.device("meta"):  # shapes only: no 124M parameters allocated
        model = GPT(cfg)
    assert model.num_params() == 124_439_808  # GPT-2 small, head tied to wte, counted once
    assert model.lm_head.weight is model.transformer.wte.weight


def test_presets_and_config_validation():
    for name in PRESETS:
        assert GPTConfig.preset(name).n_embd % GPTConfig.preset(name).n_head == 0
    assert GPTConfig.preset("tiny", block_size=32).block_size == 32  # overrides
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        GPTConfig.preset("huge")
    with pytest.raises(ValueError, match="divisible by n_head"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="n_layer must be >= 1"):
        GPTConfig(n_layer=0)


def test_gpt2_architecture_details():
    model = small_model()
    block = model.transformer.h[0]
    assert block.ln_1.eps == 1e-5 and model.transformer.ln_f.eps == 1e-5
    assert block.mlp.gelu.approximate == "tanh"
    assert model.lm_head.weight is model.transformer.wte.weight  # tied head
    assert model.lm_head.bias is None


# --- forward and loss --------------------------------------------------------------------------------


def test_forward_shapes():
    model = small_model()
    idx = random_idx(3, 7)
    logits, loss = model(idx)
    assert logits.shape == (3, 7, 260) and loss is None
    logits, loss = model(idx, targets=random_idx(3, 7, seed=1))
    assert logits.shape == (3, 7, 260) and loss.shape == () and torch.isfinite(loss)


def test_loss_is_cross_entropy_ignoring_minus_100():
    model = small_model(std=0.3)
    idx = random_idx(2, 9)
    targets = random_idx(2, 9, seed=1)
    targets[0, :4] = -100
    targets[1, 7:] = -100
    logits, loss = model(idx, targets=targets)
    keep = targets != -100
    by_hand = -F.log_softmax(logits, dim=-1)[keep].gather(1, targets[keep][:, None]).mean()
    torch.testing.assert_close(loss, by_hand, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(loss, F.cross_entropy(logits[keep], targets[keep]), rtol=1e-6, atol=1e-6)


def test_loss_keeps_float64_and_upcasts_half_precision():
    model = small_model().double()
    idx, targets = random_idx(2, 5), random_idx(2, 5, seed=1)
    logits, loss = model(idx, targets=targets)
    assert logits.dtype == torch.float64 and loss.dtype == torch.float64  # no silent cast down to fp32
    _, loss16 = small_model().to(torch.bfloat16)(idx, targets=targets)
    assert loss16.dtype == torch.float32


def test_embed_body_head_compose_to_forward():
    model = small_model(std=0.3)
    idx = random_idx(2, 11)
    x = model.embed(idx)
    assert x.shape == (2, 11, 32)
    torch.testing.assert_close(x, model.transformer.wte.weight[idx] + model.transformer.wpe.weight[:11], rtol=0, atol=0)
    h = model.body(x)
    assert h.shape == (2, 11, 32)
    assert torch.equal(model.head(h), model(idx)[0])


def test_right_padding_leaves_real_logits_unchanged():
    model = small_model(std=0.3)
    short = random_idx(1, 5)
    longer = random_idx(1, 9, seed=1)
    alone, _ = model(short)  # (1, 5, V)
    padded = torch.cat([short, torch.full((1, 4), 256)], dim=1)  # right-padded with <|pad|>
    batch = torch.cat([padded, longer])  # (2, 9)
    mask = torch.tensor([[1] * 5 + [0] * 4, [1] * 9])
    logits, _ = model(batch, attention_mask=mask)
    torch.testing.assert_close(logits[0, :5], alone[0], rtol=1e-5, atol=1e-5)

    # the mask takes the padded positions out of the loss, whatever their targets say
    targets = random_idx(2, 9, seed=2)
    _, loss = model(batch, targets=targets, attention_mask=mask)
    _, loss_by_hand = model(batch, targets=targets.masked_fill(mask == 0, -100))
    assert torch.equal(loss, loss_by_hand)
    assert not torch.equal(loss, model(batch, targets=targets)[1])  # and it did change something


def test_left_padding_and_bad_masks_are_rejected():
    model = small_model()
    idx = random_idx(2, 4)
    targets = random_idx(2, 4, seed=1)
    with pytest.raises(ValueError, match="right-padded"):
        model(idx, targets=targets, attention_mask=torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="right-padded"):
        model(idx, targets=targets, attention_mask=torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="only 0 and 1"):
        model(idx, targets=targets, attention_mask=torch.full((2, 4), 2))
    with pytest.raises(ValueError, match="attention_mask must have the shape of idx"):
        model(idx, targets=targets, attention_mask=torch.ones(2, 3))


# --- generation --------------------------------------------------------------------------------------


def test_kv_cache_greedy_generation_equals_no_cache():
    model = small_model(std=0.5)
    idx = random_idx(3, 6)
    with_cache = model.generate(idx, max_new_tokens=20, temperature=0, use_cache=True)
    without = model.generate(idx, max_new_tokens=20, temperature=0, use_cache=False)
    assert with_cache.shape == (3, 26)
    assert torch.equal(with_cache[:, :6], idx)
    assert torch.equal(with_cache, without)
    new = with_cache[:, 6:]
    assert len(new.unique()) > 3  # not a trivially constant continuation


def test_greedy_generation_is_the_argmax_of_repeated_forward():
    model = small_model(std=0.5)
    seq = random_idx(2, 4)
    out = model.generate(seq, max_new_tokens=8, temperature=0)
    for _ in range(8):
        seq = torch.cat([seq, model(seq)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


def test_sampling_with_top_k_stays_in_the_top_k():
    model = small_model(std=0.5)
    idx = random_idx(4, 3)
    g = torch.Generator().manual_seed(0)
    out = model.generate(idx, max_new_tokens=10, temperature=1.5, top_k=3, generator=g)
    assert out.shape == (4, 13) and out.dtype == torch.long
    logits, _ = model(out[:, :-1])  # logits[:, t] scores the token at t + 1
    top3 = logits[:, 2:].topk(3, dim=-1).indices  # (B, 10, 3)
    assert bool((top3 == out[:, 3:, None]).any(-1).all())
    # top_k=1 is greedy whatever the temperature
    assert torch.equal(model.generate(idx, 10, temperature=2.0, top_k=1), model.generate(idx, 10, temperature=0))
    # the same generator seed gives the same sample; plain sampling stays in the vocabulary
    a = model.generate(idx, 10, temperature=1.0, generator=torch.Generator().manual_seed(1))
    b = model.generate(idx, 10, temperature=1.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert 0 <= int(a.min()) and int(a.max()) < 260


def test_generate_zero_tokens_and_too_long_requests():
    model = small_model()
    idx = random_idx(1, 5)
    assert torch.equal(model.generate(idx, max_new_tokens=0), idx)
    with pytest.raises(ValueError, match="exceeds block_size 64"):
        model.generate(idx, max_new_tokens=60)


# --- bad input: each with a clear error ----------------------------------------------------------------


@pytest.mark.parametrize("bad_id", [260, 10_000])
def test_token_id_too_large(bad_id):
    idx = random_idx(2, 5)
    idx[1, 3] = bad_id
    with pytest.raises(ValueError, match=rf"token id {bad_id}, outside \[0, vocab_size=260\)"):
        small_model()(idx)


def test_negative_token_id():
    idx = random_idx(2, 5)
    idx[0, 0] = -1
    with pytest.raises(ValueError, match=r"token id -1, outside \[0, vocab_size=260\)"):
        small_model()(idx)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bool])
def test_non_integer_idx(dtype):
    with pytest.raises(TypeError, match="must hold integer token ids"):
        small_model()(torch.zeros(2, 5, dtype=dtype))


def test_idx_not_a_tensor_or_not_2d():
    model = small_model()
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        model([[1, 2, 3]])
    with pytest.raises(ValueError, match=r"must have shape \(B, T\)"):
        model(torch.tensor([1, 2, 3]))


@pytest.mark.parametrize("shape", [(0, 5), (2, 0)])
def test_empty_batch_or_empty_sequence(shape):
    with pytest.raises(ValueError, match="is empty"):
        small_model()(torch.zeros(shape, dtype=torch.long))
    with pytest.raises(ValueError, match="is empty"):
        small_model().generate(torch.zeros(shape, dtype=torch.long), max_new_tokens=1)


def test_sequence_longer_than_block_size():
    model = small_model()
    model(random_idx(1, 64))  # exactly block_size is fine
    with pytest.raises(ValueError, match="sequence length 65 = 65 exceeds block_size 64"):
        model(random_idx(1, 65))


def test_targets_of_the_wrong_shape_or_kind():
    model = small_model()
    idx = random_idx(2, 5)
    with pytest.raises(ValueError, match="targets must have the shape of idx"):
        model(idx, targets=random_idx(2, 4))
    with pytest.raises(ValueError, match="targets must have the shape of idx"):
        model(idx, targets=random_idx(1, 10))
    with pytest.raises(TypeError, match=r"^targets must hold int64 token ids .* got dtype torch.float32$"):
        model(idx, targets=torch.zeros(2, 5))
    for narrow in (torch.int32, torch.uint16):  # used to fail inside cross_entropy / aminmax, naming no argument
        with pytest.raises(TypeError, match=r"targets must hold int64 token ids .* got dtype torch.(int32|uint16)$"):
            model(idx, targets=idx.to(narrow))
    with pytest.raises(ValueError, match="no supervised position"):
        model(idx, targets=torch.full((2, 5), -100))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_new_tokens=-1), "max_new_tokens must be an integer >= 0"),
        (dict(max_new_tokens=2.5), "max_new_tokens must be an integer >= 0"),
        (dict(max_new_tokens=2, temperature=float("nan")), "temperature must be a finite number >= 0"),
        (dict(max_new_tokens=2, temperature=float("inf")), "temperature must be a finite number >= 0"),
        (dict(max_new_tokens=2, temperature=-1.0), "temperature must be a finite number >= 0"),
        (dict(max_new_tokens=2, temperature=1.0, top_k=0), "top_k must be >= 1"),
    ],
)
def test_generation_arguments_are_checked_in_the_api(kwargs, match):
    from minipt import PromptTuning

    model = random_gpt(dict(n_layer=1, n_head=2, n_embd=16, vocab_size=40, block_size=32))
    idx = torch.randint(40, (2, 5))
    for module in (model, PromptTuning(model, n_prompt=3, init="uniform")):
        with pytest.raises(ValueError, match=match):
            module.generate(idx, **kwargs)
