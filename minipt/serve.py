"""Serving many soft prompts from one frozen model, in one batch, with the prompt-prefix KV cache.

Lester et al. 2021 (section 1, Figure 2): a tuned prompt is a few thousand numbers, so one frozen model can
serve many tasks at once, and requests of different tasks can share a batch, each row with its own prompt.

    bank = PromptBank(model, {"parity": "parity.safetensors", "reverse": pt})
    answers = bank.generate([("parity", ids_a), ("reverse", ids_b)], max_new_tokens=8)   # list[list[int]]

The prompt-prefix KV cache. The prompt comes first and attention is causal, so at every layer the keys and
values of the prompt positions depend on the prompt alone, never on the input:

    K_l[0:P], V_l[0:P] = f_l(P + wpe[0:P])       for every layer l                                   (1)

For a trained prompt they are constants. `prefix_kv(name)` computes them once per prompt (one forward of
the P prompt positions); each request then runs only its own L tokens, at positions P..P+L-1, attending to
the cached prefix. A 100-vector prompt with a 20-token input: 100 of the 120 prefill positions are never
run again. (It also shows a soft prompt is a special case of a prefix: the prefix the frozen model makes
from P, prefix tuning is section 4 of the paper; minipt.prefix.)

Rows in one batch (see minipt.model.KVCache): row b with prompt length P_b and L_b tokens holds its prompt at
positions 0..P_b-1 and its tokens at P_b..P_b+L_b-1, exactly as `PromptTuning` does for one row; its keys
live in [0, len_b) of a preallocated (B, n_head, T_max, head_dim) buffer per layer, right padding is masked
out and overwritten, and each decoded token is written at the row's own position. So each request gets the
tokens `PromptTuning.generate` gives it alone. `prefix_cache=False` runs the prompt positions at prefill
instead (the same tokens, more work).

The embeddings go through `minipt.kernels.prompt_concat` with a bank and `prompt_index`: prompts of one
length form one `PromptTuning` bank (K, P, D); with the prefix cache the prompt rows of its output are dropped
(the wte + wpe rows of the tokens are what the prefill needs).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

import torch

from .checkpoint import CheckpointError, check_values, model_fingerprint
from .model import GPT, KVCache, check_sampling, decode
from .prompt import PromptTuning
from .tuned import base_identity, check_base

__all__ = ["PromptBank", "RequestError", "check_max_batch", "encode_requests", "generate_text", "read_requests"]


class RequestError(ValueError):
    """A request that cannot be served; the message names the request (its 0-based number, also `.index`)."""

    def __init__(self, index: int, message: str):
        super().__init__(f"request {index}: {message}")
        self.index, self.reason = index, message


def read_requests(source, known_tasks=None) -> list[tuple[str, str]]:
    """(task, input) pairs from a .jsonl file or text stream, one {"task": NAME, "input": TEXT} a line.

    Strict, like minipt.userdata: a bad line, a missing or non-string field, an unknown key or (with
    known_tasks) an unknown task name is a DataError naming the line, raised before any work.
    """
    from .userdata import DataError, read_objects

    out = []
    for where, record in read_objects(source, "requests"):
        if not isinstance(record, dict) or set(record) != {"task", "input"}:
            raise DataError(f'{where}: expected {{"task": NAME, "input": TEXT}}, got {json.dumps(record)[:80]}')
        if not isinstance(record["task"], str) or not isinstance(record["input"], str):
            raise DataError(f"{where}: 'task' and 'input' must be strings")
        if known_tasks is not None and record["task"] not in known_tasks:
            raise DataError(f"{where}: unknown task {record['task']!r}; the prompts given are {sorted(known_tasks)}")
        out.append((record["task"], record["input"]))
    return out


def encode_requests(bank, tokenizer, requests, max_new_tokens: int, source="requests") -> list[tuple[str, list[int]]]:
    """Each (task, text) request as (task, ids of text<sep>), the format the prompts were tuned on, every one
    checked by `bank.check_requests` before any generation: a bad one is a DataError naming `source`'s line."""
    from .userdata import DataError

    encoded = [(task, tokenizer.encode(text) + [tokenizer.sep_id]) for task, text in requests]
    try:
        bank.check_requests(encoded, max_new_tokens)
    except RequestError as e:
        raise DataError(f"{source}:{e.index + 1}: {e.reason}") from None
    return encoded


def generate_text(module, tokenizer, text: str, max_new_tokens: int, task_format: bool = False, **sampling) -> str:
    """The text `module` (a base model or a tuned module) continues `text` with; task_format: the input is read as
    the tasks write it (text<sep>) and the answer ends at <eos>. sampling: temperature, top_k of its generate."""
    ids = tokenizer.encode(text) + ([tokenizer.sep_id] if task_format else [])
    new = module.generate(torch.tensor([ids]), max_new_tokens, **sampling)[0, len(ids) :].tolist()
    if task_format and tokenizer.eos_id in new:
        new = new[: new.index(tokenizer.eos_id)]
    return tokenizer.decode(new)


def check_max_batch(max_batch) -> int:
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"max_batch must be an integer >= 1, got {max_batch!r}")
    return max_batch


class PromptBank:
    """Many named soft prompts for one frozen model; `generate` serves mixed batches of their requests."""

    def __init__(
        self,
        model: GPT,
        prompts: Mapping[str, PromptTuning | str | os.PathLike],
        backend: str = "auto",
        max_batch: int = 64,
    ):
        if not isinstance(model, GPT):
            raise TypeError(f"model must be a minipt GPT, got {type(model).__name__}")
        if not prompts:
            raise ValueError("PromptBank needs at least one prompt (a mapping name -> PromptTuning or file)")
        check_max_batch(max_batch)
        self.model = model.eval()
        self.backend = backend
        self.max_batch = max_batch
        fingerprint = model_fingerprint(model)
        self.prompts = {name: self._prompt(name, p, fingerprint) for name, p in prompts.items()}  # name -> (P, D)
        # Prompts of one length form one PromptTuning bank (K, P, D), indexed by prompt_index; name -> (P, k).
        groups, self.slot = {}, {}
        for name, p in self.prompts.items():
            group = groups.setdefault(p.shape[0], [])
            self.slot[name] = (p.shape[0], len(group))
            group.append(p)
        self.banks = {
            P: PromptTuning.from_tensor(model, torch.stack(group), backend=backend).eval()
            for P, group in groups.items()
        }  # P -> a bank of the prompts of length P
        self._prefix = {}  # name -> (k, v), each (n_layer, n_head, P, head_dim): filled on first use

    def _prompt(self, name, p, fingerprint: str) -> torch.Tensor:
        if isinstance(p, (str, os.PathLike)):
            p = PromptTuning.load(self.model, p, backend=self.backend)  # checks width and fingerprint
        if not isinstance(p, PromptTuning):
            raise TypeError(f"prompt {name!r}: expected a PromptTuning or a prompt file, got {type(p).__name__}")
        if p.bank_size is not None:
            raise ValueError(f"prompt {name!r} is a bank of {p.bank_size} prompts; give each one its own name")
        D = self.model.config.n_embd
        if p.prompt.shape[-1] != D:
            raise CheckpointError(f"prompt {name!r} has width {p.prompt.shape[-1]} but the model has n_embd={D}")
        if p.model is not self.model and model_fingerprint(p.model) != fingerprint:
            check_base(base_identity(p.model), self.model, f"prompt {name!r}")  # the same model in another dtype
        prompt = p.prompt_embeddings().detach()  # (P, D), fp32
        check_values({"prompt": prompt}, f"prompt {name!r}")
        return prompt

    def __len__(self) -> int:
        return len(self.prompts)

    def names(self) -> list[str]:
        return list(self.prompts)

    # ---- the prompt-prefix KV cache ---------------------------------------------------------------------

    @torch.no_grad()
    def prefix_kv(self, name: str):
        """Eq. 1: the keys and values of prompt `name` at every layer, (n_layer, n_head, P, head_dim) each."""
        if name not in self._prefix:
            tr = self.model.transformer
            P = self.prompts[name]  # (P, D)
            x = tr.drop(P.to(tr.wte.weight.dtype) + tr.wpe.weight[: P.shape[0]])[None]  # (1, P, D)
            cache = KVCache.for_model(self.model, 1, P.shape[0])
            self.model.body(x, cache)
            self._prefix[name] = cache.row(0)
        return self._prefix[name]

    # ---- serving ----------------------------------------------------------------------------------------

    def check_requests(self, requests, max_new_tokens) -> tuple[list[list[int]], list[int]]:
        """Every request checked before any work: (token lists, budgets); RequestError naming the request."""
        c = self.model.config
        if isinstance(requests, (str, bytes)) or not isinstance(requests, Sequence):
            raise TypeError("requests must be a list of (prompt name, token ids)")
        if isinstance(max_new_tokens, int) and not isinstance(max_new_tokens, bool):  # one budget for all
            if max_new_tokens < 0:
                raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens}")
            budgets = [max_new_tokens] * len(requests)
        elif isinstance(max_new_tokens, Sequence) and not isinstance(max_new_tokens, (str, bytes)):
            budgets = list(max_new_tokens)
        else:
            raise TypeError(f"max_new_tokens must be an integer or one integer per request, got {max_new_tokens!r}")
        if len(budgets) != len(requests):
            raise ValueError(f"max_new_tokens has {len(budgets)} entries for {len(requests)} requests")
        ids_out = []
        for i, (req, budget) in enumerate(zip(requests, budgets)):
            if not isinstance(req, (tuple, list)) or len(req) != 2:
                raise RequestError(i, f"expected a (prompt name, token ids) pair, got {req!r:.60}")
            name, ids = req
            if name not in self.prompts:
                raise RequestError(i, f"unknown prompt name {name!r}; this bank holds {self.names()}")
            if isinstance(ids, torch.Tensor):
                if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
                    raise RequestError(i, "token ids must be a 1-D integer tensor or a list of ints")
                ids = ids.tolist()
            if not isinstance(ids, (list, tuple)) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in ids
            ):
                raise RequestError(i, "token ids must be a list of ints")
            if len(ids) == 0:
                raise RequestError(i, "empty request (no token ids)")
            bad = [t for t in ids if not 0 <= t < c.vocab_size]
            if bad:
                raise RequestError(i, f"token id {bad[0]} is outside [0, vocab_size={c.vocab_size})")
            if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
                raise RequestError(i, f"max_new_tokens must be an int >= 0, got {budget!r}")
            P = self.prompts[name].shape[0]
            if P + len(ids) + budget > c.block_size:
                raise RequestError(
                    i,
                    f"prompt {name!r} ({P}) + {len(ids)} tokens + max_new_tokens "
                    f"{budget} = {P + len(ids) + budget} exceeds block_size {c.block_size}",
                )
            ids_out.append(list(ids))
        return ids_out, budgets

    @torch.no_grad()
    def generate(
        self,
        requests,
        max_new_tokens,
        temperature: float = 0.0,
        top_k: int | None = None,
        eos_id: int | None = None,
        prefix_cache: bool = True,
        generator: torch.Generator | None = None,
        max_batch: int | None = None,
        progress=None,
    ) -> list[list[int]]:
        """Answer requests [(name, token ids), ...] of any tasks and lengths; the new tokens, in request order.

        max_new_tokens: an int, or one per request. A row stops at its first eos_id (included). Requests are
        sorted by length and served in mixed batches of at most max_batch rows; greedy (temperature 0) gives
        each request exactly the tokens `PromptTuning.generate` gives it alone. progress(n) is called after
        each batch with the number of requests it answered.
        """
        ids, budgets = self.check_requests(requests, max_new_tokens)
        check_sampling(temperature, top_k)
        max_batch = self.max_batch if max_batch is None else check_max_batch(max_batch)
        names = [r[0] for r in requests]
        total = [self.prompts[n].shape[0] + len(t) for n, t in zip(names, ids)]
        order = sorted(range(len(ids)), key=lambda i: total[i])  # similar lengths together: less padding
        answers = [None] * len(ids)
        for s in range(0, len(order), max_batch):
            chunk = order[s : s + max_batch]
            new = self._generate_batch(
                [names[i] for i in chunk],
                [ids[i] for i in chunk],
                [budgets[i] for i in chunk],
                temperature,
                top_k,
                eos_id,
                prefix_cache,
                generator,
            )
            for i, answer in zip(chunk, new):
                answers[i] = answer
            if progress is not None:
                progress(len(chunk))
        return answers

    def _embed(self, names, ids, prefix_cache: bool):
        """x (B, T, D) right-padded and n_valid (B,): the rows of each prompt length through that length's bank
        (`PromptTuning.embed`, which calls prompt_concat with prompt_index).

        prefix_cache: the token rows only, wte[idx] + wpe[P_b + t]; else [P_b, wte[idx]] + wpe[0 : P_b + L_b].
        """
        tr, dev = self.model.transformer, self.model.transformer.wte.weight.device
        B = len(ids)
        P = [self.prompts[n].shape[0] for n in names]
        L = [len(t) for t in ids]
        n_valid = L if prefix_cache else [p + l for p, l in zip(P, L)]
        x = torch.zeros(B, max(n_valid), tr.wte.weight.shape[1], dtype=tr.wte.weight.dtype, device=dev)  # (B, T, D)
        for p_len, bank in self.banks.items():
            rows = [b for b in range(B) if P[b] == p_len]
            if not rows:
                continue
            n = max(L[b] for b in rows)
            idx = torch.tensor([ids[b] + [0] * (n - L[b]) for b in rows], device=dev)  # (B_g, n) right-padded
            k = torch.tensor([self.slot[names[b]][1] for b in rows], device=dev)  # (B_g,) prompt_index
            xg = bank.embed(idx, prompt_index=k)  # (B_g, p_len + n, D); the ids were checked above
            xg = xg[:, p_len:] if prefix_cache else xg  # with the cache: the token rows only
            x[rows, : xg.shape[1]] = xg
        return x, torch.tensor(n_valid, device=dev)

    def _generate_batch(self, names, ids, budgets, temperature, top_k, eos_id, prefix_cache, generator):
        B, max_new = len(ids), max(budgets)
        x, n_valid = self._embed(names, ids, prefix_cache)  # (B, T, D), (B,)
        P_max = max(self.prompts[n].shape[0] for n in names) if prefix_cache else 0
        cache = KVCache.for_model(self.model, B, P_max + x.shape[1] + max_new, dtype=x.dtype)
        if prefix_cache:
            for b, name in enumerate(names):
                cache.set_prefix(b, *self.prefix_kv(name))  # positions [0, P_b) of row b: eq. 1
        new = decode(
            self.model,
            x,
            cache,
            n_valid,
            max_new,
            temperature,
            top_k,
            generator,
            eos_id,
            budgets=torch.tensor(budgets, device=x.device),
        ).tolist()  # (B, max_new)
        answers = []
        for row, budget in zip(new, budgets):
            row = row[:budget]
            if eos_id is not None and eos_id in row:
                row = row[: row.index(eos_id) + 1]
            answers.append(row)
        return answers
