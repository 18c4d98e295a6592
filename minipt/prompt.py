"""Soft prompt tuning: a frozen GPT and a small trainable matrix P put in front of the token embeddings.

    x = [e_p, e_1 .. e_n] + positions       P: (n_prompt, D), the only parameters that learn
    L(P) = cross-entropy of frozen_gpt(x) at the supervised input positions

Reference: Lester, Al-Rfou, Constant 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning"
(section 2 for the method, section 3.2 / 7 for the initialisations used here).

Positions run over the whole sequence, prompt included: the prompt takes positions 0 .. n_prompt-1 and the
input starts at position n_prompt. The prompt positions carry no loss, and the logits returned are those of
the input positions only, so `targets` has the shape of `idx`, exactly as for the base model.

Right padding: causal attention means a real token never attends to a position after it, so padding at the
end of a row cannot change the logits of the real tokens. `attention_mask` (1 = real, 0 = pad) is therefore
used only to make sure no loss is taken at padded positions; it must be right-padded (ones, then zeros).
"""
from __future__ import annotations

import json
import warnings
from collections.abc import Sequence

import torch
import torch.nn as nn

from .checkpoint import CheckpointError, load_tensors, model_fingerprint, save_tensors
from .frozen import freeze, frozen_lm_loss
from .model import GPT, lm_loss, mask_padding

# The fused kernel's dispatcher: Triton where it can run, the plain PyTorch reference elsewhere.
from minipt.kernels import prompt_concat

INIT_MODES = ("uniform", "vocab", "text", "label")


def init_prompt(model: GPT, n_prompt: int, init: str = "vocab", *, init_text: str | None = None,
                tokenizer=None, token_counts: torch.Tensor | None = None, top_k_tokens: int = 5000,
                special_ids=(), generator: torch.Generator | None = None,
                labels: Sequence[str] | None = None) -> torch.Tensor:
    """The initial prompt (n_prompt, D) in fp32, one of Lester et al.'s initialisations (section 2.2).

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
        if token_counts is not None:
            if token_counts.shape != (V,):
                raise ValueError(f"token_counts must have shape (vocab_size,) = ({V},), got {tuple(token_counts.shape)}")
            ranked = torch.argsort(token_counts.float(), descending=True, stable=True)
            candidates = ranked[: min(top_k_tokens, int((token_counts > 0).sum()))]
        else:
            excluded = set(int(i) for i in special_ids)
            candidates = torch.tensor([i for i in range(V) if i not in excluded])
        if len(candidates) < n_prompt:
            raise ValueError(f"only {len(candidates)} candidate tokens for init='vocab', need n_prompt={n_prompt}")
        pick = candidates[torch.randperm(len(candidates), generator=generator)[:n_prompt]]  # distinct ids
        return wte[pick].float().cpu().clone()  # (n_prompt, D)
    if init == "text":
        if not init_text or tokenizer is None:
            raise ValueError("init='text' needs init_text (a non-empty string) and tokenizer")
        ids = tokenizer.encode(init_text)
        if len(ids) != n_prompt:
            warnings.warn(f"init_text has {len(ids)} tokens, n_prompt is {n_prompt}: the tokens are "
                          f"{'cut' if len(ids) > n_prompt else 'repeated'} to fit", stacklevel=3)
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
            rows += list(init_prompt(model, n_prompt - len(rows), "vocab", token_counts=token_counts,
                                     top_k_tokens=top_k_tokens, special_ids=special_ids, generator=generator))
        return torch.stack(rows)  # (n_prompt, D)
    raise ValueError(f"init must be one of {INIT_MODES}, got {init!r}")


class PromptTuning(nn.Module):
    """A frozen GPT with a trainable soft prompt in front of its input.

    >>> pt = PromptTuning(model, n_prompt=20, init="vocab")
    >>> logits, loss = pt(idx, targets=targets)        # logits (B, n, V) for the input positions

    frozen_head (default True): in training mode, with targets, the loss goes through the fused frozen head
    (`minipt.frozen.frozen_lm_loss`): logits only at supervised positions, chunk by chunk, and only dL/dh
    (N, D) kept for backward instead of the (N, V) log-softmax. forward then returns logits=None, since
    making them would cost the memory the path saves (train() ignores them). In eval mode, without targets,
    or with a head that requires grad, forward is the plain one. Same loss and prompt gradient either way.
    """

    def __init__(self, model: GPT, n_prompt: int = 20, init: str = "vocab", *, init_text: str | None = None,
                 tokenizer=None, token_counts: torch.Tensor | None = None, seed: int = 0,
                 backend: str = "auto", frozen_head: bool = True, labels: Sequence[str] | None = None):
        super().__init__()
        if not isinstance(model, GPT):
            raise TypeError(f"model must be a minipt GPT, got {type(model).__name__}")
        if not 1 <= n_prompt < model.config.block_size:
            raise ValueError(f"n_prompt must be in [1, block_size={model.config.block_size}), got {n_prompt}")
        self.model = freeze(model)
        self.n_prompt = n_prompt
        self.init = init
        self.backend = backend
        self.frozen_head = frozen_head
        special_ids = getattr(tokenizer, "special_ids", ())
        generator = torch.Generator().manual_seed(seed)
        p = init_prompt(model, n_prompt, init, init_text=init_text, tokenizer=tokenizer,
                        token_counts=token_counts, special_ids=special_ids, generator=generator, labels=labels)
        device = model.transformer.wte.weight.device
        # The prompt is kept in fp32 whatever the model's dtype; prompt_concat casts it to the activation dtype.
        self.prompt = nn.Parameter(p.to(device=device, dtype=torch.float32))  # (n_prompt, D)

    # ---- forward ----------------------------------------------------------------------------------------

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """x = [P, wte[idx]] + wpe[0 : n_prompt + n]   (B, n_prompt + n, D)."""
        tr = self.model.transformer
        x = prompt_concat(self.prompt, tr.wte.weight, idx, wpe=tr.wpe.weight, backend=self.backend)
        return tr.drop(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None):
        """Logits (B, n, V) for the input positions, and the loss over targets != -100 (and mask != 0).

        Training with targets and frozen_head=True: (None, loss), through the fused frozen head.
        """
        self.model.check_idx(idx, n_extra=self.n_prompt)
        h = self.model.body(self.embed(idx))[:, self.n_prompt:]  # (B, n, D): the prompt positions carry no loss
        W = self.model.lm_head.weight  # (V, D), tied with wte
        if targets is not None and self.frozen_head and self.training and not W.requires_grad:
            return None, frozen_lm_loss(h, W, mask_padding(targets, attention_mask))
        logits = self.model.head(h)  # (B, n, V)
        if targets is None:
            return logits, None
        return logits, lm_loss(logits, mask_padding(targets, attention_mask), idx.shape)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 use_cache: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
        """Continue idx (B, n); the prompt enters the KV cache once, at prefill. Returns (B, n + new)."""
        self.model.check_idx(idx, n_extra=self.n_prompt)
        new = self.model.generate_from_embeddings(self.embed(idx), max_new_tokens, temperature, top_k,
                                                  use_cache=use_cache, prefix_idx=idx, generator=generator)
        return torch.cat([idx, new], dim=1)

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    # ---- files ------------------------------------------------------------------------------------------

    def save(self, path) -> None:
        """The prompt alone, with what is needed to check it is loaded onto the right base model."""
        meta = {
            "n_prompt": self.n_prompt,
            "n_embd": self.prompt.shape[1],
            "init": self.init,
            "base_fingerprint": model_fingerprint(self.model),
            "base_config": json.dumps(self.model.config.to_dict()),
        }
        save_tensors(path, {"prompt": self.prompt}, kind="prompt", metadata=meta)

    @classmethod
    def load(cls, model: GPT, path, backend: str = "auto") -> "PromptTuning":
        """Load a saved prompt onto `model`; fails clearly if the file was made for another base model."""
        tensors, meta = load_tensors(path, kind="prompt")
        prompt = tensors.get("prompt")
        if prompt is None or prompt.dim() != 2:
            raise CheckpointError(f"{path}: no (n_prompt, D) tensor named 'prompt' in the file")
        D = model.config.n_embd
        if prompt.shape[1] != D:
            raise CheckpointError(f"{path}: the prompt has width {prompt.shape[1]} but the model has n_embd={D}; "
                                  f"it was made for another model")
        expected = meta.get("base_fingerprint")
        found = model_fingerprint(model)
        if expected != found:
            raise CheckpointError(f"{path}: the prompt was made for another base model (fingerprint {expected}, "
                                  f"this model is {found}); load the base model it was tuned on")
        pt = cls(model, n_prompt=prompt.shape[0], init="uniform", backend=backend)
        pt.init = meta.get("init", "unknown")
        with torch.no_grad():
            pt.prompt.copy_(prompt.to(pt.prompt.device))
        return pt

    def save_peft(self, directory, base_model_name_or_path: str | None = None) -> None:
        """Write a PEFT prompt-tuning adapter folder (adapter_config.json, adapter_model.safetensors); see
        minipt.peft_io, which also explains the one difference between PEFT's loss and minipt's."""
        from .peft_io import save_peft

        save_peft(self, directory, base_model_name_or_path)

    @classmethod
    def from_peft(cls, model: GPT, directory, backend: str = "auto") -> "PromptTuning":
        """Load a PEFT prompt-tuning adapter folder onto `model`; the prompt can be trained further."""
        from .peft_io import load_peft

        return load_peft(model, directory, backend=backend)
