"""Write a GGUF file (llama.cpp's format) from a Hugging Face Llama or GPT-2 checkpoint folder.

This is the inverse of `gptcli.convert` for the two families gptcli reads, so llama.cpp can run
exactly the weights gptcli runs (`benchmarks/compare.py`). What llama.cpp expects, and we do:

- names: HF names map to llama.cpp's (`model.layers.3.self_attn.q_proj.weight` ->
  `blk.3.attn_q.weight`);
- rotary layout: llama.cpp's rope rotates neighbouring dimensions (2i, 2i+1) where HF rotates
  i with i + head_dim/2, so Llama q/k rows are permuted (`permute_rows`), the inverse of
  `gptcli.convert._unpermute_rows`;
- GPT-2's Conv1D matrices are stored [in, out]; llama.cpp wants [out, in], so they are
  transposed, and `output.weight` is written as a copy of the token embedding, as llama.cpp's
  own converter does;
- storage: matrices as F32 or Q8_0 (quantized with the `gguf` package); norms, biases and
  GPT-2's position table stay F32, as llama.cpp's converter keeps them;
- tokenizer: the byte-level BPE vocabulary, merges, token types and special ids go into the
  metadata, with the pre-tokenizer name llama.cpp knows (`smollm`, `gpt-2`).

Usage: `python -m benchmarks.gguf_writer MODEL_DIR OUT.gguf [--type Q8_0]`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType, LlamaFileType, TokenType

TYPES = {"F32": GGMLQuantizationType.F32, "Q8_0": GGMLQuantizationType.Q8_0}
FILE_TYPES = {"F32": LlamaFileType.ALL_F32, "Q8_0": LlamaFileType.MOSTLY_Q8_0}

# HF Llama name (N = layer) -> llama.cpp name.
LLAMA_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.N.input_layernorm.weight": "blk.N.attn_norm.weight",
    "model.layers.N.self_attn.q_proj.weight": "blk.N.attn_q.weight",
    "model.layers.N.self_attn.k_proj.weight": "blk.N.attn_k.weight",
    "model.layers.N.self_attn.v_proj.weight": "blk.N.attn_v.weight",
    "model.layers.N.self_attn.o_proj.weight": "blk.N.attn_output.weight",
    "model.layers.N.post_attention_layernorm.weight": "blk.N.ffn_norm.weight",
    "model.layers.N.mlp.gate_proj.weight": "blk.N.ffn_gate.weight",
    "model.layers.N.mlp.up_proj.weight": "blk.N.ffn_up.weight",
    "model.layers.N.mlp.down_proj.weight": "blk.N.ffn_down.weight",
}

# HF GPT-2 name without the optional `transformer.` prefix -> llama.cpp name.
GPT2_NAMES = {
    "wte.weight": "token_embd.weight",
    "wpe.weight": "position_embd.weight",
    "ln_f.weight": "output_norm.weight",
    "ln_f.bias": "output_norm.bias",
    "lm_head.weight": "output.weight",
    "h.N.ln_1.weight": "blk.N.attn_norm.weight",
    "h.N.ln_1.bias": "blk.N.attn_norm.bias",
    "h.N.attn.c_attn.weight": "blk.N.attn_qkv.weight",
    "h.N.attn.c_attn.bias": "blk.N.attn_qkv.bias",
    "h.N.attn.c_proj.weight": "blk.N.attn_output.weight",
    "h.N.attn.c_proj.bias": "blk.N.attn_output.bias",
    "h.N.ln_2.weight": "blk.N.ffn_norm.weight",
    "h.N.ln_2.bias": "blk.N.ffn_norm.bias",
    "h.N.mlp.c_fc.weight": "blk.N.ffn_up.weight",
    "h.N.mlp.c_fc.bias": "blk.N.ffn_up.bias",
    "h.N.mlp.c_proj.weight": "blk.N.ffn_down.weight",
    "h.N.mlp.c_proj.bias": "blk.N.ffn_down.bias",
}
GPT2_CONV1D = ("attn_qkv.weight", "attn_output.weight", "ffn_up.weight", "ffn_down.weight")
# Buffers and tables that are not weights (HF writes some of them).
SKIP = re.compile(r"(\.attn\.(masked_)?bias$|rotary_emb\.inv_freq$)")
# Kept F32 whatever the file type (llama.cpp's converter does the same).
KEEP_F32 = ("position_embd.weight",)

_LAYER = re.compile(r"\.(\d+)\.")


def permute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF q/k rows -> llama.cpp's order: each head's rows (half, i) are stored at (i, half).

    Reading the rows as [heads, 2, head_dim/2] and swapping the last two axes interleaves the
    two halves, so HF's rotation pairs (i, i + head_dim/2) become neighbours (2i, 2i+1).
    """
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, head_dim // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclass
class Vocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str  # llama.cpp's pre-tokenizer name


def read_vocab(model_dir: Path, size: int) -> Vocab:
    """The byte-level BPE vocabulary of a folder (`tokenizer.json`, or `vocab.json` +
    `merges.txt`), padded with unused tokens up to the embedding's `size` rows."""
    by_id: dict[int, tuple[str, int]] = {}
    tokenizer_json = model_dir / "tokenizer.json"
    if tokenizer_json.is_file():
        data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
        model = data["model"]
        if model.get("type") != "BPE":
            raise ValueError(f"{tokenizer_json}: only byte-level BPE tokenizers are supported")
        for token, i in model["vocab"].items():
            by_id[i] = (token, TokenType.NORMAL)
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
        for added in data.get("added_tokens", []):
            kind = TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED
            by_id[added["id"]] = (added["content"], kind)
        pre = _pre_name(data.get("pre_tokenizer") or {}, tokenizer_json)
    else:
        vocab = json.loads((model_dir / "vocab.json").read_text(encoding="utf-8"))
        by_id = {i: (token, TokenType.NORMAL) for token, i in vocab.items()}
        lines = (model_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
        merges = [line for line in lines if line and not line.startswith("#version")]
        pre = "gpt-2"
    if max(by_id) >= size:
        raise ValueError(f"{model_dir}: token id {max(by_id)} is beyond the embedding ({size})")
    tokens, types = [], []
    for i in range(size):
        token, kind = by_id.get(i, (f"[PAD{i}]", TokenType.UNUSED))
        tokens.append(token)
        types.append(int(kind))
    return Vocab(tokens, types, merges, pre)


def _pre_name(pre_tokenizer: dict, source: Path) -> str:
    """llama.cpp's name for the pre-tokenizers that gptcli.convert can read back."""
    parts = pre_tokenizer.get("pretokenizers", [pre_tokenizer])
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"]:
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    raise ValueError(f"{source}: pre-tokenizer {kinds} has no llama.cpp name known here")


def _read_tensors(model_dir: Path) -> dict[str, np.ndarray]:
    """Every tensor of the folder's safetensors file(s) as float32 numpy arrays."""
    from safetensors import safe_open

    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    tensors = {}
    for name in files:
        # torch, not numpy: numpy has no bfloat16
        with safe_open(model_dir / name, framework="pt") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key).float().numpy()
    return tensors


def _rename(name: str, table: dict[str, str]) -> str | None:
    m = _LAYER.search(name)
    key = _LAYER.sub(".N.", name, count=1) if m else name
    if key not in table:
        return None
    return table[key].replace(".N.", f".{m.group(1)}.") if m else table[key]


def _first(value: object) -> int | None:
    if isinstance(value, list):
        return int(value[0]) if value else None
    return None if value is None else int(value)


def write_gguf(model_dir: Path, out_path: Path, qtype: str = "F32") -> Path:
    """Write `model_dir` (an HF Llama or GPT-2 folder) as a GGUF file of type F32 or Q8_0."""
    model_dir, out_path = Path(model_dir), Path(out_path)
    if qtype not in TYPES:
        raise ValueError(f"unknown type {qtype!r}; choose {', '.join(TYPES)}")
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    known = {"LlamaForCausalLM": "llama", "GPT2LMHeadModel": "gpt2"}
    archs = [known[a] for a in config.get("architectures") or [] if a in known]
    arch = archs[0] if archs else config.get("model_type")
    tensors = _read_tensors(model_dir)
    out: dict[str, np.ndarray] = {}
    if arch == "llama":
        n_head = config["num_attention_heads"]
        n_kv = config.get("num_key_value_heads") or n_head
        tied = config.get("tie_word_embeddings", False)
        for name, values in tensors.items():
            if SKIP.search(name) or (tied and name == "lm_head.weight"):
                continue
            new = _rename(name, LLAMA_NAMES)
            if new is None:
                raise ValueError(f"{model_dir}: tensor {name} has no llama.cpp name")
            if new.endswith("attn_q.weight"):
                values = permute_rows(values, n_head)
            elif new.endswith("attn_k.weight"):
                values = permute_rows(values, n_kv)
            out[new] = values
    elif arch == "gpt2":
        for name, values in tensors.items():
            plain = name.removeprefix("transformer.")
            if SKIP.search(plain):
                continue
            new = _rename(plain, GPT2_NAMES)
            if new is None:
                raise ValueError(f"{model_dir}: tensor {name} has no llama.cpp name")
            out[new] = values.T.copy() if new.endswith(GPT2_CONV1D) else values
        out.setdefault("output.weight", out["token_embd.weight"])
    else:
        raise ValueError(f"{model_dir}: architecture {arch!r} is not supported (llama, gpt2)")
    vocab = read_vocab(model_dir, out["token_embd.weight"].shape[0])

    generation = model_dir / "generation_config.json"
    gen = json.loads(generation.read_text(encoding="utf-8")) if generation.is_file() else {}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.partial-{secrets.token_hex(4)}")
    try:
        w = gguf.GGUFWriter(str(tmp), arch)
        w.add_name(model_dir.name)
        w.add_file_type(FILE_TYPES[qtype])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        if arch == "llama":
            d_model = config["hidden_size"]
            w.add_block_count(config["num_hidden_layers"])
            w.add_context_length(config["max_position_embeddings"])
            w.add_embedding_length(d_model)
            w.add_feed_forward_length(config["intermediate_size"])
            w.add_head_count(n_head)
            w.add_head_count_kv(n_kv)
            w.add_rope_dimension_count(d_model // n_head)
            w.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
            w.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
            w.add_vocab_size(len(vocab.tokens))
        else:
            d_model = config["n_embd"]
            w.add_block_count(config["n_layer"])
            w.add_context_length(config["n_positions"])
            w.add_embedding_length(d_model)
            w.add_feed_forward_length(config.get("n_inner") or 4 * d_model)
            w.add_head_count(config["n_head"])
            w.add_layer_norm_eps(float(config.get("layer_norm_epsilon", 1e-5)))
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(vocab.pre)
        w.add_token_list(vocab.tokens)
        w.add_token_types(vocab.types)
        w.add_token_merges(vocab.merges)
        w.add_add_bos_token(False)
        for key, add in (
            ("bos_token_id", w.add_bos_token_id),
            ("eos_token_id", w.add_eos_token_id),
            ("pad_token_id", w.add_pad_token_id),
        ):
            value = _first(gen.get(key, config.get(key)))
            if value is not None:
                add(value)
        for name in sorted(out, key=_natural):
            _add_tensor(w, name, out[name], qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return out_path


def _add_tensor(w: gguf.GGUFWriter, name: str, values: np.ndarray, qtype: str) -> None:
    values = np.ascontiguousarray(values, dtype=np.float32)
    kind = TYPES[qtype]
    block = gguf.GGML_QUANT_SIZES[kind][0]
    if kind == GGMLQuantizationType.F32 or values.ndim < 2 or name in KEEP_F32:
        w.add_tensor(name, values)
    elif values.shape[-1] % block:  # rows must be whole blocks; llama.cpp falls back too
        w.add_tensor(name, values)
    else:
        w.add_tensor(name, gguf.quants.quantize(values, kind), raw_dtype=kind)


def _natural(name: str) -> list[object]:
    return [int(part) if part.isdigit() else part for part in name.split(".")]


def cached_gguf(model_dir: Path, qtype: str, cache_dir: Path) -> Path:
    """The GGUF file of `model_dir` at `qtype` under `cache_dir`, written when missing or older
    than the checkpoint."""
    model_dir = Path(model_dir)
    path = Path(cache_dir) / f"{model_dir.name}.{qtype.lower()}.gguf"
    newest = max(p.stat().st_mtime for p in model_dir.glob("*.safetensors"))
    if not path.is_file() or path.stat().st_mtime < newest:
        write_gguf(model_dir, path, qtype)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--type", choices=list(TYPES), default="F32")
    args = parser.parse_args()
    print(write_gguf(args.model_dir, args.out, args.type))


if __name__ == "__main__":
    main()
