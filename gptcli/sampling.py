"""Logits -> next token id: greedy, temperature, top-k, top-p, min-p and repetition penalty.

Pure functions over `[batch, vocab]` logits, computed in float32. Filters mask tokens by
setting their logit to -inf; the best token always survives every filter, so there is always
something to draw. Randomness comes only from the `torch.Generator` passed in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import UsageError

# How many of the best tokens top-p sorts before falling back to sorting the whole row.
_TOP_P_WINDOW = 256


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings; each field is validated against its CLI option on construction."""

    temperature: float = 0.8  # 0 = greedy
    top_k: int = 40  # 0 = off
    top_p: float = 0.95  # 1 = off
    min_p: float = 0.05  # 0 = off
    repeat_penalty: float = 1.0  # 1 = off

    def __post_init__(self) -> None:
        self.validate()

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0

    def validate(self) -> None:
        """Raise UsageError naming the CLI option of the first bad value."""
        if not _is_number(self.temperature) or not self.temperature >= 0:
            raise UsageError(
                f"--temp must be a finite number >= 0 (0 means greedy), got {self.temperature}"
            )
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise UsageError(
                f"--top-k must be a whole number >= 0 (0 turns it off), got {self.top_k}"
            )
        if not _is_number(self.top_p) or not 0 <= self.top_p <= 1:
            raise UsageError(f"--top-p must be between 0 and 1 (1 turns it off), got {self.top_p}")
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            raise UsageError(f"--min-p must be between 0 and 1 (0 turns it off), got {self.min_p}")
        if not _is_number(self.repeat_penalty) or not self.repeat_penalty > 0:
            raise UsageError(
                f"--repeat-penalty must be a finite number > 0 (1 turns it off), "
                f"got {self.repeat_penalty}"
            )


def make_generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A generator seeded for reproducible sampling; it must live on the logits' device."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise UsageError(f"--seed must be a whole number from 0 to 2**64 - 1, got {seed}")
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    previous_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pick one id per row of `logits` `[batch, vocab]`; returns `[batch]` int64.

    Order: repetition penalty over `previous_ids` -> greedy (argmax; ties go to the lowest
    index) if temperature is 0 -> top-k -> temperature -> top-p -> min-p -> one draw with
    `torch.multinomial`. A row with no finite logit falls back to argmax.

    Top-k keeps every token tied with the k-th best. It runs before the temperature (the ranks
    are the same, so the result is that of temperature-then-top-k, without float32 rounding at
    extreme temperatures turning near-equal logits into ties). When top-k is on, the later
    steps run on its candidates only: sorting and drawing from a 50k vocabulary costs
    milliseconds per token on a CPU, 40 candidates do not.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [batch, vocab], got shape {tuple(logits.shape)}")
    # NaN (a broken or overflowing model) would poison every filter; treat it as impossible.
    scores = logits.to(torch.float32).nan_to_num(nan=-math.inf, posinf=math.inf, neginf=-math.inf)
    if previous_ids is not None and params.repeat_penalty != 1.0:
        scores = apply_repetition_penalty(scores, previous_ids, params.repeat_penalty)
    fallback = greedy(scores)
    if params.is_greedy:
        return fallback

    probs, candidate_ids = _filtered_probs(scores, params)
    # Rows without any finite logit (or with +inf/NaN from a broken model) have no valid
    # distribution; multinomial would raise on them, so they take the argmax instead.
    usable = torch.isfinite(probs).all(dim=-1) & (probs.sum(dim=-1) > 0)
    if not bool(usable.all()):
        probs = torch.where(usable[:, None], probs, torch.ones_like(probs))
    choice = torch.multinomial(probs, 1, generator=generator)
    if candidate_ids is not None:
        choice = candidate_ids.gather(1, choice)
    return torch.where(usable, choice.squeeze(1), fallback)


def next_token_probs(
    logits: torch.Tensor, params: SamplingParams, previous_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """The `[batch, vocab]` float32 distribution `sample` draws from (for temperature > 0)."""
    scores = logits.to(torch.float32)
    if previous_ids is not None and params.repeat_penalty != 1.0:
        scores = apply_repetition_penalty(scores, previous_ids, params.repeat_penalty)
    probs, candidate_ids = _filtered_probs(scores, params)
    if candidate_ids is None:
        return probs
    return torch.zeros_like(scores).scatter(1, candidate_ids, probs)


def _filtered_probs(
    scores: torch.Tensor, params: SamplingParams
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Top-k, temperature, top-p, min-p, softmax; over top-k's candidates when it is on, whose
    ids come back too (None: the probabilities cover the whole vocabulary)."""
    scores, candidate_ids = _top_k_candidates(scores, params.top_k)
    scores = apply_temperature(scores, params.temperature)
    scores = filter_top_p(scores, params.top_p)
    scores = filter_min_p(scores, params.min_p)
    return torch.softmax(scores, dim=-1), candidate_ids


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """Argmax per row; ties go to the lowest index."""
    return torch.argmax(logits, dim=-1)


def apply_repetition_penalty(
    logits: torch.Tensor, previous_ids: torch.Tensor, penalty: float
) -> torch.Tensor:
    """Make ids in `previous_ids` (`[batch, n]` or `[n]`, values in [0, vocab)) less likely.

    Positive logits are divided by `penalty`, negative ones multiplied, so a penalty > 1 always
    pushes them down. Each distinct id is penalised once however often it occurred.
    """
    if previous_ids.numel() == 0 or penalty == 1.0:
        return logits
    ids = previous_ids.to(device=logits.device, dtype=torch.int64)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0).expand(logits.shape[0], -1)
    seen = logits.gather(1, ids)
    penalised = torch.where(seen > 0, seen / penalty, seen * penalty)
    # Finite logits stay finite: overflowing to -inf would mask a token the model allowed (and
    # could leave a row with nothing to draw); a penalty < 1 could overflow to +inf.
    limits = torch.finfo(logits.dtype)
    penalised = torch.where(
        torch.isfinite(seen), penalised.clamp(min=limits.min, max=limits.max), seen
    )
    # Duplicates in `ids` all write the same value, so repeats do not compound.
    return logits.scatter(1, ids, penalised)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Divide by the temperature without overflowing to inf/NaN at extreme temperatures."""
    row_max = logits.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    # Shift so the best logit is 0: a tiny temperature then sends the others to -inf (greedy-
    # like) instead of sending the best one to +inf.
    shifted = logits - row_max
    scaled = shifted / temperature
    # In float32 a tiny temperature may round to 0 (0/0 = NaN) and a huge one to inf
    # (-inf/inf = NaN); pin the best tokens at 0 and masked ones at -inf.
    scaled = torch.where(shifted == 0, torch.zeros_like(scaled), scaled)
    return torch.where(torch.isneginf(shifted), shifted, scaled)


def filter_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the `top_k` highest logits per row (ties with the k-th are kept too); 0 = off."""
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth_best = torch.topk(logits, top_k, dim=-1).values[:, -1:]
    return logits.masked_fill(logits < kth_best, -math.inf)


def _top_k_candidates(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The top-k logits (ties with the k-th kept) and their ids, best first; (logits, None) if
    top-k is off."""
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits, None
    kth_best = torch.topk(logits, top_k, dim=-1).values[:, -1:]
    count = int((logits >= kth_best).sum(dim=-1).max())  # > top_k only with ties
    best, best_ids = torch.topk(logits, count, dim=-1, sorted=True)
    # With several rows, a row with fewer ties has extra candidates below its k-th best.
    return best.masked_fill(best < kth_best, -math.inf), best_ids


def filter_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of best tokens whose probability reaches `top_p`.

    The best token is always kept (so top_p 0 keeps just it); top_p 1 is off. Among tokens tied
    at the boundary, which ones are kept follows torch.topk's order.
    """
    if top_p >= 1.0:
        return logits
    log_total = torch.logsumexp(logits, dim=-1, keepdim=True)  # over the whole row
    finite = max(int(torch.isfinite(logits).sum(dim=-1).max()), 1)
    # A full sort of a 50k vocabulary costs milliseconds per token on a CPU, and the nucleus
    # is usually small: sort a window of the best tokens, and the whole row only when the
    # nucleus reaches past the window's end.
    for window in dict.fromkeys((min(finite, _TOP_P_WINDOW), finite)):
        best, best_ids = torch.topk(logits, window, dim=-1, sorted=True)
        probs = torch.exp(best - log_total)
        # Exclusive cumulative sum: the mass of the better tokens (no `cumsum - probs` rounding).
        mass_before = torch.nn.functional.pad(torch.cumsum(probs, dim=-1)[:, :-1], (1, 0))
        keep_sorted = (mass_before < top_p) & torch.isfinite(best)
        keep_sorted[:, 0] = True
        if not bool(keep_sorted[:, -1].any()):
            break  # every row's nucleus ended inside the window
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter(1, best_ids, keep_sorted)
    return logits.masked_fill(~keep, -math.inf)


def filter_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens whose probability is below `min_p` times the best token's; 0 = off."""
    if min_p <= 0.0:
        return logits
    probs = torch.softmax(logits, dim=-1)
    threshold = min_p * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(probs < threshold, -math.inf)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
