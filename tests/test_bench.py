"""`gptcli bench` on tiny models (run as a subprocess, as a user runs it), and the GGUF writer
of benchmarks/compare.py. Nothing here asserts a speed: only that the numbers are there, are
positive, and count the right tokens."""

from __future__ import annotations

import csv
import io
import itertools
import json
import re
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from benchmarks.gguf_writer import permute_rows, write_gguf
from gptcli.bench import BenchConfig, row_fields, run_bench
from gptcli.convert import convert_gguf

from .conftest import ROOT
from .test_cli import run
from .test_convert import llama_cpp_permute

RATES = ("prefill_tok_s", "decode_tok_s", "ttft_ms", "load_s", "peak_mem_mb", "decode_gb_s")


def readme_fields() -> list[str]:
    """Field names listed in the README's table of `gptcli bench` JSON fields."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("<!-- bench fields -->")[1].split("<!-- /bench fields -->")[0]
    return re.findall(r"^\| `(\w+)` \|", section, flags=re.M)


def bench(model: Path, *args: str, expect: int = 0) -> str:
    result = run(["bench", "-m", str(model), *args])
    assert result.returncode == expect, result.stderr.decode()
    return result.stdout.decode()


@pytest.fixture(scope="module")
def tiny(tiny_models) -> Path:
    return tiny_models["llama-gqa-tied"][1]


@pytest.fixture(scope="module")
def one_row(tiny) -> dict:
    rows = json.loads(bench(tiny, "-p", "8", "-n", "4", "-r", "2", "-o", "json"))
    assert isinstance(rows, list) and len(rows) == 1
    return rows[0]


def test_json_has_every_documented_field(one_row):
    documented = readme_fields()
    assert documented, "the README lost its bench fields table"
    assert sorted(one_row) == sorted(documented) == sorted(row_fields())


def test_json_values_are_sane(one_row, tiny):
    r = one_row
    assert (r["n_prompt"], r["n_gen"], r["batch"], r["repetitions"]) == (8, 4, 1, 2)
    assert (r["prompt_tokens"], r["gen_tokens"]) == (8, 4)
    assert r["model"] == str(tiny) and r["family"] == "llama"
    assert (r["dtype"], r["quant"], r["compile"], r["device"]) == ("float32", "none", False, "cpu")
    for key in RATES:
        assert r[key] > 0, key
        assert r.get(f"{key}_std", 0) >= 0
    assert r["params"] > 0 and r["weights_mb"] > 0 and r["kv_read_mb"] > 0
    assert r["cores"] >= 1 and r["threads"] >= 1 and r["cpu"] and r["torch"]


def test_every_combination_is_a_row(tiny_models):
    model = tiny_models["gpt2"][1]
    out = bench(model, "-p", "4,8", "-n", "2,3", "--batch", "1,2", "-r", "1", "-o", "json")
    rows = json.loads(out)
    combos = {(r["batch"], r["n_prompt"], r["n_gen"]) for r in rows}
    assert len(rows) == 8 and combos == set(itertools.product([1, 2], [4, 8], [2, 3]))
    for r in rows:
        assert r["prompt_tokens"] == r["n_prompt"] * r["batch"]
        assert r["gen_tokens"] == r["n_gen"] * r["batch"]
        assert r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0


def test_csv_markdown_and_plain_table(tiny):
    args = ["-p", "8", "-n", "2", "-r", "1", "--batch", "1,2"]
    rows = list(csv.DictReader(io.StringIO(bench(tiny, *args, "-o", "csv"))))
    assert len(rows) == 2 and list(rows[0]) == row_fields()
    assert [int(r["prompt_tokens"]) for r in rows] == [8, 16]
    assert all(float(r["decode_tok_s"]) > 0 for r in rows)

    md = bench(tiny, *args, "-o", "md").splitlines()
    table = [line for line in md if line.startswith("|")]
    assert len(table) == 4  # header, alignment, two rows
    widths = {len(line.strip("|").split(" | ")) for line in table}
    assert len(widths) == 1
    assert "decode tok/s" in table[0] and set(table[1]) <= set("|-: ")
    assert "cores" in md[0] and "threads" in md[0]  # the machine, above the table

    plain = bench(tiny, *args)  # stdout is a pipe: a plain table, no escape codes
    assert "\x1b" not in plain
    lines = plain.splitlines()
    assert "cores" in lines[0] and any("decode tok/s" in line for line in lines)
    assert sum(1 for line in lines if line.startswith(tiny.name)) == 2


def test_progress_callback_counts_every_repetition(tiny):
    calls = []
    config = BenchConfig(tiny, n_prompt=(4,), n_gen=(2,), batch=(1, 3), repetitions=2)
    rows = run_bench(config, lambda done, total, what: calls.append((done, total)))
    assert len(rows) == 2 and rows[1].batch == 3
    assert calls == [(i, 6) for i in range(1, 7)]  # (1 warm-up + 2) x 2 rows
    assert all(len(r.samples["decode_s"]) == 2 for r in rows)


@pytest.mark.parametrize(
    "args, option",
    [
        (["-p", "0"], "-p/--n-prompt"),
        (["-p", "8,x"], "-p/--n-prompt"),
        (["-n", "-3"], "-n/--n-gen"),
        (["--batch", "1,,2"], "--batch"),
        (["-r", "0"], "-r/--repetitions"),
        (["--threads", "0"], "--threads"),
        (["--dtype", "float64"], "--dtype"),
        (["--quant", "int4"], "--quant"),
        (["-o", "xml"], "-o/--output"),
        (["--device", "tpu"], "--device"),
        (["-p", "100", "-n", "64"], "-p"),  # the tiny model's context is 128
        (["-r", "two"], "-r"),
    ],
)
def test_bad_values_exit_2_naming_the_option(tiny, args, option):
    result = run(["bench", "-m", str(tiny), *args])
    err = result.stderr.decode()
    assert result.returncode == 2, err
    assert option in err and "Traceback" not in err
    assert result.stdout == b""


# --- benchmarks/gguf_writer.py ------------------------------------------------------------


def test_permutation_is_llama_cpps():
    w = np.arange(8 * 64 * 3, dtype=np.float32).reshape(8 * 64, 3)
    assert np.array_equal(permute_rows(w, 8), llama_cpp_permute(w, 8))


@pytest.mark.parametrize("name", ["llama-gqa-tied", "llama-untied", "gpt2"])
def test_gguf_writer_round_trips_through_convert(tiny_models, tmp_path, name):
    """Our HF folder -> GGUF F32 -> `gptcli convert` -> the same tensors, bit for bit. For
    Llama this proves the q/k permutation is the inverse of convert's un-permutation."""
    folder = tiny_models[name][1]
    back = convert_gguf(write_gguf(folder, tmp_path / "tiny.gguf"), tmp_path / "back")
    original = load_file(folder / "model.safetensors")
    converted = load_file(back / "model.safetensors")
    assert set(converted) == set(original)
    for key, values in converted.items():
        assert np.array_equal(values, original[key]), key
