"""Deep prompts: a trainable key/value prefix at every layer of a frozen GPT (P-tuning v2, prefix tuning).

A soft prompt P (minipt.prompt) enters at the input only; at layer l the frozen model turns it into the keys and
values that every input position reads (minipt.serve, eq. 1). A deep prompt trains those keys and values
directly, at every layer:

    K_l = [Kp_l ; x_l W_k],   V_l = [Vp_l ; x_l W_v]      Kp_l, Vp_l: (n_head, n_prefix, head_dim), trained   (1)

so each attention of the frozen model sees n_prefix extra positions in front of the input (they live where
the KV cache lives: `minipt.model.KVCache`, filled before the input runs). The input tokens sit at positions
n_prefix .. n_prefix + n - 1, exactly as after a soft prompt of that length; no loss is taken at the prefix.
Trainable numbers: n_layer * 2 * n_prefix * D, against n_prefix * D for a soft prompt.

    reparam=None    P-tuning v2 (Liu et al. 2022): the prefix itself is the parameter
    reparam="mlp"   prefix tuning (Li & Liang 2021, section 4.3): a table (n_prefix, D) through an MLP,
                    D -> hidden -> n_layer * 2 * D with tanh, during training only; `save` writes the
                    materialised prefix, so a file never depends on the MLP

Conventions, those of PEFT's PREFIX_TUNING adapters for a causal LM (so a prefix moves between the two):

    prompt_embeddings (n_prefix, n_layer * 2 * D): row j is position j; viewed as (n_prefix, 2 * n_layer,
        n_head, head_dim), entry 2l is layer l's key and 2l + 1 its value
    attention mask: ones over the prefix, then the input's own mask
    positions: the input's token i is at position n_prefix + i (transformers counts the cached prefix)
    loss: labels have the input's length; nothing is scored at the prefix

References: Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation"; Liu et al. 2022,
"P-Tuning: Prompt Tuning Can Be Comparable to Fine-tuning Across Scales and Tasks" (v2); Lester et al. 2021,
section 4 (prompt tuning against prefix tuning).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .checkpoint import CheckpointError, check_values, load_tensors
from .checks import check_batch
from .frozen import freeze
from .loss import frozen_lm_loss, lm_loss, mask_padding
from .model import GPT, KVCache, check_generation_length, decode, generate_without_cache
from .peft_io import adapter_config, read_peft, write_adapter
from .prompt import sample_vocab_ids
from .tuned import TunedModule, base_identity, check_base, save_tuned

__all__ = ["PREFIX_INITS", "PrefixTuning", "from_peft_layout", "to_peft_layout"]

REPARAMS = (None, "mlp")
PREFIX_INITS = ("vocab", "normal")


class PrefixTuning(TunedModule):
    """A frozen GPT with trainable keys and values of n_prefix positions at every layer (eq. 1).

    >>> pf = PrefixTuning(model, n_prefix=10)                 # P-tuning v2; reparam="mlp" for Li & Liang
    >>> logits, loss = pf(idx, targets=targets)             # logits (B, n, V) for the input positions
    >>> loss = pf.loss(idx, targets, attention_mask)        # what training calls: the fused frozen head

    init="vocab" (default) starts from the keys and values the frozen model itself makes for n_prefix
    sampled vocabulary tokens (Li & Liang's init from real words); "normal" from N(0, 1) (PEFT's default).
    """

    kind, peft_type = "prefix", "PREFIX_TUNING"  # its files and PEFT folders (minipt.tuned)
    methods = {"ptuning-v2": None, "prefix": "mlp"}  # the training methods that make one, and their reparam

    def __init__(
        self,
        model: GPT,
        n_prefix: int = 10,
        reparam: str | None = None,
        hidden: int | None = None,
        init: str = "vocab",
        seed: int = 0,
        special_ids=(),
        prefix: torch.Tensor | None = None,
    ):
        super().__init__()
        if not isinstance(model, GPT):
            raise TypeError(f"model must be a minipt GPT, got {type(model).__name__}")
        if reparam not in REPARAMS:
            raise ValueError(f"reparam must be None (P-tuning v2) or 'mlp' (prefix tuning), got {reparam!r}")
        if init not in PREFIX_INITS:
            raise ValueError(f"init must be one of {PREFIX_INITS}, got {init!r}")
        c = model.config
        if prefix is not None:
            n_prefix = prefix.shape[0]
        if not isinstance(n_prefix, int) or not 1 <= n_prefix < c.block_size:
            raise ValueError(f"n_prefix must be an integer in [1, block_size={c.block_size}), got {n_prefix}")
        if hidden is not None and (not isinstance(hidden, int) or hidden < 1):
            raise ValueError(f"hidden must be a positive integer, got {hidden!r}")
        self.model = freeze(model)
        self.n_prefix, self.reparam, self.init = n_prefix, reparam, init
        width = c.n_layer * 2 * c.n_embd  # one row of PEFT's prompt_embeddings
        wte = model.transformer.wte.weight
        generator = torch.Generator().manual_seed(seed)
        if prefix is not None:  # from_tensor / load: a materialised prefix
            if prefix.shape != (n_prefix, width):
                raise ValueError(
                    f"prefix must have shape (n_prefix, n_layer * 2 * n_embd) = ({n_prefix}, {width}), "
                    f"got {tuple(prefix.shape)}"
                )
            start = prefix.detach().float()
        elif init == "normal":
            start = torch.randn(n_prefix, width, generator=generator)
        else:
            self.init_ids = self._sample_ids(n_prefix, special_ids, generator)  # (n_prefix,)
            # with reparam="mlp" the MLP makes the prefix: only the prefix itself starts from these tokens' keys
            start = self._kv_of_tokens(self.init_ids) if reparam is None else None  # (n_prefix, width)
        device = wte.device
        if reparam is None:
            self.prefix = nn.Parameter(start.to(device=device, dtype=torch.float32).clone())  # (n_prefix, width)
        else:
            hidden = hidden or c.n_embd
            # The MLP's input table starts from token embeddings; the MLP is trained with it and then dropped.
            ids = self._sample_ids(n_prefix, special_ids, generator)
            self.table = nn.Parameter(wte.detach()[ids].float().clone())  # (n_prefix, D)
            with torch.random.fork_rng(devices=[]):  # the MLP's initial weights from `seed`, the global RNG untouched
                torch.manual_seed(seed)
                self.mlp = nn.Sequential(nn.Linear(c.n_embd, hidden), nn.Tanh(), nn.Linear(hidden, width)).to(device)

    @classmethod
    def from_tensor(cls, model: GPT, prefix: torch.Tensor, **kwargs) -> PrefixTuning:
        """A P-tuning v2 module whose prefix starts as `prefix` (n_prefix, n_layer * 2 * n_embd), PEFT's layout."""
        if not isinstance(prefix, torch.Tensor) or prefix.dim() != 2:
            raise ValueError(
                f"prefix must be a 2-D tensor (n_prefix, n_layer * 2 * n_embd), got "
                f"{tuple(prefix.shape) if isinstance(prefix, torch.Tensor) else type(prefix).__name__}"
            )
        return cls(model, prefix=prefix, **kwargs)

    def _sample_ids(self, n: int, special_ids, generator) -> torch.Tensor:
        """n distinct non-special token ids (the starting words of init="vocab"), on the model's device."""
        wte = self.model.transformer.wte.weight
        return sample_vocab_ids(wte.shape[0], n, generator, special_ids, what="n_prefix").to(wte.device)

    def _kv_of_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """The keys and values the frozen model makes for tokens ids (n,) at positions 0..n-1, in PEFT's layout."""
        cache = KVCache.for_model(self.model, 1, len(ids))
        training = self.model.training
        self.model.eval()  # the model's own keys and values: no dropout, nothing drawn from the global RNG
        try:
            with torch.no_grad():
                self.model.body(self.model.embed(ids[None]), cache)  # (1, n, D); fills the cache
        finally:
            self.model.train(training)
        return to_peft_layout(*cache.row(0)).float()

    # ---- the prefix ---------------------------------------------------------------------------------------

    def prefix_embeddings(self) -> torch.Tensor:
        """The materialised prefix (n_prefix, n_layer * 2 * D): the parameter, or the MLP's output."""
        return self.prefix if self.reparam is None else self.mlp(self.table)

    def prefix_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the prefix, each (n_layer, n_head, n_prefix, head_dim), in the model's dtype."""
        return from_peft_layout(self.prefix_embeddings(), self.model.config)

    def _cache(self, B: int, n: int, dtype) -> KVCache:
        """A KVCache for B rows of up to n more positions, every row starting from the prefix (eq. 1)."""
        k, v = self.prefix_kv()
        cache = KVCache.for_model(self.model, B, self.n_prefix + n, dtype=dtype)
        cache.set_prefix(slice(None), k.to(dtype), v.to(dtype))  # every row
        return cache

    # ---- forward ------------------------------------------------------------------------------------------

    def check(self, idx, targets=None, attention_mask=None) -> int | None:
        c = self.model.config
        return check_batch(
            idx,
            targets,
            attention_mask,
            vocab_size=c.vocab_size,
            block_size=c.block_size,
            n_prefix=self.n_prefix,
            prefix_name="n_prefix",
        )

    def hidden(self, idx: torch.Tensor) -> torch.Tensor:
        """Hidden states after ln_f of the input positions (B, n, D), after the prefix. Inputs unchecked."""
        model = self.model
        x = model.embed(idx, start_pos=self.n_prefix)  # (B, n, D): positions n_prefix .. n_prefix + n - 1
        return model.body(x, self._cache(idx.shape[0], idx.shape[1], x.dtype))

    def forward(self, idx, targets=None, attention_mask=None):
        """Logits (B, n, V) for the input positions, and the loss over targets != -100 (and mask != 0)."""
        self.check(idx, targets, attention_mask)
        logits = self.model.head(self.hidden(idx))  # (B, n, V)
        if targets is None:
            return logits, None
        return logits, lm_loss(logits, mask_padding(targets, attention_mask))

    def loss(self, idx, targets, attention_mask=None) -> torch.Tensor:
        """The training loss through the fused frozen head (minipt.loss.frozen_lm_loss)."""
        n_supervised = self.check(idx, targets, attention_mask)
        return frozen_lm_loss(
            self.hidden(idx), self.model.lm_head.weight, mask_padding(targets, attention_mask), n_supervised
        )

    @torch.no_grad()
    def generate(
        self,
        idx,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        use_cache: bool = True,
        generator=None,
        attention_mask=None,
        eos_id: int | None = None,
    ):
        """Continue idx (B, n) after the prefix; returns (B, n + new). use_cache=False is the reference."""
        self.check(idx, attention_mask=attention_mask)
        check_generation_length(
            self.n_prefix + idx.shape[1],
            max_new_tokens,
            self.model.config.block_size,
            "n_prefix + idx length",
            temperature,
            top_k,
        )
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
        B, n = idx.shape
        x = self.model.embed(idx, start_pos=self.n_prefix)  # (B, n, D)
        n_valid = torch.full((B,), n, device=idx.device) if attention_mask is None else attention_mask.sum(1)
        cache = self._cache(B, n + max_new_tokens, x.dtype)
        new = decode(self.model, x, cache, n_valid, max_new_tokens, temperature, top_k, generator, eos_id)
        return torch.cat([idx, new], dim=1)

    # ---- files --------------------------------------------------------------------------------------------

    def save(self, path, extra_metadata: dict | None = None) -> None:
        """The materialised prefix alone (never the MLP), with the base model's identity (minipt.tuned)."""
        save_tuned(
            self,
            path,
            {"prefix": self.prefix_embeddings().detach().float()},
            extra_metadata,
            n_prefix=self.n_prefix,
            reparam=str(self.reparam),
            init=self.init,
        )

    @classmethod
    def load(cls, model: GPT, path) -> PrefixTuning:
        """A saved prefix on `model` (as P-tuning v2: the prefix trains further); refuses another base model."""
        tensors, meta = load_tensors(path, kind=cls.kind)
        prefix = tensors.get("prefix")
        width = model.config.n_layer * 2 * model.config.n_embd
        if prefix is None or prefix.dim() != 2 or prefix.shape[1] != width:
            got = tuple(prefix.shape) if prefix is not None else "nothing"
            raise CheckpointError(
                f"{path}: expected a prefix (n_prefix, n_layer * 2 * n_embd = {width}), got {got}; "
                f"it was made for another model"
            )
        check_values(tensors, path)
        check_base(meta, model, f"{path}: the prefix")
        return cls.from_tensor(model, prefix, init=meta.get("init", "vocab"))

    # ---- PEFT adapter folders (minipt.peft_io) ------------------------------------------------------------

    def peft_config(self, base_model_name_or_path: str | None = None) -> dict:
        """The adapter_config.json of this prefix: PEFT's PrefixTuningConfig, the prefix saved materialised."""
        return adapter_config(
            self.model,
            self.peft_type,
            self.n_prefix,
            base_model_name_or_path,
            encoder_hidden_size=None,
            init_weights=None,
            prefix_projection=False,
        )  # the MLP of reparam="mlp" is never saved: the prefix is

    def save_peft(
        self, directory, base_model_name_or_path: str | None = None, extra_metadata: dict | None = None
    ) -> None:
        """A PEFT PREFIX_TUNING adapter folder (see minipt.peft_io)."""
        write_adapter(
            directory,
            self.prefix_embeddings(),
            self.peft_config(base_model_name_or_path),
            {**base_identity(self.model), **(extra_metadata or {})},
        )

    @classmethod
    def from_peft(cls, model: GPT, directory) -> PrefixTuning:
        """A trainable PrefixTuning (P-tuning v2) on `model` from a PEFT PREFIX_TUNING adapter folder."""
        prefix, config = read_peft(directory, cls.peft_type)
        c = model.config
        shape = (config.get("num_layers"), config.get("num_attention_heads"), config.get("token_dim"))
        if shape != (c.n_layer, c.n_head, c.n_embd):
            raise CheckpointError(
                f"{directory}: the adapter is for (num_layers, num_attention_heads, token_dim) = "
                f"{shape}, the model has ({c.n_layer}, {c.n_head}, {c.n_embd}); made for another "
                f"model"
            )
        if "base_fingerprint" in config["minipt"]:  # a folder minipt wrote knows its base model; PEFT's do not
            check_base(config["minipt"], model, f"{directory}: the prefix")
        return cls.from_tensor(model, prefix)


def to_peft_layout(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Keys and values (n_layer, n_head, n, head_dim) each -> PEFT's prompt_embeddings (n, n_layer * 2 * D)."""
    L, H, n, hd = k.shape
    kv = torch.stack([k, v], dim=1).reshape(2 * L, H, n, hd)  # entry 2l: layer l's key, 2l + 1: its value
    return kv.permute(2, 0, 1, 3).reshape(n, 2 * L * H * hd)  # (n, 2L, H, hd) flattened


def from_peft_layout(prefix: torch.Tensor, config) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's prompt_embeddings (n, n_layer * 2 * D) -> keys and values, each (n_layer, n_head, n, head_dim)."""
    n = prefix.shape[0]
    H = config.n_head
    kv = prefix.view(n, 2 * config.n_layer, H, config.n_embd // H).permute(1, 2, 0, 3)  # (2L, H, n, hd)
    return kv[0::2], kv[1::2]
