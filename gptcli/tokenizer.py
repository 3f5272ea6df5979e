"""Text <-> token ids, over the `tokenizers` library, plus streaming helpers.

`Tokenizer` loads a model folder's `tokenizer.json` (or GPT-2 style `vocab.json` +
`merges.txt`). `StreamDecoder` turns ids into text one token at a time without ever printing
half a UTF-8 character; `StopFilter` holds back text that may be the start of a stop string.
No torch here.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers

from .errors import GptcliError, UsageError

TOKENIZER_FILE = "tokenizer.json"
VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
ENDOFTEXT = "<|endoftext|>"
REPLACEMENT_CHAR = "\ufffd"

# tokenizer_config.json keys whose values name special tokens.
_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


class TokenizerError(GptcliError):
    """Tokenizer files that are missing, unreadable or inconsistent."""


class Tokenizer:
    """Encode and decode with one model's tokenizer.

    `encode` never adds BOS/EOS (callers decide, see `add_bos_token`), but special-token text in
    the input (e.g. `<|im_start|>`) is parsed as that special token, as Hugging Face does.
    `decode` drops special tokens and does no whitespace clean-up, so it is lossless for text.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        chat_template: str | None = None,
        add_bos_token: bool | None = None,
    ) -> None:
        self.backend = backend
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.chat_template = chat_template
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.special_ids: frozenset[int] = frozenset(
            token_id
            for token_id, token in backend.get_added_tokens_decoder().items()
            if token.special
        )
        self.bos_id: int | None = backend.token_to_id(bos_token) if bos_token else None

        # The configured EOS first; <|endoftext|> too, since a model that emits it has ended
        # its document whatever the config says.
        eos_ids: list[int] = []
        for name in (eos_token, ENDOFTEXT):
            token_id = backend.token_to_id(name) if name else None
            if token_id is not None and token_id not in eos_ids:
                eos_ids.append(token_id)
        self.eos_ids: tuple[int, ...] = tuple(eos_ids)

        if add_bos_token is None:
            # Not configured: follow the tokenizer's own post-processor (Llama-style ones add BOS).
            probe = backend.encode("a", add_special_tokens=True).ids
            add_bos_token = self.bos_id is not None and probe[:1] == [self.bos_id]
        self.add_bos_token: bool = add_bos_token

    @classmethod
    def from_dir(cls, model_dir: Path) -> Tokenizer:
        """Load `tokenizer.json`, or else `vocab.json` + `merges.txt`, and `tokenizer_config.json`."""
        model_dir = Path(model_dir)
        if not model_dir.exists():
            raise TokenizerError(f"model folder {model_dir} not found; check the path")
        if not model_dir.is_dir():
            raise TokenizerError(f"{model_dir} is not a folder; pass the model's folder")
        config = _read_config(model_dir / CONFIG_FILE)

        tokenizer_path = model_dir / TOKENIZER_FILE
        vocab_path, merges_path = model_dir / VOCAB_FILE, model_dir / MERGES_FILE
        if tokenizer_path.is_file():
            try:  # read here, so an unreadable file is not reported as a corrupt one
                data = tokenizer_path.read_bytes()
            except OSError as exc:
                raise TokenizerError(
                    f"{tokenizer_path} cannot be read ({exc.strerror or exc})"
                ) from exc
            try:
                backend = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
            except Exception as exc:  # the Rust side raises plain Exception
                raise TokenizerError(
                    f"{tokenizer_path} cannot be parsed ({_first_line(exc)}); "
                    "replace it with the model's original file"
                ) from exc
        elif vocab_path.is_file() and merges_path.is_file():
            backend = _byte_level_bpe(vocab_path, merges_path, config)
        elif vocab_path.is_file() or merges_path.is_file():
            missing = merges_path if vocab_path.is_file() else vocab_path
            raise TokenizerError(f"{missing} is missing; copy it from the original model")
        else:
            raise TokenizerError(
                f"{model_dir} has no {TOKENIZER_FILE} (nor {VOCAB_FILE} + {MERGES_FILE}); "
                "copy the tokenizer files from the original model"
            )

        add_bos = config.get("add_bos_token")
        return cls(
            backend,
            bos_token=_token_content(config.get("bos_token")),
            eos_token=_token_content(config.get("eos_token")),
            chat_template=_chat_template(model_dir, config),
            add_bos_token=add_bos if isinstance(add_bos, bool) else None,
        )

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, special tokens dropped; unknown ids (negative ones too) are ignored."""
        # The Rust side raises OverflowError for ids outside u32.
        valid = [token_id for token_id in ids if 0 <= token_id < 2**32]
        return self.backend.decode(valid, skip_special_tokens=True)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary entry (raw, e.g. byte-level `Ġthe`), or None for an unknown id."""
        if token_id < 0:
            return None
        return self.backend.id_to_token(token_id)


class StreamDecoder:
    """Turns ids into text incrementally; the chunks joined equal `tokenizer.decode(all ids)`.

    Each push decodes a small window: the ids of the previous emitted chunk (context, so that
    decoders which treat the first token specially, e.g. by stripping a leading space, behave the
    same in the diff) plus the ids not yet emitted. The new text is the window's text minus the
    context's text. Nothing is emitted while the window's text ends in U+FFFD (the last token may
    stop in the middle of a UTF-8 character), nor while the last token is a byte-fallback token
    like `<0xE4>`, a special token or an unknown id (SentencePiece-style decoders decode a run of
    byte tokens as a whole, across dropped special/unknown ids, so the run's text is only final
    once a text token ends it). Held text comes out with a later token or `flush`.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._decode = tokenizer.decode
        self._id_to_token = tokenizer.id_to_token
        self._special_ids = tokenizer.special_ids
        self._reset()

    def _reset(self) -> None:
        self._window: list[int] = []  # context ids, then pending ids
        self._context_len = 0
        self._context_text = ""

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes (often "", never half a character)."""
        self._window.append(token_id)
        # Special and unknown ids add no text, and decode drops them before joining byte runs.
        token = self._id_to_token(token_id)
        if token is None or token_id in self._special_ids or _is_byte_fallback_token(token):
            return ""
        text = self._decode(self._window)
        if (
            text.endswith(REPLACEMENT_CHAR)
            or len(text) <= len(self._context_text)
            or not text.startswith(self._context_text)
        ):
            return ""
        new_text = text[len(self._context_text) :]
        # The ids just emitted become the context for the next window.
        self._window = self._window[self._context_len :]
        self._context_len = len(self._window)
        self._context_text = self._decode(self._window)
        return new_text

    def flush(self) -> str:
        """End the stream: return the held text (it may end in U+FFFD); the decoder starts over."""
        text = self._decode(self._window)
        rest = text[len(self._context_text) :]
        self._reset()
        return rest


class StopFilter:
    """Cuts a text stream before the first stop string.

    `push` returns the text that is safe to show: a tail that could be the start of a stop string
    is held back. Once a stop string is complete, `stopped` is True, the stop and everything
    after it are dropped, and later pushes return "". With several stops, the output ends where
    the earliest-starting stop present at the moment the first stop completes begins (so the
    output never contains a stop, whatever the chunking).
    """

    def __init__(self, stops: Sequence[str]) -> None:
        if any(stop == "" for stop in stops):
            raise UsageError("--stop must not be empty; give the text that should end generation")
        self._stops = tuple(dict.fromkeys(stops))  # deduplicated, order kept
        self._longest = max((len(stop) for stop in self._stops), default=0)
        self._held = ""
        self.stopped = False

    def push(self, text: str) -> str:
        if self.stopped:
            return ""
        buffer = self._held + text
        found = [(i, len(stop)) for stop in self._stops if (i := buffer.find(stop)) >= 0]
        if found:
            # Cut as if the text had come one character at a time: at the first point where a
            # stop is complete, before the earliest stop contained in the text up to there.
            # That makes the result independent of how the text was split into pushes.
            first_end = min(start + length for start, length in found)
            self.stopped = True
            self._held = ""
            return buffer[: min(start for start, length in found if start + length <= first_end)]
        keep = self._partial_stop_length(buffer)
        self._held = buffer[len(buffer) - keep :]
        return buffer[: len(buffer) - keep]

    def flush(self) -> str:
        """Release held text at the end of the stream (nothing if a stop was hit)."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _partial_stop_length(self, buffer: str) -> int:
        """Length of the longest tail of `buffer` that is a proper prefix of some stop."""
        for length in range(min(len(buffer), self._longest - 1), 0, -1):
            tail = buffer[-length:]
            if any(stop.startswith(tail) for stop in self._stops):
                return length
        return 0


class TextStream:
    """Token ids in, the text to show out: complete characters only (`StreamDecoder`), and
    nothing from a stop string on (`StopFilter`). The one place generate, batch and chat turn
    ids into text."""

    def __init__(self, tokenizer: Tokenizer, stops: Sequence[str] = ()) -> None:
        self._decoder = StreamDecoder(tokenizer)
        self._stop_filter = StopFilter(stops)

    @property
    def stopped(self) -> bool:
        """A stop string has arrived: nothing more will be shown."""
        return self._stop_filter.stopped

    def push(self, token_id: int) -> str:
        return self._stop_filter.push(self._decoder.push(token_id))

    def finish(self) -> str:
        """At the end of generation: the text held back (a partial character, or a tail that
        could have begun a stop string), unless it completes a stop string."""
        text = self._stop_filter.push(self._decoder.flush())
        return text + self._stop_filter.flush()


def _byte_level_bpe(
    vocab_path: Path, merges_path: Path, config: dict[str, Any]
) -> tokenizers.Tokenizer:
    """GPT-2 style byte-level BPE from `vocab.json` + `merges.txt`."""
    vocab = _read_json(vocab_path)
    if not isinstance(vocab, dict) or not all(
        isinstance(token, str) and isinstance(token_id, int) for token, token_id in vocab.items()
    ):
        raise TokenizerError(
            f"{vocab_path} is not a token -> id mapping; replace it with the model's original file"
        )
    merges = []
    try:
        # Not splitlines(): it would also split on U+0085/U+2028, which may be merge symbols.
        lines = merges_path.read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenizerError(f"{merges_path} cannot be read ({exc}); check the file") from exc
    for line_number, line in enumerate(lines, start=1):
        if not line.strip() or (line_number == 1 and line.startswith("#version")):
            continue
        parts = line.rstrip("\r").split(" ")
        if len(parts) != 2:
            raise TokenizerError(
                f"{merges_path} line {line_number} is not a 'left right' merge pair; "
                "replace the file with the model's original"
            )
        merges.append((parts[0], parts[1]))
    try:
        backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges))
    except Exception as exc:
        raise TokenizerError(
            f"{vocab_path} and {merges_path} do not fit together ({_first_line(exc)}); "
            "use files from the same model"
        ) from exc
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()

    # Register the special tokens the config names (and <|endoftext|>) so that their text in a
    # prompt becomes one id and decode can skip them. Only ones already in the vocab: adding
    # new ids would disagree with the model's embedding table.
    special = [ENDOFTEXT]
    special += [_token_content(config.get(key)) for key in _SPECIAL_TOKEN_KEYS]
    special += [_token_content(t) for t in config.get("additional_special_tokens") or []]
    ordinary = []
    added = config.get("added_tokens_decoder")
    for entry in added.values() if isinstance(added, dict) else []:
        if isinstance(entry, dict):
            (special if entry.get("special") else ordinary).append(_token_content(entry))
    special_set = {token for token in special if token in vocab}
    backend.add_special_tokens(
        [AddedToken(token, special=True, normalized=False) for token in sorted(special_set)]
    )
    backend.add_tokens(
        [
            AddedToken(token, special=False, normalized=False)
            for token in sorted({t for t in ordinary if t in vocab} - special_set)
        ]
    )
    return backend


def _read_json(path: Path) -> Any:
    try:
        with path.open(encoding="utf-8") as file:
            return json.load(file)
    except OSError as exc:
        raise TokenizerError(f"{path} cannot be read ({exc.strerror or exc})") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TokenizerError(
            f"{path} is not valid JSON ({_first_line(exc)}); replace it with the model's original"
        ) from exc


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    config = _read_json(path)
    if not isinstance(config, dict):
        raise TokenizerError(f"{path} is not a JSON object; replace it with the model's original")
    return config


def _token_content(value: Any) -> str | None:
    """A token string from tokenizer_config: plain, or a serialized AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _chat_template(model_dir: Path, config: dict[str, Any]) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if isinstance(template, str):
        return template
    # Newer transformers versions save the template in its own file.
    template_path = model_dir / CHAT_TEMPLATE_FILE
    if template_path.is_file():
        try:
            return template_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise TokenizerError(f"{template_path} cannot be read ({exc}); check the file") from exc
    return None


def _is_byte_fallback_token(token: str) -> bool:
    # The same test the ByteFallback decoder applies: exactly "<0xHH>".
    return len(token) == 6 and token.startswith("<0x") and token.endswith(">")


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
