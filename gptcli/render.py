"""Everything the user sees: generated text on stdout, the rest on stderr.

Model text goes to stdout as raw UTF-8 bytes, flushed per chunk and never parsed as Rich
markup. Progress, statistics, warnings and errors go through a Rich console on stderr,
which turns off colour and animation by itself when stderr is not a terminal or NO_COLOR
is set.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

_console: Console | None = None


def console() -> Console:
    """The stderr console (created on first use so tests can swap stderr)."""
    global _console
    if _console is None or _console.file is not sys.stderr:
        _console = Console(stderr=True, highlight=False, soft_wrap=True)
    return _console


class TextOut:
    """Writes generated text to stdout; notices when the reader has gone away (`| head`)."""

    def __init__(self) -> None:
        self.closed = sys.stdout is None  # started with stdout closed (`>&-`)

    def write(self, text: str) -> None:
        if self.closed or not text:
            return
        try:
            sys.stdout.buffer.write(text.encode("utf-8"))
            sys.stdout.flush()
        except BrokenPipeError:
            self.closed = True
            silence_stdout()


def silence_stdout() -> None:
    """Point stdout and stderr at /dev/null when a reader has gone away, so that Python's
    exit-time flush does not complain of the broken pipe."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            stream.flush()
        with contextlib.suppress(OSError, ValueError, AttributeError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, stream.fileno())


def printable(message: str) -> str:
    """Show control characters from paths or model files as escapes, never as live codes."""
    return "".join(
        ch if ch.isprintable() or ch in "\n\t" else ch.encode("unicode_escape").decode("ascii")
        for ch in message
    )


def error(message: str) -> None:
    console().print(f"[bold red]error:[/] {escape(printable(message))}")


def warning(message: str) -> None:
    console().print(f"[yellow]warning:[/] {escape(printable(message))}")


def info(message: str) -> None:
    console().print(f"[dim]{escape(printable(message))}[/]")


def show_warnings() -> None:
    """Show gptcli's own Python warnings (e.g. the loader's NaN weights) as `warning:` lines,
    every time; other warnings keep Python's usual treatment."""
    import warnings

    from .errors import GptcliWarning

    warnings.simplefilter("always", GptcliWarning)
    show_python_warning = warnings.showwarning

    def show(message: Any, category: Any, *args: Any, **kwargs: Any) -> None:
        if issubclass(category, GptcliWarning):
            warning(str(message))
        else:
            show_python_warning(message, category, *args, **kwargs)

    warnings.showwarning = show


def quiet_broken_pipes() -> None:
    """When a reader goes away (`gptcli --help | head -1`), Rich exits 1 by default. Instead:
    a closed stdout ends the program quietly with 0, as it does for `cat`; a closed stderr just
    silences the console and the program carries on."""

    def on_broken_pipe(self: Console) -> None:
        self.quiet = True
        if self.file is sys.stderr:
            with contextlib.suppress(OSError, ValueError, AttributeError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stderr.fileno())
            return
        silence_stdout()
        raise SystemExit(0)

    Console.on_broken_pipe = on_broken_pipe  # type: ignore[method-assign]


@contextlib.contextmanager
def status(message: str) -> Iterator[None]:
    """A spinner on stderr while something slow happens; nothing at all when not a TTY."""
    con = console()
    if con.is_terminal and not con.is_dumb_terminal:
        with con.status(escape(printable(message)), spinner="dots"):
            yield
    else:
        yield


def stats_line(stats: dict[str, float | int | str]) -> str:
    """'12 prompt tokens · 32 new tokens · 35.2 tok/s · ...' for the end of a run."""
    parts = []
    for key, value in stats.items():
        if isinstance(value, float):
            value = f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
        parts.append(f"{key} {value}")
    return " · ".join(parts)


def stats(stats: dict[str, float | int | str]) -> None:
    info(stats_line(stats))


def newline_if_terminal() -> None:
    """End the generated line on a terminal, so the shell prompt starts on its own line."""
    if sys.stdout is not None and sys.stdout.isatty():
        sys.stdout.write("\n")
        sys.stdout.flush()


# --- benchmark results (gptcli bench) --------------------------------------------------------

#: Columns of the human-readable tables: header, and how to show a row record.
BENCH_COLUMNS: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
    ("model", lambda r: printable(Path(str(r["model"])).name)),
    ("dtype", lambda r: str(r["dtype"])),
    ("quant", lambda r: str(r["quant"])),
    ("batch", lambda r: str(r["batch"])),
    ("p", lambda r: str(r["n_prompt"])),
    ("n", lambda r: str(r["n_gen"])),
    ("prefill tok/s", lambda r: _pm(r["prefill_tok_s"], r["prefill_tok_s_std"])),
    ("decode tok/s", lambda r: _pm(r["decode_tok_s"], r["decode_tok_s_std"])),
    ("TTFT ms", lambda r: _pm(r["ttft_ms"], r["ttft_ms_std"])),
    ("load s", lambda r: f"{r['load_s']:.2f}"),
    ("peak MB", lambda r: f"{r['peak_mem_mb']:.0f}"),
    ("decode GB/s", lambda r: f"{r['decode_gb_s']:.2f}"),
]
#: Right-aligned (numeric) columns.
_NUMERIC = {"batch", "p", "n", "load s", "peak MB", "decode GB/s"}


def number(value: float) -> str:
    """Three significant figures, without exponents: 1234 -> '1234', 3.14159 -> '3.14'."""
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _pm(mean: float, std: float) -> str:
    return f"{number(mean)} ± {number(std)}"


def bench_cells(records: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Headers and the text of every cell of the human-readable benchmark table."""
    headers = [name for name, _ in BENCH_COLUMNS]
    return headers, [[show(r) for _, show in BENCH_COLUMNS] for r in records]


def bench_plain(records: list[dict[str, Any]], caption: str) -> str:
    """The table as aligned plain text (no escape codes), for pipes and files."""
    headers, cells = bench_cells(records)
    widths = [max(len(row[i]) for row in [headers, *cells]) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        parts = [
            cell.rjust(w) if headers[i] in _NUMERIC or "±" in cell else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([caption, "", line(headers), rule, *map(line, cells)]) + "\n"


def bench_markdown(records: list[dict[str, Any]], caption: str) -> str:
    """A Markdown table (for READMEs), the machine on the line above it."""
    headers, cells = bench_cells(records)
    align = ["---:" if h in _NUMERIC or h.endswith(("tok/s", "ms")) else "---" for h in headers]
    rows = [headers, align, *cells]
    table = "\n".join("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows)
    return f"{caption}\n\n{table}\n"


def bench_csv(records: list[dict[str, Any]], columns: list[str]) -> str:
    """Every field of every row, one header line first."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    # Text fields from paths are shown as typed, never as live control characters.
    writer.writerows(
        {k: printable(v) if isinstance(v, str) else v for k, v in record.items()}
        for record in records
    )
    return buffer.getvalue()


def bench_rich(records: list[dict[str, Any]], caption: str) -> None:
    """The table drawn by Rich on stdout (for a terminal)."""
    from rich.table import Table

    headers, cells = bench_cells(records)
    table = Table(caption=escape(caption), caption_justify="left")
    for h in headers:
        justify = "right" if h in _NUMERIC or h.endswith(("tok/s", "ms")) else "left"
        table.add_column(h, justify=justify, no_wrap=h.endswith(("tok/s", "ms")))
    for row in cells:
        table.add_row(*(escape(c) for c in row))
    Console(highlight=False).print(table)


@contextlib.contextmanager
def progress_bar(description: str) -> Iterator[Callable[[int, int, str], None]]:
    """A progress callback (done, total, what) drawing a bar on stderr, or doing nothing
    when stderr is not a terminal."""
    con = console()
    if not con.is_terminal or con.is_dumb_terminal:
        yield lambda done, total, what: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=con,
        transient=True,
    ) as bar:
        task = bar.add_task(escape(description), total=None)

        def update(done: int, total: int, what: str) -> None:
            bar.update(
                task, completed=done, total=total, description=escape(f"{description} {what}")
            )

        yield update


@contextlib.contextmanager
def batch_progress(total: int) -> Iterator[Callable[[int, int], None]]:
    """An update callback (prompts done, new tokens so far) drawing prompts done, tokens/s and
    the time left on stderr; doing nothing when stderr is not a terminal."""
    con = console()
    if not con.is_terminal or con.is_dumb_terminal:
        yield lambda done, tokens: None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    started = time.perf_counter()
    with Progress(
        TextColumn("batch"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
        console=con,
        transient=True,
    ) as bar:
        task = bar.add_task("batch", total=total, rate="")

        def update(done: int, tokens: int) -> None:
            seconds = time.perf_counter() - started
            rate = f"{number(tokens / seconds)} tok/s" if seconds > 0 and tokens else ""
            bar.update(task, completed=done, rate=rate)

        yield update
