"""Shared fixtures: tiny random HF checkpoints saved with `save_pretrained`, and the real
default model folder when `make weights` has made it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
GPT2_BPE = FIXTURES / "gpt2-bpe"
DEFAULT_MODEL = ROOT / "weights" / "smollm2-135m-instruct"
VOCAB = 50257  # the real GPT-2 BPE vocabulary, so prompts tokenize as they would for real

# name -> (family, tied head, key/value heads)
TINY = {
    "gpt2": ("gpt2", True, 4),
    "llama-gqa-tied": ("llama", True, 2),
    "llama-untied": ("llama", False, 4),
    "llama-mqa": ("llama", False, 1),
}


def build_hf_model(family: str, tied: bool, kv_heads: int, seed: int = 0, vocab: int = VOCAB):
    import transformers

    torch.manual_seed(seed)
    if family == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=vocab, n_positions=128, n_embd=32, n_layer=2, n_head=4,
            bos_token_id=vocab - 1, eos_token_id=vocab - 1,
        )  # fmt: skip
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.LlamaConfig(
            vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=128,
            rope_theta=5000.0, rms_norm_eps=1e-5, tie_word_embeddings=tied,
            bos_token_id=vocab - 1, eos_token_id=vocab - 1,
        )  # fmt: skip
        model = transformers.LlamaForCausalLM(config)
    # Random init gives near-uniform logits; a larger scale makes greedy choices decisive.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    return model.eval()


def save_checkpoint(model, folder: Path) -> Path:
    model.save_pretrained(folder)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(GPT2_BPE / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, tuple[object, Path]]:
    """name -> (HF model, its saved folder) for every tiny configuration."""
    made = {}
    root = tmp_path_factory.mktemp("tiny")
    for i, (name, (family, tied, kv)) in enumerate(TINY.items()):
        hf = build_hf_model(family, tied, kv, seed=i)
        made[name] = (hf, save_checkpoint(hf, root / name))
    return made


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    if not (DEFAULT_MODEL / "config.json").is_file():
        pytest.fail(f"{DEFAULT_MODEL} is missing; run `make weights` (make test does)")
    return DEFAULT_MODEL
