"""`gptcli attention`, `gptcli info` and `gptcli perplexity`: their numbers against HF
transformers on the tiny models and the default model, and the commands as a user runs them."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gptcli.attention import (
    max_entropy_bits,
    record_attention,
    row_entropy_bits,
    summarize_head,
    summarize_layer,
)
from gptcli.info import model_info
from gptcli.loader import load_model
from gptcli.perplexity import Window, encode_text, make_windows, perplexity
from gptcli.tokenizer import Tokenizer

from .conftest import FIXTURES, TINY

GPTCLI = [sys.executable, "-m", "gptcli"]
SAMPLE = FIXTURES / "sample.txt"
PROMPT = "The quick brown fox jumps over the lazy dog, and the dog sleeps."


def run(args, input=b"", python_prefix=None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "GPTCLI_MODEL"}
    command = GPTCLI if python_prefix is None else [sys.executable, "-c", python_prefix]
    return subprocess.run([*command, *args], input=input, capture_output=True, env=env, timeout=300)


def hf_eager(folder: Path):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager")
    return model.eval()


def prompt_ids(folder: Path, text: str = PROMPT) -> list[int]:
    return encode_text(Tokenizer.from_dir(folder), text)


# --- attention -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(TINY))
def test_attention_matches_hf_eager(tiny_models, name):
    _, folder = tiny_models[name]
    ids = prompt_ids(folder)
    ours = record_attention(load_model(folder), ids)  # [L, H, T, T]
    with torch.no_grad():
        out = hf_eager(folder)(torch.tensor([ids]), output_attentions=True)
    theirs = torch.stack([a[0] for a in out.attentions])
    assert ours.shape == theirs.shape == (2, 4, len(ids), len(ids))
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["gpt2", "llama-mqa"])
def test_attention_rows_sum_to_one_and_are_causal(tiny_models, name):
    _, folder = tiny_models[name]
    model = load_model(folder)
    weights = record_attention(model, prompt_ids(folder))
    T = weights.shape[-1]
    torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]), atol=1e-6, rtol=0)
    above = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
    assert (weights[..., above] == 0).all()
    assert (weights[..., ~above] > 0).all()
    assert all(block.attn.weights is None for block in model.blocks)  # released


def test_head_kinds_on_known_patterns():
    T = 6
    previous = torch.zeros(T, T)
    previous[0, 0] = 1
    previous[torch.arange(1, T), torch.arange(T - 1)] = 1
    first = torch.zeros(T, T)
    first[:, 0] = 1
    same = torch.eye(T)
    even = torch.tril(torch.ones(T, T))
    even = even / even.sum(-1, keepdim=True)
    s = summarize_head(previous)
    assert (s.kind, s.previous, s.same, s.entropy_bits) == ("previous-token", 1.0, 0.0, 0.0)
    assert summarize_head(first).kind == "first-token"
    assert summarize_head(first).first == 1.0
    assert summarize_head(same).kind == "same-token"
    spread = summarize_head(even)
    assert spread.kind == "spread"
    assert spread.entropy_bits == pytest.approx(max_entropy_bits(T))
    assert spread.first == pytest.approx(sum(1 / (i + 1) for i in range(1, T)) / (T - 1))
    # Exactly half is not "mostly": the threshold is strict.
    half = 0.5 * same + 0.5 * first
    assert summarize_head(half).kind == "spread"
    assert [h.head for h in summarize_layer(torch.stack([same, first]))] == [0, 1]
    assert row_entropy_bits(torch.tensor([[0.5, 0.5, 0.0]])).item() == 1.0


def cli_json(args) -> dict:
    result = run(args)
    assert result.returncode == 0, result.stderr.decode()
    return json.loads(result.stdout)


def test_attention_cli_summary_and_json(tiny_models):
    hf, folder = tiny_models["llama-gqa-tied"]
    ids = prompt_ids(folder)
    record = cli_json(["attention", "-m", str(folder), PROMPT, "--layer", "1", "--json"])
    assert record["layer"] == 1
    assert [t["id"] for t in record["tokens"]] == ids
    assert "".join(t["text"] for t in record["tokens"]) == PROMPT
    weights = torch.tensor(record["weights"])
    assert weights.shape == (4, len(ids), len(ids))
    with torch.no_grad():
        out = hf_eager(folder)(torch.tensor([ids]), output_attentions=True)
    torch.testing.assert_close(weights, out.attentions[1][0], atol=2e-6, rtol=0)
    expected = [s.record() for s in summarize_layer(out.attentions[1][0].float())]
    assert [h["kind"] for h in record["heads"]] == [h["kind"] for h in expected]
    for got, want in zip(record["heads"], expected, strict=True):
        assert got["entropy_bits"] == pytest.approx(want["entropy_bits"], abs=1e-4)

    shown = run(["attention", "-m", str(folder), PROMPT, "--layer", "1", "--head", "2"])
    assert shown.returncode == 0, shown.stderr.decode()
    text = shown.stdout.decode()
    assert f"layer 1 · {len(ids)} tokens · head 2 · {record['heads'][2]['kind']}" in text
    assert "entropy bits" in text and "\x1b" not in text
    for h in record["heads"]:
        assert f"│ {h['head']:>4} │ {h['kind']}" in text
    assert "␣quick" in text  # tokens label the rows


def test_attention_views_escape_and_cap(tiny_models):
    folder = str(tiny_models["gpt2"][1])
    tricky = "[bold]x[/bold] \x1b[31m " + "word " * 50
    result = run(["attention", "-m", folder, tricky, "--all-heads"])
    assert result.returncode == 0, result.stderr.decode()
    out = result.stdout.decode()
    # Tokens "[", "bold", "]", "x", "[/": printed as text, never taken as Rich markup.
    assert "0:[ 1:bold 2:] 3:x 4:[/ 5:bold" in out
    assert "8:\\x1b" in out and "\x1b" not in out
    assert "head 3" in out
    assert b"showing the first 40 of" in result.stderr
    too_long = run(["attention", "-m", folder, "word " * 199 + "word"])
    assert too_long.returncode == 2
    assert b"the prompt has 200 tokens; attention takes at most 128" in too_long.stderr
    mean = run(["attention", "-m", folder, "Hello there", "--mean"])
    assert mean.returncode == 0 and "mean over heads" in mean.stdout.decode()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--layer", "2"], "--layer 2 is out of range: this model has layers 0..1"),
        (["--layer", "-1"], "--layer -1 is out of range: this model has layers 0..1"),
        (["--head", "4"], "--head 4 is out of range: this model has heads 0..3"),
        (["--head", "1", "--mean"], "choose one"),
    ],
)
def test_attention_out_of_range_is_a_usage_error(tiny_models, args, message):
    result = run(["attention", "-m", str(tiny_models["gpt2"][1]), "Hi there", *args])
    assert result.returncode == 2
    assert message in result.stderr.decode()
    assert b"Traceback" not in result.stderr and result.stdout == b""


def test_attention_png(tiny_models, tmp_path):
    # matplotlib is in the [test] extra (it is the optional [png] extra for users).
    folder = str(tiny_models["llama-untied"][1])
    path = tmp_path / "heads.png"
    result = run(["attention", "-m", folder, "A $dollar$ and a [tag]", "--all-heads", "--png", str(path)])  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 5000
    bad = run(["attention", "-m", folder, "Hi", "--png", str(tmp_path / "nope" / "x.png")])
    assert bad.returncode == 2 and b"--png" in bad.stderr
    # Refused before anything runs: a folder, and a name matplotlib would not write as named.
    for target, message in ((tmp_path, b"is a folder"), (tmp_path / "a.txt", b"ending in .png")):
        bad = run(["attention", "-m", folder, "Hi", "--png", str(target)])
        assert (bad.returncode, bad.stdout) == (2, b"")
        assert message in bad.stderr
    svg = tmp_path / "heads.svg"
    assert run(["attention", "-m", folder, "Hi", "--png", str(svg)]).returncode == 0
    assert svg.read_bytes().lstrip().startswith(b"<?xml")


def test_attention_png_without_matplotlib_says_what_to_install(tiny_models, tmp_path):
    block = (
        "import sys; sys.modules['matplotlib'] = None; sys.argv = ['gptcli', *sys.argv[1:]]\n"
        "from gptcli.cli import main; main()"
    )
    args = ["attention", "-m", str(tiny_models["gpt2"][1]), "Hi", "--png", str(tmp_path / "a.png")]
    result = run(args, python_prefix=block)
    assert result.returncode == 1
    assert "pip install 'gptcli[png]'" in result.stderr.decode()
    assert len(result.stderr.decode().strip().splitlines()) == 1


# --- info ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(TINY))
def test_info_on_tiny_models_is_exact(tiny_models, name):
    hf, folder = tiny_models[name]
    family, tied, kv = TINY[name]
    info = model_info(folder, "float32", "cpu")
    assert info["parameters"] == hf.num_parameters()
    assert (info["family"], info["layers"], info["heads"], info["kv_heads"]) == (family, 2, 4, kv)
    assert (info["head_size"], info["hidden_size"], info["context"]) == (8, 32, 128)
    assert info["mlp_size"] == (128 if family == "gpt2" else 48)
    assert info["vocab_size"] == 50257 and info["tied_embeddings"] is tied
    assert info["dtype_on_disk"] == "float32"
    assert info["file_bytes"] == (folder / "model.safetensors").stat().st_size
    assert info["kv_cache_bytes_per_token"] == {"float32": 2 * 2 * kv * 8 * 4}
    assert info["bos"] == {"id": 50256, "text": "<|endoftext|>"}
    assert info["eos"] == [{"id": 50256, "text": "<|endoftext|>"}]
    assert info["chat_template"] is False
    half = model_info(folder, "bfloat16", "cuda")["kv_cache_bytes_per_token"]
    assert half == {"float32": 2 * 2 * kv * 8 * 4, "bfloat16": 2 * 2 * kv * 8 * 2}


def test_info_on_the_default_model(default_model_dir):
    record = cli_json(["info", "-m", str(default_model_dir), "--json"])
    assert record["parameters"] == 134_515_008  # = LlamaForCausalLM.num_parameters()
    assert {k: record[k] for k in ("layers", "heads", "kv_heads", "head_size")} == {
        "layers": 30, "heads": 9, "kv_heads": 3, "head_size": 64
    }  # fmt: skip
    assert (record["hidden_size"], record["mlp_size"], record["context"]) == (576, 1536, 8192)
    assert record["vocab_size"] == record["tokenizer_vocab_size"] == 49152
    assert record["dtype_on_disk"] == "float32" and record["tied_embeddings"] is True
    assert record["file_bytes"] == (default_model_dir / "model.safetensors").stat().st_size
    assert record["kv_cache_bytes_per_token"]["float32"] == 2 * 30 * 3 * 64 * 4 == 46080
    assert record["bos"] == {"id": 1, "text": "<|im_start|>"}
    assert record["eos"][0] == {"id": 2, "text": "<|im_end|>"}
    assert record["chat_template"] is True
    table = run(["info", "-m", str(default_model_dir)])
    assert table.returncode == 0
    assert "134,515,008" in table.stdout.decode() and table.stderr == b""


def test_info_does_not_load_weights(tiny_models, monkeypatch):
    import gptcli.loader

    def refuse(*args, **kwargs):
        raise AssertionError("info loaded the weights")

    monkeypatch.setattr(gptcli.loader, "load_model", refuse)
    monkeypatch.setattr(gptcli.loader, "_read_state", refuse)
    assert model_info(tiny_models["gpt2"][1], "float32", "cpu")["parameters"] > 0


# --- perplexity ------------------------------------------------------------------------------


def test_windows_score_every_token_once():
    for n, c, s in [(10, 4, 2), (100, 32, 16), (33, 8, 3), (7, 16, 8), (50, 10, 1)]:
        windows = make_windows(n, c, s)
        scored = [p for w in windows for p in range(w.first_scored, w.end)]
        assert scored == list(range(1, n)), (n, c, s)
        assert all(w.end - w.begin <= c and w.begin < w.first_scored for w in windows)
        assert windows[-1].end == n
    # stride = context: disjoint windows, each window's first token unscored (as HF's guide).
    assert make_windows(10, 4, 4) == [Window(0, 4, 1), Window(4, 8, 5), Window(8, 10, 9)]


def hf_strided_nll(hf, ids: list[int], context: int, stride: int) -> tuple[float, int]:
    """The guide's loop: HF's mean loss per window, weighted by the tokens it scored."""
    total, count = 0.0, 0
    for w in make_windows(len(ids), context, stride):
        x = torch.tensor([ids[w.begin : w.end]])
        labels = x.clone()
        labels[:, : w.first_scored - w.begin] = -100
        with torch.no_grad():
            loss = hf(x, labels=labels).loss.item()
        total += loss * w.scored
        count += w.scored
    return total / count, count


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa-tied"])
def test_perplexity_matches_hf_on_tiny_models(tiny_models, name):
    hf, folder = tiny_models[name]
    ids = prompt_ids(folder, SAMPLE.read_text(encoding="utf-8"))[:200]
    result = perplexity(load_model(folder), ids, 48, 20)
    nll, count = hf_strided_nll(hf, ids, 48, 20)
    assert result.tokens_scored == count == len(ids) - 1
    assert result.windows == len(make_windows(len(ids), 48, 20))
    assert result.nll_mean == pytest.approx(nll, rel=1e-4)
    assert result.ppl == pytest.approx(math.exp(nll), rel=1e-4)


def test_perplexity_matches_hf_on_the_default_model(default_model_dir):
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(default_model_dir).eval()
    ids = prompt_ids(default_model_dir, SAMPLE.read_text(encoding="utf-8"))[:320]
    result = perplexity(load_model(default_model_dir), ids, 128, 64)
    nll, count = hf_strided_nll(hf, ids, 128, 64)
    assert (result.tokens_scored, result.windows) == (count, 4)
    assert result.nll_mean == pytest.approx(nll, rel=1e-4)
    assert 1 < result.ppl < 100  # a real model on plain English


def test_perplexity_cli(tiny_models, tmp_path):
    folder = str(tiny_models["llama-untied"][1])
    ids = prompt_ids(Path(folder), SAMPLE.read_text(encoding="utf-8").removesuffix("\n"))
    record = cli_json(["perplexity", str(SAMPLE), "-m", folder, "-c", "64", "--json"])
    assert (record["context"], record["stride"]) == (64, 32)
    assert record["tokens_scored"] == len(ids) - 1
    assert record["windows"] == len(make_windows(len(ids), 64, 32))
    assert record["ppl"] == pytest.approx(math.exp(record["nll_mean"]))
    assert record["stderr"] > 0 and record["quant"] == "none"
    text = run(["perplexity", "-", "-m", folder, "-c", "64"], input=SAMPLE.read_bytes())
    assert text.returncode == 0, text.stderr.decode()
    assert text.stdout.decode().startswith(f"perplexity {record['ppl']:.4f} ± ")
    assert b"standard error" in text.stderr
    int8 = cli_json(["perplexity", str(SAMPLE), "-m", folder, "-c", "64", "--quant", "int8", "--json"])  # fmt: skip
    assert int8["quant"] == "int8" and int8["tokens_scored"] == record["tokens_scored"]
    assert int8["ppl"] == pytest.approx(record["ppl"], rel=0.05)
    bf16 = cli_json(["perplexity", str(SAMPLE), "-m", folder, "-c", "64", "--dtype", "bfloat16", "--json"])  # fmt: skip
    assert bf16["dtype"] == "bfloat16"
    assert bf16["ppl"] == pytest.approx(record["ppl"], rel=0.05)


@pytest.mark.parametrize(
    ("args", "text", "message"),
    [
        (["-c", "1"], "some words here", "-c/--context must be at least 2, got 1"),
        (["-c", "129"], "some words here", "-c/--context 129 is larger than the model's context of 128"),
        (["--stride", "0"], "some words here", "--stride must be between 1 and -c/--context (512), got 0"),
        (["-c", "16", "--stride", "17"], "some words", "--stride must be between 1 and -c/--context (16), got 17"),
        (["-c", "16", "--quant", "int4"], "some words", "--quant: choose none or int8"),
        (["-c", "16", "--quant", "int8", "--dtype", "bfloat16"], "some words", "--dtype float32"),
        (["-c", "16"], "", "is empty"),
        (["-c", "16"], "  \n", "is empty"),
        (["-c", "16"], "Hello", "has only 1 token"),
    ],
)  # fmt: skip
def test_perplexity_usage_errors(tiny_models, tmp_path, args, text, message):
    path = tmp_path / "text.txt"
    path.write_text(text, encoding="utf-8")
    result = run(["perplexity", str(path), "-m", str(tiny_models["gpt2"][1]), *args])
    assert result.returncode == 2, result.stderr.decode()
    assert message in result.stderr.decode()
    assert b"Traceback" not in result.stderr and result.stdout == b""
