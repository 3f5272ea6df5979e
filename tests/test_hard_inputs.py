"""Hard inputs: bad model files, prompts, options and interruptions each get one clear answer.

Most checks run `gptcli.cli.main` in this process (`invoke`), which is much faster than a
subprocess; the ones about signals, pipes and terminals run the real command (`run`).
"""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from gptcli import cli
from gptcli.config import ConfigError
from gptcli.convert import ConvertError, convert_gguf
from gptcli.errors import GptcliWarning
from gptcli.loader import LoadError, load_model

from .conftest import build_hf_model, save_checkpoint
from .test_cli import GPTCLI, run
from .test_loader import copy_checkpoint, edit_tensors

NOWHERE = "/nonexistent/gptcli-model"


@pytest.fixture(scope="module")
def gpt2(tiny_models) -> Path:
    return tiny_models["gpt2"][1]


def edit_config(folder: Path, edit) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


class Result:
    def __init__(self, code: int, stdout: bytes, stderr: str) -> None:
        self.code, self.stdout, self.stderr = code, stdout, stderr

    @property
    def error(self) -> str:
        """The one stderr line (asserting there is exactly one)."""
        lines = self.stderr.strip().splitlines()
        assert len(lines) == 1, self.stderr
        return lines[0]


@pytest.fixture
def invoke(monkeypatch, capfd):
    """Run `gptcli ARGS` in this process through `cli.main`, with `stdin` bytes piped in."""

    def go(*args: str, stdin: bytes = b"") -> Result:
        monkeypatch.setattr(sys, "argv", ["gptcli", *args])
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
        monkeypatch.setattr(cli, "_said_interrupted", False)
        from rich.console import Console

        monkeypatch.setattr(Console, "on_broken_pipe", Console.on_broken_pipe)
        sigterm = signal.getsignal(signal.SIGTERM)
        capfd.readouterr()
        try:
            with warnings.catch_warnings(), pytest.raises(SystemExit) as exit_info:
                cli.main()
        finally:
            signal.signal(signal.SIGTERM, sigterm)
        sys.stdout.flush()
        out, err = capfd.readouterr()
        assert "Traceback" not in err
        return Result(exit_info.value.code, out.encode(), err)

    return go


# --- model folders and files -----------------------------------------------------------------


def test_garbage_or_oversized_safetensors_header(gpt2, tmp_path, invoke):
    folder = copy_checkpoint(gpt2, tmp_path / "header")
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes((2**60).to_bytes(8, "little") + data[8:])
    result = invoke("generate", "-m", str(folder), "Hi")
    assert result.code == 1
    assert result.error == (
        f"error: {path}: cannot read safetensors (Error while deserializing header: header too "
        "large); is it a safetensors file? download it again"
    )
    path.write_bytes(data[:8] + b"\xff garbage" + data[18:])
    with pytest.raises(LoadError, match=r"invalid UTF-8 in header.*is it a safetensors file"):
        load_model(folder)


def test_truncated_safetensors_from_the_command(gpt2, tmp_path, invoke):
    folder = copy_checkpoint(gpt2, tmp_path / "cut")
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:4096])
    result = invoke("generate", "-m", str(folder), "Hi")
    assert result.code == 1
    assert result.error.endswith("is it truncated? download it again")


def test_integer_tensor_is_refused(gpt2, tmp_path):
    folder = copy_checkpoint(gpt2, tmp_path / "ints")
    name = "transformer.h.0.ln_1.weight"
    edit_tensors(folder, lambda t: t.update({name: torch.ones(32, dtype=torch.int32)}))
    with pytest.raises(LoadError, match=rf"tensor {name} has dtype torch.int32; expected floats$"):
        load_model(folder)


def test_nan_weights_warn_and_still_run(gpt2, tmp_path, invoke):
    folder = copy_checkpoint(gpt2, tmp_path / "nan")

    def poison(tensors):  # an unused token's embedding row: the model still works
        tensors["transformer.wte.weight"][50000, :2] = torch.tensor([float("nan"), float("inf")])

    edit_tensors(folder, poison)
    with pytest.warns(GptcliWarning, match="transformer.wte.weight has 2 NaN or infinite"):
        load_model(folder)
    result = invoke("generate", "-m", str(folder), "Hello", "-n", "4", "--temp", "0")
    assert result.code == 0
    assert result.error == (
        f"warning: {folder / 'model.safetensors'}: tensor transformer.wte.weight has 2 NaN or "
        "infinite value(s); the output may be garbage"
    )
    assert result.stdout


def test_weights_that_overflow_float16_warn(gpt2, tmp_path):
    folder = copy_checkpoint(gpt2, tmp_path / "big")
    edit_tensors(folder, lambda t: t["transformer.h.1.mlp.c_fc.weight"][0, :3].fill_(1e6))
    with pytest.warns(GptcliWarning, match="has 3 value.s. too large for float16.*--dtype float32"):
        load_model(folder, dtype=torch.float16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GptcliWarning)
        load_model(folder)  # float32 holds them: no warning


def test_config_json_that_is_not_json(gpt2, tmp_path, invoke):
    folder = copy_checkpoint(gpt2, tmp_path / "notjson")
    (folder / "config.json").write_text("{nope")
    result = invoke("generate", "-m", str(folder), "Hi")
    assert result.code == 1
    assert result.error.startswith(f"error: {folder / 'config.json'}: invalid JSON (")
    (folder / "config.json").write_bytes(b'{"a": "\xff"}')
    with pytest.raises(ConfigError, match=r"config\.json: not UTF-8 text \(invalid byte at 7\)"):
        load_model(folder)


def test_missing_or_corrupt_tokenizer_from_the_command(gpt2, tmp_path, invoke):
    folder = copy_checkpoint(gpt2, tmp_path / "tok")
    (folder / "merges.txt").unlink()
    result = invoke("generate", "-m", str(folder), "Hi")
    assert result.code == 1
    assert result.error == (
        f"error: {folder / 'merges.txt'} is missing; copy it from the original model"
    )
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": 5}')
    result = invoke("generate", "-m", str(folder), "Hi")
    assert result.code == 1
    assert result.error.startswith(f"error: {folder / 'tokenizer.json'} cannot be parsed (")


def test_tokenizer_larger_than_the_embedding(tmp_path, invoke):
    folder = save_checkpoint(build_hf_model("gpt2", True, 4, vocab=1000), tmp_path / "small")
    result = invoke("generate", "-m", str(folder), "Hi")
    assert result.code == 1
    assert result.error == (
        f"error: {folder}: the tokenizer has 50257 tokens but the model's embedding only 1000; "
        "the tokenizer does not belong to this model"
    )


def test_sampled_ids_the_tokenizer_cannot_decode_give_no_text(tmp_path, invoke):
    # An embedding padded past the tokenizer's 50257 tokens (as many models have), and a head
    # that always picks a padding id: the run ends normally with no text.
    hf = build_hf_model("llama", False, 4, vocab=50300)
    with torch.no_grad():
        hf.lm_head.weight.zero_()
        hf.lm_head.weight[50280].fill_(1.0)
        hf.lm_head.weight[50290].fill_(-1.0)
    folder = save_checkpoint(hf, tmp_path / "padded")
    result = invoke("generate", "-m", str(folder), "--json", "Hi", "-n", "3", "--temp", "0")
    assert result.code == 0, result.stderr
    record = json.loads(result.stdout)
    assert (record["text"], record["new_tokens"]) == ("", 3)


def test_unreadable_files_are_named(gpt2, tmp_path, monkeypatch):
    """Simulated with a PermissionError, so it holds when tests run as root too."""
    import gptcli.loader

    folder = copy_checkpoint(gpt2, tmp_path / "locked")
    real_read_text = Path.read_text

    def locked_read_text(self, *args, **kwargs):
        if self.name == "config.json":
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", locked_read_text)
    with pytest.raises(ConfigError, match=r"config\.json: cannot read \(Permission denied\)$"):
        load_model(folder)
    monkeypatch.undo()

    def locked_open(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(gptcli.loader, "safe_open", locked_open)
    with pytest.raises(
        LoadError, match=r"cannot read safetensors \(Permission denied\); check the file's perm"
    ):
        load_model(folder)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_chmod_000_folder_and_files(gpt2, tmp_path):
    folder = copy_checkpoint(gpt2, tmp_path / "chmod")
    os.chmod(folder / "vocab.json", 0)
    result = run(["generate", "-m", str(folder), "Hi"])
    assert result.returncode == 1
    assert b"vocab.json cannot be read (Permission denied)" in result.stderr
    os.chmod(folder, 0)
    try:
        result = run(["generate", "-m", str(folder), "Hi"])
    finally:
        os.chmod(folder, 0o755)
        os.chmod(folder / "vocab.json", 0o644)
    assert result.returncode == 1
    assert b"cannot read the folder (permission denied)" in result.stderr


def test_model_path_that_is_a_file(tmp_path, invoke):
    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"x")
    result = invoke("generate", "-m", str(path), "Hi")
    assert (result.code, result.error) == (
        1,
        f"error: {path}: is a file; -m expects a checkpoint folder",
    )


class _Trap:
    """Unpickling this runs code: it would create the file `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "model.pth"])
def test_pickle_checkpoints_are_never_unpickled(gpt2, tmp_path, invoke, name):
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(gpt2 / "config.json", folder)
    marker = tmp_path / "code-ran"
    (folder / name).write_bytes(pickle.dumps(_Trap(marker)))
    for model in (folder, folder / name):
        result = invoke("generate", "-m", str(model), "Hi")
        assert result.code == 1
        assert "pickle checkpoints are refused because loading them can run" in result.error
    assert not marker.exists()


def test_no_code_from_the_model_folder_runs(gpt2, tmp_path, invoke):
    folder = copy_checkpoint(gpt2, tmp_path / "remote")
    marker = tmp_path / "code-ran"
    code = f"open({str(marker)!r}, 'w').close()\n"
    for name in ("modeling_evil.py", "tokenization_evil.py", "configuration_evil.py"):
        (folder / name).write_text(code)
    edit_config(
        folder,
        lambda c: c.update(
            auto_map={"AutoModelForCausalLM": "modeling_evil.Evil"}, trust_remote_code=True
        ),
    )
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"auto_map": {"AutoTokenizer": ["tokenization_evil.Evil", None]}})
    )
    result = invoke("generate", "-m", str(folder), "Hi", "-n", "2")
    assert result.code == 0, result.stderr
    assert not marker.exists()


# --- prompts ---------------------------------------------------------------------------------


def test_empty_prompt_starts_from_the_start_token(gpt2, invoke):
    result = invoke("generate", "-m", str(gpt2), "--json", "", "-n", "2", "--temp", "0")
    assert result.code == 0
    record = json.loads(result.stdout)
    assert (record["prompt"], record["prompt_tokens"], record["new_tokens"]) == ("", 1, 2)


def test_empty_prompt_without_a_start_token_is_refused(gpt2, tmp_path, invoke):
    folder = copy_checkpoint(gpt2, tmp_path / "nobos")
    edit_config(folder, lambda c: c.pop("bos_token_id"))
    result = invoke("generate", "-m", str(folder), "")
    assert (result.code, result.error) == (
        2,
        "error: the prompt is empty and this model has no start token to begin from",
    )


def test_invalid_utf8_in_a_file_names_the_byte(gpt2, tmp_path, invoke):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\u00e9 ok".encode("utf-8") + b" caf\xe9")
    result = invoke("generate", "-m", str(gpt2), "-f", str(path))
    assert (result.code, result.error) == (
        2,
        f"error: {path}: invalid UTF-8 at byte 12; save the prompt as UTF-8 and retry",
    )


@pytest.mark.parametrize("where", ["stdin", "file"])
def test_nul_bytes_are_refused(gpt2, tmp_path, invoke, where):
    path = tmp_path / "binary.dat"
    path.write_bytes(b"\x7fELF\x02\x01\x01\x00\xfe\xff")  # not UTF-8 either: NUL is named first
    if where == "stdin":
        result = invoke("generate", "-m", str(gpt2), stdin=path.read_bytes())
        name = "stdin"
    else:
        result = invoke("generate", "-m", str(gpt2), "-f", str(path))
        name = str(path)
    assert (result.code, result.error) == (
        2,
        f"error: {name}: contains NUL bytes; is it a binary file?",
    )


def test_a_megabyte_prompt_gets_the_context_answer(gpt2, invoke):
    prompt = ("word " * 200_000).encode()  # 1 MB, 200001 tokens (the last " " too)
    result = invoke("generate", "-m", str(gpt2), "-n", "2", stdin=prompt)
    assert (result.code, result.error) == (
        2,
        "error: the prompt has 200001 tokens and -n is 2, more than the model's context of "
        "128; lower -n, shorten the prompt, or pass --truncate to drop the oldest prompt tokens",
    )


def test_markup_escapes_and_carriage_returns_are_literal(gpt2, tmp_path, invoke):
    prompt = "[bold red]hi[/] \x1b[31mred\x1b[0m a\rb [link=x]y[/link]"
    result = invoke("generate", "-m", str(gpt2), "--json", prompt, "-n", "1")
    assert result.code == 0
    assert json.loads(result.stdout)["prompt"] == prompt
    # Paths are shown with their markup as typed and control characters escaped.
    path = tmp_path / "[bold]x\x1b[31m.txt"
    result = invoke("generate", "-m", str(gpt2), "-f", str(path))
    assert result.error == f"error: -f {tmp_path}/[bold]x\\x1b[31m.txt: no such file"
    folder = copy_checkpoint(gpt2, tmp_path / "[red]warn\r")
    edit_tensors(folder, lambda t: t["transformer.wte.weight"][50001].fill_(float("nan")))
    result = invoke("generate", "-m", str(folder), "Hi", "-n", "1")
    assert result.code == 0
    assert result.error.startswith(f"warning: {tmp_path}/[red]warn\\r/model.safetensors: ")


# --- options ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-n", "-5"], "-n/--max-new-tokens must be at least 1, got -5"),
        (["-n", "2.5"], "Invalid value for '-n' / '--max-new-tokens'"),
        (["--temp", "inf"], "--temp must be a finite number >= 0 (0 means greedy), got inf"),
        (["--temp", "-0.1"], "--temp must be a finite number >= 0 (0 means greedy), got -0.1"),
        (["--temp", "warm"], "Invalid value for '--temp'"),
        (["--top-k", "-1"], "--top-k must be a whole number >= 0 (0 turns it off), got -1"),
        (["--top-p", "nan"], "--top-p must be between 0 and 1 (1 turns it off), got nan"),
        (["--top-p", "-0.5"], "--top-p must be between 0 and 1 (1 turns it off), got -0.5"),
        (["--min-p", "nan"], "--min-p must be between 0 and 1 (0 turns it off), got nan"),
        (["--min-p", "-1e-9"], "--min-p must be between 0 and 1 (0 turns it off), got -1e-09"),
        (["--repeat-penalty", "-1"], "--repeat-penalty must be a finite number > 0"),
        (["--repeat-penalty", "nan"], "--repeat-penalty must be a finite number > 0"),
        (["--repeat-penalty", "inf"], "--repeat-penalty must be a finite number > 0"),
        (["-s", str(2**63)], f"-s/--seed must be -1 (random) or between 0 and {2**63 - 1}"),
        (["-s", "nan"], "Invalid value for '-s' / '--seed'"),
        (["--dtype", "float8"], "--dtype: unknown dtype 'float8'; choose auto, float32"),
        (["-n", "200", "--truncate"], "-n 200 leaves no room for the prompt in a context of 128"),
    ],
)
def test_bad_generate_options_exit_2_naming_the_option(gpt2, invoke, args, message):
    result = invoke("generate", "-m", str(gpt2), "Hi", *args)
    assert result.code == 2
    assert message in result.stderr
    assert result.stdout == b""


def test_absurd_but_valid_values_run(gpt2, invoke):
    args = ["--top-k", str(10**30), "--temp", "1e300", "--repeat-penalty", "1e300", "-s", "0"]
    result = invoke("generate", "-m", str(gpt2), "Hi", "-n", "3", *args)
    assert result.code == 0, result.stderr
    result = invoke("generate", "-m", str(gpt2), "Hi", "-n", str(10**12))
    assert result.code == 2
    assert f"-n is {10**12}, more than the model's context of 128" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-b", "-1"], "-b/--batch-size must be at least 1, got -1"),
        (["-b", "nan"], "Invalid value for '-b' / '--batch-size'"),
        (["-n", "-1"], "-n/--max-new-tokens must be at least 1, got -1"),
        (["--top-k", "-2"], "--top-k must be a whole number >= 0"),
        (["--top-p", "inf"], "--top-p must be between 0 and 1"),
        (["--min-p", "2"], "--min-p must be between 0 and 1"),
        (["--repeat-penalty", "0"], "--repeat-penalty must be a finite number > 0"),
        (["-s", "-2"], "-s/--seed must be -1 (random) or between 0 and"),
        (["--device", "gpu"], "--device: unknown device 'gpu'; choose auto, cpu, cuda or mps"),
    ],
)
def test_bad_batch_options_exit_2_naming_the_option(gpt2, invoke, args, message):
    result = invoke("batch", "-m", str(gpt2), *args, stdin=b"Hi\n")
    assert result.code == 2
    assert message in result.stderr
    assert result.stdout == b""


def test_a_huge_batch_size_is_capped_by_the_prompts(gpt2, invoke):
    result = invoke("batch", "-m", str(gpt2), "-b", str(10**12), "-n", "2", stdin=b"a\nb\n")
    assert result.code == 0, result.stderr
    assert len(result.stdout.splitlines()) == 2


def test_control_characters_in_a_model_path_are_shown_escaped(gpt2, tmp_path, invoke):
    folder = copy_checkpoint(gpt2, tmp_path / "[bold]m\x1b[31mx")
    shown = "[bold]m\\x1b[31mx"  # as typed, the escape spelt out
    for args in (("info",), ("bench", "-p", "4", "-n", "2", "-r", "1", "-o", "csv")):
        result = invoke(*args, "-m", str(folder))
        assert result.code == 0, result.stderr
        assert b"\x1b" not in result.stdout
        assert shown in result.stdout.decode()


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("num_attention_heads", 9.5, "num_attention_heads must be a whole number, got 9.5"),
        ("num_attention_heads", "nine", "num_attention_heads must be a whole number, got 'nine'"),
        ("vocab_size", True, "vocab_size must be a whole number, got True"),
        ("eos_token_id", ["x"], "eos_token_id must be a whole number, got 'x'"),
        ("architectures", [7], "architectures must be a list of class names, got [7]"),
    ],
)
def test_config_values_of_the_wrong_type_name_the_field(field, value, message):
    from gptcli.config import ConfigError, ModelConfig

    hf = build_hf_model("llama", True, 2, vocab=64).config.to_dict()
    hf[field] = value
    with pytest.raises(ConfigError) as error:
        ModelConfig.from_hf(hf, "x/config.json")
    assert str(error.value) == f"x/config.json: {message}"


def test_config_odd_but_clear_values_are_read(gpt2, tmp_path):
    from gptcli.config import ConfigError, ModelConfig

    hf = build_hf_model("llama", True, 2, vocab=64).config.to_dict()
    hf["architectures"] = "LlamaForCausalLM"  # a string, not a list
    hf["num_attention_heads"] = 4.0
    config = ModelConfig.from_hf(hf)
    assert (config.family, config.n_head) == ("llama", 4)
    folder = copy_checkpoint(gpt2, tmp_path / "gen")
    (folder / "generation_config.json").write_text('{"eos_token_id": "x"}', encoding="utf-8")
    with pytest.raises(ConfigError, match="generation_config.json: eos_token_id must be a whole"):
        ModelConfig.from_dir(folder)


# --- interruptions and resources -------------------------------------------------------------

# Runs gptcli with a hook that sends this process SIGINT at a chosen moment: a real signal,
# delivered at an exact point instead of after a guessed delay.
INTERRUPT_AT = """
import builtins, os, signal, sys
where, *sys.argv[1:] = sys.argv[1:]
sys.argv[0] = "gptcli"
def interrupt():
    os.kill(os.getpid(), signal.SIGINT)
if where.startswith("import:"):
    real_import = builtins.__import__
    def hooked(name, *args, **kwargs):
        if name == where[7:]:
            interrupt()
        return real_import(name, *args, **kwargs)
    builtins.__import__ = hooked
else:
    import gptcli.loader, gptcli.model
    if where == "load":
        real_load = gptcli.loader.load_model
        def load_model(*args, **kwargs):
            interrupt()
            return real_load(*args, **kwargs)
        gptcli.loader.load_model = load_model
    else:  # "forward:N": during the Nth model call (1 = prefill)
        real_forward, calls = gptcli.model.GPT.forward, []
        def forward(self, *args, **kwargs):
            calls.append(1)
            if len(calls) == int(where[8:]):
                interrupt()
            return real_forward(self, *args, **kwargs)
        gptcli.model.GPT.forward = forward
from gptcli.cli import main
main()
"""


def run_interrupted(where: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", INTERRUPT_AT, where, *args],
        capture_output=True,
        stdin=subprocess.DEVNULL,
        timeout=120,
    )


@pytest.mark.parametrize("where", ["import:typer", "import:rich.console", "import:torch", "load"])
def test_ctrl_c_before_generation_is_exit_130_and_one_line(gpt2, where):
    result = run_interrupted(where, "generate", "-m", str(gpt2), "Hi", "-n", "5")
    assert result.returncode == 130, result.stderr.decode()
    assert result.stderr == b"interrupted\n"
    assert result.stdout == b""


def test_a_ctrl_c_swallowed_while_importing_torch_is_still_honoured(monkeypatch):
    # numpy's start-up, run by `import torch`, catches a KeyboardInterrupt raised inside it (seen
    # with a SIGINT 0.3 s after start: the run went on and exited 0). The handler remembers it.
    monkeypatch.setattr(cli, "_sigint_seen", False)
    try:
        cli._on_sigint(signal.SIGINT, None)
    except KeyboardInterrupt:
        pass  # swallowed, as numpy does
    with pytest.raises(KeyboardInterrupt):
        cli.import_torch()
    monkeypatch.setattr(cli, "_sigint_seen", False)
    cli.import_torch()  # without a Ctrl-C it just imports


@pytest.mark.parametrize("calls", [1, 6])  # during prefill; during the fifth decode step
def test_ctrl_c_during_generation_keeps_the_text(gpt2, calls):
    args = ["generate", "-m", str(gpt2), "Once upon a time", "-n", "20", "--temp", "0"]
    full = run(args)
    assert full.returncode == 0
    result = run_interrupted(f"forward:{calls}", *args)
    assert result.returncode == 130
    assert result.stderr == b"interrupted\n"
    if calls == 1:
        assert result.stdout == b""
    else:
        assert result.stdout and full.stdout.startswith(result.stdout)


def test_ctrl_c_on_a_terminal_restores_the_cursor(gpt2):
    """The loading spinner hides the cursor; an interrupt must show it again."""
    import pty

    primary, secondary = pty.openpty()
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "80"}
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen(
        [sys.executable, "-c", INTERRUPT_AT, "load", "generate", "-m", str(gpt2), "Hi"],
        stdin=secondary,
        stdout=secondary,
        stderr=secondary,
        env=env,
    )
    os.close(secondary)
    output = b""
    while True:
        try:
            chunk = os.read(primary, 4096)
        except OSError:  # EIO: the process has gone
            break
        if not chunk:
            break
        output += chunk
    os.close(primary)
    assert proc.wait(timeout=60) == 130
    assert b"interrupted" in output and b"Traceback" not in output
    hidden = output.rfind(b"\x1b[?25l")
    assert output.rfind(b"\x1b[?25h") > hidden


@pytest.mark.parametrize("args", [["--help"], ["generate", "--help"], ["batch", "--help"]])
def test_help_into_a_closed_pipe_exits_0(args):
    command = " ".join([*GPTCLI, *args]) + " | head -c 1"
    result = subprocess.run(
        ["bash", "-c", f"set -o pipefail; {command}"], capture_output=True, timeout=60
    )
    assert (result.returncode, result.stderr) == (0, b"")


OOM = "DefaultCPUAllocator: can't allocate memory: you tried to allocate 999999999999 bytes."


def test_out_of_memory_names_what_to_lower(gpt2, invoke, monkeypatch):
    import gptcli.model

    def no_memory(*args, **kwargs):
        raise RuntimeError(OOM)

    monkeypatch.setattr(gptcli.model.GPT, "new_cache", no_memory)
    result = invoke("generate", "-m", str(gpt2), "Hi", "-n", "100")
    assert (result.code, result.error) == (
        1,
        "error: out of memory; try a lower -n, a smaller model, or --dtype bfloat16",
    )
    monkeypatch.setattr(gptcli.model.GPT, "forward", no_memory)
    result = invoke("batch", "-m", str(gpt2), "-n", "100", stdin=b"a\nb\n")
    assert (result.code, result.error) == (
        1,
        "error: out of memory; try a lower -b/--batch-size or -n, a smaller model, "
        "or --dtype bfloat16",
    )


def test_an_unexpected_exception_is_one_line_with_the_way_to_details(gpt2, invoke, monkeypatch):
    import gptcli.model

    def broken(*args, **kwargs):
        raise ValueError("something inside went wrong\nsecond line")

    monkeypatch.setattr(gptcli.model.GPT, "new_cache", broken)
    result = invoke("generate", "-m", str(gpt2), "Hi", "-n", "3")
    assert (result.code, result.error) == (
        1,
        "error: unexpected ValueError: something inside went wrong (a bug; run again with "
        "--debug for the traceback, and please report it)",
    )
    with pytest.raises(ValueError):  # --debug lets it through
        invoke("generate", "-m", str(gpt2), "Hi", "-n", "3", "--debug")


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory) -> Path:
    from .test_convert import write_llama_gguf

    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_llama_gguf(path, tied=True)
    return path


def test_interrupted_convert_removes_the_folders_it_made(gguf_file, tmp_path):
    def interrupt(done, total):
        raise KeyboardInterrupt

    (tmp_path / "keep").mkdir()
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(gguf_file, tmp_path / "keep" / "a" / "b" / "out", progress=interrupt)
    assert [p.name for p in tmp_path.iterdir()] == ["keep"]
    assert list((tmp_path / "keep").iterdir()) == []


def test_disk_full_during_convert_leaves_nothing(gguf_file, tmp_path, monkeypatch):
    import gptcli.convert

    def disk_full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gptcli.convert, "_write_json", disk_full)
    out = tmp_path / "new" / "out"
    with pytest.raises(ConvertError, match=f"^cannot write {out}: No space left on device$"):
        convert_gguf(gguf_file, out)
    assert list(tmp_path.iterdir()) == []


# --- security --------------------------------------------------------------------------------


def test_batch_never_opens_paths_given_as_prompts(gpt2, tmp_path, invoke):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP SECRET CONTENTS")
    line = {"prompt": str(secret), "id": str(secret), "stop": str(secret), "file": str(secret)}
    lines = [json.dumps(line), json.dumps({"prompt": "[bold]x[/] \x1b[2J\r"})]
    result = invoke("batch", "-m", str(gpt2), "-n", "2", stdin="\n".join(lines).encode())
    assert result.code == 0, result.stderr
    records = [json.loads(x) for x in result.stdout.decode().splitlines()]
    assert records[0]["prompt"] == str(secret)
    assert records[0]["prompt_tokens"] == len(
        cli_tokenizer(gpt2).encode(str(secret))
    )  # the path's own tokens, not the file's
    assert records[1]["prompt"] == "[bold]x[/] \x1b[2J\r"
    assert b"TOP SECRET" not in result.stdout


def cli_tokenizer(folder: Path):
    from gptcli.tokenizer import Tokenizer

    return Tokenizer.from_dir(folder)
