"""The `gptcli` command: Typer commands, prompt resolution, and errors -> exit codes.

No tensor code lives here, and torch is imported only inside commands that need it, so
`gptcli --help` answers at once.
"""

from __future__ import annotations

import sys

try:  # Ctrl-C during these (slow) imports ends like Ctrl-C anywhere else: one line, exit 130
    import contextlib
    import json
    import os
    import secrets
    import signal
    import time
    from collections.abc import Iterator
    from pathlib import Path
    from typing import Annotated

    import typer
    from typer.exceptions import TyperException

    from . import render
    from .errors import GptcliError, UsageError
except KeyboardInterrupt:
    sys.stderr.write("interrupted\n")
    raise SystemExit(130) from None

app = typer.Typer(
    help="Generate text with a from-scratch GPT, streaming to the terminal.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM, as shells report it
MAX_SEED = 2**63 - 1
#: `gptcli batch` rows per forward: 9x the throughput of one at a time on 2 CPU cores (README).
DEFAULT_BATCH_SIZE = 32


def default_model_dir() -> Path:
    """The built-in default model, made by `make weights` in the repository's weights/."""
    return Path(__file__).resolve().parent.parent / "weights" / DEFAULT_MODEL_NAME


_said_interrupted = False
_sigint_seen = False


def _on_sigint(signum: int, frame: object) -> None:
    """Ctrl-C as Python's default handler does it, remembered: numpy's start-up (inside
    `import torch`) swallows the KeyboardInterrupt, and `import_torch` must not."""
    global _sigint_seen
    _sigint_seen = True
    raise KeyboardInterrupt


def import_torch() -> None:
    """Import torch (most of a second) before the commands' own modules, and honour a Ctrl-C
    that arrived while it was importing."""
    import torch  # noqa: F401

    if _sigint_seen:
        raise KeyboardInterrupt


def say_interrupted() -> None:
    """'interrupted' on stderr, once, however many layers see the same Ctrl-C."""
    global _said_interrupted
    if not _said_interrupted:
        _said_interrupted = True
        render.info("interrupted")


@contextlib.contextmanager
def handled_errors(debug: bool = False, lower: str = "a lower -n") -> Iterator[None]:
    """Turn our errors into one line on stderr and the documented exit code; `lower` says
    which option to lower when memory runs out."""
    try:
        yield
    except GptcliError as e:
        if debug:
            raise
        render.error(str(e))
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        render.newline_if_terminal()
        say_interrupted()
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except (typer.Exit, typer.Abort):
        raise
    except Exception as e:
        if debug:
            raise
        # torch reports a failed allocation as RuntimeError (CPU) or OutOfMemoryError (CUDA).
        out_of_memory = isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError"
        if out_of_memory or (isinstance(e, RuntimeError) and "allocate memory" in str(e)):
            render.error(f"out of memory; try {lower}, a smaller model, or --dtype bfloat16")
        else:
            # Not an input we know to be bad: a bug here or in a library. One line still, with
            # the way to the details.
            first = (str(e).strip().splitlines() or [""])[0][:300]
            render.error(
                f"unexpected {type(e).__name__}: {first} (a bug; run again with --debug for the "
                "traceback, and please report it)"
            )
        raise typer.Exit(1) from None


def read_text_input(source: str, option: str = "-f") -> str:
    """Read a prompt from a file path or '-' (stdin) as UTF-8, naming the byte of any fault.

    `option` names where the path came from in messages ("" for a positional argument)."""
    name = "stdin" if source == "-" else source
    where = f"{option} {source}" if option else source
    try:
        if source == "-":
            data = sys.stdin.buffer.read() if sys.stdin is not None else b""
        else:
            data = Path(source).read_bytes()
    except FileNotFoundError:
        raise UsageError(f"{where}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"{where}: is a folder, not a prompt file") from None
    except OSError as e:
        raise UsageError(f"{where}: cannot read ({e.strerror})") from None
    if b"\x00" in data:  # first: a binary file would otherwise be reported as bad UTF-8
        raise UsageError(f"{name}: contains NUL bytes; is it a binary file?")
    try:
        text = data.decode("utf-8-sig")  # a leading byte-order mark is not prompt text
    except UnicodeDecodeError as e:
        raise UsageError(
            f"{name}: invalid UTF-8 at byte {e.start}; save the prompt as UTF-8 and retry"
        ) from None
    # Drop the one final line break that echo and editors add: it is not part of the prompt.
    return text.removesuffix("\n").removesuffix("\r")


def check_utf8(text: str, what: str) -> str:
    """Arguments arrive with undecodable bytes smuggled in as lone surrogates; refuse them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        prefix = len(text[: e.start].encode("utf-8", "surrogateescape"))
        raise UsageError(f"{what}: invalid UTF-8 at byte {prefix}; pass UTF-8 text") from None
    return text


def stdin_is_piped() -> bool:
    return sys.stdin is not None and not sys.stdin.closed and not sys.stdin.isatty()


def resolve_prompt(prompt: str | None, file: str | None) -> str:
    """The prompt text: piped stdin or -f first, then the argument, joined by a newline."""
    parts = []
    if file is not None:
        parts.append(read_text_input(file))
    elif stdin_is_piped():
        piped = read_text_input("-")
        if piped:
            parts.append(piped)
    if prompt is not None and (prompt or not parts):  # an empty argument adds no newline
        parts.append(check_utf8(prompt, "PROMPT"))
    if not parts:
        raise UsageError("no prompt: give one as an argument, with -f FILE, or on stdin")
    return "\n".join(parts)


def resolve_model_dir(model: Path | None) -> Path:
    if model is not None:
        return model
    path = default_model_dir()
    if not (path / "config.json").is_file():
        raise GptcliError(
            f"the default model is not at {path}; run `make weights` in the gptcli "
            "repository, or pass -m DIR (or set GPTCLI_MODEL)"
        )
    return path


def check_max_new_tokens(max_new_tokens: int) -> None:
    if max_new_tokens < 1:
        raise UsageError(f"-n/--max-new-tokens must be at least 1, got {max_new_tokens}")


def choose_seed(seed: int) -> int:
    if seed == -1:
        return secrets.randbelow(2**31)
    if not 0 <= seed <= MAX_SEED:
        raise UsageError(f"-s/--seed must be -1 (random) or between 0 and {MAX_SEED}, got {seed}")
    return seed


def fit_context(ids: list[int], max_new: int, context: int, truncate: bool) -> list[int]:
    """Apply the context policy: refuse, or with --truncate drop the oldest prompt tokens."""
    if len(ids) + max_new <= context:
        return ids
    if not truncate:
        raise UsageError(
            f"the prompt has {len(ids)} tokens and -n is {max_new}, more than the model's "
            f"context of {context}; lower -n, shorten the prompt, or pass --truncate to "
            "drop the oldest prompt tokens"
        )
    keep = context - max_new
    if keep < 1:
        raise UsageError(f"-n {max_new} leaves no room for the prompt in a context of {context}")
    render.warning(f"prompt truncated to its last {keep} of {len(ids)} tokens to fit the context")
    return ids[-keep:]


Model = Annotated[
    Path | None,
    typer.Option(
        "-m",
        "--model",
        envvar="GPTCLI_MODEL",
        show_envvar=True,
        help="Checkpoint folder (config.json, *.safetensors, tokenizer.json). "
        "Default: the built-in SmolLM2-135M-Instruct.",
    ),
]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")]
Dtype = Annotated[
    str, typer.Option(help="auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16, float16.")
]
Debug = Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")]
# Sampling options shared by generate, batch and chat.
Temp = Annotated[float, typer.Option("--temp", help="Temperature; 0 = greedy.")]
TopK = Annotated[int, typer.Option("--top-k", help="Keep the k most likely; 0 = off.")]
TopP = Annotated[float, typer.Option("--top-p", help="Nucleus sampling; 1 = off.")]
MinP = Annotated[
    float, typer.Option("--min-p", help="Drop tokens below min-p x the best; 0 = off.")
]
RepeatPenalty = Annotated[
    float, typer.Option("--repeat-penalty", help="Penalise the last 64 tokens; 1 = off.")
]


@app.command()
def generate(
    prompt: Annotated[
        str | None, typer.Argument(help="Prompt text. Piped stdin is read too, and comes first.")
    ] = None,
    model: Model = None,
    file: Annotated[
        str | None, typer.Option("-f", "--file", help="Read the prompt from a file ('-' = stdin).")
    ] = None,
    max_new_tokens: Annotated[
        int, typer.Option("-n", "--max-new-tokens", help="Most tokens to generate.")
    ] = 256,
    temp: Temp = 0.8,
    top_k: TopK = 40,
    top_p: TopP = 0.95,
    min_p: MinP = 0.05,
    repeat_penalty: RepeatPenalty = 1.0,
    seed: Annotated[int, typer.Option("-s", "--seed", help="Random seed; -1 = random.")] = -1,
    stop: Annotated[
        list[str] | None, typer.Option("--stop", help="Stop before this text (repeatable).")
    ] = None,
    truncate: Annotated[
        bool,
        typer.Option(
            "--truncate", help="Drop the oldest prompt tokens when prompt + -n exceed the context."
        ),
    ] = False,
    chat: Annotated[
        bool,
        typer.Option("--chat", help="Wrap the prompt in the model's chat template, as one turn."),
    ] = False,
    system: Annotated[
        str | None, typer.Option("--system", help="With --chat: a system message first.")
    ] = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    json_out: Annotated[
        bool, typer.Option("--json", help="Print one JSON object with text and stats.")
    ] = False,
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="Timings on stderr.")] = False,
    no_stream: Annotated[
        bool, typer.Option("--no-stream", help="Print the text once, at the end.")
    ] = False,
    debug: Debug = False,
) -> None:
    """Continue a prompt, streaming the new text to stdout."""
    with handled_errors(debug):
        _generate(**locals())


def _generate(
    prompt: str | None,
    model: Path | None,
    file: str | None,
    max_new_tokens: int,
    temp: float,
    top_k: int,
    top_p: float,
    min_p: float,
    repeat_penalty: float,
    seed: int,
    stop: list[str] | None,
    truncate: bool,
    chat: bool,
    system: str | None,
    device: str,
    dtype: str,
    json_out: bool,
    verbose: bool,
    no_stream: bool,
    debug: bool,
) -> None:
    # Everything the user typed is checked before the slow imports and the model load.
    check_max_new_tokens(max_new_tokens)
    seed = choose_seed(seed)
    text_in = resolve_prompt(prompt, file)
    if system is not None and not chat:
        raise UsageError("--system needs --chat (it is a message of the chat template)")
    model_dir = resolve_model_dir(model)

    import_torch()
    from .generate import Generation
    from .loader import check_model_dir, load_model, pick_device, pick_dtype
    from .sampling import SamplingParams, make_generator
    from .tokenizer import StopFilter, TextStream, Tokenizer

    params = SamplingParams(
        temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty
    )
    stops = [check_utf8(text, "--stop") for text in stop or []]
    StopFilter(stops)  # refuses an empty stop before the model loads
    torch_device = pick_device(device)
    torch_dtype = pick_dtype(dtype, torch_device)

    load_started = time.perf_counter()
    check_model_dir(model_dir)  # first, so a wrong path gets the loader's pointed advice
    with render.status(f"Loading {model_dir}"):
        tokenizer = Tokenizer.from_dir(model_dir)
        gpt = load_model(model_dir, torch_dtype, torch_device)
    load_seconds = time.perf_counter() - load_started
    config = gpt.config
    if tokenizer.vocab_size > config.vocab_size:
        raise GptcliError(
            f"{model_dir}: the tokenizer has {tokenizer.vocab_size} tokens but the model's "
            f"embedding only {config.vocab_size}; the tokenizer does not belong to this model"
        )

    eos_ids = set(config.eos_token_ids) | set(tokenizer.eos_ids)
    if chat:  # the template writes any BOS itself, and its end-of-turn token ends the reply
        from .chat import ChatTemplate, conversation, encode_chat, end_of_turn_ids

        template = ChatTemplate.from_dir(model_dir, tokenizer)
        messages = conversation(text_in, None if system is None else check_utf8(system, "--system"))
        ids = encode_chat(tokenizer, template.render(messages))
        eos_ids |= end_of_turn_ids(template, tokenizer)
    else:
        ids = tokenizer.encode(text_in)
        bos_id = tokenizer.bos_id if tokenizer.add_bos_token else None
        if bos_id is not None and ids[:1] != [bos_id]:
            ids = [bos_id, *ids]  # Llama-2-style tokenizers expect it, as HF adds it
    if not ids:
        bos = config.bos_token_id if config.bos_token_id is not None else tokenizer.bos_id
        if bos is None:
            raise UsageError("the prompt is empty and this model has no start token to begin from")
        ids = [bos]
    ids = fit_context(ids, max_new_tokens, config.max_positions, truncate)

    generation = Generation(
        gpt, ids, max_new_tokens, params, make_generator(seed, str(torch_device)), eos_ids
    )
    stream_text = TextStream(tokenizer, stops)
    out = render.TextOut()
    stream = not (json_out or no_stream)
    pieces: list[str] = []

    def emit(text: str) -> None:
        pieces.append(text)
        if stream:
            out.write(text)

    finish_reason = None
    for token in generation:
        emit(stream_text.push(token))
        if stream_text.stopped:
            finish_reason = "stop"
            break
        if out.closed:
            finish_reason = "closed"
            break
    else:
        emit(stream_text.finish())
        if stream_text.stopped:
            finish_reason = "stop"
    finish_reason = finish_reason or generation.finish_reason
    text = "".join(pieces)

    n_new = len(generation.new_ids)
    timings = {
        "load_s": round(load_seconds, 4),
        "prefill_s": round(generation.prefill_seconds, 4),
        "decode_s": round(generation.decode_seconds, 4),
        "prompt_tokens_per_s": _rate(len(ids), generation.prefill_seconds),
        # The first new token comes out of prefill; decode produced the rest.
        "tokens_per_s": _rate(n_new - 1, generation.decode_seconds),
    }
    if json_out:
        record = {
            "prompt": text_in,
            "text": text,
            "prompt_tokens": len(ids),
            "new_tokens": n_new,
            "finish_reason": finish_reason,
            "seed": seed,
            "model": str(model_dir),
            "timings": timings,
        }
        out.write(json.dumps(record, ensure_ascii=False) + "\n")
    else:
        if no_stream:
            out.write(text)
        render.newline_if_terminal()
    if verbose:
        render.stats(
            {
                "load s": timings["load_s"],
                "first token s": timings["prefill_s"],
                "prompt tokens": len(ids),
                "prompt tok/s": timings["prompt_tokens_per_s"],
                "new tokens": n_new,
                "tok/s": timings["tokens_per_s"],
                "seed": seed,
                "finish": str(finish_reason),
            }
        )


def _rate(count: int, seconds: float) -> float:
    return round(count / seconds, 2) if seconds > 0 and count > 0 else 0.0


@app.command()
def convert(
    gguf_file: Annotated[Path, typer.Argument(help="A GGUF model file (llama.cpp format).")],
    out_dir: Annotated[Path, typer.Argument(help="Folder to create with the HF checkpoint.")],
    dtype: Annotated[
        str, typer.Option(help="Weights dtype to write: float32 (lossless), bfloat16, float16.")
    ] = "float32",
    debug: Debug = False,
) -> None:
    """Convert a GGUF file into a Hugging Face checkpoint folder (safetensors)."""
    with handled_errors(debug):
        import_torch()
        from .convert import DTYPES, convert_gguf

        if dtype not in DTYPES:
            raise UsageError(f"--dtype: unknown dtype {dtype!r}; choose {', '.join(DTYPES)}")
        with render.status(f"Converting {gguf_file}"):
            convert_gguf(gguf_file, out_dir, dtype=dtype)
        render.info(f"wrote {out_dir}")


BENCH_DTYPES = ("auto", "float32", "bfloat16", "float16")
BENCH_QUANTS = ("none", "int8")
BENCH_FORMATS = ("table", "json", "csv", "md")
DEVICES = ("auto", "cpu", "cuda", "mps")


def positive_ints(value: str, option: str) -> tuple[int, ...]:
    """'128,256' -> (128, 256); anything but positive whole numbers is a usage error."""
    parts = [part.strip() for part in value.split(",")]
    try:
        numbers = tuple(int(part) for part in parts)
    except ValueError:
        numbers = ()
    if not numbers or any(n < 1 for n in numbers):
        raise UsageError(
            f"{option}: expected positive whole numbers separated by commas, got {value!r}"
        )
    return numbers


def names(value: str, option: str, choices: tuple[str, ...]) -> tuple[str, ...]:
    """'float32,bfloat16' -> a tuple of known names; an unknown one is a usage error."""
    chosen = tuple(part.strip() for part in value.split(","))
    for name in chosen:
        if name not in choices:
            raise UsageError(f"{option}: unknown value {name!r}; choose from {', '.join(choices)}")
    return chosen


@app.command()
def bench(
    model: Model = None,
    n_prompt: Annotated[
        str, typer.Option("-p", "--n-prompt", help="Prompt lengths in tokens (comma-separated).")
    ] = "128",
    n_gen: Annotated[
        str, typer.Option("-n", "--n-gen", help="Decode steps to time (comma-separated).")
    ] = "128",
    repetitions: Annotated[
        int, typer.Option("-r", "--repetitions", help="Timed repetitions after one warm-up.")
    ] = 5,
    batch: Annotated[str, typer.Option(help="Batch sizes (comma-separated).")] = "1",
    threads: Annotated[
        int | None, typer.Option(help="CPU threads for torch; default: torch's choice.")
    ] = None,
    device: Device = "auto",
    dtype: Annotated[
        str,
        typer.Option(help="auto, float32, bfloat16, float16 (comma-separated for several)."),
    ] = "auto",
    compile_step: Annotated[
        bool, typer.Option("--compile", help="torch.compile the decode step (slow warm-up).")
    ] = False,
    quant: Annotated[
        str, typer.Option(help="none or int8 weights (comma-separated for both).")
    ] = "none",
    output: Annotated[
        str, typer.Option("-o", "--output", help="table, json, csv or md (Markdown).")
    ] = "table",
    debug: Debug = False,
) -> None:
    """Time prefill and decode on random prompt tokens (one row per combination of values)."""
    with handled_errors(debug, lower="a lower --batch, -p or -n"):
        _bench(**locals())


def _bench(
    model: Path | None,
    n_prompt: str,
    n_gen: str,
    repetitions: int,
    batch: str,
    threads: int | None,
    device: str,
    dtype: str,
    compile_step: bool,
    quant: str,
    output: str,
    debug: bool,
) -> None:
    # Every value is checked before torch is imported and the model loaded.
    prompts = positive_ints(n_prompt, "-p/--n-prompt")
    gens = positive_ints(n_gen, "-n/--n-gen")
    batches = positive_ints(batch, "--batch")
    if repetitions < 1:
        raise UsageError(f"-r/--repetitions must be at least 1, got {repetitions}")
    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be at least 1, got {threads}")
    if device not in DEVICES:
        raise UsageError(f"--device: unknown device {device!r}; choose from {', '.join(DEVICES)}")
    dtypes = names(dtype, "--dtype", BENCH_DTYPES)
    quants = names(quant, "--quant", BENCH_QUANTS)
    if output not in BENCH_FORMATS:
        raise UsageError(f"-o/--output: choose one of {', '.join(BENCH_FORMATS)}, got {output!r}")
    fmt = output
    model_dir = resolve_model_dir(model)

    import_torch()
    from .config import ModelConfig
    from .loader import check_model_dir

    check_model_dir(model_dir)
    context = ModelConfig.from_dir(model_dir).max_positions
    if max(prompts) + max(gens) > context:
        raise UsageError(
            f"-p {max(prompts)} + -n {max(gens)} exceed the model's context of {context} "
            "positions; lower -p/--n-prompt or -n/--n-gen"
        )

    from .bench import BenchConfig, row_fields, run_bench

    config = BenchConfig(
        model_dir=model_dir,
        n_prompt=prompts,
        n_gen=gens,
        batch=batches,
        dtype=dtypes,
        quant=quants,
        repetitions=repetitions,
        device=device,
        threads=threads,
        compile=compile_step,
    )
    with render.progress_bar("bench") as progress:
        rows = run_bench(config, progress)
    records = [row.record() for row in rows]
    caption = rows[0].machine().describe() + (" · torch.compile" if compile_step else "")
    out = render.TextOut()
    if fmt == "json":
        out.write(json.dumps(records, indent=2) + "\n")
    elif fmt == "csv":
        out.write(render.bench_csv(records, row_fields()))
    elif fmt == "md":
        out.write(render.bench_markdown(records, caption))
    elif sys.stdout.isatty():
        render.bench_rich(records, caption)
    else:
        out.write(render.bench_plain(records, caption))


class _JsonLines:
    """Records as whole JSON lines, each flushed at once, to a file (-o) or stdout; an
    interrupted run so leaves only complete lines behind."""

    def __init__(self, path: Path | None, append: bool) -> None:
        self._stdout = render.TextOut() if path is None else None
        self._file = None
        if path is not None:
            try:
                self._file = path.open("ab" if append else "wb")
            except OSError as e:
                raise UsageError(f"-o {path}: cannot write ({e.strerror})") from None

    @property
    def closed(self) -> bool:
        """The reader of stdout went away (`| head`)."""
        return self._stdout is not None and self._stdout.closed

    def write(self, record: dict[str, object]) -> None:
        line = json.dumps(record, ensure_ascii=False) + "\n"
        if self._file is not None:
            self._file.write(line.encode("utf-8"))
            self._file.flush()
        elif self._stdout is not None:
            self._stdout.write(line)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


@app.command()
def batch(
    file: Annotated[
        str | None,
        typer.Argument(help="Prompts: one per line (\\n for a newline), or JSONL. Default: stdin."),
    ] = None,
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Write the JSONL here, not to stdout.")
    ] = None,
    model: Model = None,
    max_new_tokens: Annotated[
        int, typer.Option("-n", "--max-new-tokens", help="Most tokens to generate per prompt.")
    ] = 256,
    temp: Temp = 0.8,
    top_k: TopK = 40,
    top_p: TopP = 0.95,
    min_p: MinP = 0.05,
    repeat_penalty: RepeatPenalty = 1.0,
    seed: Annotated[
        int, typer.Option("-s", "--seed", help="Seed of every prompt; -1 = a random one each.")
    ] = -1,
    stop: Annotated[
        list[str] | None, typer.Option("--stop", help="Stop before this text (repeatable).")
    ] = None,
    truncate: Annotated[
        bool,
        typer.Option(
            "--truncate", help="Drop the oldest prompt tokens when prompt + -n exceed the context."
        ),
    ] = False,
    batch_size: Annotated[
        int | None,
        typer.Option(
            "-b",
            "--batch-size",
            help=f"Prompts generated together (default {DEFAULT_BATCH_SIZE}, fewer if memory "
            "is short).",
            show_default=False,
        ),
    ] = None,
    input_format: Annotated[
        str, typer.Option("--format", help="auto (JSONL if the first line is a {), text, jsonl.")
    ] = "auto",
    resume: Annotated[
        bool, typer.Option("--resume", help="Keep the results already in -o OUT; run the rest.")
    ] = False,
    device: Device = "auto",
    dtype: Dtype = "auto",
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="A summary on stderr.")] = False,
    debug: Debug = False,
) -> None:
    """Generate for many prompts at once; one JSON line per prompt, in input order."""
    with handled_errors(debug, lower="a lower -b/--batch-size or -n"):
        failed = _batch(**locals())
    if failed:
        raise typer.Exit(1)


def _batch(
    file: str | None,
    output: Path | None,
    model: Path | None,
    max_new_tokens: int,
    temp: float,
    top_k: int,
    top_p: float,
    min_p: float,
    repeat_penalty: float,
    seed: int,
    stop: list[str] | None,
    truncate: bool,
    batch_size: int | None,
    input_format: str,
    resume: bool,
    device: str,
    dtype: str,
    verbose: bool,
    debug: bool,
) -> int:
    """Run the batch; the number of prompts that failed (their error records are written)."""
    check_max_new_tokens(max_new_tokens)
    if seed != -1:
        choose_seed(seed)  # validates
    if batch_size is not None and batch_size < 1:
        raise UsageError(f"-b/--batch-size must be at least 1, got {batch_size}")
    if input_format not in ("auto", "text", "jsonl"):
        raise UsageError(f"--format: choose auto, text or jsonl, got {input_format!r}")
    if resume and output is None:
        raise UsageError("--resume needs -o OUT.jsonl, the output of the run to continue")
    stops = tuple(check_utf8(text, "--stop") for text in stop or [])
    if file is None and not stdin_is_piped():
        raise UsageError("no prompts: give a FILE, or pipe them in (one per line, or JSONL)")
    source = file or "-"
    if output is not None and source != "-" and Path(source).resolve() == output.resolve():
        raise UsageError(f"-o {output} is the input file; write the results to another file")
    text_in = read_text_input(source, option="")
    model_dir = resolve_model_dir(model)

    import_torch()
    from .batch import (
        BatchGenerator,
        Defaults,
        InOrder,
        LineError,
        Request,
        available_memory,
        check_memory,
        fitting_batch_size,
        id_key,
        make_request,
        parse_input,
        read_finished_ids,
    )
    from .loader import check_model_dir, load_model, pick_device, pick_dtype
    from .sampling import SamplingParams
    from .tokenizer import StopFilter, Tokenizer

    params = SamplingParams(
        temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty
    )
    StopFilter(stops)  # refuses an empty stop
    defaults = Defaults(max_new_tokens, params, None if seed == -1 else seed, stops)
    unknown: set[str] = set()
    entries = parse_input(text_in, input_format, defaults, unknown)
    if unknown:
        render.warning(
            f"ignoring JSONL field{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(sorted(unknown))} (the options a line may set: "
            "max_new_tokens, temp, top_k, top_p, min_p, repeat_penalty, seed, stop)"
        )
    if not entries:
        name = "stdin" if source == "-" else source
        raise UsageError(f"{name}: no prompts (every line is blank)")
    finished = read_finished_ids(output) if resume and output is not None else set()
    todo = [entry for entry in entries if id_key(entry.id) not in finished]
    torch_device = pick_device(device)
    torch_dtype = pick_dtype(dtype, torch_device)

    started = time.perf_counter()
    check_model_dir(model_dir)
    with render.status(f"Loading {model_dir}"):
        tokenizer = Tokenizer.from_dir(model_dir)
        gpt = load_model(model_dir, torch_dtype, torch_device)
    config = gpt.config
    if tokenizer.vocab_size > config.vocab_size:
        raise GptcliError(
            f"{model_dir}: the tokenizer has {tokenizer.vocab_size} tokens but the model's "
            f"embedding only {config.vocab_size}; the tokenizer does not belong to this model"
        )

    requests: list[Request] = []
    errors: list[LineError] = []
    for entry in todo:
        item = entry
        if not isinstance(entry, LineError):
            item = make_request(entry, tokenizer, config, truncate)
        if isinstance(item, LineError):
            errors.append(item)
            continue
        requests.append(item)
        if item.truncated_from is not None:
            render.warning(
                f"id {item.line.id}: prompt truncated to its last {len(item.prompt_ids)} of "
                f"{item.truncated_from} tokens to fit the context"
            )
    rows = batch_size or DEFAULT_BATCH_SIZE
    if requests:
        shape = (
            max(len(request.prompt_ids) for request in requests),
            max(request.line.max_new_tokens for request in requests),
        )
        available = available_memory(torch_device)
        if batch_size is None:  # the default shrinks to what fits; a size asked for is kept
            rows = max(1, fitting_batch_size(config, torch_dtype, rows, *shape, available))
        check_memory(config, torch_dtype, min(rows, len(requests)), *shape, available)

    eos_ids = set(config.eos_token_ids) | set(tokenizer.eos_ids)
    engine = BatchGenerator(gpt, tokenizer, rows, eos_ids)
    order = InOrder(entry.index for entry in todo)
    sink = _JsonLines(output, append=resume)
    done = new_tokens = 0
    generate_started = time.perf_counter()
    with contextlib.closing(sink), render.batch_progress(len(todo)) as progress:

        def deliver(index: int, record: dict[str, object]) -> None:
            nonlocal done
            for due in order.put(index, record):
                sink.write(due)
            done += 1
            progress(done, new_tokens)

        def count_tokens(n: int) -> None:
            nonlocal new_tokens
            new_tokens += n
            progress(done, new_tokens)

        for error in errors:
            deliver(error.index, error.record())
        for result in engine.run(requests, on_tokens=count_tokens):
            deliver(result.request.line.index, result.record())
            if sink.closed:
                return 0  # the reader went away, as with `| head`
    seconds = time.perf_counter() - generate_started
    if errors:
        where = f" in {output}" if output is not None else ""
        render.warning(f"{len(errors)} of {len(todo)} prompts failed: see the error records{where}")
    if verbose:
        render.stats(
            {
                "prompts": len(todo),
                "skipped": len(entries) - len(todo),
                "failed": len(errors),
                "new tokens": new_tokens,
                "tok/s": _rate(new_tokens, seconds),
                "decode steps": engine.decode_steps,
                "batch size": rows,
                "total s": round(time.perf_counter() - started, 2),
            }
        )
    return len(errors)


def _check_tokenizer_fits(model_dir: Path, tokenizer_vocab: int, model_vocab: int) -> None:
    if tokenizer_vocab > model_vocab:
        raise GptcliError(
            f"{model_dir}: the tokenizer has {tokenizer_vocab} tokens but the model's "
            f"embedding only {model_vocab}; the tokenizer does not belong to this model"
        )


PNG_SUFFIXES = (".png", ".svg", ".pdf")  # the image formats --png writes, by the ending


@app.command()
def attention(
    prompt: Annotated[
        str | None, typer.Argument(help="Prompt text. Piped stdin is read too, and comes first.")
    ] = None,
    model: Model = None,
    layer: Annotated[int, typer.Option("--layer", help="Layer to show, from 0.")] = 0,
    head: Annotated[int | None, typer.Option("--head", help="Show this head, from 0.")] = None,
    all_heads: Annotated[
        bool, typer.Option("--all-heads", help="Show every head of the layer, small.")
    ] = False,
    mean: Annotated[
        bool, typer.Option("--mean", help="Show the mean over the heads (the default).")
    ] = False,
    png: Annotated[
        Path | None,
        typer.Option("--png", help="Also write the heatmap(s) to this PNG (needs gptcli[png])."),
    ] = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print tokens, weights and the summary as JSON.")
    ] = False,
    debug: Debug = False,
) -> None:
    """Show which earlier tokens each token attends to, and what each head of a layer does.

    Draws a heatmap (rows: tokens; columns: the tokens they attend to), then a table of heads.

    A head is previous-token, first-token or same-token when its mean weight there is > 0.5.

    The mean is over query rows 1..T-1; a head with no such pattern is "spread".
    """
    with handled_errors(debug):
        _attention(**locals())


def _attention(
    prompt: str | None,
    model: Path | None,
    layer: int,
    head: int | None,
    all_heads: bool,
    mean: bool,
    png: Path | None,
    json_out: bool,
    debug: bool,
) -> None:
    if (head is not None) + all_heads + mean > 1:
        raise UsageError("--head, --all-heads and --mean show different views; choose one")
    text_in = resolve_prompt(prompt, None)
    model_dir = resolve_model_dir(model)
    from . import views

    if png is not None:
        if not views.png_available():
            raise GptcliError(views.PNG_HINT)
        if png.is_dir():
            raise UsageError(f"--png {png}: is a folder; give a file name ending in .png")
        if png.suffix.lower() not in PNG_SUFFIXES:
            raise UsageError(f"--png {png}: give a file name ending in .png (or .svg, .pdf)")
        if not png.parent.is_dir():
            raise UsageError(f"--png {png}: the folder {png.parent} does not exist")
        if not os.access(png.parent, os.W_OK):
            raise UsageError(f"--png {png}: the folder {png.parent} is not writable")

    import_torch()
    from .config import ModelConfig
    from .loader import check_model_dir

    check_model_dir(model_dir)
    config = ModelConfig.from_dir(model_dir)
    if not 0 <= layer < config.n_layer:
        raise UsageError(
            f"--layer {layer} is out of range: this model has layers 0..{config.n_layer - 1}"
        )
    if head is not None and not 0 <= head < config.n_head:
        raise UsageError(
            f"--head {head} is out of range: this model has heads 0..{config.n_head - 1}"
        )

    from .attention import (
        MAX_TOKENS,
        attention_record,
        max_entropy_bits,
        record_attention,
        summarize_layer,
        token_texts,
        view_panels,
    )
    from .loader import load_model, pick_device
    from .perplexity import encode_text
    from .tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(model_dir)
    _check_tokenizer_fits(model_dir, tokenizer.vocab_size, config.vocab_size)
    ids = encode_text(tokenizer, text_in)
    if not ids:
        raise UsageError("the prompt is empty; give some text to look at")
    limit = min(MAX_TOKENS, config.max_positions)
    if len(ids) > limit:
        raise UsageError(f"the prompt has {len(ids)} tokens; attention takes at most {limit}")
    with render.status(f"Loading {model_dir}"):
        gpt = load_model(model_dir, device=pick_device("auto"))
    weights = record_attention(gpt, ids)[layer]  # [H, T, T]
    summaries = [s.record() for s in summarize_layer(weights)]
    tokens = token_texts(tokenizer, ids)
    if json_out:
        record = {"model": str(model_dir), **attention_record(layer, ids, tokens, weights)}
        render.TextOut().write(json.dumps(record, ensure_ascii=False) + "\n")
    if json_out and png is None:
        return

    n = min(len(ids), views.MAX_SHOWN)
    if n < len(ids):
        render.warning(
            f"showing the first {n} of {len(ids)} tokens; the head summary and --json cover all"
        )
    panels = view_panels(weights[:, :n, :n], summaries, head, all_heads)
    title = f"layer {layer} · {len(ids)} tokens"
    if not json_out:
        if all_heads:
            views.print_grid(tokens[:n], [m for _, m in panels], [s["kind"] for s in summaries])
        else:
            views.print_heatmap(tokens[:n], panels[0][1], f"{title} · {panels[0][0]}")
        caption = (
            f"layer {layer}, {len(ids)} tokens: mean over query rows 1..T-1 of the weight on "
            f"the previous, first and same token; kind = the one above 0.5. Entropy of an "
            f"even spread: {max_entropy_bits(len(ids)):.2f} bits."
        )
        views.print_table(views.summary_table(summaries, caption))
    if png is not None:
        views.write_png(png, tokens[:n], panels, title)
        render.info(f"wrote {png}")


@app.command()
def info(
    model: Model = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    debug: Debug = False,
) -> None:
    """Describe a model from its files (no weights loaded): shape, size, KV cache, tokens.

    The KV-cache size is given for float32 and for the dtype that --device/--dtype pick.
    """
    with handled_errors(debug):
        model_dir = resolve_model_dir(model)
        import_torch()
        from .info import model_info
        from .loader import check_model_dir, pick_device, pick_dtype
        from .views import info_table, print_table

        check_model_dir(model_dir)
        torch_device = pick_device(device)
        dtype_name = str(pick_dtype(dtype, torch_device)).removeprefix("torch.")
        record = model_info(model_dir, dtype_name, str(torch_device))
        if json_out:
            render.TextOut().write(json.dumps(record, ensure_ascii=False) + "\n")
        else:
            print_table(info_table(record))


PERPLEXITY_QUANTS = ("none", "int8")


@app.command()
def perplexity(
    file: Annotated[str, typer.Argument(help="Text file to score ('-' = stdin), UTF-8.")],
    model: Model = None,
    context: Annotated[int, typer.Option("-c", "--context", help="Window length in tokens.")] = 512,
    stride: Annotated[
        int | None,
        typer.Option(help="Tokens between window starts, 1..-c. Default: half of -c."),
    ] = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    quant: Annotated[str, typer.Option(help="none, or int8 weights (with float32).")] = "none",
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    debug: Debug = False,
) -> None:
    """Perplexity of a text, with sliding windows as in HF's strided evaluation.

    Windows of -c tokens start every --stride tokens; each scores the tokens not yet scored.

    The ± is the standard error: perplexity x the standard error of the mean NLL.
    """
    with handled_errors(debug):
        _perplexity(**locals())


def _perplexity(
    file: str,
    model: Path | None,
    context: int,
    stride: int | None,
    device: str,
    dtype: str,
    quant: str,
    json_out: bool,
    debug: bool,
) -> None:
    if context < 2:
        raise UsageError(f"-c/--context must be at least 2, got {context}")
    if stride is not None and not 1 <= stride <= context:
        raise UsageError(f"--stride must be between 1 and -c/--context ({context}), got {stride}")
    if quant not in PERPLEXITY_QUANTS:
        raise UsageError(f"--quant: choose none or int8, got {quant!r}")
    name = "stdin" if file == "-" else file
    text_in = read_text_input(file, option="")
    if not text_in.strip():
        raise UsageError(f"{name}: is empty; give a text file to score")
    model_dir = resolve_model_dir(model)

    import_torch()
    from .config import ModelConfig
    from .loader import check_model_dir

    check_model_dir(model_dir)
    config = ModelConfig.from_dir(model_dir)
    if context > config.max_positions:
        raise UsageError(
            f"-c/--context {context} is larger than the model's context of "
            f"{config.max_positions} tokens; lower -c"
        )

    import torch

    from .loader import load_model, pick_device, pick_dtype
    from .perplexity import default_stride, encode_text
    from .perplexity import perplexity as score
    from .tokenizer import Tokenizer

    stride = default_stride(context) if stride is None else stride
    torch_device = pick_device(device)
    torch_dtype = pick_dtype(dtype, torch_device)
    if quant == "int8" and torch_dtype != torch.float32:
        raise UsageError("--quant int8 works from float32 weights; use --dtype float32")
    tokenizer = Tokenizer.from_dir(model_dir)
    _check_tokenizer_fits(model_dir, tokenizer.vocab_size, config.vocab_size)
    ids = encode_text(tokenizer, text_in)
    if len(ids) < 2:
        raise UsageError(f"{name}: has only 1 token; perplexity needs at least 2")

    with render.status(f"Loading {model_dir}"):
        gpt = load_model(model_dir, torch_dtype, torch_device)
        if quant == "int8":
            from .quant import quantize_int8

            gpt = quantize_int8(gpt)
    with render.progress_bar("perplexity") as progress:
        result = score(
            gpt, ids, context, stride, lambda done, total, ppl: progress(done, total, f"{ppl:.3f}")
        )
    out = render.TextOut()
    if json_out:
        record = {
            **result.record(),
            "model": str(model_dir),
            "dtype": str(torch_dtype).removeprefix("torch."),
            "quant": quant,
        }
        out.write(json.dumps(record) + "\n")
        return
    error = f" ± {result.stderr:.4g}" if result.stderr is not None else ""
    out.write(
        f"perplexity {result.ppl:.4f}{error} (mean NLL {result.nll_mean:.4f} nats over "
        f"{result.tokens_scored} tokens; {result.windows} window{'s' * (result.windows != 1)} "
        f"of {context}, stride {stride})\n"
    )
    render.info("± is the standard error: perplexity x the standard error of the mean NLL")


@app.command()
def chat(
    model: Model = None,
    system: Annotated[
        str | None, typer.Option("--system", help="A system message to start the conversation.")
    ] = None,
    max_new_tokens: Annotated[
        int, typer.Option("-n", "--max-new-tokens", help="Most tokens per reply.")
    ] = 512,
    temp: Temp = 0.8,
    top_k: TopK = 40,
    top_p: TopP = 0.95,
    min_p: MinP = 0.05,
    repeat_penalty: RepeatPenalty = 1.0,
    seed: Annotated[int, typer.Option("-s", "--seed", help="Random seed; -1 = random.")] = -1,
    stop: Annotated[
        list[str] | None, typer.Option("--stop", help="End a reply before this text (repeatable).")
    ] = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    verbose: Annotated[
        bool, typer.Option("-v", "--verbose", help="Tokens/s of each reply on stderr.")
    ] = False,
    debug: Debug = False,
) -> None:
    """Talk with an instruct model in its own chat template; replies stream to stdout.

    Type a message, then Enter. End a line with a backslash (\\) to continue on the next one.

    /reset starts over (keeping --system). /exit or Ctrl-D leaves. Ctrl-C stops a reply.

    Piped stdin: one turn per line. Each reply ends with a newline.

    The KV cache is kept across turns; when the context fills, the oldest turns are dropped.
    """
    with handled_errors(debug):
        failed = _chat(**locals())
    if failed:
        raise typer.Exit(1)


def _chat(
    model: Path | None,
    system: str | None,
    max_new_tokens: int,
    temp: float,
    top_k: int,
    top_p: float,
    min_p: float,
    repeat_penalty: float,
    seed: int,
    stop: list[str] | None,
    device: str,
    dtype: str,
    verbose: bool,
    debug: bool,
) -> int:
    """Run the conversation; the number of turns that failed (each reported on stderr)."""
    check_max_new_tokens(max_new_tokens)
    seed = choose_seed(seed)
    if system is not None:
        check_utf8(system, "--system")
    stops = [check_utf8(text, "--stop") for text in stop or []]
    model_dir = resolve_model_dir(model)

    import_torch()
    from .chat import ChatSession, ChatTemplate, ChatTemplateError, TurnTooLong, read_message
    from .loader import check_model_dir, load_model, pick_device, pick_dtype
    from .sampling import SamplingParams, make_generator
    from .tokenizer import Tokenizer

    params = SamplingParams(
        temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty
    )
    torch_device = pick_device(device)
    torch_dtype = pick_dtype(dtype, torch_device)
    check_model_dir(model_dir)
    tokenizer = Tokenizer.from_dir(model_dir)
    template = ChatTemplate.from_dir(model_dir, tokenizer)  # a base model fails before the load
    with render.status(f"Loading {model_dir}"):
        gpt = load_model(model_dir, torch_dtype, torch_device)
    config = gpt.config
    if tokenizer.vocab_size > config.vocab_size:
        raise GptcliError(
            f"{model_dir}: the tokenizer has {tokenizer.vocab_size} tokens but the model's "
            f"embedding only {config.vocab_size}; the tokenizer does not belong to this model"
        )
    session = ChatSession(
        gpt,
        tokenizer,
        template,
        params=params,
        max_new_tokens=max_new_tokens,
        system=system,
        generator=make_generator(seed, str(torch_device)),
        stops=stops,
        eos_ids=set(config.eos_token_ids) | set(tokenizer.eos_ids),
    )

    interactive = sys.stdin is not None and not sys.stdin.closed and sys.stdin.isatty()
    if interactive:
        render.info(
            f"chatting with {model_dir.name}: /reset starts over, /exit or Ctrl-D leaves, "
            "a line ending in \\ continues on the next"
        )

    def ask(prompt: str) -> None:
        if interactive:
            sys.stderr.write(prompt)
            sys.stderr.flush()

    def readline() -> str:
        if sys.stdin is None or sys.stdin.closed:
            return ""
        return sys.stdin.buffer.readline().decode("utf-8", "surrogateescape")

    out = render.TextOut()
    failed = 0
    while True:
        text = read_message(readline, ask)
        if text is None:  # end of input (Ctrl-D)
            ask("\n")
            return failed
        command = text.strip()
        if command in ("/exit", "/quit"):
            return failed
        if command == "/reset":
            session.reset()
            render.info("conversation cleared")
            continue
        if not command:
            continue
        try:
            if "\0" in text:  # as for prompts: binary data is not a message
                raise UsageError("message: contains NUL bytes; is it binary data?")
            reply = session.respond(check_utf8(text, "message"))
        except (UsageError, TurnTooLong, ChatTemplateError) as e:
            render.error(str(e))
            failed += 1
            continue
        for notice in session.notices:
            render.warning(notice)
        session.notices.clear()
        try:
            for piece in reply:
                out.write(piece)
                if out.closed:  # the reader went away (`| head`)
                    return failed
        except KeyboardInterrupt:
            reply.close()  # keeps the text shown so far as the reply
            out.write("\n")
            render.info("reply stopped")
            continue
        out.write("\n")
        if verbose:
            stats = session.last
            render.stats(
                {
                    "prompt tokens": len(stats.prompt_ids),
                    "cached": stats.reused_tokens,
                    "first token s": round(stats.prefill_seconds, 4),
                    "new tokens": len(stats.new_ids),
                    "tok/s": stats.tokens_per_second,
                    "finish": str(stats.finish_reason),
                }
            )


@app.command()
def download(
    repo: Annotated[
        str, typer.Argument(help="Hub repository, e.g. HuggingFaceTB/SmolLM2-135M-Instruct.")
    ],
    revision: Annotated[
        str | None, typer.Option("--revision", help="Branch, tag or commit; default: main.")
    ] = None,
    dest_dir: Annotated[
        Path | None,
        typer.Option("--dir", help="Folder to fill; default: weights/<name, lowercased>."),
    ] = None,
    debug: Debug = False,
) -> None:
    """Fetch a model from the Hugging Face Hub: config, tokenizer and safetensors only.

    Pickle weights (.bin, .pt) are never fetched. An interrupted download resumes.

    Offline (or with HF_HUB_OFFLINE=1) the files come from the Hugging Face cache.
    """
    with handled_errors(debug):
        import_torch()
        from .download import default_dir, validate
        from .download import download as fetch

        result = fetch(repo, dest_dir or default_dir(repo), revision)
        summary = validate(result.path)
        source = " (from the local Hugging Face cache)" if result.offline else ""
        render.info(f"{repo}{source}: {len(result.files)} files in {result.path} — {summary}")
        render.info(f"use it with: gptcli generate -m {result.path}")


def main() -> None:
    """Console-script entry point: usage errors become one line and exit 2."""
    # `kill` or `timeout` end us like Ctrl-C does: through exceptions, so cleanup runs.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(EXIT_TERMINATED))
    signal.signal(signal.SIGINT, _on_sigint)
    render.quiet_broken_pipes()  # `gptcli --help | head -1` ends with 0, as `cat` would
    render.show_warnings()  # the loader's warnings (e.g. NaN weights) as one line each
    try:
        code = app(standalone_mode=False)
    except (typer.Abort, KeyboardInterrupt):  # Ctrl-C outside a command's own handling
        code = EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader of stdout or stderr went away (`| head`): not an error
        render.silence_stdout()
        code = 0
    except TyperException as e:  # Typer's own (vendored click) usage errors
        ctx = getattr(e, "ctx", None)
        if type(e).__name__ == "NoArgsIsHelpError" and ctx is not None:
            print(ctx.get_help())  # `gptcli` alone: show the help, as click would
        else:
            message = e.format_message() if hasattr(e, "format_message") else str(e)
            message = " ".join(message.split())  # one line, however Typer wrapped it
            render.error(f"{message} (see {ctx.command_path if ctx else 'gptcli'} --help)")
        code = getattr(e, "exit_code", 2)
    if code == EXIT_INTERRUPTED:  # Typer turns a Ctrl-C while parsing into a bare 130
        say_interrupted()
    sys.exit(code if isinstance(code, int) else 0)
