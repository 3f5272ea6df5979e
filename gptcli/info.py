"""What a checkpoint folder holds, read from its files without building the model.

The architecture comes from `config.json`; the parameter count and the dtype on disk from the
safetensors headers (shapes and dtypes only, no tensor data is read); the special tokens and
the chat template from the tokenizer files.

The parameter count is of unique weights, as HF's `num_parameters()` counts them: a tied head
is the embedding matrix, so a stored `lm_head.weight` is not counted again when the config
ties it, and buffers some checkpoints carry (GPT-2's causal-mask `attn.bias`, RoPE's
`inv_freq`) are not parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open

from .config import ModelConfig
from .loader import IGNORED, _reading, _weight_files
from .tokenizer import Tokenizer

#: Bytes per element of the safetensors dtype names.
DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip
#: safetensors dtype names -> the names the CLI uses.
DTYPE_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
TORCH_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class WeightsOnDisk:
    n_params: int
    dtypes: tuple[str, ...]  # of the parameters, e.g. ("float32",)
    files: tuple[Path, ...]
    file_bytes: int


def weights_on_disk(model_dir: Path, config: ModelConfig) -> WeightsOnDisk:
    """Count unique parameters and collect their dtypes from the safetensors headers."""
    found = _weight_files(model_dir)
    files = sorted(set(found.values())) if isinstance(found, dict) else list(found)
    n_params = 0
    dtypes: list[str] = []
    for path in files:
        with _reading(path), safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                plain = name.removeprefix("transformer.")
                if IGNORED.search(plain):
                    continue
                if config.tie_embeddings and plain == "lm_head.weight":
                    continue  # the same matrix as the embedding
                piece = f.get_slice(name)
                n_params += _numel(piece.get_shape())
                dtype = DTYPE_NAMES.get(piece.get_dtype(), piece.get_dtype().lower())
                if dtype not in dtypes:
                    dtypes.append(dtype)
    return WeightsOnDisk(
        n_params=n_params,
        dtypes=tuple(dtypes),
        files=tuple(files),
        file_bytes=sum(path.stat().st_size for path in files),
    )


def _numel(shape: list[int]) -> int:
    n = 1
    for size in shape:
        n *= size
    return n


def kv_cache_bytes_per_token(config: ModelConfig, dtype: str) -> int:
    """Keys and values of every layer for one token: 2 x layers x kv heads x head size."""
    return 2 * config.n_layer * config.n_kv_head * config.head_dim * TORCH_BYTES[dtype]


def _token(tokenizer: Tokenizer, token_id: int) -> dict[str, object]:
    return {"id": token_id, "text": tokenizer.id_to_token(token_id)}


def model_info(model_dir: Path, dtype_in_use: str, device: str) -> dict[str, Any]:
    """Everything `gptcli info` shows, as a JSON-ready dict. `dtype_in_use` is the activation
    dtype the other commands would run this model in (float32, bfloat16 or float16) on
    `device`."""
    config = ModelConfig.from_dir(model_dir)
    disk = weights_on_disk(model_dir, config)
    tokenizer = Tokenizer.from_dir(model_dir)
    bos = config.bos_token_id if config.bos_token_id is not None else tokenizer.bos_id
    eos_ids = list(config.eos_token_ids)
    eos_ids += [i for i in tokenizer.eos_ids if i not in eos_ids]
    return {
        "model": str(model_dir),
        "family": config.family,
        "layers": config.n_layer,
        "heads": config.n_head,
        "kv_heads": config.n_kv_head,
        "head_size": config.head_dim,
        "hidden_size": config.d_model,
        "mlp_size": config.d_ff,
        "context": config.max_positions,
        "vocab_size": config.vocab_size,
        "tokenizer_vocab_size": tokenizer.vocab_size,
        "tied_embeddings": config.tie_embeddings,
        "parameters": disk.n_params,
        "dtype_on_disk": ",".join(disk.dtypes),
        "files": [path.name for path in disk.files],
        "file_bytes": disk.file_bytes,
        "kv_cache_bytes_per_token": {
            "float32": kv_cache_bytes_per_token(config, "float32"),
            dtype_in_use: kv_cache_bytes_per_token(config, dtype_in_use),
        },
        "dtype_in_use": dtype_in_use,
        "device": device,
        "bos": None if bos is None else _token(tokenizer, bos),
        "eos": [_token(tokenizer, i) for i in eos_ids],
        "chat_template": tokenizer.chat_template is not None,
    }
