"""GPT-2 from Hugging Face: identical logits, offline loading, refused configurations, the tokenizer adapter.

Everything is built locally (random tiny GPT-2, a BPE tokenizer trained on a few sentences): nothing is downloaded.
"""

import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from minipt import GPT, PromptTuning  # noqa: E402
from minipt.assets import load_hf_base  # noqa: E402
from minipt.data import collate  # noqa: E402
from minipt.hf import HFTokenizer, config_from_hf  # noqa: E402
from minipt.tasks import Example  # noqa: E402

TEXTS = [
    "the cat sat on the mat",
    "a dog ran to the park",
    "hello world",
    "reverse these words please",
    "one two three four five six seven eight nine ten",
] * 4


def tiny_hf_gpt2(vocab_size=97, seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        n_layer=2,
        n_head=2,
        n_embd=32,
        vocab_size=vocab_size,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
        **overrides,
    )
    return transformers.GPT2LMHeadModel(cfg).eval()


def tiny_hf_tokenizer():
    """A byte-level BPE tokenizer (GPT-2's kind) trained here on a few sentences, as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tk.train_from_iterator(TEXTS, trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>")


@pytest.mark.parametrize("batch, length", [(1, 1), (3, 17), (2, 64)])
def test_from_hf_gives_the_same_logits(batch, length):
    hf = tiny_hf_gpt2()
    model = GPT.from_hf(hf)
    idx = torch.randint(0, 97, (batch, length), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, _ = model(idx)
        theirs = hf(idx).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_from_hf_copies_by_name_and_transposes_conv1d():
    hf = tiny_hf_gpt2()
    model = GPT.from_hf(hf)
    assert model.config.n_layer == 2 and model.config.block_size == 64 and model.config.vocab_size == 97
    # Conv1D keeps (in, out); nn.Linear keeps (out, in)
    assert torch.equal(model.transformer.h[1].attn.c_attn.weight, hf.transformer.h[1].attn.c_attn.weight.t())
    assert torch.equal(model.transformer.h[0].mlp.c_fc.weight, hf.transformer.h[0].mlp.c_fc.weight.t())
    assert torch.equal(model.transformer.h[0].ln_2.bias, hf.transformer.h[0].ln_2.bias)
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied


def test_from_hf_state_dict_needs_a_config():
    hf = tiny_hf_gpt2()
    with pytest.raises(ValueError, match="config="):
        GPT.from_hf(hf.state_dict())
    model = GPT.from_hf(hf.state_dict(), config=hf.config)
    torch.testing.assert_close(model.transformer.wpe.weight, hf.transformer.wpe.weight)


@pytest.mark.parametrize(
    "override, message",
    [
        (dict(activation_function="relu"), "activation_function"),
        (dict(layer_norm_epsilon=1e-6), "layer_norm_epsilon"),
        (dict(n_inner=64), "n_inner"),
        (dict(scale_attn_by_inverse_layer_idx=True), "scaling"),
    ],
)
def test_unsupported_configurations_are_refused(override, message):
    cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=50, n_positions=16, **override)
    with pytest.raises(ValueError, match=message):
        config_from_hf(cfg)


def test_from_pretrained_reads_a_local_folder_and_never_downloads(tmp_path):
    hf = tiny_hf_gpt2()
    hf.save_pretrained(tmp_path / "tiny-gpt2")
    model = GPT.from_pretrained(tmp_path / "tiny-gpt2")
    torch.testing.assert_close(model.transformer.wte.weight, hf.transformer.wte.weight)
    with pytest.raises(FileNotFoundError, match="never downloads.*hf download gpt2"):
        GPT.from_pretrained("gpt2", cache_dir=tmp_path / "empty-cache")


def test_tokenizer_adapter_interface():
    tok = HFTokenizer(tiny_hf_tokenizer())
    ids = tok.encode("the cat sat")
    assert tok.decode(ids) == "the cat sat"
    assert tok.eos_id == tok.pad_id == tok.bos_id  # GPT-2 style: <|endoftext|> does all three
    assert tok.eos_id in tok.special_ids and tok.decode(ids + [tok.eos_id]) == "the cat sat"
    assert tok.decode([tok.sep_id]) == "\n"
    assert tok.encode("hi", add_eos=True)[-1] == tok.eos_id
    with pytest.raises(ValueError, match="exactly one token"):
        HFTokenizer(tiny_hf_tokenizer(), sep="<sep> and more")


def test_text_init_and_task_batches_with_the_adapter():
    tok = HFTokenizer(tiny_hf_tokenizer())
    model = GPT.from_hf(tiny_hf_gpt2(vocab_size=tok.vocab_size))
    text = "the cat sat on the mat"
    ids = tok.encode(text)
    pt = PromptTuning(model, n_prompt=len(ids), init="text", init_text=text, tokenizer=tok)
    assert torch.equal(pt.prompt.detach(), model.transformer.wte.weight[ids])
    idx, targets, mask = collate([Example("user", "hello world", "the park")], tok, instruction=False)
    assert idx[0, len(tok.encode("hello world"))] == tok.sep_id
    assert targets[0, -1] == tok.eos_id
    _, loss = pt(idx, targets=targets, attention_mask=mask)
    assert torch.isfinite(loss)


def test_load_hf_base_reads_model_and_tokenizer(tmp_path):
    hf_tok = tiny_hf_tokenizer()
    hf = tiny_hf_gpt2(vocab_size=len(hf_tok))
    hf.save_pretrained(tmp_path / "m")
    hf_tok.save_pretrained(tmp_path / "m")
    model, tok = load_hf_base(str(tmp_path / "m"))
    assert tok.vocab_size == model.config.vocab_size == len(hf_tok)
    assert tok.decode(tok.encode("hello world")) == "hello world"


def test_cli_tune_and_generate_with_an_hf_base(tmp_path, capsys):
    import json

    from minipt.apps.cli import main

    hf_tok = tiny_hf_tokenizer()
    tiny_hf_gpt2(vocab_size=len(hf_tok)).save_pretrained(tmp_path / "m")
    hf_tok.save_pretrained(tmp_path / "m")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"input": t, "output": t.split()[0]}) + "\n" for t in TEXTS[:5]))
    base, out = f"hf:{tmp_path / 'm'}", tmp_path / "p.safetensors"
    assert (
        main(
            [
                "tune",
                "--data",
                str(data),
                "--base",
                base,
                "--steps",
                "2",
                "--batch-size",
                "2",
                "--n-prompt",
                "3",
                "--out",
                str(out),
                "--peft-out",
                str(tmp_path / "peft"),
                "--no-progress",
            ]
        )
        == 0
    )
    assert "4 training / 1 validation examples" in capsys.readouterr().out
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tmp_path / "m")
    assert (
        main(["generate", "the cat", "--base", base, "--prompt", str(out), "--task-format", "--max-new-tokens", "3"])
        == 0
    )
    capsys.readouterr()
    for prompt in (out, tmp_path / "peft"):  # eval loads the base as tune does, and whatever the prompt path holds
        assert main(["eval", "--task", "copy", "--base", base, "--prompt", str(prompt), "-n", "4"]) == 0
        assert "copy (test, n=4): exact match" in capsys.readouterr().out


def test_to_hf_is_the_inverse_of_from_hf():
    from minipt import GPTConfig
    from minipt.hf import to_hf

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=260, block_size=64)).eval()
    hf = to_hf(model)
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()  # tied
    idx = torch.randint(0, 260, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx)[0], atol=1e-5, rtol=0)
    assert GPT.from_hf(hf).fingerprint() == model.fingerprint()
