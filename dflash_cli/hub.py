"""Downloads through huggingface_hub, into the standard Hugging Face cache.

Models already fetched by transformers or vLLM users are found and reused; ours are found by them.
Only the files we load are fetched (safetensors, JSON configs, tokenizer files), never pickled
weights or `original/` checkpoints. Environment (HF_HOME, HF_HUB_CACHE, HF_ENDPOINT, HF_TOKEN,
HF_HUB_OFFLINE) is read at call time, so a long-lived process and the tests see the current values.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

import huggingface_hub
from huggingface_hub import constants, scan_cache_dir, snapshot_download
from huggingface_hub.errors import (DryRunError, GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                    OfflineModeIsEnabled, RepositoryNotFoundError)

from .errors import DflashError

ALLOW_PATTERNS = ["*.safetensors", "*.json", "tokenizer.model", "*.txt", "*.jinja"]
IGNORE_PATTERNS = ["original/*", "*/original/*", "*.bin", "*.pt", "*.pth"]
GB = 1e9


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def offline() -> bool:
    return _truthy(os.environ.get("HF_HUB_OFFLINE")) or bool(constants.HF_HUB_OFFLINE)


def cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT") or constants.ENDPOINT


def token() -> str | None:
    return os.environ.get("HF_TOKEN") or huggingface_hub.get_token()


def disk_free(path: Path) -> int:
    """Free bytes on the file system holding `path` (its nearest existing parent)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def _kwargs() -> dict:
    return dict(cache_dir=cache_dir(), endpoint=endpoint(), token=token(),
                allow_patterns=ALLOW_PATTERNS, ignore_patterns=IGNORE_PATTERNS)


@contextlib.contextmanager
def _hub_errors(repo_id: str) -> Iterator[None]:
    """Every Hub failure becomes one line that says what to do."""
    try:
        yield
    except DryRunError as e:
        cause = e.__cause__
        if cause is not None:
            with _hub_errors(repo_id):
                raise cause from None
        raise DflashError(f"cannot list {repo_id} on {endpoint()}: {e}") from None
    except GatedRepoError:
        raise DflashError(f"access to {repo_id} is gated: accept its licence at https://huggingface.co/{repo_id}, "
                          "then run `hf auth login` or set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise DflashError(f"{repo_id} was not found on the Hub (a private repo needs `hf auth login` or HF_TOKEN)") from None
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else "?"
        if status in (401, 403):
            raise DflashError(f"access to {repo_id} was refused ({status}): run `hf auth login` or set HF_TOKEN") from None
        raise DflashError(f"the Hub answered {status} for {repo_id}: {str(e).splitlines()[0]}") from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        if offline():
            raise DflashError(f"HF_HUB_OFFLINE is set and {repo_id} is not (completely) in the cache ({cache_dir()})") from None
        raise DflashError(f"cannot reach {endpoint()} to download {repo_id}, and it is not in the cache") from None
    except OSError as e:
        if getattr(e, "errno", None) == 28:
            raise DflashError(f"the disk holding {cache_dir()} is full") from None
        raise
    except Exception as e:  # httpx2 connection errors and timeouts
        if type(e).__module__.startswith(("httpx", "httpcore")):
            raise DflashError(f"cannot reach {endpoint()} ({type(e).__name__}) to download {repo_id}") from None
        raise


def local_path(repo_id: str) -> Path | None:
    """The complete cached snapshot of `repo_id`, or None. Never touches the network."""
    try:
        return Path(snapshot_download(repo_id, local_files_only=True, **_kwargs()))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        return None
    except Exception as e:  # an incomplete snapshot (interrupted pull) counts as absent
        if type(e).__name__ == "IncompleteSnapshotError":
            return None
        raise


def plan(repo_id: str) -> list:
    """What a pull would fetch: huggingface_hub's dry run (file names, sizes, cached or not)."""
    with _hub_errors(repo_id):
        return snapshot_download(repo_id, dry_run=True, **_kwargs())


def bytes_missing(repo_id: str) -> int:
    return sum(f.file_size or 0 for f in plan(repo_id) if f.will_download)


def check_free_space(needed: int, where: Path) -> None:
    free = disk_free(where)
    margin = 256 * 1024 * 1024
    if needed + margin > free:
        raise DflashError(f"not enough disk space in {where}: need {needed / GB:.1f} GB, {free / GB:.1f} GB free "
                          "(free some space, or point HF_HOME elsewhere)")


def pull(repo_id: str, *, progress: bool = True) -> Path:
    """Download (or resume) `repo_id` into the cache and return its snapshot directory."""
    if offline():
        path = local_path(repo_id)
        if path is None:
            raise DflashError(f"HF_HUB_OFFLINE is set and {repo_id} is not (completely) in the cache ({cache_dir()})")
        return path
    check_free_space(bytes_missing(repo_id), cache_dir())
    with _hub_errors(repo_id), _progress_bars(progress):
        return Path(snapshot_download(repo_id, **_kwargs()))


@contextlib.contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    if enabled:
        enable_progress_bars()
    else:
        disable_progress_bars()
    try:
        yield
    finally:
        (disable_progress_bars if was_disabled else enable_progress_bars)()


def _cached_repos() -> dict:
    directory = cache_dir()
    if not directory.is_dir():
        return {}
    return {r.repo_id: r for r in scan_cache_dir(directory).repos if r.repo_type == "model"}


def cached_sizes() -> dict[str, int]:
    """Bytes on disk per cached model repo, from one scan of the cache."""
    return {repo_id: r.size_on_disk for repo_id, r in _cached_repos().items()}


def cached_size(repo_id: str) -> int | None:
    """Bytes on disk for `repo_id` in the cache, or None when it is not there."""
    return cached_sizes().get(repo_id)


def remove(repo_id: str) -> int:
    """Delete every cached revision of `repo_id`; returns the bytes freed (0 if absent)."""
    repo = _cached_repos().get(repo_id)
    if repo is None:
        return 0
    strategy = scan_cache_dir(cache_dir()).delete_revisions(*[r.commit_hash for r in repo.revisions])
    strategy.execute()
    # Blobs of an interrupted download are not tracked as revisions: remove the whole folder.
    shutil.rmtree(repo.repo_path, ignore_errors=True)
    return strategy.expected_freed_size


def auth_status() -> str:
    """Whether a token is configured (read locally, no network)."""
    if os.environ.get("HF_TOKEN"):
        return "HF_TOKEN is set"
    return "logged in (token from `hf auth login`)" if huggingface_hub.get_token() else "not logged in"
