"""Weight-only int8 (`--quant int8`): lossy by design, so bounded against float32."""

from __future__ import annotations

import pytest
import torch

from gptcli.generate import Generation
from gptcli.loader import load_model
from gptcli.model import Linear
from gptcli.quant import Int8Linear, quantize_int8
from gptcli.sampling import SamplingParams
from gptcli.tokenizer import Tokenizer

from .conftest import FIXTURES, TINY

GREEDY = SamplingParams(temperature=0.0)


def test_int8_linear_error_is_within_the_rounding_bound():
    torch.manual_seed(0)
    layer = Linear(256, 96, bias=True)
    layer.weight.data.normal_(0, 0.05)
    layer.bias.data.normal_(0, 0.1)
    x = torch.randn(3, 5, 256)
    exact = layer(x)
    quant = Int8Linear(layer)
    got = quant(x)
    assert got.shape == exact.shape and got.dtype == torch.float32
    # Weight rounding: at most scale/2 per weight; bfloat16 input: 2^-8 relative. Their sum,
    # through a 256-long dot product, stays under 2% of the output's scale.
    assert (got - exact).abs().max() < 0.02 * exact.abs().max()
    assert quant.weight_int8.dtype == torch.int8
    assert quant.weight_int8.abs().max() == 127  # the largest weight of a row maps to ±127


def test_int8_rows_dequantize_the_tied_embedding():
    layer = Linear(16, 40, bias=False)
    layer.weight.data.normal_(0, 1.0)
    quant = Int8Linear(layer)
    ids = torch.tensor([[0, 7, 39]])
    exact = layer.rows(ids)
    scale = layer.weight.abs().amax(dim=0)[ids, None] / 127  # per row of the [out, in] view
    assert ((quant.rows(ids) - exact).abs() <= scale / 2 + 1e-7).all()


@pytest.mark.parametrize("name", TINY)
def test_tiny_models_stay_close(tiny_models, name):
    folder = tiny_models[name][1]
    ids = torch.tensor([[464, 3139, 286, 4881, 318, 6342, 13, 383]])
    exact = load_model(folder)(ids)
    quant = quantize_int8(load_model(folder))(ids)
    assert (exact - quant).abs().max() < 0.05 * exact.abs().max()


@pytest.mark.parametrize("name", TINY)
def test_greedy_choices_match_wherever_float32_is_decisive(tiny_models, name):
    # Random tiny models have near-flat logits, so whole greedy texts drift apart at near-ties.
    # Along float32's own greedy text, int8 must pick the same token at every step where
    # float32's best beats its runner-up by more than twice int8's largest error in that step.
    folder = tiny_models[name][1]
    exact, quant = load_model(folder), quantize_int8(load_model(folder))
    prompt = [464, 3139, 286, 4881, 318, 6342, 13, 383]
    text = prompt + list(Generation(exact, prompt, 32, GREEDY))
    ids = torch.tensor([text[:-1]])
    a, b = exact(ids)[0, len(prompt) - 1 :], quant(ids)[0, len(prompt) - 1 :]
    best2 = a.topk(2, dim=-1).values
    decisive = (best2[:, 0] - best2[:, 1]) > 2 * (a - b).abs().amax(dim=-1)
    assert decisive.sum() >= 4, "too few decisive steps for the check to mean anything"
    assert torch.equal(a.argmax(-1)[decisive], b.argmax(-1)[decisive])


def test_int8_needs_float32_weights(tiny_models):
    model = load_model(tiny_models["gpt2"][1], dtype=torch.bfloat16)
    with pytest.raises(Exception, match="--quant int8"):
        quantize_int8(model)


def test_default_model_perplexity_within_one_percent(default_model_dir):
    tokenizer = Tokenizer.from_dir(default_model_dir)
    ids = torch.tensor([tokenizer.encode((FIXTURES / "sample.txt").read_text())])
    assert ids.shape[1] > 300

    def perplexity(model) -> float:
        logits = model(ids)[0, :-1].float()
        return torch.nn.functional.cross_entropy(logits, ids[0, 1:]).exp().item()

    exact = perplexity(load_model(default_model_dir))
    quant = perplexity(quantize_int8(load_model(default_model_dir)))
    assert exact < 50, "the real model should find plain English text predictable"
    assert abs(quant - exact) / exact < 0.01, (exact, quant)
