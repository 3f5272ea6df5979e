"""The architecture of one model, read from a Hugging Face `config.json`.

No torch here: the CLI reads configs before it imports torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .errors import GptcliError

#: HF `architectures` entry -> our family name.
ARCHITECTURES = {
    "GPT2LMHeadModel": "gpt2",
    "LlamaForCausalLM": "llama",
}


# The MLP activations our model implements: GELU with the tanh approximation, and SiLU.
ACTIVATIONS = {"gpt2": ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"), "llama": ("silu", "swish")}
MAX_POSITIONS = 1 << 22  # beyond any real model; stops absurd configs before allocation


class ConfigError(GptcliError):
    """A config file that is missing, unreadable, or describes a model we cannot build."""


@dataclass(frozen=True)
class ModelConfig:
    family: str  # "gpt2" or "llama"
    vocab_size: int
    n_layer: int
    n_head: int
    n_kv_head: int  # < n_head means grouped-query attention
    d_model: int
    d_ff: int
    max_positions: int
    norm_eps: float
    rope_theta: float = 10000.0  # llama only
    tie_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def __post_init__(self) -> None:
        if self.family not in ("gpt2", "llama"):
            raise ConfigError(f"unknown model family {self.family!r}")
        for name in (
            "vocab_size", "n_layer", "n_head", "n_kv_head", "d_model", "d_ff", "max_positions"
        ):  # fmt: skip
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_positions > MAX_POSITIONS:
            raise ConfigError(f"a context of {self.max_positions} positions is beyond reason")
        if not (self.rope_theta > 0 and self.norm_eps > 0):
            raise ConfigError("rope_theta and the norm epsilon must be positive")
        if self.d_model % self.n_head:
            raise ConfigError(f"hidden size {self.d_model} is not divisible by {self.n_head} heads")
        if self.n_head % self.n_kv_head:
            raise ConfigError(
                f"{self.n_head} attention heads are not divisible by {self.n_kv_head} key/value heads"
            )

    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Build from the dict of an HF `config.json`; `source` names the file in errors."""
        family = _family(hf, source)
        activation = hf.get("activation_function" if family == "gpt2" else "hidden_act")
        if activation not in (None, *ACTIVATIONS[family]):
            raise ConfigError(f"{source}: activation {activation!r} is not supported for {family}")
        try:
            if family == "gpt2":
                d_model = _whole(hf, "n_embd", source)
                return cls(
                    family="gpt2",
                    vocab_size=_whole(hf, "vocab_size", source),
                    n_layer=_whole(hf, "n_layer", source),
                    n_head=_whole(hf, "n_head", source),
                    n_kv_head=_whole(hf, "n_head", source),
                    d_model=d_model,
                    d_ff=_whole(hf, "n_inner", source, 4 * d_model),
                    max_positions=_whole(hf, "n_positions", source),
                    norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
                    tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
                    bos_token_id=_optional_id(hf.get("bos_token_id"), "bos_token_id", source),
                    eos_token_ids=_id_tuple(hf.get("eos_token_id"), "eos_token_id", source),
                )
            n_head = _whole(hf, "num_attention_heads", source)
            if n_head <= 0:
                raise ConfigError(f"{source}: num_attention_heads must be positive, got {n_head}")
            rope_scaling = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
            rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
            if rope_type not in ("default", None):
                raise ConfigError(f"{source}: RoPE scaling {rope_type!r} is not supported")
            if hf.get("head_dim") not in (None, _whole(hf, "hidden_size", source) // n_head):
                raise ConfigError(
                    f"{source}: a head_dim other than hidden_size/heads is not supported"
                )
            theta = hf.get("rope_theta", rope_scaling.get("rope_theta", 10000.0))
            return cls(
                family="llama",
                vocab_size=_whole(hf, "vocab_size", source),
                n_layer=_whole(hf, "num_hidden_layers", source),
                n_head=n_head,
                n_kv_head=_whole(hf, "num_key_value_heads", source, n_head),
                d_model=_whole(hf, "hidden_size", source),
                d_ff=_whole(hf, "intermediate_size", source),
                max_positions=_whole(hf, "max_position_embeddings", source),
                norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                rope_theta=float(theta),
                tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                bos_token_id=_optional_id(hf.get("bos_token_id"), "bos_token_id", source),
                eos_token_ids=_id_tuple(hf.get("eos_token_id"), "eos_token_id", source),
            )
        except KeyError as e:
            raise ConfigError(f"{source}: required field {e.args[0]!r} is missing") from None
        except ConfigError as e:
            if str(e).startswith(source):
                raise
            raise ConfigError(f"{source}: {e}") from None
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{source}: a field has a value of the wrong type ({e})") from None

    @classmethod
    def from_dir(cls, model_dir: Path) -> ModelConfig:
        """Read `config.json` in a checkpoint folder, adding EOS ids from `generation_config.json`."""
        path = Path(model_dir) / "config.json"
        hf = read_json(path)
        config = cls.from_hf(hf, str(path))
        gen_path = Path(model_dir) / "generation_config.json"
        if gen_path.is_file():
            extra = _id_tuple(
                read_json(gen_path).get("eos_token_id"), "eos_token_id", str(gen_path)
            )
            merged = config.eos_token_ids + tuple(i for i in extra if i not in config.eos_token_ids)
            config = replace(config, eos_token_ids=merged)
        return config


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON object, turning every failure into a ConfigError naming the file."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (invalid byte at {e.start})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


def _family(hf: dict[str, Any], source: str) -> str:
    names = hf.get("architectures") or []
    if isinstance(names, str):  # one name where HF writes a list of them
        names = [names]
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise ConfigError(f"{source}: architectures must be a list of class names, got {names!r}")
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    model_type = hf.get("model_type")
    if model_type in ("gpt2", "llama") and not names:
        return model_type
    shown = ", ".join(names) if names else f"model_type {model_type!r}"
    supported = ", ".join(ARCHITECTURES)
    raise ConfigError(f"{source}: unsupported architecture {shown} (supported: {supported})")


def _whole(hf: dict[str, Any], key: str, source: str, default: int | None = None) -> int:
    """A whole-number field; `default` when it is absent or null (KeyError when none is)."""
    value = hf.get(key)
    if value is None:
        if default is None:
            raise KeyError(key)
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{source}: {key} must be a whole number, got {value!r}")
    return value


def _optional_id(value: Any, key: str, source: str) -> int | None:
    return None if value is None else _whole({key: value}, key, source)


def _id_tuple(value: Any, key: str, source: str) -> tuple[int, ...]:
    """A token id or a list of them (HF allows both), as a tuple."""
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(_whole({key: v}, key, source) for v in value)
    return (_whole({key: value}, key, source),)
