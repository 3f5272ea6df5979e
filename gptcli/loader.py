"""Checkpoint folder -> ready GPT.

Finds the safetensors files (one file, or shards listed in an index), maps each HF tensor
name through a declarative table to our parameter, checks its shape against the config,
transposes `[out, in]` matrices to our `[in, out]` layout, fuses Q/K/V and gate/up parts,
and assigns the results to a model built on the meta device, so no random weights ever
exist. Tensors are read one at a time from memory-mapped files; the only extra memory is
the tensor being converted.
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from .config import ModelConfig, read_json
from .errors import GptcliError, GptcliWarning, UsageError
from .model import GPT

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
INDEX_FILE = "model.safetensors.index.json"


class LoadError(GptcliError):
    """A checkpoint that cannot become a model; the message names the file and the tensor."""


Shape = Callable[[ModelConfig], tuple[int, ...]]


@dataclass(frozen=True)
class Rule:
    """How one HF tensor becomes (part of) one of our parameters.

    `hf` and `ours` are patterns with `{i}` for the layer number. `part`/`parts` place the
    tensor in a parameter fused along its output dimension (Q, K, V or gate, up).
    """

    hf: str
    ours: str
    shape: Shape
    transpose: bool = False
    part: int = 0
    parts: int = 1


def _d(c: ModelConfig) -> int:
    return c.d_model


def _kv(c: ModelConfig) -> int:
    return c.n_kv_head * c.head_dim


# "embedding" and "lm_head" are resolved after loading (see _place_embeddings): where they go
# depends on whether the head is tied.
LLAMA_RULES = [
    Rule("model.embed_tokens.weight", "embedding", lambda c: (c.vocab_size, c.d_model)),
    Rule("lm_head.weight", "lm_head", lambda c: (c.vocab_size, c.d_model)),
    Rule("model.norm.weight", "final_norm.weight", lambda c: (c.d_model,)),
    Rule("model.layers.{i}.input_layernorm.weight", "blocks.{i}.attn_norm.weight", lambda c: (_d(c),)),
    Rule("model.layers.{i}.post_attention_layernorm.weight", "blocks.{i}.mlp_norm.weight", lambda c: (_d(c),)),
    Rule("model.layers.{i}.self_attn.q_proj.weight", "blocks.{i}.attn.qkv.weight", lambda c: (_d(c), _d(c)), True, 0, 3),
    Rule("model.layers.{i}.self_attn.k_proj.weight", "blocks.{i}.attn.qkv.weight", lambda c: (_kv(c), _d(c)), True, 1, 3),
    Rule("model.layers.{i}.self_attn.v_proj.weight", "blocks.{i}.attn.qkv.weight", lambda c: (_kv(c), _d(c)), True, 2, 3),
    Rule("model.layers.{i}.self_attn.o_proj.weight", "blocks.{i}.attn.out.weight", lambda c: (_d(c), _d(c)), True),
    Rule("model.layers.{i}.mlp.gate_proj.weight", "blocks.{i}.mlp.up.weight", lambda c: (c.d_ff, _d(c)), True, 0, 2),
    Rule("model.layers.{i}.mlp.up_proj.weight", "blocks.{i}.mlp.up.weight", lambda c: (c.d_ff, _d(c)), True, 1, 2),
    Rule("model.layers.{i}.mlp.down_proj.weight", "blocks.{i}.mlp.down.weight", lambda c: (_d(c), c.d_ff), True),
]  # fmt: skip

# GPT-2's Conv1D layers already store [in, out]: no transposes. Names may carry a
# "transformer." prefix (GPT2LMHeadModel) or not (GPT2Model).
GPT2_RULES = [
    Rule("wte.weight", "embedding", lambda c: (c.vocab_size, c.d_model)),
    Rule("lm_head.weight", "lm_head", lambda c: (c.vocab_size, c.d_model)),
    Rule("wpe.weight", "pos_emb", lambda c: (c.max_positions, c.d_model)),
    Rule("ln_f.weight", "final_norm.weight", lambda c: (c.d_model,)),
    Rule("ln_f.bias", "final_norm.bias", lambda c: (c.d_model,)),
    Rule("h.{i}.ln_1.weight", "blocks.{i}.attn_norm.weight", lambda c: (_d(c),)),
    Rule("h.{i}.ln_1.bias", "blocks.{i}.attn_norm.bias", lambda c: (_d(c),)),
    Rule("h.{i}.attn.c_attn.weight", "blocks.{i}.attn.qkv.weight", lambda c: (_d(c), 3 * _d(c))),
    Rule("h.{i}.attn.c_attn.bias", "blocks.{i}.attn.qkv.bias", lambda c: (3 * _d(c),)),
    Rule("h.{i}.attn.c_proj.weight", "blocks.{i}.attn.out.weight", lambda c: (_d(c), _d(c))),
    Rule("h.{i}.attn.c_proj.bias", "blocks.{i}.attn.out.bias", lambda c: (_d(c),)),
    Rule("h.{i}.ln_2.weight", "blocks.{i}.mlp_norm.weight", lambda c: (_d(c),)),
    Rule("h.{i}.ln_2.bias", "blocks.{i}.mlp_norm.bias", lambda c: (_d(c),)),
    Rule("h.{i}.mlp.c_fc.weight", "blocks.{i}.mlp.up.weight", lambda c: (_d(c), c.d_ff)),
    Rule("h.{i}.mlp.c_fc.bias", "blocks.{i}.mlp.up.bias", lambda c: (c.d_ff,)),
    Rule("h.{i}.mlp.c_proj.weight", "blocks.{i}.mlp.down.weight", lambda c: (c.d_ff, _d(c))),
    Rule("h.{i}.mlp.c_proj.bias", "blocks.{i}.mlp.down.bias", lambda c: (_d(c),)),
]

RULES = {"llama": LLAMA_RULES, "gpt2": GPT2_RULES}

# Tensors checkpoints carry that are not weights: causal-mask buffers and RoPE tables.
IGNORED = re.compile(r"(^|\.)(attn\.bias|attn\.masked_bias|rotary_emb\.inv_freq)$")


def _compile(rules: list[Rule]) -> list[tuple[re.Pattern[str], Rule]]:
    compiled = []
    for rule in rules:
        pattern = re.escape(rule.hf).replace(re.escape("{i}"), r"(?P<i>\d+)")
        compiled.append((re.compile(pattern + "$"), rule))
    return compiled


def load_model(
    model_dir: Path | str,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> GPT:
    """Build a GPT from a checkpoint folder, every weight from the files, checked."""
    model_dir = Path(model_dir)
    check_model_dir(model_dir)
    config = ModelConfig.from_dir(model_dir)
    hf_config = read_json(model_dir / "config.json")
    for flag in ("attention_bias", "mlp_bias"):
        if hf_config.get(flag):
            raise LoadError(f"{model_dir / 'config.json'}: {flag}=true is not supported")

    state = _read_state(model_dir, config, torch.device(device), dtype)
    with torch.device("meta"):
        model = GPT(config)
    # _read_state checked every tensor the table expects; this guards the table itself.
    model.load_state_dict(state, strict=True, assign=True)
    return model.to_device(device).eval()


def check_model_dir(model_dir: Path) -> None:
    """Refuse paths that are not checkpoint folders, with a hint for the usual mistakes."""
    if not model_dir.exists():
        raise LoadError(f"{model_dir}: no such folder; pass -m with a checkpoint folder")
    if model_dir.is_file():
        if model_dir.suffix == ".gguf":
            raise LoadError(
                f"{model_dir}: is a GGUF file; convert it first: gptcli convert {model_dir} OUT_DIR"
            )
        if model_dir.suffix in PICKLE_SUFFIXES:
            raise LoadError(_pickle_message(model_dir))
        raise LoadError(f"{model_dir}: is a file; -m expects a checkpoint folder")
    if not os.access(model_dir, os.R_OK | os.X_OK):
        raise LoadError(f"{model_dir}: cannot read the folder (permission denied)")
    if not (model_dir / "config.json").is_file():
        raise LoadError(f"{model_dir}: no config.json here; is this a Hugging Face checkpoint?")
    if not (model_dir / INDEX_FILE).is_file() and not any(model_dir.glob("*.safetensors")):
        pickles = [p for p in sorted(model_dir.iterdir()) if p.suffix in PICKLE_SUFFIXES]
        if pickles:  # say so before anything else (the tokenizer) is looked at
            raise LoadError(_pickle_message(pickles[0]))


def _pickle_message(path: Path) -> str:
    return (
        f"{path}: pickle checkpoints are refused because loading them can run arbitrary code; "
        "convert it to safetensors with a tool you trust and retry"
    )


def _weight_files(model_dir: Path) -> dict[str, Path] | list[Path]:
    """The index's name -> shard map, or the single safetensors file as a one-item list."""
    index_path = model_dir / INDEX_FILE
    if index_path.is_file():
        index = read_json(index_path)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise LoadError(f"{index_path}: has no weight_map")
        shards = {name: model_dir / shard for name, shard in weight_map.items()}
        for shard in sorted(set(shards.values())):
            if not shard.is_file():
                raise LoadError(f"{index_path}: names shard {shard.name}, which is missing")
        return shards
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    others = sorted(model_dir.glob("*.safetensors"))
    if others:
        return others
    pickles = [p for p in sorted(model_dir.iterdir()) if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise LoadError(_pickle_message(pickles[0]))
    ggufs = sorted(model_dir.glob("*.gguf"))
    if ggufs:
        raise LoadError(
            f"{ggufs[0]}: GGUF files need converting first: gptcli convert {ggufs[0]} OUT_DIR"
        )
    raise LoadError(f"{model_dir}: no model.safetensors or {INDEX_FILE} found")


def _tensors(model_dir: Path) -> Iterator[tuple[str, Path, torch.Tensor]]:
    """Yield (name, file, tensor) for every tensor, one at a time, from memory-mapped files."""
    files = _weight_files(model_dir)
    by_file: dict[Path, list[str] | None] = {}
    if isinstance(files, dict):
        for name, path in files.items():
            by_file.setdefault(path, []).append(name)  # type: ignore[union-attr]
    else:
        by_file = {path: None for path in files}
    for path, names in by_file.items():
        with _reading(path), safe_open(path, framework="pt", device="cpu") as f:
            available = set(f.keys())
        for name in names if names is not None else sorted(available):
            if name not in available:
                raise LoadError(f"{path}: tensor {name} listed in the index is not here")
            # A fresh memory map per tensor: once the caller has copied the tensor, its pages
            # leave memory, so loading never holds the file and the model at once.
            with _reading(path), safe_open(path, framework="pt", device="cpu") as f:
                tensor = f.get_tensor(name)
            yield name, path, tensor
            del tensor


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Turn safetensors' own errors (and OSError) into one LoadError line naming the file."""
    try:
        yield
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        if isinstance(e, OSError):
            hint = "check the file's permissions" if isinstance(e, PermissionError) else ""
            reason = e.strerror or reason
        elif "not fully covered" in reason or "incomplete" in reason:
            hint = "is it truncated? download it again"
        else:
            hint = "is it a safetensors file? download it again"
        message = f"{path}: cannot read safetensors ({reason})" + (hint and f"; {hint}")
        raise LoadError(message) from None


def _read_state(
    model_dir: Path, config: ModelConfig, device: torch.device, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    rules = _compile(RULES[config.family])
    state: dict[str, torch.Tensor] = {}
    fused: dict[str, list[torch.Tensor | None]] = {}
    seen: set[str] = set()
    names_in_file: list[str] = []
    for name, path, tensor in _tensors(model_dir):
        names_in_file.append(name)
        plain = name.removeprefix("transformer.") if config.family == "gpt2" else name
        if IGNORED.search(plain):
            continue
        seen.add(plain)
        rule, ours = _match(rules, plain, config, path, name)
        want = rule.shape(config)
        if tuple(tensor.shape) != want:
            raise LoadError(
                f"{path}: tensor {name} has shape {list(tensor.shape)}, "
                f"but config.json implies {list(want)}"
            )
        if not tensor.dtype.is_floating_point:
            raise LoadError(f"{path}: tensor {name} has dtype {tensor.dtype}; expected floats")
        # Always a copy of our own, so no parameter keeps the file's memory map (and with it
        # every page read so far) alive after loading.
        source = tensor
        tensor = (tensor.t() if rule.transpose else tensor).to(  # [out, in] -> [in, out]
            device=device, dtype=dtype, memory_format=torch.contiguous_format, copy=True
        )
        _warn_if_not_finite(path, name, source, tensor)
        if rule.parts == 1:
            state[ours] = tensor
            continue
        pieces = fused.setdefault(ours, [None] * rule.parts)
        pieces[rule.part] = tensor
        if all(p is not None for p in pieces):  # fuse now: holding parts would double memory
            state[ours] = torch.cat(pieces, dim=1)  # type: ignore[arg-type]  # along [.., out]
            del fused[ours]
    # Name missing tensors as this file spells its others (GPT-2's optional "transformer.").
    prefix = "transformer." if any(n.startswith("transformer.") for n in names_in_file) else ""
    missing = [prefix + name for name in _expected_names(config) if name not in seen]
    if missing:
        where = model_dir / (
            INDEX_FILE if (model_dir / INDEX_FILE).is_file() else "model.safetensors"
        )
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise LoadError(f"{where}: missing tensor {missing[0]}{more}")
    _place_embeddings(state, config)
    return state


def _warn_if_not_finite(path: Path, name: str, source: torch.Tensor, loaded: torch.Tensor) -> None:
    """Warn (the run goes on) about NaN or infinite weights, in the file or made by the cast to
    a narrower dtype. A float32 sum is the cheap first test: it is finite for finite weights."""
    if bool(torch.isfinite(loaded.sum(dtype=torch.float32))):
        return
    bad = int((~torch.isfinite(source)).sum())
    if bad:
        message = f"tensor {name} has {bad} NaN or infinite value(s); the output may be garbage"
    else:
        bad = int((~torch.isfinite(loaded)).sum())
        if not bad:
            return  # the sum overflowed, not the weights
        kind = str(loaded.dtype).removeprefix("torch.")
        message = (
            f"tensor {name} has {bad} value(s) too large for {kind}, the output may be "
            "garbage; try --dtype float32"
        )
    warnings.warn(f"{path}: {message}", GptcliWarning, stacklevel=2)


def _expected_names(config: ModelConfig) -> list[str]:
    """Every HF tensor name the config calls for; the head only when it is not tied."""
    names = []
    for rule in RULES[config.family]:
        if rule.ours == "lm_head" and config.tie_embeddings:
            continue
        layers = range(config.n_layer) if "{i}" in rule.hf else [None]
        names += [rule.hf.replace("{i}", str(i)) for i in layers]
    return names


def _match(
    rules: list[tuple[re.Pattern[str], Rule]],
    plain: str,
    config: ModelConfig,
    path: Path,
    name: str,
) -> tuple[Rule, str]:
    for pattern, rule in rules:
        m = pattern.match(plain)
        if m is None:
            continue
        layer = m.groupdict().get("i")
        if layer is not None and int(layer) >= config.n_layer:
            raise LoadError(
                f"{path}: tensor {name} is for layer {layer}, but config.json has "
                f"{config.n_layer} layers"
            )
        return rule, rule.ours.replace("{i}", layer or "")
    raise LoadError(f"{path}: unexpected tensor {name} for a {config.family} model")


def _place_embeddings(state: dict[str, torch.Tensor], config: ModelConfig) -> None:
    """Put the input embedding and output head where GPT expects them (see GPT's docstring)."""
    embedding = state.pop("embedding")
    lm_head = state.pop("lm_head", None)
    # The head's [d, vocab] weight is a transposed view of the [vocab, d] matrix, not a copy:
    # no second 100+ MB buffer while loading, and oneDNN's kernel (model.Linear) reads the
    # [vocab, d] rows it prefers. Lookups by row stay contiguous too.
    if config.tie_embeddings:
        # A tied checkpoint may still store the head; it is the same matrix, so drop it.
        state["head.weight"] = embedding.t()  # [vocab, d] -> [d, vocab]
    else:
        state["tok_emb"] = embedding
        state["head.weight"] = lm_head.t()


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str) -> torch.device:
    """'auto' -> cuda, else mps, else cpu; an explicit choice must be available here."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        built = "no GPU was found" if torch.version.cuda else "this PyTorch is a CPU-only build"
        raise UsageError(f"--device cuda: CUDA is not available ({built}); use --device cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps: Apple's MPS backend is not available; use --device cpu")
    if name not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device: unknown device {name!r}; choose auto, cpu, cuda or mps")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' -> bfloat16 on CUDA (fast and safe there), float32 elsewhere (exact on CPUs)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise UsageError(f"--dtype: unknown dtype {name!r}; choose auto, {', '.join(DTYPES)}")
    return DTYPES[name]
