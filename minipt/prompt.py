"""Soft prompt tuning: a frozen GPT and a small trainable matrix P put in front of the token embeddings.

    x = [e_p, e_1 .. e_n] + positions       P: (n_prompt, D), the only parameters that learn
    L(P) = cross-entropy of frozen_gpt(x) at the supervised input positions

Reference: Lester, Al-Rfou, Constant 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning"
(section 2 for the method, section 2.1 for the initialisations, section 6 for a bank of prompts).

Positions run over the whole sequence, prompt included: the prompt takes positions 0 .. n_prompt-1 and the
input starts at position n_prompt. The prompt positions carry no loss, and the logits returned are those of
the input positions only, so `targets` has the shape of `idx`, exactly as for the base model.

Right padding: causal attention means a real token never attends to a position after it, so padding at the
end of a row cannot change the logits of the real tokens. `attention_mask` (1 = real, 0 = pad) is therefore
used only to make sure no loss is taken at padded positions; it must be right-padded (ones, then zeros).

A bank: `PromptTuning.from_tensor(model, P)` with P (K, n_p, D) holds K prompts for one frozen model, and every
call takes `prompt_index` (B,) saying which prompt each row uses, so one batch can mix tasks (section 6).

This is the one place that builds the prompt-tuned input: check -> prompt_concat -> body -> slice -> head.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.nn as nn

# The fused kernel's dispatcher: Triton where it can run, the plain PyTorch reference elsewhere.
from minipt.kernels import prompt_concat

from .checkpoint import CheckpointError, check_values, load_tensors
from .checks import check_batch
from .frozen import freeze
from .loss import frozen_lm_loss, lm_loss, mask_padding
from .model import GPT, check_generation_length, generate_without_cache
from .peft_io import adapter_config, read_peft, write_adapter
from .tuned import TunedModule, base_identity, check_base, save_tuned

__all__ = ["INIT_MODES", "PromptTuning", "init_prompt", "sample_vocab_ids"]

INIT_MODES = ("uniform", "vocab", "text", "label")
# minipt init -> PEFT's PromptTuningInit. PEFT's "TEXT" requires a tokenizer name to validate, which minipt
# does not know, so a text-initialised prompt is recorded as "RANDOM" (the init does not matter once trained).
_PEFT_INIT = {"uniform": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "RANDOM"}
_MINIPT_INIT = {"RANDOM": "uniform", "SAMPLE_VOCAB": "vocab", "TEXT": "text"}


def init_prompt(
    model: GPT,
    n_prompt: int,
    init: str = "vocab",
    *,
    init_text: str | None = None,
    tokenizer=None,
    token_counts: torch.Tensor | None = None,
    top_k_tokens: int = 5000,
    special_ids=(),
    generator: torch.Generator | None = None,
    labels: Sequence[str] | None = None,
) -> torch.Tensor:
    """The initial prompt (n_prompt, D) in fp32, one of Lester et al.'s initialisations (section 2.1).

    uniform  P ~ U(-0.5, 0.5), as in the paper's random init.
    vocab    embeddings of n_prompt distinct tokens sampled from the `top_k_tokens` most frequent ones of a
             corpus (`token_counts`, shape (V,)), else from the whole vocabulary minus `special_ids`.
    text     embeddings of the tokens of `init_text` (a task description or the class labels); cut or
             repeated, with a warning, when its length is not n_prompt.
    label    class-label init: one vector per class, the mean embedding of the label's tokens (a label of
             several tokens is averaged, as in the paper), in the first slots; the remaining slots are
             filled as with "vocab". With fewer slots than classes, the first n_prompt labels are used.
    """
    wte = model.transformer.wte.weight.detach()  # (V, D)
    V, D = wte.shape
    if init == "uniform":
        return torch.rand(n_prompt, D, generator=generator) - 0.5  # U(-0.5, 0.5)
    if init == "vocab":
        pick = sample_vocab_ids(V, n_prompt, generator, special_ids, token_counts, top_k_tokens)
        return wte[pick].float().cpu().clone()  # (n_prompt, D)
    if init == "text":
        if not init_text or tokenizer is None:
            raise ValueError("init='text' needs init_text (a non-empty string) and tokenizer")
        ids = tokenizer.encode(init_text)
        if len(ids) != n_prompt:
            warnings.warn(
                f"init_text has {len(ids)} tokens, n_prompt is {n_prompt}: the tokens are "
                f"{'cut' if len(ids) > n_prompt else 'repeated'} to fit",
                stacklevel=3,
            )
            ids = (ids * (n_prompt // len(ids) + 1))[:n_prompt]
        if max(ids) >= V:
            raise ValueError(f"init_text encodes to token id {max(ids)}, outside the model's vocabulary ({V})")
        return wte[torch.tensor(ids, device=wte.device)].float().cpu().clone()  # (n_prompt, D)
    if init == "label":
        if not labels or tokenizer is None:
            raise ValueError("init='label' needs labels (the class names, e.g. ('even', 'odd')) and tokenizer")
        label_ids = [tokenizer.encode(label) for label in labels]
        if any(len(ids) == 0 for ids in label_ids):
            raise ValueError(f"labels must be non-empty strings, got {list(labels)!r}")
        if max(max(ids) for ids in label_ids) >= V:
            raise ValueError(f"labels encode to token ids outside the model's vocabulary ({V})")
        rows = [wte[torch.tensor(ids, device=wte.device)].float().mean(dim=0).cpu() for ids in label_ids]  # (D,) each
        rows = rows[:n_prompt]
        if len(rows) < n_prompt:
            rows += list(
                init_prompt(
                    model,
                    n_prompt - len(rows),
                    "vocab",
                    token_counts=token_counts,
                    top_k_tokens=top_k_tokens,
                    special_ids=special_ids,
                    generator=generator,
                )
            )
        return torch.stack(rows)  # (n_prompt, D)
    raise ValueError(f"init must be one of {INIT_MODES}, got {init!r}")


def sample_vocab_ids(
    V: int,
    n: int,
    generator=None,
    special_ids=(),
    token_counts: torch.Tensor | None = None,
    top_k_tokens: int = 5000,
    what: str = "n_prompt",
) -> torch.Tensor:
    """n distinct token ids for init="vocab": from the top_k_tokens most frequent ones of a corpus (token_counts,
    shape (V,)), else from the whole vocabulary minus special_ids. `what` names n in the error message."""
    if token_counts is not None:
        if token_counts.shape != (V,):
            raise ValueError(f"token_counts must have shape (vocab_size,) = ({V},), got {tuple(token_counts.shape)}")
        ranked = torch.argsort(token_counts.float(), descending=True, stable=True)
        candidates = ranked[: min(top_k_tokens, int((token_counts > 0).sum()))]
    else:
        excluded = set(int(i) for i in special_ids)
        candidates = torch.tensor([i for i in range(V) if i not in excluded])
    if len(candidates) < n:
        raise ValueError(f"only {len(candidates)} candidate tokens for init='vocab', need {what}={n}")
    return candidates[torch.randperm(len(candidates), generator=generator)[:n]]  # distinct ids


class PromptTuning(TunedModule):
    """A frozen GPT with a trainable soft prompt (or a bank of them) in front of its input.

    >>> pt = PromptTuning(model, n_prompt=20, init="vocab")
    >>> logits, loss = pt(idx, targets=targets)        # logits (B, n, V) for the input positions
    >>> loss = pt.loss(idx, targets, attention_mask)   # what training calls: the fused frozen head

    Why `loss` apart from `forward`: training needs only the loss, and the fused frozen head
    (`minipt.loss.frozen_lm_loss`) computes it without ever making the (B, n, V) logits: logits only at
    supervised positions, chunk by chunk, and only dL/dh (N, D) kept for backward. forward always returns the
    logits. Same loss and prompt gradient either way; `frozen_head=False` (or a head that requires grad) makes
    `loss` take the plain path. `recompute=True` recomputes each frozen block in backward instead of keeping
    its activations (minipt.model.GPT.body).
    """

    kind, peft_type = "prompt", "PROMPT_TUNING"  # its files and PEFT folders (minipt.tuned)
    methods = {"prompt": None, "ptuning": "mlp"}  # the training methods that make one, and their reparam

    def __init__(
        self,
        model: GPT,
        n_prompt: int = 20,
        init: str = "vocab",
        *,
        init_text: str | None = None,
        tokenizer=None,
        token_counts: torch.Tensor | None = None,
        seed: int = 0,
        backend: str = "auto",
        frozen_head: bool = True,
        labels: Sequence[str] | None = None,
        recompute: bool = False,
        prompt: torch.Tensor | None = None,
        reparam: str | None = None,
        hidden: int | None = None,
        concat=None,
    ):
        super().__init__()
        if not isinstance(model, GPT):
            raise TypeError(f"model must be a minipt GPT, got {type(model).__name__}")
        if prompt is not None:  # from_tensor: start from a given prompt or bank
            n_prompt = prompt.shape[-2]
        if not isinstance(n_prompt, int) or not 1 <= n_prompt < model.config.block_size:
            raise ValueError(
                f"n_prompt must be in [1, block_size={model.config.block_size}), an integer; got {n_prompt!r}"
            )
        if reparam not in (None, "mlp"):
            raise ValueError(f"reparam must be None (prompt tuning) or 'mlp' (P-tuning), got {reparam!r}")
        if hidden is not None and (not isinstance(hidden, int) or hidden < 1):
            raise ValueError(f"hidden must be a positive integer, got {hidden!r}")
        if concat is not None and (not callable(concat) or (prompt is not None and prompt.dim() == 3)):
            raise ValueError(
                "concat must be a function concat(prompt (n_p, D), wte, idx, wpe) -> x (B, n_p + n, D), "
                "for one prompt (not a bank)"
            )
        self.model = freeze(model)
        self.n_prompt = n_prompt
        self.init = init
        self.backend = backend
        self.frozen_head = frozen_head
        self.recompute = recompute
        # concat: your own x = [P, wte[idx]] + wpe (equation 1) in place of prompt_concat, e.g. the exercises'
        # capstone; it must be differentiable in P (an autograd.Function with your own backward will do).
        self.concat = concat
        if prompt is None:
            generator = torch.Generator().manual_seed(seed)
            prompt = init_prompt(
                model,
                n_prompt,
                init,
                init_text=init_text,
                tokenizer=tokenizer,
                token_counts=token_counts,
                special_ids=getattr(tokenizer, "special_ids", ()),
                generator=generator,
                labels=labels,
            )
        device = model.transformer.wte.weight.device
        # The prompt is kept in fp32 whatever the model's dtype; prompt_concat casts it to the activation dtype.
        self.prompt = nn.Parameter(
            prompt.detach().to(device=device, dtype=torch.float32).clone()
        )  # (n_p, D) or (K, n_p, D)
        self.reparam = reparam
        if reparam == "mlp":
            # P-tuning (Liu et al. 2021, "GPT Understands, Too"): the prompt the model sees is an MLP of a trained
            # table, D -> hidden -> hidden -> D with ReLU, PEFT's PromptEncoder (MLP). `prompt` is then the table,
            # `prompt_embeddings()` what the model reads; `save` writes the latter, a plain soft prompt.
            D, H = prompt.shape[-1], hidden or prompt.shape[-1]
            with torch.random.fork_rng(devices=[]):  # the MLP's initial weights from `seed`, the global RNG untouched
                torch.manual_seed(seed)
                self.encoder = nn.Sequential(
                    nn.Linear(D, H), nn.ReLU(), nn.Linear(H, H), nn.ReLU(), nn.Linear(H, D)
                ).to(device)

    @classmethod
    def from_tensor(cls, model: GPT, prompt: torch.Tensor, init: str = "unknown", **kwargs) -> PromptTuning:
        """A PromptTuning that starts from `prompt`: one (n_p, D) prompt or a bank (K, n_p, D) of K prompts."""
        D = model.config.n_embd
        if (
            not isinstance(prompt, torch.Tensor)
            or prompt.dim() not in (2, 3)
            or prompt.shape[-1] != D
            or 0 in prompt.shape
        ):
            got = tuple(prompt.shape) if isinstance(prompt, torch.Tensor) else type(prompt).__name__
            raise ValueError(
                f"prompt must have shape (n_prompt, n_embd={D}) or a bank (K, n_prompt, n_embd={D}), got {got}"
            )
        return cls(model, init=init, prompt=prompt, **kwargs)

    def prompt_embeddings(self) -> torch.Tensor:
        """What the model reads at the prompt positions: the prompt, or with reparam="mlp" the encoder's output."""
        return self.prompt if self.reparam is None else self.encoder(self.prompt)

    @property
    def bank_size(self) -> int | None:
        """K for a bank of prompts, None for one prompt."""
        return self.prompt.shape[0] if self.prompt.dim() == 3 else None

    # ---- forward ----------------------------------------------------------------------------------------

    def check(self, idx, targets=None, attention_mask=None, prompt_index=None, name: str = "idx") -> int | None:
        """Every check of the inputs, once (minipt.checks); returns the number of supervised positions."""
        c = self.model.config
        n_supervised = check_batch(
            idx,
            targets,
            attention_mask,
            vocab_size=c.vocab_size,
            block_size=c.block_size,
            n_prefix=self.n_prompt,
            name=name,
        )
        K = self.bank_size
        if K is None and prompt_index is not None:
            raise ValueError("prompt_index is given but this PromptTuning holds one prompt, not a bank")
        if K is not None:
            if (
                not isinstance(prompt_index, torch.Tensor)
                or prompt_index.shape != idx.shape[:1]
                or prompt_index.dtype.is_floating_point
            ):
                raise ValueError(
                    f"this PromptTuning holds a bank of {K} prompts: prompt_index must be an integer "
                    f"tensor of shape (B,) = ({idx.shape[0]},) saying which prompt each row uses"
                )
            lo, hi = torch.stack(torch.aminmax(prompt_index)).tolist()  # one more host read, for banks only
            if lo < 0 or hi >= K:
                raise ValueError(f"prompt_index holds {lo if lo < 0 else hi}, outside [0, K={K})")
        return n_supervised

    def embed(self, idx: torch.Tensor, prompt_index: torch.Tensor | None = None) -> torch.Tensor:
        """x = [P, wte[idx]] + wpe[0 : n_prompt + n]   (B, n_prompt + n, D); P = bank[prompt_index[b]] for a bank.

        Inputs unchecked: call `check` first (forward, loss and generate do)."""
        tr = self.model.transformer
        if self.concat is not None:
            return tr.drop(self.concat(self.prompt_embeddings(), tr.wte.weight, idx, tr.wpe.weight))
        # check_ids=False: the public methods have checked the ids once already (`check`)
        x = prompt_concat(
            self.prompt_embeddings(),
            tr.wte.weight,
            idx,
            wpe=tr.wpe.weight,
            prompt_index=prompt_index,
            backend=self.backend,
            check_ids=False,
        )
        return tr.drop(x)

    def hidden(self, idx: torch.Tensor, prompt_index: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states after ln_f at every position, prompt included: (B, n_prompt + n, D). Inputs unchecked."""
        return self.model.body(self.embed(idx, prompt_index), recompute=self.recompute)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        prompt_index: torch.Tensor | None = None,
    ):
        """Logits (B, n, V) for the input positions, and the loss over targets != -100 (and mask != 0)."""
        self.check(idx, targets, attention_mask, prompt_index)
        logits = self.model.head(self.hidden(idx, prompt_index)[:, self.n_prompt :])  # (B, n, V): no prompt slot
        if targets is None:
            return logits, None
        return logits, lm_loss(logits, mask_padding(targets, attention_mask))

    def loss(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        prompt_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The training loss, through the fused frozen head when the head is frozen (see the class docstring)."""
        W = self.model.lm_head.weight  # (V, D), tied with wte
        if not self.frozen_head or W.requires_grad:
            return self(idx, targets, attention_mask, prompt_index)[1]
        n_supervised = self.check(idx, targets, attention_mask, prompt_index)
        h = self.hidden(idx, prompt_index)[:, self.n_prompt :]  # (B, n, D): the prompt positions carry no loss
        return frozen_lm_loss(h, W, mask_padding(targets, attention_mask), n_supervised)

    @torch.no_grad()
    def generate(
        self,
        idx,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
        prompt_index: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        eos_id: int | None = None,
    ) -> torch.Tensor:
        """Continue idx (B, n); the prompt enters the KV cache once, at prefill. Returns (B, n + new).

        attention_mask (B, n), right-padded: row b continues after its own last token; its new tokens are
        out[b, n:]. eos_id: a row stops at its first eos (kept), the rest of its row is eos_id.
        use_cache=False runs the whole prompted sequence again for every token: the reference the cache equals.
        """
        self.check(idx, attention_mask=attention_mask, prompt_index=prompt_index)
        check_generation_length(
            self.n_prompt + idx.shape[1],
            max_new_tokens,
            self.model.config.block_size,
            "n_prompt + idx length",
            temperature,
            top_k,
        )
        if not use_cache:  # each row with its own prompt of the bank

            def logits_fn(ids, rows):
                return self(ids, prompt_index=None if prompt_index is None else prompt_index[rows])[0]

            return generate_without_cache(
                logits_fn, idx, max_new_tokens, temperature, top_k, generator, attention_mask, eos_id
            )
        n_valid = None if attention_mask is None else self.n_prompt + attention_mask.sum(1)  # (B,) real positions
        new = self.model.generate_from_embeddings(
            self.embed(idx, prompt_index), max_new_tokens, temperature, top_k, generator, n_valid=n_valid, eos_id=eos_id
        )
        return torch.cat([idx, new], dim=1)

    # ---- files ------------------------------------------------------------------------------------------

    def save(self, path, extra_metadata: dict | None = None) -> None:
        """The prompt alone, with what is needed to check it is loaded onto the right base model."""
        save_tuned(
            self,
            path,
            {"prompt": self.prompt_embeddings().detach()},
            extra_metadata,
            n_prompt=self.n_prompt,
            n_embd=self.prompt.shape[-1],
            init=self.init,
        )

    @classmethod
    def load(cls, model: GPT, path, backend: str = "auto") -> PromptTuning:
        """Load a saved prompt (or bank) onto `model`; fails clearly if the file was made for another base model."""
        tensors, meta = load_tensors(path, kind=cls.kind)
        prompt = tensors.get("prompt")
        if prompt is None or prompt.dim() not in (2, 3):
            raise CheckpointError(f"{path}: no (n_prompt, D) tensor named 'prompt' in the file")
        D = model.config.n_embd
        if prompt.shape[-1] != D:
            raise CheckpointError(
                f"{path}: the prompt has width {prompt.shape[-1]} but the model has n_embd={D}; "
                f"it was made for another model"
            )
        check_values(tensors, path)
        check_base(meta, model, f"{path}: the prompt")
        return cls.from_tensor(model, prompt, init=meta.get("init", "unknown"), backend=backend)

    # ---- PEFT adapter folders (minipt.peft_io) ------------------------------------------------------------

    def peft_config(self, base_model_name_or_path: str | None = None) -> dict:
        """The adapter_config.json of this prompt: PEFT's PromptTuningConfig."""
        return adapter_config(
            self.model,
            self.peft_type,
            self.n_prompt,
            base_model_name_or_path,
            prompt_tuning_init=_PEFT_INIT.get(self.init, "RANDOM"),
            prompt_tuning_init_text=None,
            tokenizer_kwargs=None,
            tokenizer_name_or_path=None,
        )

    def save_peft(
        self, directory, base_model_name_or_path: str | None = None, extra_metadata: dict | None = None
    ) -> None:
        """Write a PEFT prompt-tuning adapter folder (adapter_config.json, adapter_model.safetensors); see
        minipt.peft_io, which also explains the one difference between PEFT's loss and minipt's."""
        write_adapter(
            directory,
            self.prompt_embeddings(),
            self.peft_config(base_model_name_or_path),
            {**base_identity(self.model), **(extra_metadata or {})},
        )

    @classmethod
    def from_peft(cls, model: GPT, directory, backend: str = "auto") -> PromptTuning:
        """Load a PEFT prompt-tuning adapter folder onto `model`; the prompt can be trained further."""
        prompt, config = read_peft(directory, cls.peft_type)
        D = model.config.n_embd
        if prompt.shape[1] != D:
            raise CheckpointError(
                f"{directory}: the prompt has token_dim {prompt.shape[1]} but the model has "
                f"n_embd={D}; it was made for another model"
            )
        if "base_fingerprint" in config["minipt"]:  # a folder minipt wrote knows its base model; PEFT's do not
            check_base(config["minipt"], model, f"{directory}: the prompt")
        # kept fp32 and requiring grad: it can be trained further
        return cls.from_tensor(
            model, prompt, init=_MINIPT_INIT.get(str(config.get("prompt_tuning_init")), "unknown"), backend=backend
        )
