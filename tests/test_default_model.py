"""The real default model (SmolLM2-135M-Instruct, converted by `make weights`) against HF
transformers loading the very same folder."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from gptcli.generate import Generation
from gptcli.loader import load_model
from gptcli.sampling import SamplingParams
from gptcli.tokenizer import Tokenizer

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "<|im_start|>user\nWhat is the boiling point of water?<|im_end|>\n<|im_start|>assistant\n",
    "Once upon a time, in a small village by the sea,",
    "Les trois couleurs du drapeau français sont",
    "1, 2, 3, 5, 8, 13,",
]


@pytest.fixture(scope="module")
def ours(default_model_dir):
    return load_model(default_model_dir), Tokenizer.from_dir(default_model_dir)


@pytest.fixture(scope="module")
def reference(default_model_dir):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        default_model_dir, dtype=torch.float32
    )
    return model.eval()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_32_tokens_equal_transformers(ours, reference, prompt):
    model, tokenizer = ours
    ids = tokenizer.encode(prompt)
    with torch.no_grad():
        out = reference.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=32,
            do_sample=False,
            eos_token_id=None,  # compare 32 whole tokens, EOS or not
            pad_token_id=2,
        )
    want = out[0, len(ids) :].tolist()
    got = list(Generation(model, ids, 32, SamplingParams(temperature=0.0)))
    assert got == want


def test_prompt_logits_match_transformers(ours, reference):
    model, tokenizer = ours
    ids = torch.tensor([tokenizer.encode(PROMPTS[3])])
    with torch.no_grad():
        want = reference(ids).logits
    assert (model(ids) - want).abs().max().item() < 1e-3


def test_paris_from_the_shell():
    result = subprocess.run(
        [sys.executable, "-m", "gptcli", "generate", "The capital of France is", "-n", "8",
         "--temp", "0"],
        capture_output=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode("utf-8").startswith(" Paris.")


def test_eos_ends_an_instruct_answer(ours):
    model, tokenizer = ours
    prompt = PROMPTS[2]
    gen = Generation(
        model, tokenizer.encode(prompt), 200, SamplingParams(temperature=0.0), eos_ids=[2]
    )
    text = tokenizer.decode(list(gen))
    assert gen.finish_reason == "eos"
    assert "100" in text and "<|im_end|>" not in text
