"""Our GPT against HF transformers on tiny random checkpoints of both families."""

from __future__ import annotations

import pytest
import torch

from gptcli.generate import Generation
from gptcli.loader import load_model
from gptcli.sampling import SamplingParams

from .conftest import TINY

GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randint(0, 50257, (2, 24))


@pytest.mark.parametrize("name", TINY)
def test_logits_match_transformers(tiny_models, ids, name):
    hf, folder = tiny_models[name]
    ours = load_model(folder)
    with torch.no_grad():
        want = hf(ids).logits
    got = ours(ids)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() < 1e-4


@pytest.mark.parametrize("name", TINY)
def test_greedy_32_tokens_match_transformers(tiny_models, ids, name):
    hf, folder = tiny_models[name]
    ours = load_model(folder)
    prompt = ids[0, :9].tolist()
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([prompt]),
            max_new_tokens=32,
            min_new_tokens=32,
            do_sample=False,
            pad_token_id=0,
        )
    want = out[0, len(prompt) :].tolist()
    got = list(Generation(ours, prompt, 32, GREEDY))
    assert got == want
    assert len(set(got)) > 1, "a degenerate continuation would prove little"


@pytest.mark.parametrize("name", TINY)
def test_cached_steps_equal_full_forward(tiny_models, ids, name):
    model = load_model(tiny_models[name][1])
    full = model(ids)
    cache = model.new_cache(batch=2, max_len=ids.shape[1])
    steps = [model(ids[:, :7], start=0, cache=cache)]  # prefill 7
    steps.append(model(ids[:, 7:12], start=7, cache=cache))  # a chunk: 5 queries, 12 keys
    for t in range(12, ids.shape[1]):  # then one token at a time
        steps.append(model(ids[:, t : t + 1], start=t, cache=cache))
    assert (torch.cat(steps, dim=1) - full).abs().max().item() < 1e-5


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa-tied"])
def test_textbook_attention_equals_fast_path(tiny_models, ids, name):
    model = load_model(tiny_models[name][1])
    fast = model(ids)
    textbook = model(ids, record_attention=True)
    assert (fast - textbook).abs().max().item() < 1e-5
    weights = model.blocks[0].attn.weights  # [B, H, T, T]
    assert weights.shape == (2, 4, 24, 24)
    assert torch.allclose(weights.sum(-1), torch.ones(2, 4, 24))
    assert weights.triu(diagonal=1).abs().max().item() == 0.0  # nothing from the future


def test_last_only_equals_last_row(tiny_models, ids):
    model = load_model(tiny_models["llama-gqa-tied"][1])
    # The head's product over one row and over all rows may be blocked differently by the CPU's
    # kernels (bit-equal on some CPUs, not on others), so equal up to float32 rounding.
    last, full = model(ids, last_only=True)[:, -1], model(ids)[:, -1]
    torch.testing.assert_close(last, full, atol=1e-5, rtol=0)


def test_bfloat16_is_close_to_float32(tiny_models, ids):
    folder = tiny_models["llama-untied"][1]
    exact = load_model(folder)(ids)
    half = load_model(folder, dtype=torch.bfloat16)(ids)
    assert half.dtype == torch.bfloat16
    assert torch.isfinite(half).all()
    assert (half.float() - exact).abs().max().item() < 0.25 * exact.abs().max().item()


def test_positions_past_context_are_refused(tiny_models):
    model = load_model(tiny_models["gpt2"][1])
    with pytest.raises(ValueError, match="exceed"):
        model(torch.zeros(1, 129, dtype=torch.long))


def test_generation_stops_at_eos_and_length(tiny_models, ids):
    model = load_model(tiny_models["gpt2"][1])
    prompt = ids[0, :5].tolist()
    free = list(Generation(model, prompt, 6, GREEDY))
    assert len(free) == 6
    gen = Generation(model, prompt, 6, GREEDY, eos_ids=[free[2]])
    assert list(gen) == free[: free.index(free[2])]
    assert gen.finish_reason == "eos"
    gen = Generation(model, prompt, 6, GREEDY)
    list(gen)
    assert gen.finish_reason == "length"


def test_generation_stops_at_context_end(tiny_models):
    model = load_model(tiny_models["llama-untied"][1])
    gen = Generation(model, list(range(120)), 50, GREEDY)
    assert len(list(gen)) == 9  # positions 120..127 fed, the 9th token ends the context
    assert gen.finish_reason == "context"
