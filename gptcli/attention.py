"""Attention weights of one prompt, and a summary of what each head attends to.

The weights come from the model's own attention code: `GPT.forward(record_attention=True)`
makes every layer keep its softmax weights in `block.attn.weights` ([B, H, T, T]); nothing
here recomputes attention.

Each head is summarised over its query rows 1..T-1 (row 0 can only attend to itself, so it
says nothing about the head):

- `previous`: mean weight a token puts on the token just before it, w[i, i-1];
- `first`:    mean weight on the first token, w[i, 0] (an "attention sink");
- `same`:     mean weight on itself, w[i, i];
- `entropy`:  mean entropy of a row, in bits (0 = all weight on one token; log2(i+1) = even).

A head's `kind` is the pattern whose mean weight is largest, when that mean exceeds 0.5
(`previous-token`, `first-token`, `same-token`), and `spread` otherwise. Row 1's previous
token is also the first token; the largest mean decides.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .model import GPT
from .tokenizer import Tokenizer

#: A head is of a kind when its mean weight on that pattern is above this.
KIND_THRESHOLD = 0.5
#: Every layer's [H, T, T] weights are kept during the forward pass; this bounds their memory.
MAX_TOKENS = 512
PATTERNS = ("previous", "first", "same")
KINDS = {"previous": "previous-token", "first": "first-token", "same": "same-token"}


@dataclass(frozen=True)
class HeadSummary:
    head: int
    kind: str  # previous-token, first-token, same-token or spread
    previous: float
    first: float
    same: float
    entropy_bits: float

    def record(self) -> dict[str, object]:
        return {
            "head": self.head,
            "kind": self.kind,
            "previous": round(self.previous, 6),
            "first": round(self.first, 6),
            "same": round(self.same, 6),
            "entropy_bits": round(self.entropy_bits, 6),
        }


def record_attention(model: GPT, ids: list[int]) -> torch.Tensor:
    """Softmax weights of every layer for one prompt: float32 [n_layer, n_head, T, T], on the
    CPU, row i over keys 0..T-1 (zero above the diagonal). The layers' copies are released."""
    if not ids:
        raise ValueError("record_attention needs at least one token")
    x = torch.tensor([ids], dtype=torch.long, device=model.device)
    try:
        model(x, record_attention=True, last_only=True)
        layers = []
        for block in model.blocks:
            weights = block.attn.weights
            if weights is None:
                raise RuntimeError("the model did not record attention weights")
            layers.append(weights[0].float().cpu())  # [H, T, T]
    finally:
        for block in model.blocks:
            block.attn.weights = None
    return torch.stack(layers)  # [L, H, T, T]


def row_entropy_bits(weights: torch.Tensor) -> torch.Tensor:
    """Entropy in bits of each row of [..., T, S] weights (0 log 0 counts as 0)."""
    logs = torch.where(weights > 0, weights.log2(), torch.zeros_like(weights))
    return -(weights * logs).sum(-1)


def summarize_head(weights: torch.Tensor, head: int = 0) -> HeadSummary:
    """Classify one head from its [T, T] weights (see the module docstring)."""
    T = weights.shape[-1]
    if T < 2:  # one token: it can only attend to itself
        return HeadSummary(head, "spread", 0.0, 1.0, 1.0, 0.0)
    rows = torch.arange(1, T)
    means = {
        "previous": float(weights[rows, rows - 1].mean()),
        "first": float(weights[rows, 0].mean()),
        "same": float(weights[rows, rows].mean()),
    }
    best = max(PATTERNS, key=lambda name: means[name])
    kind = KINDS[best] if means[best] > KIND_THRESHOLD else "spread"
    entropy = float(row_entropy_bits(weights[1:]).mean())
    return HeadSummary(head, kind, means["previous"], means["first"], means["same"], entropy)


def summarize_layer(layer_weights: torch.Tensor) -> list[HeadSummary]:
    """One summary per head of [H, T, T] weights."""
    return [summarize_head(layer_weights[h], h) for h in range(layer_weights.shape[0])]


def max_entropy_bits(n_tokens: int) -> float:
    """The mean entropy of rows 1..T-1 if every row spread its weight evenly (for scale)."""
    if n_tokens < 2:
        return 0.0
    return sum(math.log2(i + 1) for i in range(1, n_tokens)) / (n_tokens - 1)


def token_texts(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    """Each token's own text; a special token (which decoding drops) by its name."""
    texts = []
    for token_id in ids:
        text = "" if token_id in tokenizer.special_ids else tokenizer.decode([token_id])
        texts.append(text or tokenizer.id_to_token(token_id) or "")
    return texts


def attention_record(
    layer: int, ids: list[int], tokens: list[str], weights: torch.Tensor
) -> dict[str, object]:
    """The JSON of `gptcli attention --json`: tokens, per-head summary and the layer's weights
    [head][query][key], rounded to 6 decimals."""
    return {
        "layer": layer,
        "tokens": [{"id": i, "text": t} for i, t in zip(ids, tokens, strict=True)],
        "heads": [s.record() for s in summarize_layer(weights)],
        "weights": [[[round(w, 6) for w in row] for row in m] for m in weights.tolist()],
    }


Panel = tuple[str, list[list[float]]]


def view_panels(
    weights: torch.Tensor, summaries: list[dict[str, object]], head: int | None, all_heads: bool
) -> list[Panel]:
    """(title, [T][T] matrix) of what to draw from [H, T, T] weights: every head, one head, or
    the mean over heads (the default)."""
    if all_heads:
        return [
            (f"head {h} · {summaries[h]['kind']}", weights[h].tolist()) for h in range(len(weights))
        ]
    if head is not None:
        return [(f"head {head} · {summaries[head]['kind']}", weights[head].tolist())]
    return [("mean over heads", weights.mean(0).tolist())]
