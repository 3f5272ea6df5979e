"""Fetch a checkpoint from the Hugging Face Hub into a folder gptcli can load.

Only what gptcli reads is fetched: `config.json`, `generation_config.json`, the tokenizer files
and the `*.safetensors` weights (with their index). Pickle weights (`.bin`, `.pt`, `.pth`) are
never downloaded: loading them can run arbitrary code. `huggingface_hub` does the transfer,
the resuming and the progress bars; when the Hub cannot be reached (or `HF_HUB_OFFLINE=1`) the
files come from the local Hugging Face cache, if they are there.
"""

from __future__ import annotations

import fnmatch
import shutil
from dataclasses import dataclass
from pathlib import Path

from .errors import GptcliError, UsageError

#: Top-level files of a repository that gptcli uses.
WANTED = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "chat_template.jinja",  # where newer transformers versions save the chat template
    "*.safetensors",
    "*.safetensors.index.json",
)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


class DownloadError(GptcliError):
    """The Hub or the cache could not provide a usable checkpoint."""


@dataclass(frozen=True)
class Downloaded:
    path: Path
    files: tuple[str, ...]
    offline: bool  # served from the local cache, without the Hub


def default_dir(repo_id: str) -> Path:
    """weights/<name after the slash, lowercased>, under the current folder."""
    return Path("weights") / repo_id.rsplit("/", 1)[-1].lower()


def check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise UsageError(
            f"REPO {repo_id!r} is not a Hub repository id; write it as ORG/NAME, "
            "e.g. HuggingFaceTB/SmolLM2-135M-Instruct"
        ) from None


def select_files(files: list[str]) -> list[str]:
    """The repository files gptcli wants: top-level config, tokenizer and safetensors files."""
    return sorted(
        name
        for name in files
        if "/" not in name and any(fnmatch.fnmatchcase(name, p) for p in WANTED)
    )


def check_weights(files: list[str], where: str) -> None:
    """Refuse a repository whose weights are not in safetensors files."""
    top = [name for name in files if "/" not in name]
    if any(name.endswith(".safetensors") for name in top):
        return
    pickles = [name for name in top if name.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise DownloadError(
            f"{where} has only pickle weights ({pickles[0]}), which gptcli refuses because "
            "loading them can run arbitrary code; pick a revision with safetensors "
            "(--revision refs/pr/N, where a conversion PR exists) or convert it with a tool "
            "you trust"
        )
    raise DownloadError(f"{where} has no *.safetensors weights; it is not a model gptcli can load")


def download(repo_id: str, dest: Path, revision: str | None = None) -> Downloaded:
    """Fetch the wanted files of `repo_id` at `revision` into `dest` (resuming a partial one)."""
    from huggingface_hub import HfApi, constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    check_repo_id(repo_id)
    where = repo_id + (f" at revision {revision}" if revision else "")
    if dest.exists() and not dest.is_dir():
        raise UsageError(f"--dir {dest}: is a file; give a folder to download into")

    files = None
    if not constants.HF_HUB_OFFLINE:
        try:
            # One request (no retries with back-off, unlike listing the tree): fast offline.
            info = HfApi().model_info(repo_id, revision=revision)
            files = [sibling.rfilename for sibling in info.siblings or []]
        except Exception as e:
            if not _is_connection_error(e):
                raise _hub_error(e, repo_id, revision) from None
    if files is not None:
        check_weights(files, where)
        wanted = select_files(files)
        try:
            snapshot_download(repo_id, revision=revision, allow_patterns=wanted, local_dir=dest)
        except Exception as e:
            if isinstance(e, OSError) and not _is_connection_error(e):
                raise DownloadError(f"{dest}: cannot write the download ({e})") from None
            raise _hub_error(e, repo_id, revision) from None
        return Downloaded(dest, tuple(wanted), offline=False)

    # Offline: the Hugging Face cache (HF_HUB_CACHE) may hold the snapshot already.
    try:
        snapshot = Path(
            snapshot_download(
                repo_id, revision=revision, allow_patterns=list(WANTED), local_files_only=True
            )
        )
    except LocalEntryNotFoundError:
        raise DownloadError(
            f"the Hugging Face Hub cannot be reached (offline) and {where} is not in the local "
            f"cache ({constants.HF_HUB_CACHE}); connect to the network and retry"
        ) from None
    except Exception as e:
        raise _hub_error(e, repo_id, revision) from None
    present = sorted(p.name for p in snapshot.iterdir() if p.is_file())
    check_weights(present, f"{where} (in the local cache)")
    wanted = select_files(present)
    try:
        dest.mkdir(parents=True, exist_ok=True)
        for name in wanted:
            shutil.copyfile(snapshot / name, dest / name)  # follows the cache's symlinks
    except OSError as e:
        raise DownloadError(f"{dest}: cannot write the download ({e.strerror or e})") from None
    return Downloaded(dest, tuple(wanted), offline=True)


def _is_connection_error(error: BaseException) -> bool:
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(error, OfflineModeIsEnabled):
        return True
    if isinstance(error, HfHubHTTPError):
        return False  # the Hub answered
    if isinstance(error, (ConnectionError, TimeoutError)):
        return True
    module = type(error).__module__.split(".")[0]
    return module in ("httpx", "httpx2", "httpcore", "requests", "urllib3")


def _hub_error(error: BaseException, repo_id: str, revision: str | None) -> GptcliError:
    """One line for what the Hub said."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(error, GptcliError):
        return error
    if isinstance(error, GatedRepoError):
        return DownloadError(
            f"{repo_id} is gated: accept its terms on huggingface.co, then log in with "
            "`hf auth login` and retry"
        )
    if isinstance(error, RepositoryNotFoundError):
        return DownloadError(
            f"{repo_id}: no such model repository on the Hugging Face Hub (or it is private: "
            "log in with `hf auth login`); check the name"
        )
    if isinstance(error, RevisionNotFoundError):
        return DownloadError(f"--revision {revision}: {repo_id} has no such branch, tag or commit")
    if isinstance(error, LocalEntryNotFoundError) or _is_connection_error(error):
        return DownloadError(
            f"cannot reach the Hugging Face Hub to fetch {repo_id}; check the network and retry"
        )
    if isinstance(error, HfHubHTTPError):
        return DownloadError(f"the Hugging Face Hub refused the download: {_first_line(error)}")
    return DownloadError(f"download of {repo_id} failed: {_first_line(error)}")


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def validate(path: Path) -> str:
    """Check the folder loads as far as its config and tokenizer; a one-line description."""
    from .config import ModelConfig
    from .loader import check_model_dir
    from .tokenizer import Tokenizer

    try:
        check_model_dir(path)
        config = ModelConfig.from_dir(path)
        Tokenizer.from_dir(path)
    except GptcliError as e:
        raise DownloadError(f"downloaded to {path}, but gptcli cannot load it: {e}") from None
    return (
        f"{config.family}, {config.n_layer} layers, d_model {config.d_model}, "
        f"context {config.max_positions}"
    )
