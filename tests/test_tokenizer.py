"""Tokenizer, StreamDecoder and StopFilter, checked against HF transformers on the real GPT-2
BPE files and against a small hand-built SentencePiece-style (byte-fallback) tokenizer."""

from __future__ import annotations

import json
from itertools import pairwise
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, decoders, models, normalizers, processors
from tokenizers import Tokenizer as RawTokenizer

from gptcli.errors import GptcliError, UsageError
from gptcli.tokenizer import StopFilter, StreamDecoder, TextStream, Tokenizer, TokenizerError

GPT2_DIR = Path(__file__).parent / "fixtures" / "gpt2-bpe"
ENDOFTEXT_ID = 50256

# Loaded once at import: the hypothesis strategies below draw from its vocabulary.
GPT2 = Tokenizer.from_dir(GPT2_DIR)

TEXTS = [
    "Hello world",
    "hello, world!",
    " leading space",
    "trailing space ",
    "  two  spaces   three",
    "",
    " ",
    "\n",
    "line one\nline two\n\nline four",
    "tabs\tand\r\nwindows newlines",
    "don't I'm they'll we've she'd it's",
    "Numbers 12345 and 3.14159 and 1,000,000",
    "Punctuation!?... ;:--() [] {} <> @#$%^&*",
    "café naïve résumé",
    "e\u0301 combining acute, a\u0308 and n\u0303",
    "Z\u0351\u0357a\u0352l\u0310g\u0308o",
    "😀",
    "emoji 😀👍🏽🎉 in text",
    "family 👨‍👩‍👧‍👦 and flag 🇫🇷",
    "中文字符测试",
    "日本語のテキスト、カタカナ",
    "한국어 텍스트",
    "Ελληνικά και русский",
    "العربية עברית",
    "हिन्दी",
    "math ∑∫√∞ ≤ ≥ ≠",
    "nbsp\u00a0here and zero\u200bwidth",
    "replacement char \ufffd literal",
    "controls \x00\x07\x1b[0m",
    "def f(x):\n    return x ** 2  # square\n",
    "https://example.com/path?query=1&b=2#frag",
    "a<|endoftext|>b",
    "<|endoftext|><|endoftext|>",
    "start <|endoftext|> end",
    "<|endoftext",
    "Ġ is a literal G-with-dot",
    "supercalifragilisticexpialidocious" * 3,
]


@pytest.fixture(scope="module")
def hf_gpt2():
    transformers = pytest.importorskip("transformers")
    return transformers.GPT2TokenizerFast.from_pretrained(str(GPT2_DIR))


# ---------------------------------------------------------------- Tokenizer


@pytest.mark.parametrize("text", TEXTS)
def test_encode_and_decode_match_transformers(hf_gpt2, text):
    ids = GPT2.encode(text)
    assert ids == hf_gpt2.encode(text)
    assert GPT2.decode(ids) == hf_gpt2.decode(ids, skip_special_tokens=True)
    assert GPT2.decode(ids) == text.replace("<|endoftext|>", "")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, ENDOFTEXT_ID), max_size=30))
def test_decode_of_any_ids_matches_transformers(hf_gpt2, ids):
    # Covers invalid UTF-8 too: both must replace it the same way.
    assert GPT2.decode(ids) == hf_gpt2.decode(ids, skip_special_tokens=True)


def test_gpt2_files_attributes():
    assert GPT2.vocab_size == 50257
    assert GPT2.special_ids == frozenset({ENDOFTEXT_ID})
    assert GPT2.eos_ids == (ENDOFTEXT_ID,)
    assert GPT2.bos_id is None  # no tokenizer_config.json to name one
    assert GPT2.add_bos_token is False
    assert GPT2.chat_template is None
    assert GPT2.encode("<|endoftext|>") == [ENDOFTEXT_ID]
    assert GPT2.id_to_token(15496) == "Hello"
    assert GPT2.id_to_token(ENDOFTEXT_ID) == "<|endoftext|>"
    assert GPT2.id_to_token(10**6) is None
    assert GPT2.id_to_token(-1) is None
    # Ids a padded model vocabulary may produce beyond the tokenizer's are dropped.
    assert GPT2.decode([15496, -1, 50300, 2**40]) == "Hello"


def _copy_bpe_files(folder: Path) -> None:
    for name in ("vocab.json", "merges.txt"):
        (folder / name).write_bytes((GPT2_DIR / name).read_bytes())


def test_tokenizer_json_and_config_are_read(tmp_path, hf_gpt2):
    hf_gpt2.backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    config = {
        "bos_token": {"content": "<|endoftext|>", "special": True},
        "eos_token": "<|endoftext|>",
        "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
        "add_bos_token": True,
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.bos_id == ENDOFTEXT_ID
    assert tok.eos_ids == (ENDOFTEXT_ID,)
    assert tok.add_bos_token is True
    assert tok.chat_template == config["chat_template"]
    assert tok.encode("Hello world") == GPT2.encode("Hello world")


def test_chat_template_from_named_list_or_jinja_file(tmp_path):
    _copy_bpe_files(tmp_path)
    named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": named}))
    assert Tokenizer.from_dir(tmp_path).chat_template == "D"
    (tmp_path / "tokenizer_config.json").write_text("{}")
    (tmp_path / "chat_template.jinja").write_text("{{ messages }}")
    assert Tokenizer.from_dir(tmp_path).chat_template == "{{ messages }}"


def test_config_names_extra_special_tokens_for_vocab_files(tmp_path):
    # A vocab entry named in added_tokens_decoder becomes one special id, skipped by decode.
    _copy_bpe_files(tmp_path)
    hello = GPT2.encode("Hello")[0]
    added = {str(hello): {"content": "Hello", "special": True}}
    config = {"added_tokens_decoder": added, "eos_token": "Hello"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.special_ids == frozenset({hello, ENDOFTEXT_ID})
    assert tok.eos_ids == (hello, ENDOFTEXT_ID)
    assert tok.decode(tok.encode("Hello world")) == " world"


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda d: None, "no tokenizer.json"),
        (lambda d: (d / "vocab.json").write_text("{}"), "merges.txt is missing"),
        (lambda d: (d / "tokenizer.json").write_text("{not json"), "tokenizer.json cannot be"),
        (lambda d: (d / "tokenizer_config.json").write_text("[1"), "tokenizer_config.json is not"),
    ],
)
def test_bad_folders_give_one_line_errors(tmp_path, setup, message):
    if "config" in message:
        _copy_bpe_files(tmp_path)
    setup(tmp_path)
    with pytest.raises(TokenizerError, match=message) as info:
        Tokenizer.from_dir(tmp_path)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, GptcliError) and info.value.exit_code == 1


def test_missing_folder_and_corrupt_vocab(tmp_path):
    with pytest.raises(TokenizerError, match="not found"):
        Tokenizer.from_dir(tmp_path / "nope")
    (tmp_path / "vocab.json").write_text("[1, 2]")
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b\n")
    with pytest.raises(TokenizerError, match="vocab.json is not a token -> id mapping"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "vocab.json").write_text('{"a": 0, "b": 1, "ab": 2}')
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b c\n")
    with pytest.raises(TokenizerError, match="line 2"):
        Tokenizer.from_dir(tmp_path)


# ---------------------------------------------------------------- StreamDecoder


def stream(tok: Tokenizer, ids: list[int]) -> list[str]:
    decoder = StreamDecoder(tok)
    chunks = [decoder.push(i) for i in ids]
    chunks.append(decoder.flush())
    return chunks


def assert_stream_matches_decode(tok: Tokenizer, ids: list[int]) -> list[str]:
    chunks = stream(tok, ids)
    full = tok.decode(ids)
    assert "".join(chunks) == full
    # A U+FFFD may only be streamed where the full text has one (e.g. truly invalid bytes).
    offset = 0
    for chunk in chunks:
        for i, char in enumerate(chunk):
            if char == "\ufffd":
                assert full[offset + i] == "\ufffd"
        offset += len(chunk)
    return chunks


@pytest.mark.parametrize("text", TEXTS)
def test_stream_of_encoded_text_reproduces_it(text):
    ids = GPT2.encode(text)
    chunks = assert_stream_matches_decode(GPT2, ids)
    assert chunks[-1] == ""  # valid text leaves nothing held back at the end
    assert not any("\ufffd" in c for c in chunks) or "\ufffd" in text


def test_emoji_split_across_tokens_is_held_until_complete():
    ids = GPT2.encode("😀")
    assert len(ids) == 2  # byte-level BPE splits its four bytes over two tokens
    assert stream(GPT2, ids) == ["", "😀", ""]


def test_hard_cases_keep_spaces_accents_and_skip_special_tokens():
    ids = GPT2.encode(" café e\u0301 中文")
    assert "".join(stream(GPT2, ids)) == " café e\u0301 中文"
    # A special token in the middle of a split emoji: decode skips it and joins the bytes.
    a, b = GPT2.encode("😀")
    assert_stream_matches_decode(GPT2, [a, ENDOFTEXT_ID, b])
    assert "".join(stream(GPT2, [a, ENDOFTEXT_ID, b])) == "😀"
    chunks = stream(GPT2, GPT2.encode("Hi<|endoftext|> there"))
    assert chunks == ["Hi", "", " there", ""]


def test_unknown_ids_produce_no_text():
    a, b = GPT2.encode("😀")
    assert "".join(stream(GPT2, [15496, 50300, a, 60000, b])) == "Hello😀"


def test_incomplete_tail_comes_out_at_flush():
    first = GPT2.encode("😀")[0]
    hello = GPT2.encode("Hello")
    chunks = assert_stream_matches_decode(GPT2, hello + [first])
    assert chunks[-1] == "\ufffd"


def test_stream_window_stays_small():
    decoder = StreamDecoder(GPT2)
    for token_id in GPT2.encode("some ordinary words " * 200):
        decoder.push(token_id)
        assert len(decoder._window) <= 4


PARTIAL_UTF8_IDS = [i for i in range(GPT2.vocab_size) if "\ufffd" in GPT2.decode([i])]


@st.composite
def gpt2_id_lists(draw):
    # Bias towards tokens that hold partial UTF-8 characters, where streaming is hard.
    one_id = st.one_of(
        st.sampled_from(PARTIAL_UTF8_IDS),
        st.sampled_from(GPT2.encode("😀👍🏽 中文 café e\u0301 ñ")),
        st.integers(0, ENDOFTEXT_ID),
        st.just(ENDOFTEXT_ID),
    )
    return draw(st.lists(one_id, max_size=40))


@settings(max_examples=400, deadline=None)
@given(gpt2_id_lists())
def test_stream_chunks_join_to_decode_for_any_ids(ids):
    assert_stream_matches_decode(GPT2, ids)


# A SentencePiece-style tokenizer (Llama-2 layout): "▁" for spaces, <0xHH> byte fallback,
# a decoder that strips the first space, and a post-processor that adds <s>.
def build_byte_fallback_tokenizer() -> RawTokenizer:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for piece in ["▁", *"abcdefghijklmnopqrstuvwxyz.,!?'", "▁t", "he", "▁the", "▁a", "in", "▁in"]:
        vocab.setdefault(piece, len(vocab))
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("▁", "a"), ("i", "n"), ("▁", "in")]
    raw = RawTokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    raw.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    raw.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    raw.add_special_tokens([AddedToken(t, special=True) for t in ("<unk>", "<s>", "</s>")])
    raw.add_tokens([AddedToken("<|user|>", special=False, normalized=False)])
    raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return raw


@pytest.fixture(scope="module")
def sentencepiece_style(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sp")
    build_byte_fallback_tokenizer().save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>"})
    )
    return Tokenizer.from_dir(folder)


def test_sentencepiece_style_tokenizer_json(sentencepiece_style):
    tok = sentencepiece_style
    assert tok.bos_id == 1 and tok.eos_ids == (2,)
    assert tok.add_bos_token is True  # inferred from the post-processor
    assert tok.special_ids == frozenset({0, 1, 2})
    ids = tok.encode("the cat 😀")
    assert ids[0] != tok.bos_id  # encode never adds BOS itself
    assert tok.decode(ids) == "the cat 😀"
    assert "<|user|>" in tok.decode(tok.encode("<|user|> hi"))


@pytest.mark.parametrize("text", ["the cat in the hat", " leading", "a 😀 b 中 é", "x<|user|>y z"])
def test_sentencepiece_style_stream(sentencepiece_style, text):
    ids = sentencepiece_style.encode(text)
    chunks = assert_stream_matches_decode(sentencepiece_style, ids)
    assert "".join(chunks) == sentencepiece_style.decode(ids)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ids=st.lists(st.integers(0, 300), max_size=30))  # 298+ are unknown ids
def test_sentencepiece_style_stream_for_any_ids(sentencepiece_style, ids):
    # Includes byte runs that are invalid UTF-8 (decoded to one U+FFFD per byte as a whole run).
    assert_stream_matches_decode(sentencepiece_style, ids)


# ---------------------------------------------------------------- StopFilter


def run_stop_filter(stops: list[str], pieces: list[str]) -> tuple[str, bool]:
    stop_filter = StopFilter(stops)
    out = "".join(stop_filter.push(piece) for piece in pieces) + stop_filter.flush()
    return out, stop_filter.stopped


def reference_stop(stops: list[str], text: str) -> tuple[str, bool]:
    """Character by character: cut before the earliest stop once the first one is complete."""
    for end in range(1, len(text) + 1):
        seen = text[:end]
        starts = [seen.find(stop) for stop in stops if stop in seen]
        if starts:
            return seen[: min(starts)], True
    return text, False


def test_stop_split_char_by_char():
    stop_filter = StopFilter(["</s>"])
    emitted = [stop_filter.push(c) for c in "Hello</s>world"]
    assert "".join(emitted) == "Hello"
    assert emitted[5:] == [""] * 9  # nothing of "</s>" or after it ever comes out
    assert stop_filter.stopped and stop_filter.flush() == ""
    assert stop_filter.push("more") == ""


def test_multiple_stops_and_stop_at_start():
    assert run_stop_filter(["\n\n", "User:"], ["Hi there\nUs", "er: x"]) == ("Hi there\n", True)
    assert run_stop_filter(["\n\n", "User:"], ["Hi\n", "\nUser:"]) == ("Hi", True)
    assert run_stop_filter(["STOP"], ["STOP now"]) == ("", True)
    assert run_stop_filter(["STOP"], ["S", "T", "O", "P"]) == ("", True)


def test_partial_prefix_is_released():
    stop_filter = StopFilter(["<end>"])
    assert stop_filter.push("a<e") == "a"
    assert stop_filter.push("nd") == ""
    assert stop_filter.push("!") == "<end!"
    assert stop_filter.push("<en") == ""
    assert stop_filter.flush() == "<en"
    assert not stop_filter.stopped


def test_overlapping_prefixes():
    assert run_stop_filter(["abcd"], list("ababcd")) == ("ab", True)
    assert run_stop_filter(["aab"], list("aaab")) == ("a", True)
    assert run_stop_filter(["abab"], list("abaabab")) == ("aba", True)
    # A short stop completes inside a longer one that is still arriving.
    assert run_stop_filter(["abcd", "bc"], list("abcd")) == ("a", True)
    assert run_stop_filter(["abcd", "bc"], ["abcd"]) == ("a", True)


def test_no_stops_passes_everything_and_empty_stop_is_rejected():
    assert run_stop_filter([], ["a", "b"]) == ("ab", False)
    with pytest.raises(UsageError, match="--stop"):
        StopFilter(["ok", ""])


@settings(max_examples=400, deadline=None)
@given(
    text=st.text(alphabet="abc", max_size=25),
    stops=st.lists(st.text(alphabet="abc", min_size=1, max_size=4), min_size=1, max_size=3),
    cuts=st.lists(st.integers(0, 25), max_size=6),
)
def test_stop_filter_matches_reference_for_any_chunking(text, stops, cuts):
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    pieces = [text[a:b] for a, b in pairwise(bounds)]
    assert run_stop_filter(stops, pieces) == reference_stop(stops, text)


def test_text_stream_shows_complete_text_up_to_a_stop():
    tokenizer = GPT2
    ids = tokenizer.encode("Caf\u00e9 \U0001f600 au lait. STOP here, and more")
    stream = TextStream(tokenizer, ["STOP"])
    shown = "".join(stream.push(i) for i in ids)
    assert stream.stopped and shown == "Caf\u00e9 \U0001f600 au lait. "
    assert stream.finish() == ""
    stream = TextStream(tokenizer, ["never"])
    shown = "".join(stream.push(i) for i in ids) + stream.finish()
    assert not stream.stopped and shown == tokenizer.decode(ids)
