"""Everything the user sees: generated text on stdout, the rest on stderr.

Model text goes to stdout as raw UTF-8 bytes, flushed per chunk and never parsed as Rich
markup. Progress, statistics, warnings and errors go through a Rich console on stderr,
which turns off colour and animation by itself when stderr is not a terminal or NO_COLOR
is set.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

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
        self.closed = False

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
    """Point stdout at /dev/null so Python's exit-time flush does not complain of the pipe."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def error(message: str) -> None:
    console().print(f"[bold red]error:[/] {escape(message)}")


def warning(message: str) -> None:
    console().print(f"[yellow]warning:[/] {escape(message)}")


def info(message: str) -> None:
    console().print(f"[dim]{escape(message)}[/]")


@contextlib.contextmanager
def status(message: str) -> Iterator[None]:
    """A spinner on stderr while something slow happens; nothing at all when not a TTY."""
    con = console()
    if con.is_terminal and not con.is_dumb_terminal:
        with con.status(escape(message), spinner="dots"):
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
    if sys.stdout.isatty():
        sys.stdout.write("\n")
        sys.stdout.flush()
