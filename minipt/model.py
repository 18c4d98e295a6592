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

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .checks import check_batch
from .loss import lm_loss, mask_padding


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
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        for name in ("n_layer", "n_head", "n_embd", "vocab_size", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"GPTConfig.{name} must be >= 1, got {getattr(self, name)}")

    @classmethod
    def preset(cls, name: str, **overrides) -> "GPTConfig":
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
    """Multi-head causal self-attention with an optional key/value cache for generation."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache: tuple | None = None):
        B, T, D = x.shape
        q, k, v = self.c_attn(x).split(D, dim=2)  # 3 x (B, T, D)
        # (B, T, D) -> (B, n_head, T, head_dim)
        q = q.view(B, T, self.n_head, D // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, D // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, D // self.n_head).transpose(1, 2)
        if cache is not None and cache[0] is not None:
            # Decoding: the new queries see every cached position, so no causal mask is needed as long as
            # they are a single new position (T == 1), which is what `generate` feeds.
            if T != 1:
                raise ValueError("with a non-empty cache, feed one new position at a time")
            k = torch.cat([cache[0], k], dim=2)  # (B, n_head, T_past + 1, head_dim)
            v = torch.cat([cache[1], v], dim=2)
            is_causal = False
        else:
            is_causal = True
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=is_causal, dropout_p=self.dropout if self.training else 0.0
        )  # (B, n_head, T, head_dim)
        y = y.transpose(1, 2).contiguous().view(B, T, D)  # (B, T, D)
        y = self.resid_dropout(self.c_proj(y))
        return y, (k, v)


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

    def forward(self, x, cache=None):
        a, new_cache = self.attn(self.ln_1(x), cache)
        x = x + a  # (B, T, D)
        x = x + self.mlp(self.ln_2(x))  # (B, T, D)
        return x, new_cache


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

    def embed(self, idx: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        """x[b, t] = wte[idx[b, t]] + wpe[start_pos + t]."""
        T = idx.shape[1]
        pos = torch.arange(start_pos, start_pos + T, device=idx.device)  # (T,)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, D)
        return self.transformer.drop(x)

    def body(self, x: torch.Tensor, cache: list | None = None, recompute: bool = False) -> torch.Tensor:
        """Run the blocks and the final LayerNorm on input embeddings x (B, T, D).

        cache: a list with one (k, v) entry per layer, each (B, n_head, T_past, head_dim), empty or from an
        earlier call; the keys and values of x are appended to it, so the next call only needs the new position.
        recompute: run each block under `torch.utils.checkpoint` (non-reentrant): backward keeps only the block
        inputs and runs each block's forward again. It needs no input that requires grad, so it works on a
        frozen model as it is (PEFT issue #742 is about the reentrant variant, which does).
        """
        if cache is not None and len(cache) == 0:
            cache.extend([None] * len(self.transformer.h))
        for i, block in enumerate(self.transformer.h):
            layer_cache = None if cache is None else (cache[i] if cache[i] is not None else (None, None))
            if recompute and torch.is_grad_enabled():
                x, kv = checkpoint(block, x, layer_cache, use_reentrant=False)
            else:
                x, kv = block(x, layer_cache)
            if cache is not None:
                cache[i] = kv
        return self.transformer.ln_f(x)  # (B, T, D)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(h)  # (B, T, V)

    def check(self, idx, targets=None, attention_mask=None) -> int | None:
        """minipt.checks.check_batch for this model: clear errors before any embedding lookup reads out of bounds."""
        c = self.config
        return check_batch(idx, targets, attention_mask, vocab_size=c.vocab_size, block_size=c.block_size)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None):
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
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 use_cache: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
        """Continue idx (B, T) by max_new_tokens tokens; temperature 0 means greedy. Returns (B, T + new).

        Every row continues from its last position, so the rows of a batch must have the same length (no
        padding); batch examples of equal length together.
        """
        self.check(idx)
        check_generation_length(idx.shape[1], max_new_tokens, self.config.block_size, "idx length")
        if not use_cache:
            return generate_without_cache(lambda ids: self(ids)[0], idx, max_new_tokens, temperature, top_k, generator)
        new = self.generate_from_embeddings(self.embed(idx), max_new_tokens, temperature, top_k, generator)
        return torch.cat([idx, new], dim=1)

    @torch.no_grad()
    def generate_from_embeddings(self, x, max_new_tokens, temperature=1.0, top_k=None, generator=None) -> torch.Tensor:
        """Generate after a prefix given as embeddings x (B, T0, D), e.g. a soft prompt + input, with the KV cache.

        The prefix is run once (prefill) and each new token costs one position. Returns the new ids (B, new).
        """
        B, T0, _ = x.shape
        check_generation_length(T0, max_new_tokens, self.config.block_size, "prefix length")
        new_ids = torch.empty(B, 0, dtype=torch.long, device=x.device)
        if max_new_tokens == 0:
            return new_ids
        cache = []
        h = self.body(x, cache)  # prefill: (B, T0, D)
        for step in range(max_new_tokens):
            next_id = sample_next(self.head(h[:, -1]), temperature, top_k, generator)  # (B, 1)
            new_ids = torch.cat([new_ids, next_id], dim=1)
            if step < max_new_tokens - 1:
                h = self.body(self.embed(next_id, start_pos=T0 + step), cache)  # (B, 1, D)
        return new_ids

    # ---- bookkeeping ------------------------------------------------------------------------------------

    def num_params(self) -> int:
        """Parameter count, the tied head counted once."""
        return sum(p.numel() for p in self.parameters())

    def fingerprint(self) -> str:
        """A short hash of the configuration and every weight, to tell which base model a prompt was made for."""
        from .checkpoint import model_fingerprint

        return model_fingerprint(self)

    @classmethod
    def from_checkpoint(cls, path, map_location="cpu") -> "GPT":
        from .checkpoint import load_model

        return load_model(path, map_location=map_location)

    def save(self, path, extra_metadata: dict | None = None) -> None:
        from .checkpoint import save_model

        save_model(self, path, extra_metadata)

    @classmethod
    def from_hf(cls, model_or_state_dict, config=None) -> "GPT":
        """A transformers GPT2LMHeadModel (or its state dict + config) as a minipt GPT; see minipt.hf."""
        from .hf import gpt_from_hf

        return gpt_from_hf(model_or_state_dict, config)

    @classmethod
    def from_pretrained(cls, name_or_path: str = "gpt2", cache_dir=None) -> "GPT":
        """GPT-2 weights from the local Hugging Face cache or a local folder (never downloads); see minipt.hf."""
        from .hf import gpt_from_pretrained

        return gpt_from_pretrained(name_or_path, cache_dir=cache_dir)


def check_generation_length(T0: int, max_new_tokens: int, block_size: int, what: str) -> None:
    if T0 + max_new_tokens > block_size:
        raise ValueError(f"{what} {T0} + max_new_tokens {max_new_tokens} exceeds block_size {block_size}")


@torch.no_grad()
def generate_without_cache(logits_fn, idx, max_new_tokens: int, temperature: float = 1.0, top_k=None,
                           generator=None) -> torch.Tensor:
    """The reference decoder: run the whole sequence again for every new token (what the cache must equal).

    logits_fn(ids (B, T)) -> logits (B, T, V) is any forward pass (the model's, or a prompt-tuned one).
    """
    for _ in range(max_new_tokens):
        next_id = sample_next(logits_fn(idx)[:, -1], temperature, top_k, generator)  # (B, 1)
        idx = torch.cat([idx, next_id], dim=1)
    return idx


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, generator=None) -> torch.Tensor:
    """Pick the next token from logits (B, V): argmax when temperature == 0, else sample (top-k optional)."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)  # (B, 1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits.float(), dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
