"""Chat: a checkpoint's own chat template, rendered in a sandbox, and a conversation kept
over one KV cache.

`ChatTemplate` renders the Jinja template from `tokenizer_config.json` (or
`chat_template.jinja`) the way Hugging Face's `apply_chat_template(..., tokenize=False)` does:
the same Jinja settings (trim_blocks, lstrip_blocks, loop controls, a `{% generation %}` tag),
the same helpers (`raise_exception`, `strftime_now`, a `tojson` that does not HTML-escape) and
the same variables (`messages`, `add_generation_prompt`, `tools`, `documents` and the named
special tokens such as `bos_token`). Templates are untrusted: they run in Jinja's
`ImmutableSandboxedEnvironment`, and nothing from a model folder is ever executed as Python.

`ChatSession` keeps the messages and the KV cache between turns. Each turn renders the whole
conversation again, tokenizes it, and feeds the model only the tokens after the longest prefix
the cache already holds (so normally just the new turn); when the conversation no longer fits
the context, the oldest turns are dropped (the system message stays) and the cache is rebuilt.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import GptcliError, UsageError
from .tokenizer import StopFilter, TextStream, Tokenizer

if TYPE_CHECKING:  # torch is imported only when a conversation runs
    import torch

    from .model import GPT, KVCache
    from .sampling import SamplingParams

#: The named special tokens HF hands to templates (`tokenizer.special_tokens_map`).
SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
#: The most text a chat template may render (far beyond any context window's worth).
MAX_RENDERED_CHARS = 10_000_000
#: Chat commands typed at the prompt.
COMMANDS = ("/reset", "/exit", "/quit")

Message = dict[str, str]


class ChatTemplateError(GptcliError):
    """A missing, broken or refusing chat template."""


# --- the template ----------------------------------------------------------------------------


def _raise_exception(message: str) -> None:
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | str | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML; templates want plain JSON.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _make_dict(*args: Any, **kwargs: Any) -> dict[Any, Any]:
    # A plain function, not the `dict` type itself, so templates cannot reach the class.
    return dict(*args, **kwargs)


@lru_cache(maxsize=1)
def _environment() -> Any:
    """The sandboxed Jinja environment every template is compiled in (built once)."""
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text for training masks;
        for rendering it is just its body."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(
                lineno
            )

        def _body(self, caller: Callable[[], str]) -> str:
            return caller()

    class Namespace(jinja2.utils.Namespace):
        """`namespace(...)` that refuses underscore names, so no dunder can be planted."""

        def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 (as jinja's own)
            self, rest = args[0], args[1:]
            attrs = dict(*rest, **kwargs)
            for name in attrs:
                _check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            _check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

    def _check_name(name: object) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"a chat template may not set the underscore attribute {name!r}"
            )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[GenerationTag, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _make_dict
    env.globals["namespace"] = Namespace
    return env


class ChatTemplate:
    """A compiled chat template plus the special-token strings it is rendered with."""

    def __init__(
        self, source: str, special_tokens: Mapping[str, str] | None = None, origin: str = ""
    ) -> None:
        import jinja2

        self.source = source
        self.special_tokens = dict(special_tokens or {})
        self.origin = origin or "the chat template"
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(
                f"{self.origin}: the chat template has a syntax error on line {e.lineno} "
                f"({e.message}); fix the template or use a model with a working one"
            ) from None

    @classmethod
    def from_dir(cls, model_dir: Path, tokenizer: Tokenizer | None = None) -> ChatTemplate:
        """The template and special tokens of a model folder, as HF would load them."""
        model_dir = Path(model_dir)
        if tokenizer is None:
            tokenizer = Tokenizer.from_dir(model_dir)
        source = tokenizer.chat_template
        origin = str(model_dir / TOKENIZER_CONFIG)
        if not source:
            raise ChatTemplateError(
                f'{model_dir}: this model has no chat template (no "chat_template" in '
                f"{TOKENIZER_CONFIG}, no chat_template.jinja); it is probably a base model: "
                "use `gptcli generate` without --chat, or an instruct model"
            )
        return cls(source, special_tokens(model_dir), origin)

    def render(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True
    ) -> str:
        """The conversation as the model expects to read it."""
        import jinja2

        # Plain copies, None values dropped (templates test for missing keys), as HF does.
        plain = [{k: v for k, v in dict(m).items() if v is not None} for m in messages]
        try:
            chunks = self._template.generate(
                messages=plain,
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self.special_tokens,
            )
            # A hostile template could write without end: stop it at a size no real
            # conversation prompt reaches (and that memory holds easily).
            size, parts = 0, []
            for chunk in chunks:
                size += len(chunk)
                if size > MAX_RENDERED_CHARS:
                    raise ChatTemplateError(
                        f"{self.origin}: the chat template wrote more than "
                        f"{MAX_RENDERED_CHARS:,} characters and was stopped"
                    )
                parts.append(chunk)
            return "".join(parts)
        except ChatTemplateError:
            raise
        except jinja2.exceptions.SecurityError as e:
            raise ChatTemplateError(
                f"{self.origin}: the chat template tried something unsafe and was stopped ({e})"
            ) from None
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"the chat template refused the conversation: {e}") from None
        except Exception as e:  # a template can fail in many ways (TypeError, KeyError, ...)
            raise ChatTemplateError(
                f"{self.origin}: the chat template failed ({type(e).__name__}: {e})"
            ) from None


def special_tokens(model_dir: Path) -> dict[str, str]:
    """Named special tokens as strings: tokenizer_config.json, then special_tokens_map.json."""
    found: dict[str, str] = {}
    for name in (TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP):
        data = _read_json_object(Path(model_dir) / name)
        for key in SPECIAL_TOKEN_NAMES:
            value = data.get(key)
            if isinstance(value, dict):  # a serialized AddedToken
                value = value.get("content")
            if key not in found and isinstance(value, str):
                found[key] = value
    return found


def _read_json_object(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ChatTemplateError(
            f"{path}: not valid JSON ({e}); replace it with the original"
        ) from None
    return data if isinstance(data, dict) else {}


def conversation(user: str, system: str | None = None) -> list[Message]:
    """One user message, after a system message when one is given."""
    messages: list[Message] = [{"role": "system", "content": system}] if system is not None else []
    messages.append({"role": "user", "content": user})
    return messages


def encode_chat(tokenizer: Tokenizer, text: str) -> list[int]:
    """Ids of rendered chat text. No BOS is added: the template writes what the model needs
    (HF's apply_chat_template encodes without special tokens too)."""
    return tokenizer.encode(text)


_SENTINEL = "GPTCLI-END-OF-TURN-PROBE"


def end_of_turn_ids(template: ChatTemplate, tokenizer: Tokenizer) -> set[int]:
    """The special token(s) the template closes an assistant turn with (`<|im_end|>`,
    `<|eot_id|>`, `</s>`, ...): generation must stop there as at EOS."""
    found: set[int] = set()
    probes = (
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _SENTINEL}],
        [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": _SENTINEL},
            {"role": "user", "content": "Hi"},
        ],
    )
    for messages in probes:
        try:
            text = template.render(messages, add_generation_prompt=False)
        except ChatTemplateError:
            continue
        where = text.find(_SENTINEL)
        if where < 0:
            continue
        for token_id in tokenizer.encode(text[where + len(_SENTINEL) :])[:8]:
            if token_id in tokenizer.special_ids:
                found.add(token_id)
                break
            if tokenizer.decode([token_id]).strip():
                break  # text, not the end of the turn
    return found


def read_message(readline: Callable[[], str], ask: Callable[[str], None]) -> str | None:
    """One user turn: a line, continued onto the next while it ends in a backslash.

    Returns None at end of input (Ctrl-D). The backslashes are dropped; the lines are joined
    with newlines."""
    lines: list[str] = []
    ask("> ")
    while True:
        line = readline()
        if not line:
            return "\n".join(lines) if lines else None
        line = line.removesuffix("\n").removesuffix("\r")
        if line.endswith("\\"):
            lines.append(line[:-1])
            ask("... ")
            continue
        lines.append(line)
        return "\n".join(lines)


# --- the conversation ------------------------------------------------------------------------


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading ids `a` and `b` share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class TurnTooLong(GptcliError):
    """The newest user message alone does not fit the context."""

    exit_code = UsageError.exit_code


class ChatSession:
    """Messages, the ids the KV cache holds, and the cache itself, across turns.

    `respond(text)` adds a user message and yields the reply's text as it streams; when the
    iteration ends (finished, stopped, interrupted or closed) the text shown so far becomes the
    assistant message. After each reply, `last` holds its ids and statistics.
    """

    def __init__(
        self,
        model: GPT,
        tokenizer: Tokenizer,
        template: ChatTemplate,
        *,
        params: SamplingParams,
        max_new_tokens: int = 512,
        system: str | None = None,
        generator: torch.Generator | None = None,
        stops: Sequence[str] = (),
        eos_ids: Sequence[int] = (),
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.template = template
        self.params = params
        self.max_new_tokens = max_new_tokens
        self.system = system
        self.generator = generator
        self.stops = tuple(stops)
        StopFilter(self.stops)  # refuses an empty stop now, not at the first turn
        self.eos_ids = frozenset(eos_ids) | end_of_turn_ids(template, tokenizer)
        self.context = model.config.max_positions
        self.messages: list[Message] = []
        self.cache: KVCache | None = None
        self.cached_ids: list[int] = []  # the ids whose keys/values the cache holds, in order
        self.last = TurnStats()
        self.notices: list[str] = []  # what the caller should tell the user (dropped turns)
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the system message stays). The cache keeps its contents:
        the next turn reuses what it shares with them (the system prompt, typically)."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def prompt_ids(self) -> list[int]:
        """The whole conversation, rendered with the generation prompt, as ids."""
        return encode_chat(self.tokenizer, self.template.render(self.messages, True))

    def respond(self, text: str) -> Iterator[str]:
        """Add the user's message and return the reply's text stream.

        The conversation is fitted to the context now (see `notices`), so errors about this
        message (`TurnTooLong`, `ChatTemplateError`) come before any text; the message is then
        taken back. Iterating generates the reply; however the iteration ends (finished,
        stopped, interrupted or closed) the text shown so far becomes the assistant message.
        """
        before, notices = list(self.messages), len(self.notices)
        self.messages.append({"role": "user", "content": text})
        try:
            ids = self._fit()
        except BaseException:
            # Refused: the conversation is as it was (no turns dropped for this message).
            self.messages, self.notices[notices:] = before, []
            raise
        self.last = TurnStats(prompt_ids=ids)
        return self._stream(ids, self.last)

    def _stream(self, ids: list[int], stats: TurnStats) -> Iterator[str]:
        shown: list[str] = []
        text = TextStream(self.tokenizer, self.stops)
        try:
            for token in self._tokens(ids, stats):
                piece = text.push(token)
                if piece:
                    shown.append(piece)
                    yield piece
                if text.stopped:
                    stats.finish_reason = "stop"
                    break
            else:
                piece = text.finish()
                if text.stopped:
                    stats.finish_reason = "stop"
                if piece:
                    shown.append(piece)
                    yield piece
        finally:
            if stats.finish_reason is None:
                stats.finish_reason = "interrupted"
            stats.text = "".join(shown)
            self.messages.append({"role": "assistant", "content": stats.text})

    def _fit(self) -> list[int]:
        """Ids of the conversation, dropping the oldest turns while it overflows the context."""
        ids = self.prompt_ids()
        dropped = 0
        first = 1 if self.messages and self.messages[0]["role"] == "system" else 0
        while len(ids) + self.max_new_tokens > self.context and len(self.messages) - first > 1:
            # Drop one whole exchange: the oldest user message and what answered it.
            del self.messages[first]
            dropped += 1
            while len(self.messages) - first > 1 and self.messages[first]["role"] != "user":
                del self.messages[first]
                dropped += 1
            ids = self.prompt_ids()
        if dropped:
            self.notices.append(
                f"the conversation outgrew the context of {self.context} tokens: dropped the "
                f"oldest {dropped} message{'s' if dropped != 1 else ''}"
            )
        if len(ids) >= self.context:
            raise TurnTooLong(
                f"this message makes a prompt of {len(ids)} tokens, more than the model's "
                f"context of {self.context}; send a shorter one (or /reset)"
            )
        return ids

    def _ensure_cache(self, length: int, keep: int) -> KVCache:
        """A cache of at least `length` positions whose first `keep` are preserved."""
        import torch

        if self.cache is not None and self.cache.max_len >= length:
            return self.cache
        old = self.cache
        size = min(self.context, max(length, 2 * old.max_len if old is not None else 0))
        self.cache = self.model.new_cache(batch=1, max_len=size)
        if old is not None and keep:
            with torch.inference_mode():
                self.cache.k[:, :, :, :keep] = old.k[:, :, :, :keep]
                self.cache.v[:, :, :, :keep] = old.v[:, :, :, :keep]
        return self.cache

    def _tokens(self, ids: list[int], stats: TurnStats) -> Iterator[int]:
        """Prefill what the cache lacks, then decode one token at a time (`Generation`)."""
        from .generate import Generation

        # Reuse the longest prefix the cache holds, but always feed at least one token: its
        # logits are the first prediction.
        reuse = min(common_prefix(self.cached_ids, ids), len(ids) - 1)
        self.cached_ids = self.cached_ids[:reuse]
        stats.reused_tokens = reuse
        cache = self._ensure_cache(min(len(ids) + self.max_new_tokens, self.context), reuse)
        generation = Generation(
            self.model,
            ids,
            self.max_new_tokens,
            self.params,
            self.generator,
            self.eos_ids,
            cache=cache,
            reuse=reuse,
        )
        stats.new_ids = generation.new_ids
        try:
            yield from generation
        finally:
            # Also after a stop string or Ctrl-C: the cache holds exactly what was fed.
            self.cached_ids = (list(ids) + generation.new_ids)[: generation.cached_len]
            stats.prefill_seconds = generation.prefill_seconds
            stats.decode_seconds = generation.decode_seconds
            if generation.finish_reason is not None:
                stats.finish_reason = generation.finish_reason


class TurnStats:
    """What one reply did: its prompt ids, how many came from the cache, new ids, timings."""

    def __init__(self, prompt_ids: Sequence[int] = ()) -> None:
        self.prompt_ids: list[int] = list(prompt_ids)
        self.reused_tokens = 0
        self.new_ids: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.prefill_seconds = 0.0
        self.decode_seconds = 0.0

    @property
    def tokens_per_second(self) -> float:
        """Decode speed; the first new token came out of the prefill."""
        n = len(self.new_ids) - 1
        return round(n / self.decode_seconds, 2) if n > 0 and self.decode_seconds > 0 else 0.0
