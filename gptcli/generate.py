"""Prefill the prompt, then decode one token at a time over the KV cache.

`Generation` is an iterator of token ids; it never prints. It stops at an end-of-sequence
id, after `max_new_tokens`, or at the end of the model's context; `finish_reason` says
which. Stop strings are text and are handled by the caller, which simply stops iterating
(and may set `finish_reason = "stop"`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import torch

from .errors import GptcliError
from .model import GPT, KVCache
from .sampling import SamplingParams, sample

#: How many recent tokens the repetition penalty looks at (llama.cpp's default).
REPEAT_WINDOW = 64


class Generation:
    """One request: iterate to get new token ids; timings and the finish reason are kept."""

    def __init__(
        self,
        model: GPT,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        params: SamplingParams,
        generator: torch.Generator | None = None,
        eos_ids: Sequence[int] = (),
        cache: KVCache | None = None,
        reuse: int = 0,
    ) -> None:
        """`cache` and `reuse`: continue in a cache that already holds the keys and values of
        the first `reuse` prompt ids (a chat's earlier turns); only the rest are prefilled. By
        default a fresh cache is made for the prompt and every token that may follow."""
        if not prompt_ids:
            raise ValueError("the prompt must have at least one token")
        if not 0 <= reuse < len(prompt_ids):
            raise ValueError("at least one prompt token must be fed: its logits come next")
        self.model = model
        self.prompt_ids = list(prompt_ids)
        self.max_new_tokens = max_new_tokens
        self.params = params
        self.generator = generator
        self.eos_ids = frozenset(eos_ids)
        self.cache = cache
        self.reuse = reuse
        self.new_ids: list[int] = []
        #: How many of prompt_ids + new_ids have their keys and values in the cache.
        self.cached_len = reuse
        self.finish_reason: str | None = None
        self.prefill_seconds = 0.0
        self.decode_seconds = 0.0

    def __iter__(self) -> Iterator[int]:
        model = self.model
        context = model.config.max_positions
        n_prompt = len(self.prompt_ids)
        if n_prompt >= context:
            raise ValueError(f"a prompt of {n_prompt} tokens leaves no room in {context}")
        # One cache for the whole request: prompt plus every token we may generate.
        total = min(n_prompt + self.max_new_tokens, context)
        cache = self.cache
        if cache is None:
            cache = model.new_cache(batch=1, max_len=total)
        elif cache.max_len < total:
            raise ValueError(f"the cache holds {cache.max_len} positions; {total} are needed")
        history = torch.tensor(self.prompt_ids, device=model.device)  # for the repeat penalty

        started = time.perf_counter()
        fresh = history[None, self.reuse :]  # [1, n_prompt - reuse]
        logits = model(fresh, start=self.reuse, cache=cache, last_only=True)[:, -1]  # [1, vocab]
        self.cached_len = n_prompt
        position = n_prompt
        while True:
            if len(self.new_ids) >= self.max_new_tokens:
                self.finish_reason = "length"
                return
            recent = history[-REPEAT_WINDOW:][None, :] if self.params.repeat_penalty != 1 else None
            if not bool(torch.isfinite(logits).any()):
                raise GptcliError(
                    "the model produced no finite logits (NaN or inf): its weights are broken, "
                    "or float16 overflowed (try --dtype float32)"
                )
            next_id = sample(logits, self.params, self.generator, recent)  # [1]
            token = int(next_id.item())  # waits for the device: the token is needed now
            now = time.perf_counter()
            if not self.new_ids:
                self.prefill_seconds = now - started
            else:
                self.decode_seconds = now - started - self.prefill_seconds
            if token in self.eos_ids:
                self.finish_reason = "eos"
                return
            self.new_ids.append(token)
            yield token
            if position >= context:
                self.finish_reason = "context"
                return
            if len(self.new_ids) >= self.max_new_tokens:
                self.finish_reason = "length"
                return
            if recent is not None:
                history = torch.cat([history[-REPEAT_WINDOW:], next_id])
            logits = model(next_id[None, :], start=position, cache=cache)[:, -1]
            position += 1
            self.cached_len = position
