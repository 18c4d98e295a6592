"""Tests for minipt.prompt: freezing, the forward pass against a by-hand computation, the three inits, a
float64 gradient check, generation with the prompt in the KV cache, and prompt files."""

import pytest
import torch
import torch.nn.functional as F

from helpers import random_gpt
from minipt import GPT, ByteTokenizer, GPTConfig, PromptTuning
from minipt.checkpoint import CheckpointError
from minipt.frozen import snapshot, trainable_parameters
from minipt.prompt import init_prompt
from minipt.train import TrainConfig, train

CFG = dict(n_layer=2, n_head=2, n_embd=32, vocab_size=260, block_size=64)
tok = ByteTokenizer()


def make_model(seed=0, std=None, **overrides) -> GPT:
    """A small GPT in eval mode (see helpers.random_gpt for `std`)."""
    return random_gpt({**CFG, **overrides}, seed=seed, std=std).eval()


def make_pt(model=None, n_prompt=5, init="uniform", **kw) -> PromptTuning:
    return PromptTuning(
        model if model is not None else make_model(std=0.3), n_prompt=n_prompt, init=init, backend="reference", **kw
    ).eval()


def random_idx(B, T, seed=0):
    return torch.randint(256, (B, T), generator=torch.Generator().manual_seed(seed))


# --- freezing and shapes -----------------------------------------------------------------------------


def test_every_base_parameter_is_frozen():
    model = make_model()
    pt = make_pt(model, n_prompt=7)
    assert all(not p.requires_grad for p in model.parameters())
    assert [name for name, _ in trainable_parameters(pt)] == ["prompt"]
    assert pt.prompt.shape == (7, 32) and pt.prompt.dtype == torch.float32 and pt.prompt.requires_grad
    assert pt.num_trainable() == 7 * 32

    _, loss = pt(random_idx(2, 6), targets=random_idx(2, 6, seed=1))
    loss.backward()
    assert pt.prompt.grad is not None and pt.prompt.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_logits_are_for_the_input_positions_only():
    model = make_model(std=0.3)
    pt = make_pt(model, n_prompt=5)
    idx = random_idx(3, 8)
    logits, loss = pt(idx)
    assert logits.shape == (3, 8, 260) and loss is None
    # the same positions of a full forward over [P, tokens]: columns n_prompt .. n_prompt + 7, not 0 .. 7
    full = model.head(model.body(pt.embed(idx)))  # (3, 5 + 8, V)
    assert torch.equal(logits, full[:, 5:])
    assert not torch.allclose(logits, full[:, :8], atol=1e-3)


@pytest.mark.parametrize("data_seed", [0, 1, 2, 3])
@pytest.mark.parametrize("fused", [False, True])  # fused: pt.loss, through the fused frozen head
def test_loss_equals_the_by_hand_computation(fused, data_seed):
    model = make_model(std=0.3)
    pt = make_pt(model, n_prompt=4).train()
    n_p, n = 4, 6
    idx = random_idx(3, n, seed=10 + data_seed)
    targets = random_idx(3, n, seed=20 + data_seed)
    targets[:, :2] = -100
    logits, loss = (None, pt.loss(idx, targets)) if fused else pt(idx, targets=targets)
    loss.backward()

    P = pt.prompt.detach().clone().requires_grad_(True)
    wte, wpe = model.transformer.wte.weight, model.transformer.wpe.weight
    x = torch.cat([(P + wpe[:n_p]).expand(3, n_p, 32), wte[idx] + wpe[n_p : n_p + n]], dim=1)  # (B, n_p+n, D)
    by_hand_logits = model.head(model.body(x))[:, n_p:]  # (B, n, V)
    by_hand = F.cross_entropy(by_hand_logits.reshape(-1, 260), targets.reshape(-1), ignore_index=-100)
    by_hand.backward()

    if fused:
        torch.testing.assert_close(loss, by_hand, rtol=1e-6, atol=1e-6)
    else:
        torch.testing.assert_close(logits, by_hand_logits, rtol=0, atol=0)
        torch.testing.assert_close(loss, by_hand, rtol=0, atol=0)
    # The fused head sums the gradient in another order: allow a few hundred fp32 roundings of the largest entry.
    atol = 256 * torch.finfo(torch.float32).eps * P.grad.abs().max().item()
    torch.testing.assert_close(pt.prompt.grad, P.grad, rtol=0, atol=atol)


def test_prompt_changes_the_output_and_right_padding_does_not():
    model = make_model(std=0.3)
    pt = make_pt(model, n_prompt=3)
    idx = random_idx(1, 5)
    base_logits, _ = model(idx)
    logits, _ = pt(idx)
    assert not torch.allclose(logits, base_logits, atol=1e-3)  # the prompt is really in front
    padded = torch.cat([torch.cat([idx, torch.full((1, 3), tok.pad_id)], 1), random_idx(1, 8, seed=1)])
    mask = torch.tensor([[1] * 5 + [0] * 3, [1] * 8])
    batch_logits, _ = pt(padded, attention_mask=mask)
    torch.testing.assert_close(batch_logits[0, :5], logits[0], rtol=1e-5, atol=1e-5)
    targets = random_idx(2, 8, seed=2)
    _, loss = pt(padded, targets=targets, attention_mask=mask)
    assert torch.equal(loss, pt(padded, targets=targets.masked_fill(mask == 0, -100))[1])
    with pytest.raises(ValueError, match="right-padded"):
        pt(padded, targets=targets, attention_mask=mask.flip(1))


# --- initialisations ---------------------------------------------------------------------------------


def test_uniform_init():
    pt = make_pt(n_prompt=50, init="uniform")
    P = pt.prompt.detach()
    assert P.min() >= -0.5 and P.max() <= 0.5
    assert P.min() < -0.45 and P.max() > 0.45 and abs(float(P.mean())) < 0.05  # U(-0.5, 0.5), not a constant
    assert torch.equal(P, make_pt(n_prompt=50, init="uniform").prompt.detach())  # seeded
    assert not torch.equal(P, make_pt(n_prompt=50, init="uniform", seed=1).prompt.detach())


def rows_of(P, wte) -> list[int]:
    """For each row of P, the id of the identical wte row (asserting there is one)."""
    ids = []
    for row in P:
        match = (wte == row).all(dim=1).nonzero().flatten().tolist()
        assert len(match) == 1, "a prompt row is not a row of wte"
        ids.append(match[0])
    return ids


def test_vocab_init_takes_distinct_non_special_tokens():
    model = make_model()
    pt = make_pt(model, n_prompt=30, init="vocab", tokenizer=tok)
    ids = rows_of(pt.prompt.detach(), model.transformer.wte.weight)
    assert len(set(ids)) == 30  # distinct tokens
    assert not set(ids) & tok.special_ids


def test_vocab_init_without_counts_takes_exactly_the_non_special_tokens():
    """Deterministic whatever the seed: n_prompt = the number of candidates takes every one of them, once."""
    model = make_model(block_size=300)  # room for a prompt of every candidate token
    V = model.config.vocab_size
    candidates = set(range(V)) - set(tok.special_ids)
    for seed in (0, 1):
        pt = make_pt(model, n_prompt=len(candidates), init="vocab", tokenizer=tok, seed=seed)
        assert set(rows_of(pt.prompt.detach(), model.transformer.wte.weight)) == candidates
    with pytest.raises(ValueError, match=rf"only {len(candidates)} candidate tokens"):
        make_pt(model, n_prompt=len(candidates) + 1, init="vocab", tokenizer=tok)


def test_vocab_init_samples_the_most_frequent_tokens():
    model = make_model()
    counts = torch.zeros(260, dtype=torch.long)
    frequent = list(range(97, 97 + 26))  # a..z, the most frequent
    counts[frequent] = torch.arange(1000, 1026)
    counts[[48, 49, 50]] = 3  # rare digits
    # through PromptTuning: only tokens that occur are candidates
    pt = make_pt(model, n_prompt=29, init="vocab", token_counts=counts)
    assert set(rows_of(pt.prompt.detach(), model.transformer.wte.weight)) == set(frequent) | {48, 49, 50}
    # with top_k_tokens: only the k most frequent
    P = init_prompt(
        model, 10, "vocab", token_counts=counts, top_k_tokens=12, generator=torch.Generator().manual_seed(0)
    )
    ids = rows_of(P, model.transformer.wte.weight)
    assert len(set(ids)) == 10 and set(ids) <= set(range(97 + 14, 97 + 26))  # the 12 largest counts
    with pytest.raises(ValueError, match="only 12 candidate tokens"):
        init_prompt(model, 13, "vocab", token_counts=counts, top_k_tokens=12)
    with pytest.raises(ValueError, match="token_counts must have shape"):
        init_prompt(model, 3, "vocab", token_counts=torch.ones(100))


def test_text_init_uses_the_text_embeddings():
    model = make_model()
    wte = model.transformer.wte.weight
    text = "Reverse it:"
    pt = make_pt(model, n_prompt=len(text), init="text", init_text=text, tokenizer=tok)
    assert torch.equal(pt.prompt.detach(), wte[tok.encode(text)])

    with pytest.warns(UserWarning, match="cut"):
        short = make_pt(model, n_prompt=4, init="text", init_text=text, tokenizer=tok)
    assert torch.equal(short.prompt.detach(), wte[tok.encode("Reve")])
    with pytest.warns(UserWarning, match="repeated"):
        long = make_pt(model, n_prompt=7, init="text", init_text="abc", tokenizer=tok)
    assert torch.equal(long.prompt.detach(), wte[tok.encode("abcabca")])

    with pytest.raises(ValueError, match="needs init_text"):
        make_pt(model, n_prompt=3, init="text", tokenizer=tok)
    with pytest.raises(ValueError, match="init must be one of"):
        make_pt(model, n_prompt=3, init="random")


def test_text_init_with_the_instruction_equals_the_written_instruction():
    """A prompt initialised from the instruction's text is the instruction: same positions, same logits."""
    model = make_model(std=0.3)
    instruction = "Reverse the letters: "
    pt = make_pt(model, n_prompt=len(instruction), init="text", init_text=instruction, tokenizer=tok)
    idx = torch.tensor([tok.encode("abcde") + [tok.sep_id]])
    with_instruction = torch.tensor([tok.encode(instruction + "abcde") + [tok.sep_id]])
    torch.testing.assert_close(pt(idx)[0], model(with_instruction)[0][:, len(instruction) :], rtol=0, atol=1e-6)


# --- gradient check ----------------------------------------------------------------------------------


@pytest.mark.parametrize("training", [False, True])  # plain head, and the fused frozen head of training mode
@pytest.mark.parametrize("padded", [False, True])
def test_prompt_gradient_matches_finite_differences_in_float64(padded, training):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=8, vocab_size=260, block_size=32)).double()
    with torch.no_grad():  # larger weights than GPT-2's init, so the loss really depends on the prompt
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.5)
    pt = PromptTuning(model, n_prompt=3, init="uniform", backend="reference").double().train(training)
    idx = random_idx(2, 5)
    targets = random_idx(2, 5, seed=1)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]) if padded else None

    def loss_of(P):
        return torch.func.functional_call(pt, {"prompt": P}, (idx, targets, mask))[1]

    P = pt.prompt.detach().clone().requires_grad_(True)
    assert P.dtype == torch.float64
    assert torch.autograd.gradcheck(loss_of, (P,), eps=1e-6, atol=1e-8, rtol=1e-6)
    (grad,) = torch.autograd.grad(loss_of(P), P)
    assert grad.abs().min() > 0  # every prompt entry reaches the loss: the check is not on zeros


# --- generation --------------------------------------------------------------------------------------


def test_kv_cache_generate_equals_no_cache_generate():
    pt = make_pt(make_model(std=0.5), n_prompt=6)
    idx = random_idx(3, 5)
    with_cache = pt.generate(idx, max_new_tokens=15, temperature=0, use_cache=True)
    without = pt.generate(idx, max_new_tokens=15, temperature=0, use_cache=False)
    assert with_cache.shape == (3, 20) and torch.equal(with_cache[:, :5], idx)
    assert torch.equal(with_cache, without)
    assert len(with_cache[:, 5:].unique()) > 3  # not trivially constant


def test_generate_equals_argmax_of_repeated_forward():
    model = make_model(std=0.5)
    pt = make_pt(model, n_prompt=6)
    seq = random_idx(2, 4)
    out = pt.generate(seq, max_new_tokens=10, temperature=0)
    for _ in range(10):
        seq = torch.cat([seq, pt(seq)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)
    assert not torch.equal(out, model.generate(out[:, :4], 10, temperature=0))  # the prompt matters


def test_sampling_with_a_prompt():
    pt = make_pt(make_model(std=0.5), n_prompt=6)
    idx = random_idx(2, 4)
    a = pt.generate(idx, 8, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(0))
    b = pt.generate(idx, 8, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == (2, 12)
    top5 = pt(a[:, :-1])[0][:, 3:].topk(5, dim=-1).indices
    assert bool((top5 == a[:, 4:, None]).any(-1).all())


def test_prompt_plus_input_longer_than_block_size():
    pt = make_pt(n_prompt=10)  # block_size 64
    pt(random_idx(1, 54))
    with pytest.raises(ValueError, match=r"n_prompt \(10\) \+ sequence length \(55\) = 65 exceeds block_size 64"):
        pt(random_idx(1, 55))
    with pytest.raises(ValueError, match="exceeds block_size"):
        pt.generate(random_idx(1, 50), max_new_tokens=5)
    with pytest.raises(ValueError, match=r"n_prompt must be in \[1, block_size=64\)"):
        make_pt(n_prompt=64)
    with pytest.raises(ValueError, match="n_prompt must be"):
        make_pt(n_prompt=0)


def test_bad_ids_through_the_prompt():
    pt = make_pt()
    with pytest.raises(ValueError, match="token id 260, outside"):
        pt(torch.tensor([[1, 2, 260]]))
    with pytest.raises(ValueError, match="token id -3, outside"):
        pt.generate(torch.tensor([[1, -3]]), max_new_tokens=2)
    with pytest.raises(TypeError, match="integer token ids"):
        pt(torch.tensor([[1.0, 2.0]]))
    with pytest.raises(ValueError, match="is empty"):
        pt(torch.zeros(0, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="must be a minipt GPT"):
        PromptTuning(torch.nn.Linear(2, 2))


# --- files -------------------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    model = make_model(std=0.3)
    pt = make_pt(model, n_prompt=6, init="text", init_text="hello!", tokenizer=tok)
    with torch.no_grad():
        pt.prompt.add_(torch.randn_like(pt.prompt))  # as if trained
    path = tmp_path / "prompt.safetensors"
    pt.save(path)
    loaded = PromptTuning.load(model, path, backend="reference").eval()
    assert torch.equal(loaded.prompt.detach(), pt.prompt.detach())
    assert loaded.n_prompt == 6 and loaded.init == "text"
    assert [name for name, _ in trainable_parameters(loaded)] == ["prompt"]
    idx = random_idx(2, 5)
    assert torch.equal(loaded(idx)[0], pt(idx)[0])
    # the same base model loaded from its own file is accepted too
    model.save(tmp_path / "base.safetensors")
    again = PromptTuning.load(GPT.from_checkpoint(tmp_path / "base.safetensors"), path, backend="reference")
    assert torch.equal(again.prompt.detach(), pt.prompt.detach())


def test_load_onto_another_base_model_fails(tmp_path):
    path = tmp_path / "prompt.safetensors"
    make_pt(make_model(seed=0)).save(path)
    with pytest.raises(CheckpointError, match="made for another base model"):
        PromptTuning.load(make_model(seed=1), path)  # same shape, other weights
    with pytest.raises(CheckpointError, match="width 32 but the model has n_embd=16"):
        PromptTuning.load(make_model(n_embd=16), path)
    with pytest.raises(CheckpointError, match="made for another base model"):
        PromptTuning.load(make_model(seed=0, n_layer=1), path)  # same width, other depth


def test_corrupted_truncated_and_missing_prompt_files(tmp_path):
    model = make_model()
    path = tmp_path / "prompt.safetensors"
    make_pt(model).save(path)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10  # a flipped bit in the prompt's bytes
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted"):
        PromptTuning.load(model, path)
    path.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        PromptTuning.load(model, path)
    with pytest.raises(FileNotFoundError, match="no such checkpoint file"):
        PromptTuning.load(model, tmp_path / "missing.safetensors")


def test_a_loaded_prompt_can_be_trained_further(tmp_path):
    model = make_model(std=0.3)
    make_pt(model, n_prompt=4).save(tmp_path / "prompt.safetensors")
    pt = PromptTuning.load(model, tmp_path / "prompt.safetensors", backend="reference")
    before_base = snapshot(model)
    before_prompt = pt.prompt.detach().clone()
    idx, targets = random_idx(4, 8), random_idx(4, 8, seed=1)
    result = train(pt, lambda step: (idx, targets), TrainConfig(steps=15, lr=0.05, warmup_steps=1, progress=False))
    assert result.losses[-1] < result.losses[0] - 0.1
    assert not torch.equal(pt.prompt.detach(), before_prompt)
    after_base = snapshot(model)
    assert all(torch.equal(v, after_base[k]) for k, v in before_base.items())


def test_label_init_puts_the_mean_label_embeddings_first_then_sampled_vocab():
    model = make_model()
    wte = model.transformer.wte.weight.detach()
    labels = ("even", "odd")
    pt = make_pt(model, n_prompt=5, init="label", labels=labels, tokenizer=tok)
    for k, label in enumerate(labels):  # a label of several tokens is the mean of their embeddings
        torch.testing.assert_close(pt.prompt[k].detach(), wte[tok.encode(label)].mean(dim=0), rtol=0, atol=0)
    fill = pt.prompt[2:].detach()  # the other slots are whole embedding rows of distinct ordinary tokens
    rows = [(wte == row).all(dim=1).nonzero().flatten().tolist() for row in fill]
    assert all(len(r) == 1 and r[0] < 256 for r in rows) and len({r[0] for r in rows}) == 3

    one = make_pt(model, n_prompt=1, init="label", labels=labels, tokenizer=tok)  # fewer slots than labels
    torch.testing.assert_close(one.prompt[0].detach(), wte[tok.encode("even")].mean(dim=0), rtol=0, atol=0)
    with pytest.raises(ValueError, match="needs labels"):
        make_pt(model, n_prompt=3, init="label", tokenizer=tok)
    with pytest.raises(ValueError, match="non-empty"):
        make_pt(model, n_prompt=3, init="label", labels=("yes", ""), tokenizer=tok)


def test_label_init_of_a_built_in_task_uses_its_labels():
    from minipt.apps.recipes import tune_prompt
    from minipt.train import TrainConfig

    model = make_model()
    data = ([], [], [])
    with pytest.raises(ValueError, match="classification task"):
        tune_prompt(model, "reverse", 4, "label", TrainConfig(steps=1, progress=False), data=data)
