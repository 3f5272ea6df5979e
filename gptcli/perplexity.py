"""Perplexity of a text with sliding windows, as in Hugging Face's "perplexity of fixed-length
models" guide (strided evaluation).

Windows of at most `context` tokens start every `stride` tokens: begin = 0, stride, 2*stride, ...
and end = min(begin + context, n). A window scores only the tokens the previous window did not
(positions prev_end..end-1), each predicted from the tokens before it inside the window; so
every token gets at least context - stride tokens of context (except near the start), and the
last window is the one that reaches the end of the text. The first token of the text is never
scored (nothing predicts it); with stride = context the windows are disjoint and each
window's first token goes unscored, as in the guide.

The result is the mean negative log-likelihood (nats) over the scored tokens, and
perplexity = exp(mean NLL). Its standard error is that of the mean NLL (sample standard
deviation / sqrt(n)) carried through exp to first order: se(ppl) = ppl x se(NLL). Tokens of a
text are not independent, so read it as a rough guide to precision.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .model import GPT
from .tokenizer import Tokenizer


@dataclass(frozen=True)
class Window:
    begin: int  # first token fed to the model
    end: int  # one past the last
    first_scored: int  # tokens first_scored..end-1 are scored

    @property
    def scored(self) -> int:
        return self.end - self.first_scored


@dataclass(frozen=True)
class Perplexity:
    ppl: float
    stderr: float | None  # None with a single scored token
    nll_mean: float
    tokens_scored: int
    windows: int
    context: int
    stride: int

    def record(self) -> dict[str, object]:
        return {
            "ppl": self.ppl,
            "stderr": self.stderr,
            "nll_mean": self.nll_mean,
            "tokens_scored": self.tokens_scored,
            "windows": self.windows,
            "context": self.context,
            "stride": self.stride,
        }


def default_stride(context: int) -> int:
    """Half the window: each scored token sees at least context/2 tokens before it."""
    return max(1, context // 2)


def make_windows(n_tokens: int, context: int, stride: int) -> list[Window]:
    """The guide's windows over n_tokens tokens (see the module docstring)."""
    if context < 2 or not 1 <= stride <= context:
        raise ValueError(f"need context >= 2 and 1 <= stride <= context, got {context}, {stride}")
    windows = []
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + context, n_tokens)
        first = max(prev_end, begin + 1)
        if first < end:
            windows.append(Window(begin, end, first))
        prev_end = end
        if end == n_tokens:
            break
    return windows


def encode_text(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of a document, with BOS first when the tokenizer is configured to add it."""
    ids = tokenizer.encode(text)
    if tokenizer.add_bos_token and tokenizer.bos_id is not None and ids[:1] != [tokenizer.bos_id]:
        ids = [tokenizer.bos_id, *ids]
    return ids


def window_nll(model: GPT, ids: list[int], window: Window) -> list[float]:
    """Negative log-likelihood (nats) of each scored token of one window."""
    x = torch.tensor([ids[window.begin : window.end]], dtype=torch.long, device=model.device)
    logits = model(x)[0]  # [T, vocab]
    # The logits at position p predict the token at p + 1.
    lo, hi = window.first_scored - window.begin - 1, window.end - window.begin - 1
    log_probs = torch.log_softmax(logits[lo:hi].float(), dim=-1)  # [scored, vocab]
    targets = x[0, lo + 1 : hi + 1]
    nll = -log_probs.gather(1, targets[:, None])[:, 0]
    return nll.double().cpu().tolist()


def perplexity(
    model: GPT,
    ids: list[int],
    context: int,
    stride: int,
    progress: Callable[[int, int, float], None] | None = None,
) -> Perplexity:
    """Score ids with strided windows; `progress(done, total, running ppl)` after each one."""
    windows = make_windows(len(ids), context, stride)
    if not windows:
        raise ValueError("need at least 2 tokens to score")
    nlls: list[float] = []
    for done, window in enumerate(windows, 1):
        nlls.extend(window_nll(model, ids, window))
        if progress is not None:
            progress(done, len(windows), math.exp(statistics.fmean(nlls)))
    mean = statistics.fmean(nlls)
    ppl = math.exp(mean)
    stderr = None
    if len(nlls) > 1:
        stderr = ppl * statistics.stdev(nlls) / math.sqrt(len(nlls))
    return Perplexity(ppl, stderr, mean, len(nlls), len(windows), context, stride)
