"""Property tests: option parsing never crashes, and streaming decodes any ids as a whole decode.

(Sampling's property - a valid, seed-deterministic id for any finite or -inf logits and any
valid options - lives in test_sampling.py: test_any_logits_and_params_give_a_valid_deterministic_id.)
"""

from __future__ import annotations

import contextlib
import tempfile

import typer
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from gptcli import cli
from gptcli.tokenizer import StreamDecoder, Tokenizer

from .conftest import GPT2_BPE

NOWHERE = "/nonexistent/gptcli-model"
# Commands that cannot reach the network or wait on a terminal; -m points nowhere, so none of
# them ever loads a model.
COMMANDS = ("generate", "batch", "bench", "convert")
# Left out: -m (it is fixed to NOWHERE) and --debug (which shows tracebacks by design).
SKIP = {"-m", "--model", "--debug"}
ODD_VALUES = [
    "-1", "0", "1", "-0", "nan", "inf", "-inf", "1e309", "2.5", "99999999999999999999999",
    "", " ", "abc", "-", "[bold]x[/]", "\x1b[31m", "a\rb", "\udcff", "auto", "cpu", "cuda",
    "float16", "int8", "json", "1,2", "1,,2",
]  # fmt: skip


def option_names(command: str) -> list[str]:
    click_command = typer.main.get_command(cli.app).commands[command]  # type: ignore[attr-defined]
    names = [name for param in click_command.params for name in param.opts + param.secondary_opts]
    return sorted(name for name in names if name.startswith("-"))


@st.composite
def command_lines(draw) -> list[str]:
    command = draw(st.sampled_from(COMMANDS))
    names = option_names(command)
    usable = [name for name in names if name not in SKIP]
    token = st.one_of(st.sampled_from(usable), st.sampled_from(ODD_VALUES))
    model = ["-m", NOWHERE] if "-m" in names else []
    return [command, *model, *draw(st.lists(token, max_size=8))]


@settings(max_examples=80, deadline=None)
@given(args=command_lines())
def test_option_parsing_never_raises(args):
    runner = CliRunner()
    # -o, OUT_DIR and the like land in a scratch folder.
    with tempfile.TemporaryDirectory() as scratch, contextlib.chdir(scratch):
        result = runner.invoke(cli.app, args, input="Hi\n")
    assert result.exit_code in (0, 1, 2), (args, result.output)
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        args,
        repr(result.exception),
    )
    assert "Traceback" not in result.output


GPT2 = Tokenizer.from_dir(GPT2_BPE)
PADDING_IDS = range(GPT2.vocab_size, GPT2.vocab_size + 47)  # an embedding padded to 50304


@settings(max_examples=200, deadline=None)
@given(
    ids=st.lists(
        st.one_of(
            st.integers(0, GPT2.vocab_size - 1),
            st.sampled_from(PADDING_IDS),  # ids a model may sample that the tokenizer lacks
            st.sampled_from(GPT2.encode("😀 中文 café")),
        ),
        max_size=30,
    )
)
def test_stream_with_undecodable_ids_equals_a_full_decode(ids):
    decoder = StreamDecoder(GPT2)
    chunks = [decoder.push(token_id) for token_id in ids]
    chunks.append(decoder.flush())
    assert "".join(chunks) == GPT2.decode(ids)
