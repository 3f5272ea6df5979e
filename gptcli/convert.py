"""GGUF file (llama.cpp's format) -> a standard Hugging Face checkpoint folder.

The folder holds `model.safetensors`, `config.json`, `generation_config.json`, `tokenizer.json`
and `tokenizer_config.json`, so `loader.py` (and HF transformers) can open it like any other.

What llama.cpp changed on the way in, and this module undoes:
- names: `blk.N.attn_q.weight` and friends, mapped back through `_LLAMA_NAMES` / `_GPT2_NAMES`;
- storage: quantized blocks, expanded with the `gguf` package's own `gguf.quants.dequantize`;
- shape order: GGUF lists dimensions innermost first (ne0 = columns), the reverse of numpy's;
- rotary layout: Llama's q/k rows are permuted for ggml's rope (`_unpermute_rows`);
- tokenizer: vocabulary, merges and token types live in metadata; `tokenizer.json` is rebuilt.

Only `numpy` is imported here at module level; `gguf` and `tokenizers` load on first use.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import secrets
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .config import ConfigError, ModelConfig
from .errors import GptcliError

#: dtype name -> safetensors dtype tag and bytes per element.
DTYPES = {"float32": ("F32", 4), "float16": ("F16", 2), "bfloat16": ("BF16", 2)}

# llama.cpp's token types (tokenizer.ggml.token_type).
_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4


class ConvertError(GptcliError):
    """A GGUF file we cannot convert, or an output folder we must not overwrite."""


@dataclass
class _Tensor:
    """One output tensor: its HF name and shape, and how to produce its float32 values."""

    name: str
    shape: tuple[int, ...]
    load: Callable[[], np.ndarray]
    source: str  # "<file>: tensor <gguf name>", for errors


def convert_gguf(
    gguf_path: Path,
    out_dir: Path,
    dtype: str = "float32",
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Convert a GGUF file into a Hugging Face checkpoint folder at `out_dir`; return `out_dir`.

    Supports the `llama` and `gpt2` architectures with a byte-level BPE (`gpt2`) vocabulary.
    Tensors are dequantized to float32 and stored as `dtype` (float32, float16 or bfloat16).
    Everything is written into a hidden sibling folder that is renamed to `out_dir` only when
    complete, so an error or Ctrl-C never leaves a half-written checkpoint behind.
    `progress(done, total)` is called after each tensor is written.

    Raises ConvertError for a missing, unreadable or truncated file, an unsupported architecture,
    tokenizer or tensor type, an unknown `dtype`, or an `out_dir` that exists and is not empty.
    """
    # Absolute, so the temporary sibling lands beside out_dir even for "." or "name/".
    gguf_path, out_dir = Path(gguf_path), Path(out_dir).absolute()
    if out_dir.exists() and out_dir.resolve() == Path.cwd().resolve():
        raise ConvertError("OUT_DIR is the current folder; give the name of a new folder")
    if dtype not in DTYPES:
        raise ConvertError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    _check_output(out_dir)
    reader = _open(gguf_path)
    meta = _Metadata(reader, gguf_path)

    arch = meta.get("general.architecture")
    plans = {"llama": _llama_plan, "gpt2": _gpt2_plan}
    if arch not in plans:
        raise ConvertError(
            f"{gguf_path}: architecture {arch!r} is not supported (supported: llama, gpt2)"
        )
    try:
        hf_config, tensors = plans[arch](reader, meta)
    except (TypeError, ValueError) as e:  # e.g. a per-layer list where a number belongs
        raise ConvertError(f"{gguf_path}: unexpected {arch} metadata ({e})") from None
    hf_config["torch_dtype"] = dtype
    try:  # what we write must be something our own loader accepts
        ModelConfig.from_hf(hf_config, source=str(gguf_path))
    except ConfigError as e:
        raise ConvertError(str(e)) from None
    tokenizer, tokenizer_config = _build_tokenizer(meta)

    # A sibling, so the final rename stays on one filesystem. mkdir rather than mkdtemp, which
    # would make the folder private.
    tmp = out_dir.parent / f".{out_dir.name}.partial-{secrets.token_hex(4)}"
    # The parent folders this call creates, deepest first: a failure removes them again.
    made = [p for p in (out_dir.parent, *out_dir.parent.parents) if not p.exists()]
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        _write_safetensors(tmp / "model.safetensors", tensors, dtype, progress)
        _write_json(tmp / "config.json", hf_config)
        generation = {k: hf_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        _write_json(
            tmp / "generation_config.json", {k: v for k, v in generation.items() if v is not None}
        )
        tokenizer.save(str(tmp / "tokenizer.json"))
        _write_json(tmp / "tokenizer_config.json", tokenizer_config)
        _check_output(out_dir)  # it may have appeared while we worked
        os.replace(tmp, out_dir)  # atomic; also replaces an empty folder
    except BaseException as e:  # KeyboardInterrupt included: never leave the partial folder
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in made:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only while empty: never what someone else put there
        if isinstance(e, OSError):
            raise ConvertError(f"cannot write {out_dir}: {e.strerror or e}") from None
        raise
    return out_dir


# --- reading ---------------------------------------------------------------------------------


def _check_output(out_dir: Path) -> None:
    if out_dir.is_dir():
        if any(out_dir.iterdir()):
            raise ConvertError(
                f"{out_dir} already exists and is not empty; remove it or choose another path"
            )
    elif out_dir.exists():
        raise ConvertError(
            f"{out_dir} exists and is not a folder; remove it or choose another path"
        )


def _open(path: Path) -> Any:
    """A `gguf.GGUFReader` over the file; every reading failure becomes one ConvertError line."""
    import gguf

    if not path.exists():
        raise ConvertError(f"{path}: file not found; check the path")
    if path.is_dir():
        raise ConvertError(f"{path} is a folder; give the path of a .gguf file")
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ConvertError(f"{path}: cannot read ({e.strerror or e})") from None
    if magic != b"GGUF":
        raise ConvertError(f"{path} is not a GGUF file (it does not start with 'GGUF')")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises plain ValueError/IndexError on short data
        raise ConvertError(
            f"{path}: the GGUF file is truncated or corrupt ({e}); download it again"
        ) from None


class _Metadata:
    """Key/value metadata of a GGUF file, with errors that name the file and the key."""

    def __init__(self, reader: Any, path: Path) -> None:
        self.fields = reader.fields
        self.path = path

    def get(self, key: str, default: Any = ...) -> Any:
        field = self.fields.get(key)
        if field is None:
            if default is ...:
                raise ConvertError(
                    f"{self.path}: metadata key {key!r} is missing; the file is incomplete"
                )
            return default
        try:
            return field.contents()
        except Exception as e:
            raise ConvertError(f"{self.path}: cannot read metadata key {key!r} ({e})") from None


def _gguf_shape(tensor: Any) -> tuple[int, ...]:
    # GGUF lists ne0 (the contiguous, innermost dimension) first; numpy/torch list it last.
    return tuple(int(n) for n in reversed(tensor.shape.tolist()))


def _dequantizer(tensor: Any, path: Path) -> Callable[[], np.ndarray]:
    """A loader for one GGUF tensor's values as float32 in numpy (row-major) shape."""
    import gguf

    qtype = tensor.tensor_type
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    try:  # one all-zero block tells whether gguf can expand this type, before any real work
        gguf.quants.dequantize(np.zeros((1, type_size), np.uint8), qtype)
    except NotImplementedError:
        raise ConvertError(
            f"{path}: tensor {tensor.name} has type {qtype.name}, which gguf cannot dequantize; "
            "use a file quantized as F32/F16/BF16/Q8_0/Q4_0/Q4_1/Q4_K/Q6_K or similar"
        ) from None
    shape = _gguf_shape(tensor)

    def load() -> np.ndarray:
        # Quantized data arrives as uint8 blocks [rows, bytes]; dequantize gives [rows, cols].
        values = gguf.quants.dequantize(tensor.data, qtype)
        return np.asarray(values, dtype=np.float32).reshape(shape)

    return load


def _unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's reordering of q_proj/k_proj rows.

    HF rotates each head's dimension i with i + head_dim/2 (half-split); ggml's rope rotates
    neighbours 2i, 2i+1. llama.cpp's converter therefore stores HF row (head, half, i) at
    (head, i, half). Reading the rows as [heads, head_dim/2, 2] and swapping the last two axes
    puts them back.
    """
    rows = w.shape[0]
    # [heads * head_dim, in] -> [heads, head_dim/2, 2, in] -> [heads, 2, head_dim/2, in] -> back
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# --- architectures ---------------------------------------------------------------------------

# GGUF name pattern (N = layer) -> HF LlamaForCausalLM name.
_LLAMA_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.N.attn_norm.weight": "model.layers.N.input_layernorm.weight",
    "blk.N.attn_q.weight": "model.layers.N.self_attn.q_proj.weight",
    "blk.N.attn_k.weight": "model.layers.N.self_attn.k_proj.weight",
    "blk.N.attn_v.weight": "model.layers.N.self_attn.v_proj.weight",
    "blk.N.attn_output.weight": "model.layers.N.self_attn.o_proj.weight",
    "blk.N.ffn_norm.weight": "model.layers.N.post_attention_layernorm.weight",
    "blk.N.ffn_gate.weight": "model.layers.N.mlp.gate_proj.weight",
    "blk.N.ffn_up.weight": "model.layers.N.mlp.up_proj.weight",
    "blk.N.ffn_down.weight": "model.layers.N.mlp.down_proj.weight",
}

# GGUF -> HF GPT2LMHeadModel. GPT-2's Conv1D stores [in, out], the transpose of llama.cpp's.
_GPT2_NAMES = {
    "token_embd.weight": "transformer.wte.weight",
    "position_embd.weight": "transformer.wpe.weight",
    "output_norm.weight": "transformer.ln_f.weight",
    "output_norm.bias": "transformer.ln_f.bias",
    "output.weight": "lm_head.weight",
    "blk.N.attn_norm.weight": "transformer.h.N.ln_1.weight",
    "blk.N.attn_norm.bias": "transformer.h.N.ln_1.bias",
    "blk.N.attn_qkv.weight": "transformer.h.N.attn.c_attn.weight",
    "blk.N.attn_qkv.bias": "transformer.h.N.attn.c_attn.bias",
    "blk.N.attn_output.weight": "transformer.h.N.attn.c_proj.weight",
    "blk.N.attn_output.bias": "transformer.h.N.attn.c_proj.bias",
    "blk.N.ffn_norm.weight": "transformer.h.N.ln_2.weight",
    "blk.N.ffn_norm.bias": "transformer.h.N.ln_2.bias",
    "blk.N.ffn_up.weight": "transformer.h.N.mlp.c_fc.weight",
    "blk.N.ffn_up.bias": "transformer.h.N.mlp.c_fc.bias",
    "blk.N.ffn_down.weight": "transformer.h.N.mlp.c_proj.weight",
    "blk.N.ffn_down.bias": "transformer.h.N.mlp.c_proj.bias",
}

_LAYER = re.compile(r"^blk\.(\d+)\.")


def _map_names(
    reader: Any, table: dict[str, str], n_layer: int, path: Path, arch: str
) -> dict[str, Any]:
    """HF name -> GGUF tensor for every tensor in the file; refuses names the table lacks."""
    mapped = {}
    for tensor in reader.tensors:
        m = _LAYER.match(tensor.name)
        key = _LAYER.sub("blk.N.", tensor.name) if m else tensor.name
        if key not in table or (m and int(m.group(1)) >= n_layer):
            raise ConvertError(
                f"{path}: tensor {tensor.name} has no {arch} equivalent; "
                "this model variant is not supported"
            )
        mapped[table[key].replace(".N.", f".{m.group(1)}.") if m else table[key]] = tensor
    return mapped


def _expect(mapped: dict[str, Any], expected: dict[str, tuple[int, ...]], path: Path) -> None:
    """Every expected tensor is present with the shape the metadata implies."""
    for name, shape in expected.items():
        tensor = mapped.get(name)
        if tensor is None:
            raise ConvertError(f"{path}: tensor for {name} is missing; the file is incomplete")
        if _gguf_shape(tensor) != shape:
            raise ConvertError(
                f"{path}: tensor {tensor.name} has shape {list(_gguf_shape(tensor))}, "
                f"expected {list(shape)} from the file's metadata"
            )


def _common_ids(meta: _Metadata) -> dict[str, int | None]:
    return {
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id", None),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id", None),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id", None),
    }


def _f32(value: float) -> float:
    # GGUF stores floats as float32; 9.999999747378752e-06 was meant as 1e-05.
    return float(f"{value:.7g}")


def _llama_plan(reader: Any, meta: _Metadata) -> tuple[dict[str, Any], list[_Tensor]]:
    path = meta.path
    n_layer = int(meta.get("llama.block_count"))
    d_model = int(meta.get("llama.embedding_length"))
    d_ff = int(meta.get("llama.feed_forward_length"))
    n_head = int(meta.get("llama.attention.head_count"))
    n_kv = int(meta.get("llama.attention.head_count_kv", n_head))
    if n_head <= 0 or n_kv <= 0 or d_model % n_head or n_head % n_kv:
        raise ConvertError(f"{path}: inconsistent head counts ({n_head} heads, {n_kv} kv heads)")
    head_dim = d_model // n_head
    rope_dim = meta.get("llama.rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise ConvertError(
            f"{path}: partial rotary embeddings ({rope_dim} of {head_dim}) are not supported"
        )
    scaling = meta.get("llama.rope.scaling.type", "none")
    if scaling not in ("none", "") or any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise ConvertError(f"{path}: RoPE scaling ({scaling}) is not supported")

    mapped = _map_names(reader, _LLAMA_NAMES, n_layer, path, "llama")
    vocab = (
        _gguf_shape(mapped["model.embed_tokens.weight"])[0]
        if "model.embed_tokens.weight" in mapped
        else 0
    )
    expected = {"model.embed_tokens.weight": (vocab, d_model), "model.norm.weight": (d_model,)}
    tied = "lm_head.weight" not in mapped
    if not tied:
        expected["lm_head.weight"] = (vocab, d_model)
    for i in range(n_layer):
        p = f"model.layers.{i}."
        expected |= {
            p + "input_layernorm.weight": (d_model,),
            p + "self_attn.q_proj.weight": (n_head * head_dim, d_model),
            p + "self_attn.k_proj.weight": (n_kv * head_dim, d_model),
            p + "self_attn.v_proj.weight": (n_kv * head_dim, d_model),
            p + "self_attn.o_proj.weight": (d_model, n_head * head_dim),
            p + "post_attention_layernorm.weight": (d_model,),
            p + "mlp.gate_proj.weight": (d_ff, d_model),
            p + "mlp.up_proj.weight": (d_ff, d_model),
            p + "mlp.down_proj.weight": (d_model, d_ff),
        }
    _expect(mapped, expected, path)

    tensors = []
    for name in sorted(mapped, key=_natural):
        load = _dequantizer(mapped[name], path)
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = n_head if name.endswith("q_proj.weight") else n_kv
            load = _then(load, _unpermute_rows, heads)
        tensors.append(_Tensor(name, expected[name], load, f"{path}: tensor {mapped[name].name}"))

    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": d_model,
        "intermediate_size": d_ff,
        "num_hidden_layers": n_layer,
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "max_position_embeddings": int(meta.get("llama.context_length", 2048)),
        "rms_norm_eps": _f32(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": _f32(meta.get("llama.rope.freq_base", 10000.0)),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": tied,
        **_common_ids(meta),
    }
    return config, tensors


def _gpt2_plan(reader: Any, meta: _Metadata) -> tuple[dict[str, Any], list[_Tensor]]:
    path = meta.path
    n_layer = int(meta.get("gpt2.block_count"))
    d_model = int(meta.get("gpt2.embedding_length"))
    d_ff = int(meta.get("gpt2.feed_forward_length", 4 * d_model))
    n_head = int(meta.get("gpt2.attention.head_count"))
    n_ctx = int(meta.get("gpt2.context_length"))

    mapped = _map_names(reader, _GPT2_NAMES, n_layer, path, "gpt2")
    vocab = (
        _gguf_shape(mapped["transformer.wte.weight"])[0]
        if "transformer.wte.weight" in mapped
        else 0
    )
    d = (d_model,)
    expected = {
        "transformer.wte.weight": (vocab, d_model),
        "transformer.wpe.weight": (n_ctx, d_model),
        "transformer.ln_f.weight": d,
        "transformer.ln_f.bias": d,
    }
    # GGUF (llama.cpp) shapes of the Linear weights are [out, in]; HF Conv1D wants [in, out].
    linear = {
        "attn.c_attn": (3 * d_model, d_model),
        "attn.c_proj": (d_model, d_model),
        "mlp.c_fc": (d_ff, d_model),
        "mlp.c_proj": (d_model, d_ff),
    }
    for i in range(n_layer):
        p = f"transformer.h.{i}."
        for norm in ("ln_1", "ln_2"):
            expected |= {p + norm + ".weight": d, p + norm + ".bias": d}
        for name, (out, inp) in linear.items():
            expected |= {p + name + ".weight": (out, inp), p + name + ".bias": (out,)}
    # llama.cpp writes `output` as a copy of the embedding; keep it only if it differs.
    tied = True
    if "lm_head.weight" in mapped:
        head = mapped.pop("lm_head.weight")
        if _gguf_shape(head) != (vocab, d_model) or not np.array_equal(
            _dequantizer(head, path)(), _dequantizer(mapped["transformer.wte.weight"], path)()
        ):
            tied = False
            mapped["lm_head.weight"] = head
            expected["lm_head.weight"] = (vocab, d_model)
    _expect(mapped, expected, path)

    tensors = []
    for name in sorted(mapped, key=_natural):
        load, shape = _dequantizer(mapped[name], path), expected[name]
        if name.endswith(".weight") and any(f".{k}." in name for k in linear):
            load, shape = _then(load, np.transpose), shape[::-1]  # [out, in] -> [in, out]
        tensors.append(_Tensor(name, shape, load, f"{path}: tensor {mapped[name].name}"))

    config = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": vocab,
        "n_embd": d_model,
        "n_inner": d_ff,
        "n_layer": n_layer,
        "n_head": n_head,
        "n_positions": n_ctx,
        "layer_norm_epsilon": _f32(meta.get("gpt2.attention.layer_norm_epsilon", 1e-5)),
        "activation_function": "gelu_new",
        "tie_word_embeddings": tied,
        **_common_ids(meta),
    }
    return config, tensors


def _then(
    load: Callable[[], np.ndarray], fn: Callable[..., np.ndarray], *args: Any
) -> Callable[[], np.ndarray]:
    return lambda: fn(load(), *args)


def _natural(name: str) -> list[Any]:
    # layers in numeric order: model.layers.2 before model.layers.10
    return [int(part) if part.isdigit() else part for part in name.split(".")]


# --- writing ---------------------------------------------------------------------------------


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _to_bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even like torch does."""
    bits = np.ascontiguousarray(x, dtype="<f4").view("<u4")
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & 1)) >> 16).astype("<u2")
    rounded[np.isnan(x)] = 0x7FC0  # rounding could carry a NaN's mantissa into the sign bit
    return rounded


def _write_safetensors(
    path: Path,
    tensors: list[_Tensor],
    dtype: str,
    progress: Callable[[int, int], None] | None,
) -> None:
    """Stream tensors into a safetensors file one at a time, so memory holds one tensor.

    Format: u64 little-endian header length, a JSON header giving each tensor's dtype, shape and
    byte range, then the raw little-endian data back to back.
    """
    tag, size = DTYPES[dtype]
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        nbytes = math.prod(t.shape) * size
        header[t.name] = {
            "dtype": tag,
            "shape": list(t.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data must start 8-byte aligned
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for i, t in enumerate(tensors, 1):
            try:
                values = t.load()
            except (ValueError, IndexError, TypeError) as e:  # bad blocks in a damaged file
                raise ConvertError(
                    f"{t.source} cannot be read ({e}); the file is corrupt"
                ) from None
            if values.shape != t.shape:  # a bug here, not in the file: shapes were checked
                raise ConvertError(
                    f"internal error: {t.name} came out {values.shape}, not {t.shape}"
                )
            if dtype == "bfloat16":
                data = _to_bfloat16_bits(values)
            else:
                data = np.ascontiguousarray(values, dtype="<f4" if dtype == "float32" else "<f2")
            f.write(memoryview(data))  # no copy: data is C-contiguous
            if progress is not None:
                progress(i, len(tensors))


# --- tokenizer -------------------------------------------------------------------------------

# How the text is split before BPE, by tokenizer.ggml.pre (llama.cpp's names). A file without
# a `pre` says "default"; GPT-2's split is the usual truth then (transformers assumes it too).
_GPT2_REGEX = ("default", "gpt-2", "gpt2", "olmo", "jais", "mpt")
# These split every digit off first, then apply the GPT-2 regex (llama.cpp does the same).
_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3 = ("llama-bpe", "llama3", "llama-v3")


def _byte_spelling() -> dict[int, str]:
    """GPT-2's byte -> character table: printable Latin-1 bytes stand for themselves, the other
    68 bytes take code points 256, 257, ... in byte order, so every token is visible text."""
    table = {b: chr(b) for b in [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]}
    extra = (b for b in range(256) if b not in table)
    table |= {b: chr(256 + n) for n, b in enumerate(extra)}
    return dict(sorted(table.items()))


def _pre_tokenizer(pre: str, path: Path) -> tuple[Any, bool]:
    """The `tokenizers` pre-tokenizer for llama.cpp's `pre` name, and whether to ignore merges."""
    from tokenizers import Regex, pre_tokenizers

    if pre in _GPT2_REGEX:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True), False
    if pre in _DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        ), False
    if pre in _LLAMA3:
        # Llama 3 looks whole words up in the vocabulary before merging (llama.cpp does too).
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_LLAMA3_REGEX), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        ), True
    known = ", ".join(_GPT2_REGEX + _DIGITS_THEN_GPT2 + _LLAMA3)
    raise ConvertError(f"{path}: pre-tokenizer {pre!r} is not supported (supported: {known})")


def _build_tokenizer(meta: _Metadata) -> tuple[Any, dict[str, Any]]:
    """`tokenizers.Tokenizer` and `tokenizer_config.json` contents from the GGUF vocabulary."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    path = meta.path
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ConvertError(
            f"{path}: tokenizer {kind!r} is not supported; only byte-level BPE ('gpt2') is"
        )
    tokens = [str(t) for t in meta.get("tokenizer.ggml.tokens")]
    types = [int(t) for t in meta.get("tokenizer.ggml.token_type", [_NORMAL] * len(tokens))]
    merges = meta.get("tokenizer.ggml.merges")
    if len(types) != len(tokens):
        raise ConvertError(
            f"{path}: {len(tokens)} tokens but {len(types)} token types; the file is corrupt"
        )
    pre_tokenizer, ignore_merges = _pre_tokenizer(meta.get("tokenizer.ggml.pre", "default"), path)

    spelling = _byte_spelling()
    alphabet = set(spelling.values())
    vocab: dict[str, int] = {}
    for i, (token, ttype) in enumerate(zip(tokens, types, strict=True)):
        # Added tokens keep their literal text; a normal token should already be byte-spelled,
        # but some files store it as plain text, so spell it.
        if ttype not in (_CONTROL, _USER_DEFINED) and not set(token) <= alphabet:
            token = "".join(spelling[b] for b in token.encode("utf-8"))
        vocab.setdefault(token, i)  # on a duplicate, the first id wins
    try:
        bpe = models.BPE(
            vocab=vocab,
            merges=[tuple(m.split(" ", 1)) for m in merges],
            fuse_unk=False,
            byte_fallback=False,
            ignore_merges=ignore_merges,
        )
    except Exception as e:
        raise ConvertError(f"{path}: the vocabulary and merges do not fit together ({e})") from None
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|>...) must match whole and never be split; they keep their ids.
    tok.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, k in zip(tokens, types, strict=True)
            if k == _CONTROL
        ]
    )
    tok.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, k in zip(tokens, types, strict=True)
            if k == _USER_DEFINED
        ]
    )

    def token_id(key: str) -> int | None:
        i = meta.get(f"tokenizer.ggml.{key}", None)
        return int(i) if i is not None and 0 <= i < len(tokens) else None

    def token(key: str) -> str | None:
        i = token_id(key)
        return None if i is None else tokens[i]

    bos, eos = token("bos_token_id"), token("eos_token_id")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    if add_bos or add_eos:
        # "<bos> $A <eos>", as llama.cpp adds them when the file asks for it
        before = [bos] if add_bos else []
        after = [eos] if add_eos else []
        single = [*before, "$A", *after]
        pair = [*single, *[f"{t}:1" for t in before], "$B:1", *[f"{t}:1" for t in after]]
        ids = {bos: token_id("bos_token_id"), eos: token_id("eos_token_id")}
        tok.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=[(t, ids[t]) for t in {*before, *after}]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)

    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": token("unknown_token_id"),
        "pad_token": token("padding_token_id"),
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
    }
    arch = meta.get("general.architecture")
    context = meta.get(f"{arch}.context_length", None)
    if context is not None:
        config["model_max_length"] = int(context)
    template = meta.get("tokenizer.chat_template", None)
    if template:
        config["chat_template"] = template
    return tok, config
