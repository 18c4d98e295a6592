"""A small GPT in plain PyTorch: exactly the GPT-2 architecture, so GPT-2 weights load with identical logits.

The model is split into three steps so that prompt tuning can feed its own input embeddings:

    x = model.embed(idx)          # (B, T, D)  token + learned position embeddings
    h = model.body(x)             # (B, T, D)  transformer blocks, then the final LayerNorm
    logits = model.head(h)        # (B, T, V)  tied with the token embedding (lm_head.weight is wte.weight)

References:
    Radford et al. 2019, "Language Models are Unsupervised Multitask Learners" (GPT-2): pre-LayerNorm
        blocks, learned positions, tanh-approximated GELU, weights tied between wte and lm_head.
    Vaswani et al. 2017, "Attention Is All You Need": scaled dot-product attention.
    Karpathy, nanoGPT `model.py`: the parameter names (wte, wpe, h, ln_f, c_attn, c_proj) and config fields.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .checkpoint import CheckpointError, check_values, load_tensors, model_fingerprint, save_model
from .checks import check_batch
from .loss import lm_loss, mask_padding

__all__ = [
    "GPTConfig",
    "PRESETS",
    "GPT",
    "KVCache",
    "Block",
    "CausalSelfAttention",
    "MLP",
    "load_model",
    "check_generation_length",
    "check_sampling",
    "decode",
    "generate_without_cache",
    "sample_next",
]


@dataclass
class GPTConfig:
    """Hyper-parameters, with nanoGPT's field names."""

    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    vocab_size: int = 260  # ByteTokenizer: 256 bytes + pad, bos, eos, sep
    block_size: int = 128  # the longest sequence (prompt included) the model can see
    bias: bool = True  # GPT-2 has biases in Linear layers and LayerNorms
    dropout: float = 0.0

    def __post_init__(self):
        for name in ("n_layer", "n_head", "n_embd", "vocab_size", "block_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be >= 1 (an integer), got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not isinstance(self.bias, bool):
            raise ValueError(f"GPTConfig.bias must be true or false, got {self.bias!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"GPTConfig.dropout must be a number in [0, 1), got {self.dropout!r}")

    @classmethod
    def preset(cls, name: str, **overrides) -> GPTConfig:
        """A named configuration: see PRESETS."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS = {
    # Byte-level models for the built-in task suite. "tiny" (~0.8M parameters) is the demo's base model;
    # the others give the scale curve more points.
    "pico": dict(n_layer=1, n_head=2, n_embd=32, vocab_size=260, block_size=128),
    "nano": dict(n_layer=2, n_head=2, n_embd=64, vocab_size=260, block_size=128),
    "micro": dict(n_layer=3, n_head=3, n_embd=96, vocab_size=260, block_size=128),
    "tiny": dict(n_layer=4, n_head=4, n_embd=128, vocab_size=260, block_size=128),
    "mini": dict(n_layer=6, n_head=6, n_embd=192, vocab_size=260, block_size=128),
    "small": dict(n_layer=8, n_head=8, n_embd=256, vocab_size=260, block_size=128),
    # The shapes of the released GPT-2 models (BPE vocabulary of 50,257 tokens, 1,024 positions).
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, block_size=1024),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024, vocab_size=50257, block_size=1024),
}


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention; with a `KVCache`, the keys and values of x are written into it first."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0):
        B, T, D = x.shape
        q, k, v = self.c_attn(x).split(D, dim=2)  # 3 x (B, T, D)
        # (B, T, D) -> (B, n_head, T, head_dim)
        q = q.view(B, T, self.n_head, D // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, D // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, D // self.n_head).transpose(1, 2)
        if cache is None:
            y = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
            )  # (B, n_head, T, hd)
        else:
            k, v = cache.write(layer, k, v)  # (B, n_head, T_max, head_dim): every row's past and this chunk
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=cache.mask)  # (B, n_head, T, head_dim)
        y = y.transpose(1, 2).contiguous().view(B, T, D)  # (B, T, D)
        return self.resid_dropout(self.c_proj(y))


class KVCache:
    """Preallocated keys and values of every layer, for generation with rows of different lengths.

        k, v      per layer (B, n_head, T_max, head_dim); row b's valid keys are positions [0, lengths[b])
        lengths   (B,) int64: how many positions of each row are in the cache

    A chunk x (B, T, D) fed to `GPT.body` is written at positions lengths[b] + t of its row (`begin`), and
    query t of row b attends to the keys j <= lengths[b] + t: the row's past plus the causal part of the chunk
    (eq. 1, the boolean mask given to scaled_dot_product_attention). Then `advance(n_valid)` moves each row by
    its number of real positions, so right padding in the chunk is overwritten by the row's next token. No
    tensor is concatenated per step: decoding one token writes one slot per row.

    Rows can start from a filled prefix (the prompt-prefix KV cache of minipt.serve): write its keys and values
    into positions [0, P_b) with `set_prefix` and the row continues at position P_b.
    """

    def __init__(self, n_layer: int, B: int, n_head: int, T_max: int, head_dim: int, device=None, dtype=None):
        # One buffer per layer, not one (n_layer, ...) tensor: an in-place write into one layer's buffer must not
        # change the version of the keys another layer's attention saved for backward (deep prompts train
        # through the cache, minipt.prefix).
        shape = (B, n_head, T_max, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.lengths = torch.zeros(B, dtype=torch.long, device=device)  # (B,)
        self.mask = None

    @classmethod
    def for_model(cls, model: GPT, B: int, T_max: int, dtype=None) -> KVCache:
        c, w = model.config, model.transformer.wte.weight
        return cls(c.n_layer, B, c.n_head, T_max, c.n_embd // c.n_head, device=w.device, dtype=dtype or w.dtype)

    @property
    def T_max(self) -> int:
        return self.k[0].shape[2]

    def row(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Row b's keys and values at every layer, each (n_layer, n_head, T_max, head_dim)."""
        return torch.stack([k[b] for k in self.k]), torch.stack([v[b] for v in self.v])

    def set_prefix(self, rows, k: torch.Tensor, v: torch.Tensor) -> None:
        """Rows (an index, or slice(None) for every row) start from a prefix k, v (n_layer, n_head, P, head_dim),
        written to positions [0, P): one prompt's cache (minipt.serve), or a deep prompt (minipt.prefix). A plain
        copy into the buffers (broadcast over the rows), so when k and v require grad the gradient flows back."""
        P = k.shape[2]
        for layer in range(len(self.k)):
            self.k[layer][rows, :, :P] = k[layer]
            self.v[layer][rows, :, :P] = v[layer]
        self.lengths[rows] = P

    def begin(self, T: int) -> None:
        """Prepare a chunk of T positions: where each row writes (B, T) and what each query sees (eq. 1)."""
        self.pos = self.lengths[:, None] + torch.arange(T, device=self.lengths.device)  # (B, T) write positions
        keys = torch.arange(self.T_max, device=self.lengths.device)  # (T_max,)
        self.mask = (keys[None, None, :] <= self.pos[:, :, None])[:, None]  # (B, 1, T, T_max)   eq. 1

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store this chunk's k, v (B, n_head, T, head_dim) at `pos`; return the layer's (B, n_head, T_max, hd)."""
        rows = torch.arange(k.shape[0], device=k.device)[:, None]  # (B, 1)
        self.k[layer][rows, :, self.pos] = k.transpose(1, 2)  # (B, T, n_head, head_dim) into (B, n_head, T_max, hd)
        self.v[layer][rows, :, self.pos] = v.transpose(1, 2)
        return self.k[layer], self.v[layer]

    def advance(self, n_valid) -> None:
        """Each row moves by its number of real positions in the chunk: an int, or (B,) for right padding."""
        self.lengths += n_valid

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (finished rows leave the batch and stop costing work)."""
        self.k, self.v = [k[rows] for k in self.k], [v[rows] for v in self.v]
        self.lengths = self.lengths[rows]


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2 uses the tanh approximation of GELU
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))  # (B, T, D)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), cache, layer)  # (B, T, D)
        x = x + self.mlp(self.ln_2(x))  # (B, T, D)
        return x


class GPT(nn.Module):
    """GPT-2: token + position embeddings, n_layer pre-LN blocks, final LayerNorm, tied output head."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying (GPT-2)
        self.apply(self._init_weights)
        # GPT-2's scaled init of the residual projections: std 0.02 / sqrt(2 * n_layer).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    # ---- the three steps -------------------------------------------------------------------------------

    def embed(self, idx: torch.Tensor, start_pos: int = 0, positions: torch.Tensor | None = None) -> torch.Tensor:
        """x[b, t] = wte[idx[b, t]] + wpe[start_pos + t], or wpe[positions[b, t]] with positions (B, T)."""
        T = idx.shape[1]
        if positions is None:
            positions = torch.arange(start_pos, start_pos + T, device=idx.device)  # (T,)
        x = self.transformer.wte(idx) + self.transformer.wpe(positions)  # (B, T, D)
        return self.transformer.drop(x)

    def body(
        self, x: torch.Tensor, cache: KVCache | None = None, recompute: bool = False, n_valid=None
    ) -> torch.Tensor:
        """Run the blocks and the final LayerNorm on input embeddings x (B, T, D).

        cache: a `KVCache`; x's keys and values are written after each row's cached positions and x attends to
        them, so generation feeds only new positions. n_valid: the real positions of each row of x (an int or
        (B,), right padding; default T), by which each row of the cache advances.
        recompute: run each block under `torch.utils.checkpoint` (non-reentrant): backward keeps only the block
        inputs and runs each block's forward again. It needs no input that requires grad, so it works on a
        frozen model as it is (PEFT issue #742 is about the reentrant variant, which does).
        """
        if cache is not None:
            cache.begin(x.shape[1])
        for i, block in enumerate(self.transformer.h):
            if recompute and torch.is_grad_enabled() and cache is None:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x, cache, i)
        if cache is not None:
            cache.advance(x.shape[1] if n_valid is None else n_valid)
        return self.transformer.ln_f(x)  # (B, T, D)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(h)  # (B, T, V)

    def check(self, idx, targets=None, attention_mask=None) -> int | None:
        """minipt.checks.check_batch for this model: clear errors before any embedding lookup reads out of bounds."""
        c = self.config
        return check_batch(idx, targets, attention_mask, vocab_size=c.vocab_size, block_size=c.block_size)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None
    ):
        """Logits (B, T, V) for every position, and the mean cross-entropy over targets != -100 when targets are given.

        targets has the shape of idx and holds the next token of each position (targets[:, t] = idx[:, t+1]
        where that token is supervised), -100 where no loss is taken. With right padding, attention_mask
        (1 = token, 0 = pad) only removes the padded positions from the loss: causal attention already keeps
        real tokens from seeing the padding after them.
        """
        self.check(idx, targets, attention_mask)
        logits = self.head(self.body(self.embed(idx)))  # (B, T, V)
        if targets is None:
            return logits, None
        return logits, lm_loss(logits, mask_padding(targets, attention_mask))

    def loss(self, idx, targets, attention_mask=None) -> torch.Tensor:
        """The training loss alone (what `minipt.train` calls): forward's loss."""
        return self(idx, targets, attention_mask)[1]

    # ---- generation -------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        idx,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
        attention_mask: torch.Tensor | None = None,
        eos_id: int | None = None,
    ) -> torch.Tensor:
        """Continue idx (B, T) by max_new_tokens tokens; temperature 0 means greedy. Returns (B, T + new).

        attention_mask (B, T), 1 = token, 0 = pad, right-padded: row b continues after its own last token, and
        its new tokens are out[b, T:] whatever its length. With eos_id, a row stops at its first eos (kept)
        and the rest of its row is eos_id.
        """
        self.check(idx, attention_mask=attention_mask)
        check_generation_length(idx.shape[1], max_new_tokens, self.config.block_size, "idx length", temperature, top_k)
        if not use_cache:
            return generate_without_cache(
                lambda ids, rows: self(ids)[0],
                idx,
                max_new_tokens,
                temperature,
                top_k,
                generator,
                attention_mask,
                eos_id,
            )
        n_valid = idx.shape[1] if attention_mask is None else attention_mask.sum(1)  # (B,) or T
        new = self.generate_from_embeddings(
            self.embed(idx), max_new_tokens, temperature, top_k, generator, n_valid=n_valid, eos_id=eos_id
        )
        return torch.cat([idx, new], dim=1)

    @torch.no_grad()
    def generate_from_embeddings(
        self,
        x,
        max_new_tokens,
        temperature=1.0,
        top_k=None,
        generator=None,
        n_valid=None,
        eos_id=None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Generate after a prefix given as embeddings x (B, T0, D), e.g. a soft prompt + input, with the KV cache.

        n_valid: the real positions of each row (an int or (B,) tensor; right padding; default T0). cache: a
        KVCache whose rows already hold a prefix (its lengths say where x starts); by default a new one.
        The prefix is run once (prefill) and each new token costs one position. Returns the new ids (B, new).
        """
        B, T0, _ = x.shape
        n_valid = (
            torch.full((B,), T0, dtype=torch.long, device=x.device)
            if n_valid is None
            else torch.as_tensor(n_valid, device=x.device).expand(B)
        )  # (B,)
        if cache is None:
            check_generation_length(T0, max_new_tokens, self.config.block_size, "prefix length")
            cache = KVCache.for_model(self, B, T0 + max_new_tokens, dtype=x.dtype)
        return decode(self, x, cache, n_valid, max_new_tokens, temperature, top_k, generator, eos_id)

    # ---- bookkeeping ------------------------------------------------------------------------------------

    def num_params(self) -> int:
        """Parameter count, the tied head counted once."""
        return sum(p.numel() for p in self.parameters())

    def fingerprint(self) -> str:
        """A short hash of the configuration and every weight, to tell which base model a prompt was made for."""
        return model_fingerprint(self)

    @classmethod
    def from_checkpoint(cls, path, map_location="cpu") -> GPT:
        return load_model(path, map_location=map_location)

    def save(self, path, extra_metadata: dict | None = None) -> None:
        save_model(self, path, extra_metadata)

    @classmethod
    def from_hf(cls, model_or_state_dict, config=None) -> GPT:
        """A minipt GPT with the weights of a transformers GPT-2 (a GPT2LMHeadModel or its state dict); minipt.hf.

        With a state dict, pass `config` (a transformers GPT2Config or a minipt GPTConfig): the number of heads
        cannot be read from the tensor shapes. The new model is on the CPU in float32 unless the weights are not.
        """
        from .hf import config_from_hf, state_dict_from_hf

        if isinstance(model_or_state_dict, dict):
            if config is None:
                raise ValueError(
                    "from a state dict, pass config= (a GPT2Config or GPTConfig): n_head is not in the shapes"
                )
            hf_state = model_or_state_dict
        else:
            hf_state = model_or_state_dict.state_dict()
            config = config if config is not None else model_or_state_dict.config
        cfg = config if isinstance(config, GPTConfig) else GPTConfig(**config_from_hf(config))
        state = state_dict_from_hf(hf_state)
        dtype = state["transformer.wte.weight"].dtype
        model = cls(cfg).to(dtype)
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if k != "lm_head.weight"]  # tied to wte, loaded with it
        if missing or unexpected:
            raise ValueError(
                f"the GPT-2 weights do not fit the configuration (missing {missing}, unexpected {unexpected})"
            )
        return model.eval()

    @classmethod
    def from_pretrained(cls, name_or_path: str = "gpt2", cache_dir=None) -> GPT:
        """GPT-2 weights from the local Hugging Face cache or a local folder (never downloads); see minipt.hf."""
        from .hf import hf_gpt2_from_pretrained

        return cls.from_hf(hf_gpt2_from_pretrained(name_or_path, cache_dir=cache_dir))


def load_model(path, map_location="cpu") -> GPT:
    """GPT.from_checkpoint: a model file written by GPT.save (minipt.checkpoint.save_model), proven before anything
    large is built: the hash (load_tensors), the config against the tensors' shapes, finite float weights, and the
    stored fingerprint against the loaded model's."""
    tensors, meta = load_tensors(path, kind="gpt", map_location=map_location)
    try:
        config = GPTConfig(**json.loads(meta["config"]))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: the model config in the metadata is missing or invalid ({e})") from e
    _check_config_fits(config, tensors, path)
    check_values(tensors, path)
    try:
        model = GPT(config).to(map_location)
        missing, unexpected = model.load_state_dict(tensors, strict=False)
    except (RuntimeError, ValueError, TypeError) as e:  # a tensor whose shape does not fit, or a bad config
        first = str(e).strip().splitlines()[-1].strip()
        raise CheckpointError(f"{path}: the weights do not fit the model config in the file ({first})") from e
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not fit the config (missing {missing}, unexpected {unexpected})")
    if "fingerprint" in meta and meta["fingerprint"] != model_fingerprint(model):
        raise CheckpointError(
            f"{path}: the model does not match the fingerprint stored in the file (its config or weights were changed)"
        )
    return model


def _check_config_fits(config: GPTConfig, tensors: dict[str, torch.Tensor], path) -> None:
    """The config's sizes against the tensors' shapes, before a model of that config is built."""
    wte, wpe = tensors.get("transformer.wte.weight"), tensors.get("transformer.wpe.weight")
    blocks = {name.split(".")[2] for name in tensors if name.startswith("transformer.h.")}
    found = {
        "vocab_size": None if wte is None else wte.shape[0],
        "n_embd": None if wte is None else wte.shape[-1],
        "block_size": None if wpe is None else wpe.shape[0],
        "n_layer": len(blocks),
    }
    for name, value in found.items():
        if getattr(config, name) != value:
            raise CheckpointError(
                f"{path}: the config says {name}={getattr(config, name)} but the weights have "
                f"{value}; the file was changed"
            )


def check_generation_length(
    T0: int, max_new_tokens: int, block_size: int, what: str, temperature: float = 0.0, top_k: int | None = None
) -> None:
    """Generation's arguments, before any work: max_new_tokens an integer >= 0 whose sequence fits in block_size,
    and the sampling arguments as sample_next takes them."""
    check_sampling(temperature, top_k)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if T0 + max_new_tokens > block_size:
        raise ValueError(f"{what} {T0} + max_new_tokens {max_new_tokens} exceeds block_size {block_size}")


@torch.no_grad()
def decode(
    model: GPT,
    x,
    cache: KVCache,
    n_valid,
    max_new_tokens,
    temperature=1.0,
    top_k=None,
    generator=None,
    eos_id=None,
    budgets=None,
) -> torch.Tensor:
    """Prefill x (B, T0, D) after each row's cached prefix, then decode; returns the new ids (B, max_new_tokens).

    Row b's real positions are x[b, :n_valid[b]], placed after the cache's lengths[b] positions; its next token
    is read at its last real position and written at position lengths[b] + n_valid[b] + step. budgets (B,): the most new
    tokens of each row (default max_new_tokens). A row is done at its first eos_id (kept) or its budget; the
    rest of its output is eos_id (0 without one), and done rows leave the batch (`KVCache.keep`).
    """
    B = x.shape[0]
    fill = 0 if eos_id is None else eos_id
    out = torch.full((B, max_new_tokens), fill, dtype=torch.long, device=x.device)  # (B, new)
    if max_new_tokens == 0:
        return out
    rows = torch.arange(B, device=x.device)  # (B_active,) the rows still decoding
    h = model.body(x, cache, n_valid=n_valid)  # prefill: (B, T0, D)
    h = h[rows, n_valid - 1]  # (B, D): each row's last real position
    stop_early = eos_id is not None or budgets is not None
    budgets = torch.as_tensor(max_new_tokens if budgets is None else budgets, device=x.device).expand(B)
    for step in range(max_new_tokens):
        next_id = sample_next(model.head(h), temperature, top_k, generator)  # (B_active, 1)
        out[rows, step] = next_id[:, 0]
        if step == max_new_tokens - 1:
            break
        if stop_early:  # one host read per step: which rows are done
            done = budgets[rows] <= step + 1
            if eos_id is not None:
                done |= next_id[:, 0] == eos_id
            if bool(done.any()):
                keep = (~done).nonzero()[:, 0]  # (B_active',)
                if len(keep) == 0:
                    break
                rows, next_id = rows[keep], next_id[keep]
                cache.keep(keep)
        pos = cache.lengths[:, None]  # (B_active, 1): each row's next position
        h = model.body(model.embed(next_id, positions=pos), cache)[:, 0]  # (B_active, D)
    return out


@torch.no_grad()
def generate_without_cache(
    logits_fn,
    idx,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k=None,
    generator=None,
    attention_mask=None,
    eos_id=None,
) -> torch.Tensor:
    """The reference decoder: run the whole sequence again for every new token (what the cache must equal).

    logits_fn(ids, rows) -> logits (b, T, V) is any forward pass (the model's, or a prompt-tuned one) of ids
    (b, T), the rows `rows` (a slice) of the batch: a bank of prompts picks each row's prompt with it. With
    attention_mask (right padding), each row is decoded alone, unpadded: the plainest reference there is.
    """
    if attention_mask is None:
        return _decode_rows(logits_fn, idx, slice(None), max_new_tokens, temperature, top_k, generator, eos_id)
    rows = [
        _decode_rows(
            logits_fn, idx[b : b + 1, :n], slice(b, b + 1), max_new_tokens, temperature, top_k, generator, eos_id
        )[:, n:]
        for b, n in enumerate(attention_mask.sum(1).tolist())
    ]
    return torch.cat([idx, torch.cat(rows)], dim=1)  # (B, T + new)


def _decode_rows(logits_fn, idx, rows: slice, max_new_tokens, temperature, top_k, generator, eos_id):
    """generate_without_cache for unpadded rows idx (b, T): (b, T + new)."""
    T = idx.shape[1]
    for _ in range(max_new_tokens):
        next_id = sample_next(logits_fn(idx, rows)[:, -1], temperature, top_k, generator)  # (b, 1)
        idx = torch.cat([idx, next_id], dim=1)
    if eos_id is not None:  # everything after a row's first eos is eos
        new = idx[:, T:]
        after = (new == eos_id).long().cumsum(1) - (new == eos_id).long() > 0  # (b, new): past the first eos
        idx = torch.cat([idx[:, :T], new.masked_fill(after, eos_id)], dim=1)
    return idx


def check_sampling(temperature: float, top_k: int | None) -> None:
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, generator=None) -> torch.Tensor:
    """Pick the next token from logits (B, V): argmax when temperature == 0, else sample (top-k optional)."""
    check_sampling(temperature, top_k)
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)  # (B, 1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits.float(), dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
