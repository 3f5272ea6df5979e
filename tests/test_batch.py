"""`gptcli batch`: input parsing, batched rows equal to one-at-a-time generation, error records,
order, --resume and interruptions."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
import torch

from gptcli.batch import (
    BatchGenerator,
    Defaults,
    Line,
    LineError,
    Request,
    batch_memory_bytes,
    check_memory,
    detect_format,
    fitting_batch_size,
    make_request,
    parse_input,
    read_finished_ids,
    unescape,
)
from gptcli.config import ModelConfig
from gptcli.errors import GptcliError
from gptcli.generate import Generation
from gptcli.loader import load_model
from gptcli.sampling import SamplingParams, make_generator
from gptcli.tokenizer import StopFilter, StreamDecoder, Tokenizer

from .test_cli import GPTCLI, run

GREEDY = SamplingParams(temperature=0)
# Sampling over (almost) the whole vocabulary: any difference in the logits or in the order of
# draws from a row's generator would change the text.
WIDE = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
DEFAULTS = Defaults(max_new_tokens=16, params=GREEDY, seed=5)


# --- input ---------------------------------------------------------------------------------


def test_text_lines_ids_and_escapes():
    entries = parse_input("first\n\n  \nsecond\\nline \\\\n\r\nthird\\t!\n", "auto", DEFAULTS)
    assert [e.prompt for e in entries] == ["first", "second\nline \\n", "third\t!"]
    assert [e.id for e in entries] == [1, 4, 5]  # line numbers, blank lines skipped
    assert [e.index for e in entries] == [0, 1, 2]
    assert all(e.seed == 5 and e.max_new_tokens == 16 for e in entries)
    assert unescape(r"a\qb") == r"a\qb"  # unknown escapes stay as typed


def test_format_detection():
    assert detect_format('\n  {"prompt": "x"}\n') == "jsonl"
    assert detect_format("{not json but text}") == "jsonl"
    assert detect_format("plain\n{") == "text"
    # Forced text keeps a JSON-looking line as a prompt.
    (entry,) = parse_input('{"prompt": "x"}', "text", DEFAULTS)
    assert entry.prompt == '{"prompt": "x"}'


def test_jsonl_options_override_the_defaults():
    text = "\n".join(
        [
            '{"prompt": "a", "id": "q1", "max_new_tokens": 3, "temp": 0.5, "top_k": 7, '
            '"top_p": 0.9, "seed": 11, "stop": "."}',
            '{"prompt": "b", "stop": ["x", "y"]}',
        ]
    )
    first, second = parse_input(text, "auto", DEFAULTS)
    assert (first.id, first.max_new_tokens, first.seed, first.stops) == ("q1", 3, 11, (".",))
    assert first.params == SamplingParams(temperature=0.5, top_k=7, top_p=0.9, min_p=0.05)
    assert (second.id, second.params, second.stops) == (2, GREEDY, ("x", "y"))


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "line 1: invalid JSON"),
        ("[1, 2]", "line 1: expected a JSON object"),
        ('{"id": 3}', 'line 1: "prompt" (a string) is missing'),
        ('{"prompt": 5}', 'line 1: "prompt" (a string) is missing'),
        ('{"prompt": "a", "temp": -1}', "line 1: temp must be"),
        ('{"prompt": "a", "top_p": "high"}', "line 1: top_p must be"),
        ('{"prompt": "a", "max_new_tokens": 0}', "line 1: max_new_tokens must be"),
        ('{"prompt": "a", "seed": -7}', "line 1: seed must be"),
        ('{"prompt": "a", "stop": ""}', "line 1: "),
        ('{"prompt": "a", "stop": [1]}', "line 1: stop must be"),
        ('{"prompt": "a", "id": [1]}', "line 1: id must be"),
    ],
)
def test_bad_jsonl_lines_become_error_records(line, message):
    (entry,) = parse_input(line, "jsonl", DEFAULTS)
    assert isinstance(entry, LineError)
    assert entry.error.startswith(message)
    assert set(entry.record()) == {"id", "error"}


def test_duplicate_ids_are_refused_after_the_first():
    entries = parse_input('{"prompt": "a", "id": 1}\n{"prompt": "b", "id": 1}', "jsonl", DEFAULTS)
    assert isinstance(entries[0], Line)
    assert isinstance(entries[1], LineError)
    assert "duplicate id (first on line 1)" in entries[1].error
    # 1 and "1" are different ids, as JSON writes them.
    entries = parse_input('{"prompt": "a", "id": 1}\n{"prompt": "b", "id": "1"}', "jsonl", DEFAULTS)
    assert all(isinstance(e, Line) for e in entries)


def test_memory_check_names_a_batch_size_that_fits():
    config = ModelConfig(
        family="llama", vocab_size=49152, max_positions=8192, d_model=576, n_layer=30,
        n_head=9, n_kv_head=3, d_ff=1536, norm_eps=1e-5,
    )  # fmt: skip
    check_memory(config, torch.float32, 8, 100, 100, available=8 * 2**30)  # fits
    check_memory(config, torch.float32, 8, 100, 100, available=None)  # unknown: no check
    with pytest.raises(GptcliError, match=r"a batch of 64 .* try --batch-size \d+$"):
        check_memory(config, torch.float32, 64, 2000, 2000, available=6 * 2**30)
    with pytest.raises(GptcliError, match="lower -n or shorten the prompts"):
        check_memory(config, torch.float32, 4, 2000, 6000, available=2**28)
    # The default batch size shrinks to the largest that fits.
    assert fitting_batch_size(config, torch.float32, 32, 100, 100, available=None) == 32
    assert fitting_batch_size(config, torch.float32, 32, 100, 100, available=8 * 2**30) == 32
    fits = fitting_batch_size(config, torch.float32, 64, 2000, 2000, available=6 * 2**30)
    assert 1 <= fits < 64
    budget = 0.8 * 6 * 2**30
    assert batch_memory_bytes(config, torch.float32, fits, 2000, 2000) <= budget
    assert batch_memory_bytes(config, torch.float32, fits + 1, 2000, 2000) > budget
    assert fitting_batch_size(config, torch.float32, 4, 2000, 6000, available=2**28) == 0


# --- batched rows equal generating each prompt alone ------------------------------------------


PROMPTS = [
    "Hello",
    "The quick brown fox jumps over the lazy dog and keeps running",
    "A",
    "Once upon a time in a land far away",
    "1 2 3 4 5 6 7 8 9",
    "Why?",
    "Some words, some more words, and a few more",
]


def requests_for(tokenizer, config, params, max_new, prompts=PROMPTS, stops=()) -> list[Request]:
    requests = []
    for i, prompt in enumerate(prompts):
        n = max_new[i % len(max_new)]
        line = Line(i, i + 1, i + 1, prompt, n, params, 100 + i, tuple(stops))
        request = make_request(line, tokenizer, config, truncate=False)
        assert isinstance(request, Request)
        requests.append(request)
    return requests


def alone(model, tokenizer, request: Request, eos_ids=()) -> tuple[list[int], str, str]:
    """What `gptcli generate` gives for one request: ids, text and finish reason."""
    line = request.line
    generator = make_generator(line.seed, "cpu")
    generation = Generation(
        model, request.prompt_ids, line.max_new_tokens, line.params, generator, eos_ids
    )
    decoder, stop = StreamDecoder(tokenizer), StopFilter(line.stops)
    pieces, reason = [], None
    for token in generation:
        pieces.append(stop.push(decoder.push(token)))
        if stop.stopped:
            reason = "stop"
            break
    else:
        pieces.append(stop.push(decoder.flush()))
        reason = "stop" if stop.stopped else generation.finish_reason
        pieces.append(stop.flush())
    return generation.new_ids, "".join(pieces), reason


def batched(model, tokenizer, requests, batch_size, eos_ids=()) -> tuple[dict, BatchGenerator]:
    engine = BatchGenerator(model, tokenizer, batch_size, eos_ids)
    results = {r.request.line.index: r for r in engine.run(requests)}
    assert sorted(results) == list(range(len(requests)))
    return results, engine


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa-tied", "llama-untied"])
@pytest.mark.parametrize("params", [GREEDY, WIDE], ids=["greedy", "sampled"])
def test_each_row_equals_generating_it_alone(tiny_models, name, params):
    folder = tiny_models[name][1]
    model, tokenizer = load_model(folder), Tokenizer.from_dir(folder)
    # Mixed prompt lengths and budgets; 7 prompts in 3 rows, so finished rows are refilled.
    requests = requests_for(tokenizer, model.config, params, max_new=[9, 3, 14, 6])
    results, engine = batched(model, tokenizer, requests, batch_size=3)
    for request in requests:
        ids, text, reason = alone(model, tokenizer, request)
        result = results[request.line.index]
        assert list(result.new_ids) == ids
        assert (result.text, result.finish_reason) == (text, reason)
    assert engine.decode_steps < sum(r.line.max_new_tokens for r in requests)


def test_rows_stop_at_eos_and_stop_strings_as_alone(tiny_models):
    folder = tiny_models["llama-gqa-tied"][1]
    model, tokenizer = load_model(folder), Tokenizer.from_dir(folder)
    probe = requests_for(tokenizer, model.config, GREEDY, max_new=[12])
    first_ids = alone(model, tokenizer, probe[0])[0]
    eos = {first_ids[4]}  # a token the first prompt makes: it stops there
    stop_text = tokenizer.decode(alone(model, tokenizer, probe[1])[0][6:8])
    requests = requests_for(tokenizer, model.config, GREEDY, max_new=[12], stops=[stop_text])
    results, _ = batched(model, tokenizer, requests, batch_size=4, eos_ids=eos)
    reasons = set()
    for request in requests:
        ids, text, reason = alone(model, tokenizer, request, eos)
        result = results[request.line.index]
        assert (list(result.new_ids), result.text, result.finish_reason) == (ids, text, reason)
        reasons.add(reason)
    assert {"eos", "stop"} <= reasons


def test_padded_forward_matches_each_row_alone(tiny_models):
    """The model's left-padding path: per-row positions and masks give each row's own logits."""
    for name in ("gpt2", "llama-mqa"):
        model = load_model(tiny_models[name][1])
        rows = [[5, 6, 7, 8, 9], [11, 12], [13, 14, 15, 16]]
        longest = max(map(len, rows))
        pads = torch.tensor([longest - len(r) for r in rows])
        ids = torch.tensor([[0] * (longest - len(r)) + r for r in rows])  # [3, 5]
        cache = model.new_cache(len(rows), longest + 1)
        with torch.inference_mode():
            padded = model(ids, start=0, cache=cache, left_pad=pads)
            step = model(
                torch.tensor([[21], [22], [23]]), start=longest, cache=cache, left_pad=pads
            )
            for b, row in enumerate(rows):
                one = model(torch.tensor([row + [21 + b]]))  # [1, len + 1, vocab]
                torch.testing.assert_close(padded[b, -len(row) :], one[0, :-1], atol=1e-5, rtol=0)
                torch.testing.assert_close(step[b, 0], one[0, -1], atol=1e-5, rtol=0)


def test_default_model_rows_equal_generate(default_model_dir):
    model, tokenizer = load_model(default_model_dir), Tokenizer.from_dir(default_model_dir)
    prompts = [
        "The capital of France is",
        "Write a haiku about autumn leaves falling on a quiet river.",
        "def add(a, b):",
        "Three primary colours are",
        "In 1969, the first people to walk on the Moon",
    ]
    eos = set(model.config.eos_token_ids) | set(tokenizer.eos_ids)
    for params in (GREEDY, SamplingParams()):  # greedy, and gptcli's sampling defaults
        requests = requests_for(tokenizer, model.config, params, [20, 12], prompts)
        results, _ = batched(model, tokenizer, requests, batch_size=3, eos_ids=eos)
        for request in requests:
            ids, text, reason = alone(model, tokenizer, request, eos)
            result = results[request.line.index]
            assert (list(result.new_ids), result.text, result.finish_reason) == (ids, text, reason)


# --- the command -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tiny_models):
    return str(tiny_models["llama-gqa-tied"][1])


def batch_run(model, *args, input=b""):
    return run(["batch", "-m", model, *args], input=input)


def records(stdout: bytes) -> list[dict]:
    return [json.loads(line) for line in stdout.decode("utf-8").splitlines()]


def test_piped_text_in_order_with_every_field(tiny):
    prompts = ["Hello there", "A much longer prompt with quite a few more words in it", "Hi"]
    result = batch_run(tiny, "-n", "6", "--temp", "0", "-b", "2", input="\n".join(prompts).encode())
    assert result.returncode == 0, result.stderr.decode()
    out = records(result.stdout)
    assert [r["id"] for r in out] == [1, 2, 3]
    assert [r["prompt"] for r in out] == prompts
    for record in out:
        assert set(record) == {
            "id", "prompt", "text", "finish_reason", "prompt_tokens", "new_tokens", "seed"
        }  # fmt: skip
        assert (record["new_tokens"], record["finish_reason"]) == (6, "length")
    # Each record equals `gptcli generate` for that prompt.
    single = run(["generate", "-m", tiny, "--json", prompts[1], "-n", "6", "--temp", "0"])
    expected = json.loads(single.stdout)
    assert out[1]["text"] == expected["text"]
    assert out[1]["prompt_tokens"] == expected["prompt_tokens"]


def test_seeded_records_equal_generate_with_that_seed(tiny):
    lines = ['{"prompt": "Once", "seed": 3}', '{"prompt": "Twice upon", "seed": 4, "temp": 1.3}']
    result = batch_run(tiny, "-n", "10", input="\n".join(lines).encode())
    assert result.returncode == 0, result.stderr.decode()
    out = records(result.stdout)
    for record, temp in zip(out, ("0.8", "1.3"), strict=True):
        single = run(
            ["generate", "-m", tiny, "--json", record["prompt"], "-n", "10"]
            + ["-s", str(record["seed"]), "--temp", temp]
        )
        assert record["text"] == json.loads(single.stdout)["text"]


def test_bad_lines_become_error_records_and_exit_1(tiny, tmp_path):
    lines = [
        '{"prompt": "good one", "id": "a"}',
        "{oops",
        '{"id": "c"}',
        '{"prompt": "' + "word " * 200 + '", "id": "long"}',
        '{"prompt": "another good one", "id": "e", "top_k": -1}',
        '{"prompt": "last", "id": "f"}',
    ]
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(lines), encoding="utf-8")
    result = batch_run(tiny, str(source), "-n", "4", "--temp", "0")
    assert result.returncode == 1
    out = records(result.stdout)
    assert [r["id"] for r in out] == ["a", 2, "c", "long", "e", "f"]
    assert [("error" in r) for r in out] == [False, True, True, True, True, False]
    assert "too" in out[3]["error"] or "context" in out[3]["error"]
    assert "top_k" in out[4]["error"]
    assert b"4 of 6 prompts failed" in result.stderr
    assert b"Traceback" not in result.stderr


def test_resume_skips_finished_ids_and_repairs_a_cut_line(tiny, tmp_path):
    source = tmp_path / "in.txt"
    source.write_text("\n".join(f"prompt number {i}" for i in range(6)), encoding="utf-8")
    full = tmp_path / "full.jsonl"
    assert batch_run(tiny, str(source), "-o", str(full), "-n", "5", "-s", "1").returncode == 0
    expected = full.read_text(encoding="utf-8").splitlines()
    assert len(expected) == 6
    # A run that stopped after three results, in the middle of writing the fourth.
    partial = tmp_path / "partial.jsonl"
    partial.write_text("\n".join(expected[:3]) + "\n" + expected[3][:20], encoding="utf-8")
    assert read_finished_ids(partial) == {"1", "2", "3"}
    assert partial.read_text(encoding="utf-8").splitlines() == expected[:3]
    args = [str(source), "-o", str(partial), "--resume", "-n", "5", "-s", "1", "-v"]
    result = batch_run(tiny, *args)
    assert result.returncode == 0, result.stderr.decode()
    assert partial.read_text(encoding="utf-8").splitlines() == expected
    assert b"skipped" in result.stderr


def test_resume_refuses_a_file_that_is_not_batch_output(tiny, tmp_path):
    source = tmp_path / "in.txt"
    source.write_text("alpha\nbeta\n", encoding="utf-8")
    other = tmp_path / "notes.txt"
    other.write_text("precious line 1\nprecious line 2\n", encoding="utf-8")
    result = batch_run(tiny, str(source), "-o", str(other), "--resume", "-n", "2")
    assert result.returncode == 2
    assert f"--resume: line 1 of {other} is not a gptcli batch result" in result.stderr.decode()
    assert other.read_text(encoding="utf-8") == "precious line 1\nprecious line 2\n"
    # A cut line is only forgiven at the end; error records are dropped so they run again.
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": 1, "error": "x"}\n{"id": 2, "text": "t"}\n{"id": 3, "te', "utf-8")
    assert read_finished_ids(out) == {"2"}
    assert out.read_text(encoding="utf-8") == '{"id": 2, "text": "t"}\n'


def test_output_onto_the_input_is_refused(tiny, tmp_path):
    source = tmp_path / "in.txt"
    source.write_text("alpha\n", encoding="utf-8")
    result = batch_run(tiny, str(source), "-o", str(source), "-n", "2")
    assert result.returncode == 2
    assert b"is the input file" in result.stderr
    assert source.read_text(encoding="utf-8") == "alpha\n"


def test_unknown_jsonl_fields_are_carried_with_a_warning(tiny):
    lines = '{"prompt": "a", "max_tokens": 2, "answer": "x"}\n{"prompt": "b", "stop": ""}\n'
    result = batch_run(tiny, "-n", "3", "--temp", "0", input=lines.encode())
    assert result.returncode == 1
    stderr = result.stderr.decode()
    assert "warning: ignoring JSONL fields answer, max_tokens (the options" in stderr
    out = records(result.stdout)
    assert out[0]["new_tokens"] == 3
    assert out[1] == {
        "id": 2,
        "error": "line 2: stop must not be empty; give the text that should end generation",
    }


def test_interrupted_run_leaves_whole_json_lines(tiny, tmp_path):
    out = tmp_path / "out.jsonl"
    n_prompts = 3000  # far more than can finish before the interrupt
    prompts = "\n".join(f"Tell me about the number {i}." for i in range(n_prompts)).encode()
    proc = subprocess.Popen(
        [*GPTCLI, "batch", "-m", tiny, "-o", str(out), "-n", "100", "-b", "4", "--temp", "0"],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdin.write(prompts)
    proc.stdin.close()
    for _ in range(6000):  # wait until some results are out (a busy machine is slow)
        if out.exists() and out.read_bytes().count(b"\n") >= 2:
            break
        if proc.poll() is not None:
            break
        subprocess.run(["sleep", "0.1"])
    proc.send_signal(signal.SIGINT)
    stderr = proc.stderr.read()
    assert proc.wait(timeout=60) == 130
    assert b"Traceback" not in stderr
    data = out.read_bytes()
    assert data.endswith(b"\n")
    lines = [json.loads(line) for line in data.splitlines()]
    assert 2 <= len(lines) < n_prompts
    assert [r["id"] for r in lines] == list(range(1, len(lines) + 1))


@pytest.mark.parametrize(
    ("args", "stdin", "message"),
    [
        (["-b", "0"], b"x", "--batch-size"),
        (["--format", "csv"], b"x", "--format"),
        (["--resume"], b"x", "--resume needs -o"),
        (["-n", "0"], b"x", "--max-new-tokens"),
        (["--temp", "nan"], b"x", "--temp"),
        ([], b"\n  \n", "no prompts"),
        (["no-such-file.txt"], b"", "no-such-file.txt: no such file"),
        ([], b"bad \xff byte", "invalid UTF-8 at byte 4"),
    ],
)
def test_usage_errors_are_one_line(tiny, args, stdin, message):
    result = batch_run(tiny, *args, input=stdin)
    assert result.returncode == 2
    assert message in result.stderr.decode()
    assert len(result.stderr.decode().strip().splitlines()) == 1
    assert result.stdout == b""


def test_default_model_from_a_pipe(default_model_dir):
    shell = (
        f"printf 'The capital of France is\\nThe capital of Italy is\\n' | "
        f"{sys.executable} -m gptcli batch -m {default_model_dir} -n 2 --temp 0"
    )
    result = subprocess.run(["bash", "-c", shell], capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr.decode()
    assert [r["text"] for r in records(result.stdout)] == [" Paris.", " Rome."]
