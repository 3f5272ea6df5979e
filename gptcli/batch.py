"""Many prompts generated together, for `gptcli batch`: input lines, the batched engine, records.

How a batch runs (continuous batching over one shared key/value cache):

- Rows are left-padded so that every row's next token goes into the same cache slot. The model
  gets each row's pad count (`GPT.forward(left_pad=...)`), from which it derives per-row
  positions and a mask that hides the pad slots.
- Each row chooses its tokens from its own logits with its own `torch.Generator` (seeded from
  the row's seed), sampling parameters and stop rules, in the order `Generation` and the CLI's
  stop handling use, so a row yields what `gptcli generate` yields for that prompt and seed.
- A row that finishes leaves the batch at once (the last row moves into its cache row) and the
  next waiting prompt is prefilled into the free row, padded on the left to end at the running
  rows' slot. The batch so stays full while prompts wait, and a finished row costs nothing more.
  The cache is rebuilt only when a joining prompt is longer than the running rows or its new
  tokens would not fit; the rebuild also cuts the slots that are padding for every row.

Numerics: a matrix product over several rows may round differently in the last bits from the
same product over one row (the kernels block the sums by shape), so a row's logits here differ
from batch-1 logits by about 1e-4 on the default model. A token can change only where the two
best logits are that close; see the README for what was measured.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import secrets
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .config import ModelConfig
from .errors import GptcliError, UsageError
from .generate import REPEAT_WINDOW
from .model import GPT, KVCache
from .sampling import SamplingParams, make_generator, sample
from .tokenizer import StopFilter, TextStream, Tokenizer

MAX_SEED = 2**63 - 1
FORMATS = ("auto", "text", "jsonl")
#: Filler id in pad slots; any valid id does, since no query attends to a pad slot.
PAD_ID = 0
#: Share of the available memory a batch may plan to use (the rest: allocator slack, others).
MEMORY_SHARE = 0.8


# --- input lines --------------------------------------------------------------------------


@dataclass(frozen=True)
class Defaults:
    """Per-prompt settings from the command line; JSONL lines may override each."""

    max_new_tokens: int
    params: SamplingParams
    seed: int | None  # None: a random seed per prompt
    stops: tuple[str, ...] = ()


@dataclass(frozen=True)
class Line:
    """One prompt of the input, parsed and validated (not yet tokenized)."""

    index: int  # order among the input's prompts: output follows it
    number: int  # line number in the input, for messages
    id: str | int
    prompt: str
    max_new_tokens: int
    params: SamplingParams
    seed: int
    stops: tuple[str, ...]


@dataclass(frozen=True)
class LineError:
    """A line that cannot run; it becomes an error record in its place in the output."""

    index: int
    id: str | int
    error: str

    def record(self) -> dict[str, object]:
        return {"id": self.id, "error": self.error}


Entry = Line | LineError

_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}
_ESCAPE = re.compile(r"\\([nt\\])")
# JSONL keys that map onto SamplingParams fields.
_PARAM_KEYS = {
    "temp": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "min_p": "min_p",
    "repeat_penalty": "repeat_penalty",
}


def unescape(line: str) -> str:
    """A text line's escapes: `\\n` newline, `\\t` tab, `\\\\` backslash; others stay as typed."""
    return _ESCAPE.sub(lambda m: _ESCAPES[m.group(1)], line)


def detect_format(text: str) -> str:
    """'jsonl' when the first non-blank line starts with '{', else 'text'."""
    for line in text.splitlines():
        if line.strip():
            return "jsonl" if line.lstrip().startswith("{") else "text"
    return "text"


#: The JSONL keys a line may set; others (an eval set's answers, say) are carried along unused.
JSONL_KEYS = frozenset({"prompt", "id", "max_new_tokens", "seed", "stop", *_PARAM_KEYS})


def parse_input(
    text: str, fmt: str, defaults: Defaults, unknown: set[str] | None = None
) -> list[Entry]:
    """Every non-blank line of `text` as a Line, or a LineError saying what is wrong with it.

    ids default to the 1-based line number; a repeated id is an error (resume needs unique ids).
    JSONL keys that are not options are added to `unknown` when given, so the caller can warn
    of a misspelt one.
    """
    if fmt == "auto":
        fmt = detect_format(text)
    entries: list[Entry] = []
    first_line_of: dict[str, int] = {}
    for number, raw in enumerate(text.split("\n"), start=1):
        raw = raw.removesuffix("\r")
        if not raw.strip():
            continue
        index = len(entries)
        if fmt == "text":
            entry: Entry = _line(index, number, number, unescape(raw), {}, defaults)
        else:
            entry = _jsonl_line(index, number, raw, defaults, unknown)
        key = id_key(entry.id)
        if key in first_line_of and isinstance(entry, Line):
            first = first_line_of[key]
            entry = LineError(
                index, entry.id, f"line {number}: duplicate id (first on line {first})"
            )
        first_line_of.setdefault(key, number)
        entries.append(entry)
    return entries


def _jsonl_line(
    index: int, number: int, raw: str, defaults: Defaults, unknown: set[str] | None
) -> Entry:
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        return LineError(
            index, number, f"line {number}: invalid JSON ({e.msg} at column {e.colno})"
        )
    if not isinstance(obj, dict):
        return LineError(index, number, f"line {number}: expected a JSON object with a prompt")
    if unknown is not None:
        unknown.update(key for key in obj if key not in JSONL_KEYS)
    line_id = obj.get("id", number)
    if isinstance(line_id, bool) or not isinstance(line_id, (str, int)):
        return LineError(index, number, f"line {number}: id must be a string or a whole number")
    prompt = obj.get("prompt")
    if not isinstance(prompt, str):
        return LineError(index, line_id, f'line {number}: "prompt" (a string) is missing')
    return _line(index, number, line_id, prompt, obj, defaults)


def _line(
    index: int,
    number: int,
    line_id: str | int,
    prompt: str,
    options: dict[str, object],
    defaults: Defaults,
) -> Entry:
    """Apply a line's own options over the defaults, validating each as the CLI would."""
    try:
        overrides = {field: options[key] for key, field in _PARAM_KEYS.items() if key in options}
        try:
            params = replace(defaults.params, **overrides)  # validates, naming the option
        except UsageError as e:
            # The command line's values were checked already: the line's own key is at fault.
            message = str(e)
            for key in _PARAM_KEYS:
                message = message.replace("--" + key.replace("_", "-"), key)
            raise UsageError(message) from None
        max_new = options.get("max_new_tokens", defaults.max_new_tokens)
        if isinstance(max_new, bool) or not isinstance(max_new, int) or max_new < 1:
            raise UsageError(f"max_new_tokens must be a whole number >= 1, got {max_new!r}")
        seed = options.get("seed", defaults.seed)
        if seed is None or seed == -1:
            seed = secrets.randbelow(2**31)
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
            raise UsageError(f"seed must be -1 (random) or from 0 to {MAX_SEED}, got {seed!r}")
        stops = options.get("stop", defaults.stops)
        stops = (stops,) if isinstance(stops, str) else stops
        if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) for s in stops):
            raise UsageError(f"stop must be a string or a list of strings, got {stops!r}")
        try:
            StopFilter(stops)  # refuses empty stop strings
        except UsageError as e:
            raise UsageError(str(e).replace("--stop", "stop")) from None
    except UsageError as e:
        return LineError(index, line_id, f"line {number}: {e}")
    return Line(index, number, line_id, prompt, max_new, params, seed, tuple(stops))


def id_key(line_id: object) -> str:
    """A hashable key for an id as JSON writes it (so 1 and "1" stay different)."""
    return json.dumps(line_id)


# --- requests: tokenized lines -----------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """A line ready to run: its prompt as ids, within the model's context."""

    line: Line
    prompt_ids: tuple[int, ...]
    truncated_from: int | None = None  # the prompt's length before --truncate cut it


def encode_prompt(tokenizer: Tokenizer, text: str, bos_token_id: int | None) -> list[int]:
    """Prompt ids as `gptcli generate` makes them: BOS where the tokenizer wants one, and a lone
    start token for an empty prompt."""
    ids = tokenizer.encode(text)
    if tokenizer.add_bos_token and tokenizer.bos_id is not None and ids[:1] != [tokenizer.bos_id]:
        ids = [tokenizer.bos_id, *ids]
    if not ids:
        bos = bos_token_id if bos_token_id is not None else tokenizer.bos_id
        if bos is None:
            raise UsageError("the prompt is empty and this model has no start token to begin from")
        ids = [bos]
    return ids


def make_request(
    line: Line, tokenizer: Tokenizer, config: ModelConfig, truncate: bool
) -> Request | LineError:
    """Tokenize a line and apply the context policy of `gptcli generate` to it."""
    try:
        ids = encode_prompt(tokenizer, line.prompt, config.bos_token_id)
    except UsageError as e:
        return LineError(line.index, line.id, f"line {line.number}: {e}")
    context, max_new = config.max_positions, line.max_new_tokens
    if len(ids) + max_new <= context:
        return Request(line, tuple(ids))
    keep = context - max_new
    if not truncate or keep < 1:
        hint = "; lower it" if keep < 1 else "; lower it, shorten the prompt or pass --truncate"
        return LineError(
            line.index,
            line.id,
            f"line {line.number}: the prompt has {len(ids)} tokens and max_new_tokens is "
            f"{max_new}, more than the model's context of {context}{hint}",
        )
    return Request(line, tuple(ids[-keep:]), truncated_from=len(ids))


@dataclass(frozen=True)
class Result:
    request: Request
    new_ids: tuple[int, ...]
    text: str
    finish_reason: str

    def record(self) -> dict[str, object]:
        line = self.request.line
        return {
            "id": line.id,
            "prompt": line.prompt,
            "text": self.text,
            "finish_reason": self.finish_reason,
            "prompt_tokens": len(self.request.prompt_ids),
            "new_tokens": len(self.new_ids),
            "seed": line.seed,
        }


# --- the engine --------------------------------------------------------------------------


class _Row:
    """One prompt in flight: its generator, recent ids, text so far and stop rules."""

    def __init__(self, request: Request, tokenizer: Tokenizer, device: torch.device) -> None:
        self.request = request
        line = request.line
        self.params = line.params
        self.generator = make_generator(line.seed, str(device))
        self.recent = list(request.prompt_ids[-REPEAT_WINDOW:])  # for the repetition penalty
        self.new_ids: list[int] = []
        self.text = TextStream(tokenizer, line.stops)
        self.pieces: list[str] = []
        self.finish_reason: str | None = None
        # Greedy without a penalty needs no generator: one argmax serves all such rows.
        self.plain_greedy = self.params.is_greedy and self.params.repeat_penalty == 1

    @property
    def cached(self) -> int:
        """Tokens in the cache: the prompt, and every new token but the last (not fed yet)."""
        return len(self.request.prompt_ids) + max(len(self.new_ids) - 1, 0)

    @property
    def room(self) -> int:
        """Cache slots this row may still write after its current ones (the tokens to feed)."""
        return self.request.line.max_new_tokens - max(len(self.new_ids), 1)

    def choose(self, logits: torch.Tensor) -> int:
        """Sample from this row's logits [1, vocab] as `Generation` does."""
        recent = None
        if self.params.repeat_penalty != 1:
            recent = torch.tensor(self.recent, device=logits.device)[None, :]
        return int(sample(logits, self.params, self.generator, recent).item())

    def advance(self, token: int, eos_ids: frozenset[int], context: int) -> bool:
        """Take the chosen token; True when the row has finished. The checks and their order are
        those of `Generation` and the CLI's stop-string handling."""
        if token in eos_ids:
            return self._finish("eos")
        self.new_ids.append(token)
        self.recent = [*self.recent[-(REPEAT_WINDOW - 1) :], token]
        self.pieces.append(self.text.push(token))
        if self.text.stopped:
            self.finish_reason = "stop"
            return True
        if len(self.request.prompt_ids) + len(self.new_ids) - 1 >= context:  # no slot to feed it
            return self._finish("context")
        if len(self.new_ids) >= self.request.line.max_new_tokens:
            return self._finish("length")
        return False

    def _finish(self, reason: str) -> bool:
        # Release the text held back for a possible multi-byte character or stop string.
        self.pieces.append(self.text.finish())
        self.finish_reason = "stop" if self.text.stopped else reason
        return True

    def result(self) -> Result:
        assert self.finish_reason is not None
        return Result(self.request, tuple(self.new_ids), "".join(self.pieces), self.finish_reason)


class BatchGenerator:
    """Runs requests up to `batch_size` at a time; `run` yields each result as its row finishes
    (not in input order; see `InOrder`).

    Row i of the batch lives in row i of one cache of `batch_size` rows. A finished row is
    replaced by the last row (one row's keys and values copied), and a joining prompt is
    prefilled straight into a free row when it ends by the current slot and its new tokens fit;
    only otherwise is the cache rebuilt ("compacted": every row shifted so that the longest
    starts at slot 0), with room for the longest request's new tokens to spare, which keeps
    rebuilds rare.
    """

    def __init__(
        self, model: GPT, tokenizer: Tokenizer, batch_size: int, eos_ids: Iterable[int] = ()
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.eos_ids = frozenset(eos_ids)
        self.rows: list[_Row] = []  # the running rows; rows[i] lives in cache row i
        self.cache: KVCache | None = None
        self.slot = 0  # the cache slot every row's next token goes into
        self.left_pad: torch.Tensor | None = None  # per row: its leading pad slots; None if all 0
        self.spare_slots = 0  # extra capacity of a rebuilt cache: the most new tokens requested
        self.decode_steps = 0
        self.compactions = 0

    def run(
        self, requests: Iterable[Request], on_tokens: Callable[[int], None] | None = None
    ) -> Iterator[Result]:
        """Generate every request; `on_tokens(n)` hears of the n new tokens of each step."""
        waiting = deque(requests)
        if not waiting:
            return
        n_rows = min(self.batch_size, len(waiting))
        self.spare_slots = max(request.line.max_new_tokens for request in waiting)
        while True:
            n_join = min(n_rows - len(self.rows), len(waiting))
            if n_join:
                device = self.model.device
                joining = [_Row(waiting.popleft(), self.tokenizer, device) for _ in range(n_join)]
                self._make_room(joining, n_rows)
                rows, logits = joining, self._prefill(joining)
            elif self.rows:
                rows, logits = self.rows, self._decode()
            else:
                return
            before = sum(len(row.new_ids) for row in rows)
            finished = self._choose(rows, logits)
            if on_tokens is not None:
                on_tokens(sum(len(row.new_ids) for row in rows) - before)
            if finished:
                self._drop(finished)
            for row in finished:
                yield row.result()

    def _make_room(self, joining: list[_Row], n_rows: int) -> None:
        """Get the cache ready for the joining rows: in place when their prompts end by the
        current slot and their new tokens fit in it, else in a rebuilt cache."""
        longest = max(len(row.request.prompt_ids) for row in joining)
        room = max(row.room for row in joining)
        if not self.rows:
            self.slot = longest  # nobody to stay aligned with: the slot count starts afresh
        cache = self.cache
        if cache is None or longest > self.slot or self.slot + room > cache.max_len:
            self._compact(longest, max([room] + [row.room for row in self.rows]), n_rows)

    @torch.inference_mode()
    def _compact(self, longest: int, room: int, n_rows: int) -> None:
        """A new cache: the running rows' keys and values shifted so that the longest row starts
        at slot 0 (or later, for a longer joining prompt), and room for every row's new tokens
        and then some."""
        used = max((row.cached for row in self.rows), default=0)
        slot = max(used, longest)
        cache = self.model.new_cache(n_rows, slot + room + self.spare_slots)
        if self.rows:
            assert self.cache is not None
            B = len(self.rows)
            for old, new in ((self.cache.k, cache.k), (self.cache.v, cache.v)):
                # [layers, rows, kv heads, slots, head_dim]: each row's used slots end at `slot`
                new[:, :B, :, slot - used : slot] = old[:, :B, :, self.slot - used : self.slot]
        self.cache, self.slot = cache, slot
        self.compactions += 1

    def _prefill(self, joining: list[_Row]) -> torch.Tensor:
        """Run the joining prompts (left-padded to end at the current slot) into the free rows
        after the running ones; their last logits [joining, vocab]."""
        assert self.cache is not None
        longest = max(len(row.request.prompt_ids) for row in joining)
        ids = [
            [PAD_ID] * (longest - len(row.request.prompt_ids)) + list(row.request.prompt_ids)
            for row in joining
        ]
        pads = [self.slot - len(row.request.prompt_ids) for row in joining]
        device = self.model.device
        left_pad = torch.tensor(pads, device=device) if any(pads) else None
        B = len(self.rows)
        rows = _cache_rows(self.cache, B, B + len(joining))
        logits = self.model(
            torch.tensor(ids, device=device),  # [joining, longest]
            start=self.slot - longest,
            cache=rows,
            last_only=True,
            left_pad=left_pad,
        )
        self.rows += joining
        self._update_pads()
        return logits[:, -1]

    def _decode(self) -> torch.Tensor:
        """One step: every row's last token in, the next logits [rows, vocab] out."""
        ids = torch.tensor([[row.new_ids[-1]] for row in self.rows], device=self.model.device)
        logits = self.model(ids, start=self.slot, cache=self.cache, left_pad=self.left_pad)
        self.slot += 1
        self.decode_steps += 1
        return logits[:, -1]

    def _choose(self, rows: list[_Row], logits: torch.Tensor) -> list[_Row]:
        """Each row's next token, from its logits row; the rows that finished."""
        greedy_ids: list[int] | None = None
        finished = []
        context = self.model.config.max_positions
        for i, row in enumerate(rows):
            if row.plain_greedy:
                if greedy_ids is None:
                    greedy_ids = logits.argmax(dim=-1).tolist()  # one transfer for all rows
                token = greedy_ids[i]
            else:
                token = row.choose(logits[i : i + 1])
            if row.advance(token, self.eos_ids, context):
                finished.append(row)
        return finished

    @torch.inference_mode()
    def _drop(self, finished: list[_Row]) -> None:
        """Take finished rows out: the last row moves into each one's place."""
        assert self.cache is not None
        for row in finished:
            i, last = self.rows.index(row), len(self.rows) - 1
            if i != last:
                moved = self.rows[last]
                first = self.slot - moved.cached  # its used slots: first .. slot-1
                for kv in (self.cache.k, self.cache.v):
                    kv[:, i, :, first : self.slot] = kv[:, last, :, first : self.slot]
                self.rows[i] = moved
            self.rows.pop()
        self._update_pads()

    def _update_pads(self) -> None:
        pads = [self.slot - row.cached for row in self.rows]
        self.left_pad = torch.tensor(pads, device=self.model.device) if any(pads) else None


def _cache_rows(cache: KVCache, start: int, stop: int) -> KVCache:
    """A view of rows start..stop-1 of `cache`: what a forward writes there lands in `cache`."""
    view = copy.copy(cache)
    view.k, view.v = cache.k[:, start:stop], cache.v[:, start:stop]
    return view


# --- output order, resume, memory --------------------------------------------------------


class InOrder:
    """Releases records in input order: `put` one by index, get back those now due."""

    def __init__(self, indices: Iterable[int]) -> None:
        self._order = sorted(indices)
        self._next = 0
        self._ready: dict[int, dict[str, object]] = {}

    def put(self, index: int, record: dict[str, object]) -> list[dict[str, object]]:
        self._ready[index] = record
        due = []
        while self._next < len(self._order) and self._order[self._next] in self._ready:
            due.append(self._ready.pop(self._order[self._next]))
            self._next += 1
        return due


def read_finished_ids(path: Path) -> set[str]:
    """Ids (as `id_key`s) that have a result in a previous run's output.

    Error records and a last line cut short by a crash are dropped from the file (rewritten
    under a temporary name, then renamed), so their prompts run again and the file stays valid
    JSONL. Any other line means the file is not a `gptcli batch` output: it is refused, not
    rewritten.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return set()
    except OSError as e:
        raise UsageError(f"--resume: cannot read {path} ({e.strerror})") from None
    lines = data.split(b"\n")
    kept: list[bytes] = []
    finished: set[str] = set()
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            record = None
        if isinstance(record, dict) and "id" in record and "text" in record:
            kept.append(raw)
            finished.add(id_key(record["id"]))
        elif isinstance(record, dict) and set(record) == {"id", "error"}:
            continue  # a failed prompt: it runs again
        elif record is None and number == len(lines):
            continue  # the last line, cut short by a crash (a whole line ends with a newline)
        else:
            raise UsageError(
                f"--resume: line {number} of {path} is not a gptcli batch result; is -o the "
                "right file? It is left as it is"
            )
    if len(kept) != len([raw for raw in lines if raw.strip()]):
        temporary = path.with_name(path.name + ".resume-tmp")
        temporary.write_bytes(b"".join(raw + b"\n" for raw in kept))
        os.replace(temporary, path)
    return finished


def batch_memory_bytes(
    config: ModelConfig, dtype: torch.dtype, batch: int, prompt_tokens: int, max_new: int
) -> int:
    """Bytes a batch may need beyond the weights, at its peak (an upper estimate).

    Two key/value caches (the old and the new one while the cache is rebuilt), each with room
    for the longest prompt plus three times the most new tokens (a row may join while another is
    mid-way, and a rebuilt cache keeps that many slots to spare), and
    the activations of a prefill of `batch` prompts: hidden states, the attention scores (when
    the attention kernel materializes them) and the float32 logits that sampling copies.
    """
    item = torch.empty((), dtype=dtype).element_size()
    slots = prompt_tokens + 3 * max_new
    cache = 2 * config.n_layer * batch * config.n_kv_head * slots * config.head_dim * item
    qkv = (config.n_head + 2 * config.n_kv_head) * config.head_dim
    per_token = (4 * config.d_model + qkv + 3 * config.d_ff) * item
    scores = batch * config.n_head * prompt_tokens * slots * 4
    logits = 4 * batch * config.vocab_size * 4
    return 2 * cache + batch * prompt_tokens * per_token + scores + logits


def available_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on `device`, or None when unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def fitting_batch_size(
    config: ModelConfig,
    dtype: torch.dtype,
    batch: int,
    prompt_tokens: int,
    max_new: int,
    available: int | None,
) -> int:
    """The largest batch size up to `batch` whose estimate fits in the available memory (all
    of `batch` when that is unknown), or 0 when not even one prompt fits."""
    if available is None:
        return batch
    budget = MEMORY_SHARE * available
    # The estimate grows with the batch size: the largest size within budget, by bisection.
    low, high = 0, batch
    while low < high:
        middle = (low + high + 1) // 2
        if batch_memory_bytes(config, dtype, middle, prompt_tokens, max_new) <= budget:
            low = middle
        else:
            high = middle - 1
    return low


def check_memory(
    config: ModelConfig,
    dtype: torch.dtype,
    batch: int,
    prompt_tokens: int,
    max_new: int,
    available: int | None,
) -> None:
    """Refuse a batch whose estimate exceeds the available memory, naming a batch size that
    fits (or what to lower when one prompt does not)."""
    fits = fitting_batch_size(config, dtype, batch, prompt_tokens, max_new, available)
    if fits == batch:
        return
    assert available is not None
    size = batch if fits else 1
    need = _gb(batch_memory_bytes(config, dtype, size, prompt_tokens, max_new))
    shape = f"prompts of up to {prompt_tokens} tokens with up to {max_new} new tokens"
    what = f"a batch of {batch}" if fits else "one prompt"
    advice = f"try --batch-size {fits}" if fits else "lower -n or shorten the prompts"
    raise GptcliError(
        f"{what} ({shape}) needs about {need} for its key/value cache and activations, but "
        f"{_gb(available)} is available; {advice}"
    )


def _gb(n_bytes: float) -> str:
    return f"{n_bytes / 1e9:.1f} GB" if n_bytes >= 1e8 else f"{math.ceil(n_bytes / 1e6)} MB"
