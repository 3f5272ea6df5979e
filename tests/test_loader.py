"""Loading checkpoints: layouts that must work, and faults that must end in one clear line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from gptcli.config import ConfigError
from gptcli.loader import LoadError, load_model


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_tensors(folder: Path, edit) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_sharded_checkpoint_loads(tiny_models, tmp_path):
    hf, _ = tiny_models["llama-untied"]
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="1MB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        want = hf(ids).logits
    assert (load_model(tmp_path / "sharded")(ids) - want).abs().max() < 1e-4


def test_gpt2_without_transformer_prefix(tiny_models, tmp_path):
    hf, folder = tiny_models["gpt2"]
    folder = copy_checkpoint(folder, tmp_path / "bare")

    def strip(tensors):
        for name in list(tensors):
            tensors[name.removeprefix("transformer.")] = tensors.pop(name)

    edit_tensors(folder, strip)
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        want = hf(ids).logits
    assert (load_model(folder)(ids) - want).abs().max() < 1e-4


def test_gpt2_mask_buffers_are_ignored(tiny_models, tmp_path):
    folder = copy_checkpoint(tiny_models["gpt2"][1], tmp_path / "buffers")

    def add_buffers(tensors):
        tensors["transformer.h.0.attn.bias"] = torch.ones(1, 1, 128, 128)
        tensors["transformer.h.0.attn.masked_bias"] = torch.tensor(-1e4)

    edit_tensors(folder, add_buffers)
    load_model(folder)


def test_missing_tensor_is_named(tiny_models, tmp_path):
    folder = copy_checkpoint(tiny_models["llama-untied"][1], tmp_path / "missing")
    edit_tensors(folder, lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
    with pytest.raises(
        LoadError,
        match=r"model\.safetensors: missing tensor model\.layers\.1\.mlp\.down_proj\.weight$",
    ):
        load_model(folder)


def test_missing_untied_head_is_an_error(tiny_models, tmp_path):
    folder = copy_checkpoint(tiny_models["llama-untied"][1], tmp_path / "nohead")
    edit_tensors(folder, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(LoadError, match="missing tensor lm_head.weight"):
        load_model(folder)


def test_unexpected_tensor_is_named(tiny_models, tmp_path):
    folder = copy_checkpoint(tiny_models["llama-gqa-tied"][1], tmp_path / "extra")
    edit_tensors(
        folder, lambda t: t.update({"model.layers.0.self_attn.q_norm.weight": torch.ones(8)})
    )
    with pytest.raises(LoadError, match=r"model\.safetensors: unexpected tensor .*q_norm"):
        load_model(folder)


def test_tensor_for_a_layer_beyond_the_config(tiny_models, tmp_path):
    folder = copy_checkpoint(tiny_models["llama-gqa-tied"][1], tmp_path / "layers")
    edit_tensors(
        folder, lambda t: t.update({"model.layers.5.input_layernorm.weight": torch.ones(32)})
    )
    with pytest.raises(LoadError, match="layer 5.*2 layers"):
        load_model(folder)


def test_wrong_shape_is_named(tiny_models, tmp_path):
    folder = copy_checkpoint(tiny_models["llama-gqa-tied"][1], tmp_path / "shape")
    name = "model.layers.0.self_attn.k_proj.weight"
    edit_tensors(folder, lambda t: t.update({name: torch.zeros(32, 32)}))
    with pytest.raises(LoadError, match=rf"{name} has shape \[32, 32\].*\[16, 32\]"):
        load_model(folder)


def test_truncated_file(tiny_models, tmp_path):
    folder = copy_checkpoint(tiny_models["gpt2"][1], tmp_path / "truncated")
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(LoadError, match=r"model\.safetensors: cannot read safetensors"):
        load_model(folder)


def test_missing_shard(tiny_models, tmp_path):
    hf, _ = tiny_models["llama-untied"]
    folder = tmp_path / "shards"
    hf.save_pretrained(folder, max_shard_size="1MB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[-1]
    (folder / victim).unlink()
    with pytest.raises(LoadError, match=f"names shard {victim}, which is missing"):
        load_model(folder)


def test_pickle_checkpoints_are_refused_unopened(tiny_models, tmp_path):
    folder = tmp_path / "pickle"
    folder.mkdir()
    shutil.copy(tiny_models["gpt2"][1] / "config.json", folder)
    # Not even a valid pickle: the loader must refuse by name, never try to open it.
    (folder / "pytorch_model.bin").write_bytes(b"not a pickle")
    with pytest.raises(LoadError, match="pickle checkpoints are refused.*arbitrary code"):
        load_model(folder)
    with pytest.raises(LoadError, match="pickle"):
        load_model(folder / "pytorch_model.bin")


def test_unknown_architecture(tiny_models, tmp_path):
    folder = copy_checkpoint(tiny_models["gpt2"][1], tmp_path / "arch")
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["MambaForCausalLM"]
    config["model_type"] = "mamba"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="unsupported architecture MambaForCausalLM"):
        load_model(folder)


def test_config_missing_field(tiny_models, tmp_path):
    folder = copy_checkpoint(tiny_models["llama-untied"][1], tmp_path / "field")
    config = json.loads((folder / "config.json").read_text())
    del config["num_hidden_layers"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="num_hidden_layers"):
        load_model(folder)


@pytest.mark.parametrize("make", ["nothing", "file", "gguf", "empty-dir"])
def test_paths_that_are_not_checkpoints(tmp_path, make):
    path = tmp_path / "x.gguf" if make == "gguf" else tmp_path / "x"
    if make in ("file", "gguf"):
        path.write_bytes(b"GGUF")
    elif make == "empty-dir":
        path.mkdir()
    expected = {
        "nothing": "no such folder",
        "file": "is a file",
        "gguf": "gptcli convert",
        "empty-dir": "no config.json",
    }[make]
    with pytest.raises(LoadError, match=expected):
        load_model(path)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("num_attention_heads", 0, "num_attention_heads must be positive"),
        ("max_position_embeddings", 10**12, "beyond reason"),
        ("hidden_act", "relu", "activation 'relu' is not supported"),
        ("rope_theta", -1, "rope_theta"),
    ],
)
def test_config_values_we_cannot_honour(tiny_models, tmp_path, field, value, message):
    folder = copy_checkpoint(tiny_models["llama-untied"][1], tmp_path / "cfg")
    config = json.loads((folder / "config.json").read_text())
    config[field] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=message) as info:
        load_model(folder)
    assert str(info.value).startswith(str(folder / "config.json"))


def test_missing_tensor_keeps_the_files_prefix(tiny_models, tmp_path):
    folder = copy_checkpoint(tiny_models["gpt2"][1], tmp_path / "prefix")
    edit_tensors(folder, lambda t: t.pop("transformer.h.1.ln_2.bias"))
    with pytest.raises(LoadError, match=r"missing tensor transformer\.h\.1\.ln_2\.bias$"):
        load_model(folder)
