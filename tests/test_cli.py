"""The command run as a user runs it: a subprocess, with pipes, files and bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from .conftest import DEFAULT_MODEL

GPTCLI = [sys.executable, "-m", "gptcli"]


def run(args, input=None, env=None, **kw) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    full_env.pop("GPTCLI_MODEL", None) if env is None or "GPTCLI_MODEL" not in env else None
    return subprocess.run(
        GPTCLI + args,
        input=input if input is not None else b"",
        capture_output=True,
        env=full_env,
        timeout=120,
        **kw,
    )


@pytest.fixture(scope="module")
def tiny(tiny_models):
    return str(tiny_models["gpt2"][1])


def generate_json(model, *args, input=b"") -> dict:
    result = run(["generate", "-m", model, "--json", *args], input=input)
    assert result.returncode == 0, result.stderr.decode()
    return json.loads(result.stdout)


def test_help_answers_without_importing_torch():
    code = (
        "import sys; sys.argv = ['gptcli', 'generate', '--help']\n"
        "from gptcli import cli\n"
        "try:\n    cli.main()\nexcept SystemExit:\n    pass\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "--max-new-tokens" in out.stdout
    assert out.stdout.strip().endswith("NO-TORCH")


def test_json_record_has_every_field(tiny):
    record = generate_json(tiny, "Hello world", "-n", "5", "--temp", "0")
    assert record["prompt"] == "Hello world"
    assert record["prompt_tokens"] == 2
    assert record["new_tokens"] == 5
    assert record["finish_reason"] == "length"
    assert isinstance(record["seed"], int)
    assert record["text"]
    assert set(record["timings"]) == {
        "load_s", "prefill_s", "decode_s", "prompt_tokens_per_s", "tokens_per_s"
    }  # fmt: skip
    assert all(v > 0 for v in record["timings"].values())


def test_stdin_comes_first_then_the_argument(tiny):
    record = generate_json(tiny, "second", "-n", "1", input=b"first\n")
    assert record["prompt"] == "first\nsecond"


def test_prompt_from_file_and_from_dash(tiny, tmp_path):
    path = tmp_path / "prompt.txt"
    path.write_text("From a file\n", encoding="utf-8")
    assert generate_json(tiny, "-f", str(path), "-n", "1")["prompt"] == "From a file"
    assert generate_json(tiny, "-f", "-", "-n", "1", input=b"From stdin")["prompt"] == "From stdin"


def test_same_seed_same_text(tiny):
    a = generate_json(tiny, "Once", "-n", "12", "-s", "7")
    b = generate_json(tiny, "Once", "-n", "12", "-s", "7")
    c = generate_json(tiny, "Once", "-n", "12", "-s", "8")
    assert a["text"] == b["text"]
    assert a["seed"] == 7
    assert c["text"] != a["text"]


def test_streamed_text_equals_json_text_and_has_no_escapes(tiny):
    args = ["generate", "-m", tiny, "Rich [bold]markup[/bold] \x1b[31m", "-n", "20", "--temp", "0"]
    streamed = run([*args, "-v"])
    assert streamed.returncode == 0
    record = generate_json(tiny, "Rich [bold]markup[/bold] \x1b[31m", "-n", "20", "--temp", "0")
    assert streamed.stdout.decode("utf-8") == record["text"]
    assert b"\x1b" not in streamed.stdout
    assert b"\x1b" not in streamed.stderr
    assert b"tok/s" in streamed.stderr  # -v stats went to stderr


def test_stop_string_ends_output_before_it(tiny):
    full = generate_json(tiny, "The", "-n", "30", "--temp", "0")["text"]
    stop = full[len(full) // 2 : len(full) // 2 + 4]
    cut = generate_json(tiny, "The", "-n", "30", "--temp", "0", "--stop", stop)
    assert cut["text"] == full[: full.index(stop)]
    assert cut["finish_reason"] == "stop"


def test_context_policy_refuses_then_truncates(tiny):
    long_prompt = "word " * 120
    refused = run(["generate", "-m", tiny, long_prompt, "-n", "20"])
    assert refused.returncode == 2
    assert b"--truncate" in refused.stderr
    record = generate_json(tiny, long_prompt, "-n", "20", "--truncate", "--temp", "0")
    assert record["prompt_tokens"] == 108  # 128 positions - 20 new tokens
    assert record["new_tokens"] == 20


def test_closed_pipe_ends_quietly(tiny):
    shell = f"{sys.executable} -m gptcli generate -m {tiny} Hi -n 100 --temp 0 | head -c 3"
    result = subprocess.run(["bash", "-c", f"set -o pipefail; {shell}"], capture_output=True)
    assert len(result.stdout) == 3
    assert result.stderr == b""
    assert result.returncode == 0


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--temp", "-1"], 2, "--temp"),
        (["--temp", "nan"], 2, "--temp"),
        (["--top-p", "1.5"], 2, "--top-p"),
        (["--top-k", "-3"], 2, "--top-k"),
        (["--min-p", "2"], 2, "--min-p"),
        (["--repeat-penalty", "0"], 2, "--repeat-penalty"),
        (["-n", "0"], 2, "--max-new-tokens"),
        (["-s", "-5"], 2, "--seed"),
        (["--stop", ""], 2, "--stop"),
        (["--device", "tpu"], 2, "--device"),
        (["--dtype", "int3"], 2, "--dtype"),
        (["-f", "/nonexistent/prompt.txt"], 2, "/nonexistent/prompt.txt"),
        (["-n", "many"], 2, "--max-new-tokens"),
    ],
)
def test_bad_options_exit_2_naming_the_option(tiny, args, code, message):
    result = run(["generate", "-m", tiny, "Hi", *args])
    assert result.returncode == code, result.stderr.decode()
    assert message.encode() in result.stderr
    assert b"Traceback" not in result.stderr
    assert result.stdout == b""


def test_cuda_on_a_machine_without_it(tiny):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the refusal cannot be seen here")
    result = run(["generate", "-m", tiny, "Hi", "--device", "cuda"])
    assert result.returncode == 2
    assert b"--device cuda: CUDA is not available" in result.stderr


def test_missing_model_folder_is_one_line_exit_1(tmp_path):
    result = run(["generate", "-m", str(tmp_path / "nope"), "Hi"])
    assert result.returncode == 1
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and str(tmp_path / "nope") in lines[0]


def test_invalid_utf8_names_the_byte(tiny):
    result = run(["generate", "-m", tiny, "-n", "1"], input=b"ok \xff bad")
    assert result.returncode == 2
    assert b"stdin: invalid UTF-8 at byte 3" in result.stderr


def test_no_prompt_on_a_terminal_is_a_usage_error(tiny):
    primary, secondary = os.openpty()
    try:
        result = subprocess.run(
            GPTCLI + ["generate", "-m", tiny], stdin=secondary, capture_output=True, timeout=60
        )
    finally:
        os.close(primary)
        os.close(secondary)
    assert result.returncode == 2
    assert b"no prompt" in result.stderr


def test_default_model_from_env_var(tiny):
    result = run(["generate", "Hi", "-n", "2", "--json"], env={"GPTCLI_MODEL": tiny})
    assert result.returncode == 0
    assert json.loads(result.stdout)["model"] == tiny


def test_ctrl_c_keeps_text_and_exits_130(default_model_dir):
    proc = subprocess.Popen(
        GPTCLI
        + ["generate", "Here is a list of 100 fruits: 1. Apple, 2.", "-n", "256", "--temp", "0"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    first = proc.stdout.read(8)  # some text has streamed: we are decoding
    assert len(first) == 8
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    rest = proc.stdout.read()
    stderr = proc.stderr.read()
    assert proc.wait(timeout=60) == 130
    assert len(first + rest) >= 8
    assert b"Traceback" not in stderr
    assert str(DEFAULT_MODEL) not in stderr.decode()


def test_invalid_utf8_in_the_argument_or_stop_is_a_usage_error(tiny):
    for args, what in (([b"ab\xffc"], b"PROMPT"), ([b"Hi", b"--stop", b"\xff"], b"--stop")):
        result = subprocess.run(
            [*(a.encode() for a in GPTCLI), b"generate", b"-m", tiny.encode(), *args],
            capture_output=True,
            stdin=subprocess.DEVNULL,
            timeout=60,
        )
        assert result.returncode == 2
        assert what + b": invalid UTF-8 at byte" in result.stderr
        assert b"Traceback" not in result.stderr


@pytest.mark.parametrize(
    "shell",
    [
        "generate -m {tiny} Hi -n 40 --temp 0 -v 2>&1 | head -c 3",
        "generate -m {tiny} Hi -n 4 >&-",
    ],
)
def test_closed_stdout_or_stderr_is_not_an_error(tiny, shell):
    command = f"{sys.executable} -m gptcli " + shell.format(tiny=tiny)
    result = subprocess.run(
        ["bash", "-c", f"set -o pipefail; {command}"], capture_output=True, timeout=60
    )
    assert result.returncode == 0, result.stderr.decode()
    assert b"Traceback" not in result.stderr and b"Exception ignored" not in result.stderr


def test_broken_weights_are_reported_not_sampled(tiny, tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "nan"
    shutil.copytree(tiny, folder)
    tensors = load_file(folder / "model.safetensors")
    tensors["transformer.wte.weight"] = torch.full_like(
        tensors["transformer.wte.weight"], float("nan")
    )
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    for temp in ("0", "0.8"):
        result = run(["generate", "-m", str(folder), "Hi", "-n", "4", "--temp", temp])
        assert result.returncode == 1
        assert b"no finite logits" in result.stderr
        assert result.stdout == b""


def test_gguf_given_as_model_points_to_convert(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    result = run(["generate", "-m", str(tmp_path / "m.gguf"), "Hi"])
    assert result.returncode == 1
    assert b"gptcli convert" in result.stderr


def test_convert_usage_errors_and_no_leftovers(tmp_path):
    result = run(["convert", str(tmp_path / "x.gguf"), str(tmp_path / "out"), "--dtype", "int4"])
    assert result.returncode == 2 and b"--dtype" in result.stderr
    result = run(["convert", str(tmp_path / "x.gguf"), "."], cwd=tmp_path)
    assert result.returncode == 1 and b"current folder" in result.stderr
    assert list(tmp_path.iterdir()) == []
