"""`gptcli download` against a fake local Hugging Face cache: never the network."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from gptcli.download import (
    DownloadError,
    check_weights,
    default_dir,
    download,
    select_files,
    validate,
)

from .test_cli import run

SHA = "0123456789abcdef0123456789abcdef01234567"


def fake_repo(cache: Path, repo_id: str, files: dict[str, bytes]) -> Path:
    """A repository in the hub cache layout: refs/main -> snapshots/<sha>/ links -> blobs/."""
    storage = cache / ("models--" + repo_id.replace("/", "--"))
    (storage / "refs").mkdir(parents=True)
    (storage / "refs" / "main").write_text(SHA)
    snapshot = storage / "snapshots" / SHA
    for name, data in files.items():
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


@pytest.fixture(scope="module")
def hub(tmp_path_factory, tiny_models) -> Path:
    """A cache with a loadable tiny model, a pickle-only repo and a repo without weights."""
    cache = tmp_path_factory.mktemp("hub")
    folder = tiny_models["gpt2"][1]
    model_files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    extras = {
        "pytorch_model.bin": b"pickle, never to be fetched",
        "README.md": b"# tiny\n",
        "onnx/model.onnx": b"onnx",
        "tokenizer_config.json": b'{"eos_token": "<|endoftext|>"}',
    }
    fake_repo(cache, "org/Tiny-GPT2", {**model_files, **extras})
    fake_repo(
        cache,
        "org/pickles",
        {"config.json": model_files["config.json"], "pytorch_model.bin": b"pickle"},
    )
    fake_repo(cache, "org/nothing", {"config.json": model_files["config.json"]})
    return cache


def offline_env(cache: Path, tmp_path: Path) -> dict[str, str]:
    return {
        "HF_HUB_CACHE": str(cache),
        "HF_HOME": str(tmp_path / "hf-home"),  # no token, no user cache
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }


def stderr_lines(result) -> list[str]:
    return result.stderr.decode().strip().splitlines()


def test_download_copies_only_config_tokenizer_and_safetensors(hub, tmp_path):
    out = tmp_path / "out"
    result = run(["download", "org/Tiny-GPT2", "--dir", str(out)], env=offline_env(hub, tmp_path))
    assert result.returncode == 0, result.stderr.decode()
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "generation_config.json",
        "merges.txt",
        "model.safetensors",
        "tokenizer_config.json",
        "vocab.json",
    ]
    assert not (out / "model.safetensors").is_symlink()
    assert result.stdout == b""
    assert str(out) in result.stderr.decode()
    assert "local Hugging Face cache" in result.stderr.decode()
    generated = run(["generate", "-m", str(out), "Hi", "-n", "3", "--temp", "0"])
    assert generated.returncode == 0, generated.stderr.decode()


def test_default_folder_is_weights_slash_lowercased_name(hub, tmp_path):
    result = run(["download", "org/Tiny-GPT2"], env=offline_env(hub, tmp_path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr.decode()
    assert (tmp_path / "weights" / "tiny-gpt2" / "model.safetensors").is_file()


def test_a_pickle_only_repo_is_refused(hub, tmp_path):
    out = tmp_path / "out"
    result = run(["download", "org/pickles", "--dir", str(out)], env=offline_env(hub, tmp_path))
    assert result.returncode == 1
    lines = stderr_lines(result)
    assert len(lines) == 1
    assert "only pickle weights (pytorch_model.bin)" in lines[0]
    assert "gptcli refuses" in lines[0] and "safetensors" in lines[0]
    assert not out.exists()


def test_a_repo_without_weights_is_refused(hub, tmp_path):
    result = run(
        ["download", "org/nothing", "--dir", str(tmp_path / "o")], env=offline_env(hub, tmp_path)
    )
    assert result.returncode == 1
    lines = stderr_lines(result)
    assert len(lines) == 1 and "has no *.safetensors weights" in lines[0]


def test_offline_and_not_cached_is_one_clear_line(hub, tmp_path):
    result = run(
        ["download", "org/absent", "--dir", str(tmp_path / "o")], env=offline_env(hub, tmp_path)
    )
    assert result.returncode == 1
    lines = stderr_lines(result)
    assert len(lines) == 1
    assert "cannot be reached (offline)" in lines[0]
    assert "org/absent is not in the local cache" in lines[0]
    assert b"Traceback" not in result.stderr


def test_an_unknown_revision_offline_is_not_cached(hub, tmp_path):
    args = ["download", "org/Tiny-GPT2", "--revision", "v9", "--dir", str(tmp_path / "o")]
    result = run(args, env=offline_env(hub, tmp_path))
    assert result.returncode == 1
    assert "org/Tiny-GPT2 at revision v9 is not in the local cache" in result.stderr.decode()


def test_an_unreachable_hub_falls_back_to_the_cache(hub, tmp_path):
    # A closed port on this machine stands in for a network that is down.
    env = {**offline_env(hub, tmp_path), "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}
    out = tmp_path / "out"
    result = run(["download", "org/Tiny-GPT2", "--dir", str(out)], env=env)
    assert result.returncode == 0, result.stderr.decode()
    assert (out / "model.safetensors").is_file()
    assert not (out / "pytorch_model.bin").exists()


@pytest.mark.parametrize("repo", ["not a repo!", "a/b/c", "--"])
def test_a_malformed_repo_id_is_a_usage_error(repo, tmp_path):
    result = run(["download", "--dir", str(tmp_path / "o"), "--", repo])
    assert result.returncode == 2
    lines = stderr_lines(result)
    assert len(lines) == 1 and "ORG/NAME" in lines[0]


def test_select_files_and_check_weights():
    files = [
        "config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "tf_model.h5",
        "onnx/model.safetensors",
        "special_tokens_map.json",
        "chat_template.jinja",
        "README.md",
    ]
    assert select_files(files) == [
        "chat_template.jinja",
        "config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "special_tokens_map.json",
    ]
    check_weights(files, "x")
    with pytest.raises(DownloadError, match=r"only pickle weights \(model.pt\)"):
        check_weights(["config.json", "model.pt", "onnx/model.safetensors"], "x")
    assert default_dir("openai-community/gpt2") == Path("weights/gpt2")
    assert default_dir("HuggingFaceTB/SmolLM2-135M-Instruct") == Path(
        "weights/smollm2-135m-instruct"
    )


# --- the online path, with the Hub replaced by stand-ins (still no network) -------------------


def hub_error(cls, message: str) -> Exception:
    """An instance of a huggingface_hub error without an HTTP response behind it."""
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    return error


@pytest.fixture
def online(monkeypatch, tiny_models):
    """Pretend the Hub answers: `files` is the repository listing; downloads are recorded and
    served from the tiny model's folder."""
    import huggingface_hub
    from huggingface_hub import constants

    state = {"files": [], "downloads": [], "info_error": None}
    source = tiny_models["gpt2"][1]

    def model_info(self, repo_id, revision=None, **kwargs):
        if state["info_error"] is not None:
            raise state["info_error"]
        return SimpleNamespace(siblings=[SimpleNamespace(rfilename=f) for f in state["files"]])

    def snapshot_download(repo_id, **kwargs):
        state["downloads"].append(kwargs)
        dest = Path(kwargs["local_dir"])
        dest.mkdir(parents=True, exist_ok=True)
        for name in kwargs["allow_patterns"]:
            if (source / name).is_file():
                shutil.copy(source / name, dest / name)
        return str(dest)

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return state


def test_online_download_asks_only_for_the_wanted_files(online, tmp_path):
    online["files"] = [
        "config.json",
        "model.safetensors",
        "pytorch_model.bin",
        "vocab.json",
        "merges.txt",
        "onnx/decoder.onnx",
        "flax_model.msgpack",
    ]
    result = download("org/tiny", tmp_path / "out", revision="v1")
    assert result.files == ("config.json", "merges.txt", "model.safetensors", "vocab.json")
    assert not result.offline
    (call,) = online["downloads"]
    assert call["allow_patterns"] == list(result.files)
    assert call["revision"] == "v1"
    assert "gpt2" in validate(result.path)


def test_online_pickle_only_repo_is_refused_before_any_download(online, tmp_path):
    online["files"] = ["config.json", "pytorch_model.bin", "README.md"]
    with pytest.raises(DownloadError, match="only pickle weights"):
        download("org/old", tmp_path / "out")
    assert online["downloads"] == []


@pytest.mark.parametrize(
    ("error", "message"),
    [
        ("RepositoryNotFoundError", "org/x: no such model repository on the Hugging Face Hub"),
        ("GatedRepoError", "org/x is gated"),
        ("RevisionNotFoundError", "--revision r: org/x has no such branch, tag or commit"),
    ],
)
def test_hub_errors_become_one_line(online, tmp_path, error, message):
    from huggingface_hub import errors

    online["info_error"] = hub_error(getattr(errors, error), "404 Client Error: long\nstory")
    with pytest.raises(DownloadError) as info:
        download("org/x", tmp_path / "out", revision="r")
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)
