"""Hugging Face interop: GPT-2 weights into minipt's GPT, offline loading, and a tokenizer adapter.

    model = GPT.from_hf(hf_model)               # a transformers GPT2LMHeadModel (any size), or its state dict
    hf_model = to_hf(model)                     # and back: the same network as a GPT2LMHeadModel
    model = GPT.from_pretrained("gpt2")         # from the local Hugging Face cache or a local folder; never downloads
    tok = HFTokenizer.from_pretrained("gpt2")   # encode / decode / eos_id / pad_id / sep_id, as minipt uses them

One difference in layout matters. Hugging Face's GPT-2 stores its four projections (attn.c_attn, attn.c_proj,
mlp.c_fc, mlp.c_proj) as `Conv1D` modules, whose weight is (in, out) and computes y = x @ W + b. minipt uses
`nn.Linear`, whose weight is (out, in) and computes y = x @ W^T + b. So those four weights are transposed on
import; every other tensor (embeddings, LayerNorms, biases) copies over by name unchanged.

The two models are the same function only if the configuration agrees with minipt's fixed choices: tanh GELU
("gelu_new"), LayerNorm eps 1e-5, MLP width 4 * n_embd, attention scaled by 1/sqrt(head_dim) and nothing else,
tied output head. A configuration that differs is refused with an error saying which field, rather than
loaded into a model that would silently compute something else.

`transformers` is imported only inside the functions that need it (the `hf` extra: pip install "minipt[hf]").
This module knows no GPT class (minipt.model imports it, never the other way): `GPT.from_hf` builds the model
from `config_from_hf` and `state_dict_from_hf`; `minipt.assets.load_hf_base` pairs a model with its tokenizer.
"""

from __future__ import annotations

import torch

__all__ = ["HFTokenizer", "config_from_hf", "hf_gpt2_from_pretrained", "state_dict_from_hf", "to_hf"]

# Conv1D weights: stored (in, out) by Hugging Face, (out, in) by nn.Linear.
TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Buffers some transformers versions keep in the state dict (the causal mask); minipt has no such buffers.
_SKIPPED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")  # both are 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))

HOW_TO_GET_WEIGHTS = (
    "minipt never downloads. On a machine with network access, fetch the weights once into the Hugging Face "
    'cache with `python -c "from transformers import AutoTokenizer, GPT2LMHeadModel as M; '
    "M.from_pretrained('{name}'); AutoTokenizer.from_pretrained('{name}')\"` (or `hf download {name}`), "
    "then copy the cache folder (~/.cache/huggingface, or $HF_HOME) to this machine; or pass the path of a "
    "folder written by `save_pretrained`."
)


def _require_transformers():
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError('this needs the Hugging Face extra: pip install "minipt[hf]" (transformers, peft)') from e
    return transformers


def config_from_hf(hf_config) -> dict:
    """The GPTConfig fields (a dict) of a transformers GPT2Config; ValueError for any setting minipt does not
    compute."""
    get = lambda name, default=None: getattr(hf_config, name, default)  # noqa: E731
    if get("model_type") not in (None, "gpt2"):
        raise ValueError(f"only GPT-2 models can be imported, got model_type {get('model_type')!r}")
    act = get("activation_function", "gelu_new")
    if act not in _TANH_GELUS:
        raise ValueError(
            f"activation_function {act!r} is not supported: minipt's GPT uses the tanh GELU ('gelu_new', as GPT-2 does)"
        )
    eps = get("layer_norm_epsilon", 1e-5)
    if eps != 1e-5:
        raise ValueError(f"layer_norm_epsilon {eps} is not supported: minipt's LayerNorms use 1e-5 (GPT-2's)")
    n_embd = get("n_embd")
    if get("n_inner") not in (None, 4 * n_embd):
        raise ValueError(f"n_inner {get('n_inner')} is not supported: minipt's MLP is 4 * n_embd = {4 * n_embd} wide")
    if not get("scale_attn_weights", True) or get("scale_attn_by_inverse_layer_idx", False):
        raise ValueError("only GPT-2's attention scaling (1/sqrt(head_dim), nothing else) is supported")
    if not get("tie_word_embeddings", True):
        raise ValueError("the output head must be tied to the token embedding (tie_word_embeddings=True)")
    return dict(
        n_layer=get("n_layer"),
        n_head=get("n_head"),
        n_embd=n_embd,
        vocab_size=get("vocab_size"),
        block_size=get("n_positions"),
        bias=True,
        dropout=0.0,
    )


def state_dict_from_hf(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A minipt GPT state dict (without lm_head.weight, which is tied) from a GPT-2 one.

    Accepts the keys of GPT2LMHeadModel ("transformer.h.0...") and of GPT2Model ("h.0...").
    """
    out = {}
    for key, t in hf_state.items():
        if key.endswith(_SKIPPED_SUFFIXES) or key == "lm_head.weight":
            continue
        name = key if key.startswith("transformer.") else "transformer." + key
        out[name] = t.t().contiguous() if name.endswith(TRANSPOSED) else t  # (in, out) -> (out, in)
    head = hf_state.get("lm_head.weight")
    wte = out.get("transformer.wte.weight")
    if head is not None and wte is not None and not torch.equal(head, wte):
        raise ValueError("lm_head.weight differs from transformer.wte.weight: minipt needs a tied output head")
    return out


def to_hf(model, activation: str = "gelu_new"):
    """A minipt GPT as the same network, a transformers GPT2LMHeadModel (the inverse of GPT.from_hf), on the
    model's device and dtype, e.g. to use a prompt tuned in minipt with PEFT on a minipt base model. Logits
    agree to float rounding.
    activation: "gelu_new" (GPT-2's) or "gelu_pytorch_tanh" (the same function, fused)."""
    transformers = _require_transformers()
    c = model.config
    if not c.bias:
        raise ValueError("only models with bias=True (GPT-2's layout) can be exported")
    hf_config = transformers.GPT2Config(
        n_layer=c.n_layer,
        n_head=c.n_head,
        n_embd=c.n_embd,
        vocab_size=c.vocab_size,
        n_positions=c.block_size,
        activation_function=activation,
        layer_norm_epsilon=1e-5,
        resid_pdrop=c.dropout,
        embd_pdrop=c.dropout,
        attn_pdrop=c.dropout,
        bos_token_id=None,
        eos_token_id=None,
    )
    hf_config._attn_implementation = "sdpa"  # minipt uses F.scaled_dot_product_attention too
    wte = model.transformer.wte.weight
    hf = transformers.GPT2LMHeadModel(hf_config).to(device=wte.device, dtype=wte.dtype)
    state = {
        name: t.t().contiguous() if name.endswith(TRANSPOSED) else t  # (out, in) -> (in, out)
        for name, t in model.state_dict().items()
        if name != "lm_head.weight"
    }
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight" and not k.endswith(_SKIPPED_SUFFIXES)]
    if missing or unexpected:
        raise ValueError(f"export failed (missing {missing}, unexpected {unexpected})")
    hf.tie_weights()
    return hf.eval()


def hf_gpt2_from_pretrained(name_or_path: str, cache_dir=None):
    """For GPT.from_pretrained: a transformers GPT-2 from the local Hugging Face cache or a local folder, never
    the network."""
    transformers = _require_transformers()
    try:
        return transformers.GPT2LMHeadModel.from_pretrained(
            str(name_or_path), local_files_only=True, cache_dir=cache_dir
        )
    except OSError as e:  # transformers raises OSError (EnvironmentError) for files it cannot find offline
        raise FileNotFoundError(
            f"GPT-2 weights {name_or_path!r} are not in the local Hugging Face cache "
            f"or a local folder. " + HOW_TO_GET_WEIGHTS.format(name=name_or_path)
        ) from e


class HFTokenizer:
    """A transformers tokenizer with the small interface minipt uses (the one ByteTokenizer has).

        encode(text) -> ids       decode(ids) -> text       vocab_size, special_ids
        eos_id   end of an answer: the tokenizer's eos token (GPT-2: <|endoftext|>)
        pad_id   padding (never a target): the pad token, else eos
        bos_id   the bos token, else eos
        sep_id   ends a task's input before the answer (`minipt.tasks` appends it as one id). GPT-2 has no such
                 token, so it is the single token of the `sep` string ("\\n" by default; must be one token).

    encode never adds special tokens; minipt's task encoding adds sep and eos itself.
    """

    def __init__(self, tokenizer, sep: str = "\n"):
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)  # added tokens included
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos token; set tokenizer.eos_token first")
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        self.bos_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else self.eos_id
        sep_ids = tokenizer.encode(sep, add_special_tokens=False)
        if len(sep_ids) != 1:
            raise ValueError(
                f"sep={sep!r} encodes to {len(sep_ids)} tokens {sep_ids}; choose a string that is exactly one token"
            )
        self.sep = sep
        self.sep_id = sep_ids[0]
        self.special_ids = frozenset(tokenizer.all_special_ids)

    @classmethod
    def from_pretrained(cls, name_or_path: str, sep: str = "\n", cache_dir=None) -> HFTokenizer:
        """The tokenizer of a local folder or the local Hugging Face cache, never the network."""
        transformers = _require_transformers()
        try:
            tok = transformers.AutoTokenizer.from_pretrained(
                str(name_or_path), local_files_only=True, cache_dir=cache_dir
            )
        except OSError as e:
            raise FileNotFoundError(
                f"tokenizer {name_or_path!r} is not in the local Hugging Face cache or a "
                f"local folder. " + HOW_TO_GET_WEIGHTS.format(name=name_or_path)
            ) from e
        return cls(tok, sep=sep)

    def __repr__(self) -> str:
        return f"HFTokenizer({type(self.tokenizer).__name__}, vocab_size={self.vocab_size}, sep={self.sep!r})"

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids = list(self.tokenizer.encode(text, add_special_tokens=False))
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def decode(self, ids, skip_special: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"decode expects a 1-D tensor of ids, got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special)
