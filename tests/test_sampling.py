"""Sampling: exact results where they exist, distributions with a fixed seed, and properties."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from gptcli.errors import UsageError
from gptcli.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    apply_temperature,
    filter_min_p,
    filter_top_k,
    filter_top_p,
    make_generator,
    next_token_probs,
    sample,
)

NEG_INF = -math.inf
GREEDY = SamplingParams(temperature=0.0)
PLAIN = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)  # no filtering at all


def draws(logits: list[float], params: SamplingParams, n: int = 2000, seed: int = 0) -> list[int]:
    """`n` independent draws from one row of logits, as one batched call."""
    batch = torch.tensor([logits]).expand(n, -1)
    return sample(batch, params, make_generator(seed)).tolist()


def test_greedy_is_argmax_and_ties_go_to_the_lowest_index():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.9], [5.0, 1.0, 5.0, 5.0]])
    ids = sample(logits, GREEDY)
    assert ids.tolist() == [1, 0]
    assert ids.dtype == torch.int64 and ids.shape == (2,)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0, top_k=1, top_p=1.0, min_p=0.0),
        SamplingParams(temperature=5.0, top_k=0, top_p=0.0, min_p=0.0),
        SamplingParams(temperature=5.0, top_k=0, top_p=1.0, min_p=1.0),
        SamplingParams(temperature=1e-30, top_k=0, top_p=1.0, min_p=0.0),
    ],
    ids=["top_k=1", "top_p=0", "min_p=1", "tiny-temperature"],
)
def test_settings_that_leave_only_the_best_token(params):
    logits = torch.randn(8, 100, generator=make_generator(1))
    for seed in range(10):
        ids = sample(logits, params, make_generator(seed))
        assert torch.equal(ids, logits.argmax(dim=-1))


def test_min_p_one_keeps_all_tied_best_tokens():
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=1.0)
    assert set(draws([2.0, 1.9, 2.0, -1.0], params)) == {0, 2}


def test_repetition_penalty_numbers():
    logits = torch.tensor([[2.0, -2.0, 0.5, 0.0]])
    previous = torch.tensor([[0, 1, 0, 3, 3]])  # repeats are penalised once
    result = apply_repetition_penalty(logits, previous, 2.0)
    assert result.tolist() == [[1.0, -4.0, 0.5, 0.0]]
    assert logits.tolist() == [[2.0, -2.0, 0.5, 0.0]]  # input untouched
    # 1-D ids apply to every row.
    both = apply_repetition_penalty(logits.repeat(2, 1), torch.tensor([1]), 2.0)
    assert both[:, 1].tolist() == [-4.0, -4.0]


def test_repetition_penalty_changes_the_greedy_choice():
    logits = torch.tensor([[3.0, 2.0]])
    params = SamplingParams(temperature=0.0, repeat_penalty=2.0)
    assert sample(logits, params, previous_ids=torch.tensor([[0]])).item() == 1
    assert sample(logits, params, previous_ids=torch.empty(1, 0, dtype=torch.long)).item() == 0


def test_same_seed_same_ids_and_different_seeds_differ():
    logits = torch.randn(4, 500, generator=make_generator(7))
    params = SamplingParams(temperature=1.5, top_k=0, top_p=1.0, min_p=0.0)
    first = [sample(logits, params, make_generator(123)) for _ in range(2)]
    assert torch.equal(first[0], first[1])
    others = {tuple(sample(logits, params, make_generator(s)).tolist()) for s in range(10)}
    assert len(others) > 1


def test_two_equal_tokens_both_appear_and_masked_ones_never():
    results = draws([0.0, 0.0, NEG_INF, NEG_INF], PLAIN, n=4000)
    counts = [results.count(i) for i in range(4)]
    assert counts[2] == counts[3] == 0
    assert 1800 < counts[0] < 2200  # binomial(4000, 0.5): about 6 standard deviations wide


def test_filters_mask_what_they_should():
    results = draws([5.0, 5.0, 1.0, 1.0, 4.9], SamplingParams(1.0, top_k=2, top_p=1.0, min_p=0))
    assert set(results) == {0, 1}
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isfinite(filter_top_p(logits, 0.5)).tolist() == [[True, False, False, False]]
    assert torch.isfinite(filter_top_p(logits, 0.6)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_top_p(logits, 0.9)).tolist() == [[True, True, True, False]]
    assert torch.isfinite(filter_top_p(logits, 0.99)).tolist() == [[True, True, True, True]]
    assert torch.isfinite(filter_min_p(logits, 0.3)).tolist() == [[True, True, True, False]]
    assert torch.isfinite(filter_top_k(logits, 3)).tolist() == [[True, True, True, False]]
    assert torch.equal(filter_top_k(logits, 0), logits)
    assert torch.equal(filter_top_k(logits, 4), logits)


def test_extreme_inputs_never_crash_or_give_nan():
    only_one = torch.full((1, 1000), NEG_INF)
    only_one[0, 637] = -5.0
    for temperature in (1e-300, 1e-30, 1e-3, 1.0, 1e3, 1e30, 1e300):
        params = SamplingParams(temperature=temperature, top_k=0, top_p=1.0, min_p=0.0)
        assert sample(only_one, params, make_generator(0)).item() == 637
        scaled = apply_temperature(torch.tensor([[1.0, -3e38, NEG_INF]]), temperature)
        assert not torch.isnan(scaled).any()
    # A huge temperature makes all finite tokens equally likely, still never a -inf one.
    flat = set(draws([100.0, -100.0, NEG_INF], SamplingParams(1e30, 0, 1.0, 0.0), n=500))
    assert flat == {0, 1}
    # Half-precision logits and rows without any finite logit (falls back to argmax).
    half = torch.tensor([[1.0, 9.0, 2.0]], dtype=torch.float16)
    assert sample(half, SamplingParams(0.01, 1, 0.5, 0.1), make_generator(0)).item() == 1
    assert sample(half.bfloat16(), SamplingParams(), make_generator(0)).item() in {0, 1, 2}
    dead = torch.tensor([[NEG_INF, NEG_INF], [0.0, NEG_INF]])
    assert sample(dead, SamplingParams(), make_generator(0)).tolist() == [0, 0]
    assert sample(torch.tensor([[0.0, math.inf]]), SamplingParams()).item() == 1


def test_one_dimensional_logits_are_refused():
    with pytest.raises(ValueError, match=r"\[batch, vocab\]"):
        sample(torch.zeros(5), SamplingParams())


@pytest.mark.parametrize(
    ("field", "value", "option"),
    [
        ("temperature", math.nan, "--temp"),
        ("temperature", -0.1, "--temp"),
        ("temperature", math.inf, "--temp"),
        ("top_k", -1, "--top-k"),
        ("top_k", 2.5, "--top-k"),
        ("top_p", math.nan, "--top-p"),
        ("top_p", 1.01, "--top-p"),
        ("top_p", -0.01, "--top-p"),
        ("min_p", math.nan, "--min-p"),
        ("min_p", 2.0, "--min-p"),
        ("min_p", -1.0, "--min-p"),
        ("repeat_penalty", 0.0, "--repeat-penalty"),
        ("repeat_penalty", -1.0, "--repeat-penalty"),
        ("repeat_penalty", math.nan, "--repeat-penalty"),
        ("repeat_penalty", math.inf, "--repeat-penalty"),
    ],
)
def test_validation_names_the_option(field, value, option):
    with pytest.raises(UsageError, match=option) as info:
        SamplingParams(**{field: value})
    assert info.value.exit_code == 2


def test_defaults_and_bounds_are_valid():
    SamplingParams()
    SamplingParams(temperature=0.0, top_k=0, top_p=0.0, min_p=1.0, repeat_penalty=0.5)
    SamplingParams(top_p=1.0, min_p=0.0, repeat_penalty=1e6)
    with pytest.raises(UsageError, match="--seed"):
        make_generator(-1)


finite_or_neg_inf = st.one_of(
    st.floats(-1e4, 1e4, allow_nan=False), st.just(NEG_INF), st.floats(-1e38, 1e38)
)
params_strategy = st.builds(
    SamplingParams,
    temperature=st.one_of(st.just(0.0), st.floats(1e-30, 1e30), st.floats(0.01, 5.0)),
    top_k=st.integers(0, 12),
    top_p=st.floats(0.0, 1.0),
    min_p=st.floats(0.0, 1.0),
    repeat_penalty=st.floats(0.01, 100.0),
)


@st.composite
def logits_and_history(draw):
    """1-3 rows over a vocab of 1-20, each row with at least one finite logit."""
    vocab = draw(st.integers(1, 20))
    row = st.lists(finite_or_neg_inf, min_size=vocab, max_size=vocab).filter(
        lambda values: any(math.isfinite(x) for x in values)
    )
    rows = draw(st.lists(row, min_size=1, max_size=3))
    previous = draw(st.lists(st.integers(0, vocab - 1), max_size=5))
    return rows, previous


@settings(max_examples=300, deadline=None)
@given(data=logits_and_history(), params=params_strategy, seed=st.integers(0, 2**64 - 1))
def test_any_logits_and_params_give_a_valid_deterministic_id(data, params, seed):
    rows, previous = data
    logits = torch.tensor(rows, dtype=torch.float32)
    previous_ids = torch.tensor(previous, dtype=torch.long)
    ids = sample(logits, params, make_generator(seed), previous_ids)
    again = sample(logits, params, make_generator(seed), previous_ids)
    assert torch.equal(ids, again)
    assert ids.shape == (len(rows),) and ids.dtype == torch.int64
    for row, token_id in zip(rows, ids.tolist(), strict=True):
        assert 0 <= token_id < len(row)
        assert math.isfinite(row[token_id])


def reference_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The documented order with the plain masking filters over the whole vocabulary."""
    # top-k before the temperature, as `sample` documents: the shift by the row maximum in
    # apply_temperature can round near-equal logits into ties that top-k would then keep.
    scores = filter_top_k(logits.float(), params.top_k)
    scores = apply_temperature(scores, params.temperature)
    scores = filter_top_p(scores, params.top_p)
    scores = filter_min_p(scores, params.min_p)
    return torch.softmax(scores, dim=-1)


@pytest.mark.parametrize("spread", [0.5, 3.0, 30.0])  # flat (top-p sorts everything) to peaked
@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(),
        SamplingParams(temperature=1.3, top_k=0, top_p=0.9, min_p=0.0),
        SamplingParams(temperature=0.7, top_k=300, top_p=0.8, min_p=0.01),
        SamplingParams(temperature=1.0, top_k=5, top_p=1.0, min_p=0.2),
    ],
)
def test_fast_paths_give_the_reference_distribution(spread, params):
    logits = torch.randn(3, 2000, generator=make_generator(5)) * spread
    logits[1, 100:] = NEG_INF  # a row with fewer finite tokens than the others
    fast = next_token_probs(logits, params)
    assert torch.allclose(fast, reference_probs(logits, params), atol=1e-6)
    assert torch.allclose(fast.sum(dim=-1), torch.ones(3))


@settings(max_examples=200, deadline=None)
@given(
    data=logits_and_history(),
    params=params_strategy.filter(lambda p: 0.05 < p.temperature < 20),
)
def test_fast_paths_match_the_reference_for_any_logits(data, params):
    rows, _ = data
    logits = torch.tensor(rows)
    # Which of several tied tokens top-p keeps is unspecified, so no ties here: not in the
    # logits, and not in float32 probabilities either (0 and 1e-22 differ only as logits).
    for row in logits:
        finite = row[torch.isfinite(row)]
        assume(finite.unique().numel() == finite.numel())
        probs = torch.softmax(finite / params.temperature, dim=-1)
        probs = probs[probs > 1e-6]  # tokens that can matter to top-p
        assume(probs.unique().numel() == probs.numel())
    assert torch.allclose(
        next_token_probs(logits, params), reference_probs(logits, params), atol=1e-5
    )
