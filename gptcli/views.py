"""Drawing the results of the inspection commands (attention, info, perplexity).

Results go to stdout through a Rich console that writes no colour or escape codes when stdout
is not a terminal (or NO_COLOR is set); heatmap cells then fall back to shade characters.
Token text is model data: it is shown with control characters escaped and is never parsed as
Rich markup. No torch here; matrices arrive as nested lists of floats.
"""

from __future__ import annotations

import importlib.util
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.cells import cell_len
from rich.color import Color
from rich.columns import Columns
from rich.console import Console, Group
from rich.panel import Panel
from rich.style import Style
from rich.table import Table
from rich.text import Text

from .errors import GptcliError
from .render import printable

Matrix = Sequence[Sequence[float]]

#: Most tokens a terminal heatmap shows (the first ones: a causal matrix's top-left corner is
#: complete, each row still sums to 1).
MAX_SHOWN = 40
LABEL_WIDTH = 10  # row labels
COLUMN_LABEL_HEIGHT = 6  # column labels, written downwards
#: Shade characters for consoles without colour: (upper bound of the weight, character).
SHADES = ((0.02, " "), (0.1, "░"), (0.3, "▒"), (0.6, "▓"), (math.inf, "█"))
#: Colour ramp from weight 0 to 1.
RAMP = ((0.0, (24, 24, 48)), (0.35, (120, 40, 140)), (0.7, (235, 110, 40)), (1.0, (255, 245, 160)))


def stdout_console() -> Console:
    return Console(highlight=False)


def token_label(text: str, width: int = LABEL_WIDTH) -> str:
    """A token's text as a short printable label: control characters escaped (\\n, \\x1b),
    spaces shown as '␣', cut to `width` cells with '…'."""
    shown = "".join(
        ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text
    ).replace(" ", "␣")
    if not shown:
        shown = "∅"
    if cell_len(shown) <= width:
        return shown
    out = ""
    for ch in shown:
        if cell_len(out + ch) > width - 1:
            break
        out += ch
    return out + "…"


def _shade(weight: float) -> str:
    for bound, char in SHADES:
        if weight < bound:
            return char
    return SHADES[-1][1]


def _colour(weight: float) -> Style:
    weight = min(max(weight, 0.0), 1.0)
    for (lo, c0), (hi, c1) in zip(RAMP, RAMP[1:], strict=False):
        if weight <= hi:
            t = (weight - lo) / (hi - lo)
            rgb = [round(a + (b - a) * t) for a, b in zip(c0, c1, strict=True)]
            return Style(color=Color.from_rgb(*rgb))
    return Style(color=Color.from_rgb(*RAMP[-1][1]))


def _uses_colour(console: Console) -> bool:
    return console.color_system is not None and not console.no_color


def _cells(row: Sequence[float], n: int, width: int, colour: bool) -> Text:
    """One heatmap row: n cells of `width` characters; blank above the diagonal."""
    text = Text()
    for j in range(n):
        if j >= len(row):
            text.append(" " * width)
        elif colour:
            text.append("█" * width, _colour(row[j]))
        else:
            text.append(_shade(row[j]) * width)
    return text


def _vertical(label: str, height: int) -> list[str]:
    """A label as `height` two-cell pieces, one per line, top to bottom."""
    pieces = []
    for ch in label[:height]:
        pieces.append(ch if cell_len(ch) == 2 else (ch + " " if cell_len(ch) == 1 else "? "))
    return pieces + ["  "] * (height - len(pieces))


def heatmap(tokens: Sequence[str], weights: Matrix, title: str, colour: bool) -> Text:
    """Rows = query tokens, columns = key tokens (labels written downwards), two cells each."""
    n = len(tokens)
    labels = [token_label(t) for t in tokens]
    out = Text(title + "\n", style="bold")
    columns = [_vertical(token_label(t, COLUMN_LABEL_HEIGHT), COLUMN_LABEL_HEIGHT) for t in tokens]
    indent = " " * (4 + LABEL_WIDTH + 1)
    for line in range(COLUMN_LABEL_HEIGHT):
        out.append(indent + "".join(col[line] for col in columns).rstrip() + "\n", style="dim")
    for i in range(n):
        label = labels[i] + " " * (LABEL_WIDTH - cell_len(labels[i]))
        out.append(f"{i:>3} {label} ", style="dim")
        out.append_text(_cells(weights[i][: i + 1], n, 2, colour))
        out.append("\n")
    out.append_text(_legend(colour))
    return out


def _legend(colour: bool) -> Text:
    text = Text("weight  0 ", style="dim")
    if colour:
        for k in range(11):
            text.append("██", _colour(k / 10))
    else:
        previous = 0.0
        for bound, char in SHADES:
            shown = char if char != " " else "' '"
            if math.isinf(bound):
                text.append(f"{shown} ≥{previous:g}  ")
            else:
                text.append(f"{shown} <{bound:g}  ")
            previous = bound
    text.append(" 1" if colour else "")
    return text


def small_heatmap(weights: Matrix, colour: bool) -> Text:
    """A one-cell-per-token heatmap without labels, for a grid of heads."""
    n = len(weights)
    rows = [_cells(weights[i][: i + 1], n, 1, colour) for i in range(n)]
    return Text("\n").join(rows)


def heads_grid(tokens: Sequence[str], layers: Sequence[Matrix], kinds: Sequence[str]) -> Group:
    """Every head of a layer as small heatmaps, with a numbered key of the tokens above."""
    console = stdout_console()
    colour = _uses_colour(console)
    key = Text("tokens: ", style="dim")
    for i, token in enumerate(tokens):
        key.append(f"{i}", style="dim")
        key.append(f":{token_label(token)} ")
    panels = [
        Panel(
            small_heatmap(weights, colour),
            title=f"head {h}",
            subtitle=kinds[h],
            width=max(len(layers[h]) + 4, 20),
        )
        for h, weights in enumerate(layers)
    ]
    return Group(key, Columns(panels), _legend(colour))


def print_heatmap(tokens: Sequence[str], weights: Matrix, title: str) -> None:
    console = stdout_console()
    console.print(heatmap(tokens, weights, title, _uses_colour(console)), soft_wrap=True)


def print_grid(tokens: Sequence[str], layers: Sequence[Matrix], kinds: Sequence[str]) -> None:
    stdout_console().print(heads_grid(tokens, layers, kinds))


def summary_table(summaries: Sequence[dict[str, object]], caption: str) -> Table:
    """The per-head table: kind, mean weight on each pattern, mean entropy."""
    table = Table(caption=caption, caption_justify="left")
    table.add_column("head", justify="right")
    table.add_column("kind")
    for name in ("previous", "first", "same"):
        table.add_column(f"→{name}", justify="right")
    table.add_column("entropy bits", justify="right")
    for s in summaries:
        table.add_row(
            str(s["head"]),
            str(s["kind"]),
            f"{s['previous']:.2f}",
            f"{s['first']:.2f}",
            f"{s['same']:.2f}",
            f"{s['entropy_bits']:.2f}",
        )
    return table


def print_table(table: Table) -> None:
    stdout_console().print(table)


# --- PNG (optional: pip install 'gptcli[png]') ------------------------------------------------

PNG_HINT = "--png needs matplotlib, which is not installed; run: pip install 'gptcli[png]'"


def png_available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def write_png(
    path: Path, tokens: Sequence[str], panels: Sequence[tuple[str, Matrix]], title: str
) -> None:
    """Heatmaps (one per (title, matrix) panel, in a grid) with token tick labels, as a PNG."""
    if not png_available():
        raise GptcliError(PNG_HINT)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(tokens)
    # '$' would start matplotlib's math mode; a label is always literal text.
    labels = [token_label(t, 12).replace("$", r"\$") for t in tokens]
    cols = math.ceil(math.sqrt(len(panels)))
    rows = math.ceil(len(panels) / cols)
    side = max(3.0, 0.22 * n + 1.5)
    fig, axes = plt.subplots(
        rows, cols, figsize=(cols * side, rows * side), squeeze=False, layout="constrained"
    )
    image = None
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for ax, (name, matrix) in zip(axes.flat, panels, strict=False):
        grid = [[row[j] if j < len(row) else float("nan") for j in range(n)] for row in matrix]
        image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="magma", interpolation="nearest")
        ax.set_title(name, fontsize=9)
        fontsize = max(4, min(8, 200 // max(n, 1)))
        ax.set_xticks(range(n), labels, rotation=90, fontsize=fontsize)
        ax.set_yticks(range(n), labels, fontsize=fontsize)
        ax.set_xlabel("key", fontsize=8)
        ax.set_ylabel("query", fontsize=8)
    fig.suptitle(title)
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.6, label="attention weight")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # missing glyphs for some token characters
            fig.savefig(path, dpi=120, format=Path(path).suffix[1:].lower() or "png")
    except OSError as e:
        raise GptcliError(f"--png {path}: cannot write ({e.strerror or e})") from None
    finally:
        plt.close(fig)


# --- gptcli info ------------------------------------------------------------------------------


def _bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n:,} B ({n / size:.1f} {unit})"
    return f"{n:,} B"


def _token(token: dict[str, Any] | None) -> str:
    if token is None:
        return "none"
    text = token["text"]
    return f"{token_label(str(text), 40) if text is not None else '?'} (id {token['id']})"


def info_table(info: dict[str, Any]) -> Table:
    """`gptcli info` as a two-column table."""
    heads, kv = int(info["heads"]), int(info["kv_heads"])
    if kv == heads:
        kv_note = "(multi-head)"
    elif kv == 1:
        kv_note = "(multi-query)"
    else:
        kv_note = f"(grouped-query, {heads // kv} query heads each)"
    kv_bytes: dict[str, int] = info["kv_cache_bytes_per_token"]
    in_use = str(info["dtype_in_use"])
    rows = [
        ("family", str(info["family"])),
        ("layers", str(info["layers"])),
        ("query heads", str(heads)),
        ("key/value heads", f"{kv} {kv_note}"),
        ("head size", str(info["head_size"])),
        ("hidden size", str(info["hidden_size"])),
        ("MLP size", str(info["mlp_size"])),
        ("context", f"{info['context']:,} tokens"),
        ("vocabulary", f"{info['vocab_size']:,} (tokenizer: {info['tokenizer_vocab_size']:,})"),
        ("parameters", f"{info['parameters']:,} ({int(info['parameters']) / 1e6:.1f} M)"),
        ("tied embeddings", "yes" if info["tied_embeddings"] else "no"),
        ("dtype on disk", str(info["dtype_on_disk"])),
        ("weights on disk", f"{_bytes(int(info['file_bytes']))}"),
        ("files", ", ".join(info["files"])),
    ]
    kv_parts = []
    for dtype, n in kv_bytes.items():
        note = f" (in use on {info['device']})" if dtype == in_use else ""
        kv_parts.append(f"{_bytes(n)} in {dtype}{note}")
    rows.append(("KV cache per token", "; ".join(kv_parts)))
    eos: list[dict[str, Any]] = info["eos"]
    rows += [
        ("BOS", _token(info["bos"])),
        ("EOS", ", ".join(_token(t) for t in eos) or "none"),
        ("chat template", "yes" if info["chat_template"] else "no"),
    ]
    table = Table(title=Text(printable(str(info["model"]))), show_header=False)
    table.add_column("field", style="bold", no_wrap=True)
    table.add_column("value")
    for name, value in rows:
        table.add_row(name, Text(value))
    return table
