"""Downloads through huggingface_hub, into the standard Hugging Face cache.

Models already fetched by transformers or vLLM users are found and reused; ours are found by them.
Only the files we load are fetched (safetensors, JSON configs, tokenizer files), never pickled
weights or `original/` checkpoints. huggingface_hub reads its environment once, at import; we read
HF_HOME, HF_HUB_CACHE, HF_ENDPOINT and HF_HUB_OFFLINE at call time, so a long-lived process and the
tests see the current values.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path
from typing import Iterator, NamedTuple

from huggingface_hub import HfApi, constants, scan_cache_dir, snapshot_download
from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, HFValidationError, LocalEntryNotFoundError,
                                    OfflineModeIsEnabled, RepositoryNotFoundError)
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.utils import (are_progress_bars_disabled, disable_progress_bars, enable_progress_bars,
                                   filter_repo_objects, validate_repo_id)

from .errors import DflashError, UsageError
from .registry import ModelPair

ALLOW_PATTERNS = ["*.safetensors", "*.json", "tokenizer.model", "*.txt", "*.jinja"]
IGNORE_PATTERNS = ["original/*", "*/original/*", "*.bin", "*.pt", "*.pth"]
SPARE_BYTES = 256 * 2**20  # left free after a download, for logs, locks and whatever else runs
GB = 1e9


class HubUnreachable(DflashError):
    """No answer from the Hub (network down, wrong HF_ENDPOINT): a complete cached copy still serves."""


class RemoteFile(NamedTuple):
    filename: str
    size: int


def format_size(n: int) -> str:
    """Bytes for people: "16.4 GB", "216 kB" (never "0.0 GB" for a small repo)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}" if n < 100 * scale else f"{n / scale:.0f} {unit}"
    return f"{n} bytes"


def check_repo_id(repo_id: str) -> None:
    """A usage error for a name the Hub could never hold ("a/b/c", "bad name/x")."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise UsageError(f"'{repo_id}' is not a Hub repo id (owner/name: letters, digits, '-', '_', '.')") from None
    if repo_id.count("/") != 1:
        raise UsageError(f"'{repo_id}' is not a Hub repo id (owner/name)")


# -- environment, read at call time


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


def _endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def disk_free(path: Path) -> int:
    """Free bytes on the file system holding `path` (its nearest existing parent)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def _token_file() -> Path:
    if os.environ.get("HF_TOKEN_PATH"):
        return Path(os.environ["HF_TOKEN_PATH"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "token"
    return Path(constants.HF_TOKEN_PATH)


def auth_status() -> str:
    """Where the token for gated repos would come from; reads no network (unlike get_token, which may refresh)."""
    if os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN"):
        return "HF_TOKEN is set"
    if os.environ.get("HF_OIDC_RESOURCE"):
        return "token from OIDC (HF_OIDC_RESOURCE is set)"
    token_file = _token_file()
    if token_file.is_file() and token_file.read_text().strip():
        return "logged in (token from `hf auth login`)"
    return "not logged in"


# -- the cache


def local_path(repo_id_or_dir: str | Path) -> Path | None:
    """A directory as given, or the complete cached snapshot of a repo id, or None. Never touches the network."""
    path = Path(repo_id_or_dir).expanduser()
    if path.is_dir():
        return path
    try:
        return Path(snapshot_download(str(repo_id_or_dir), local_files_only=True, cache_dir=cache_dir(),
                                      allow_patterns=ALLOW_PATTERNS, ignore_patterns=IGNORE_PATTERNS))
    except (LocalEntryNotFoundError, HFValidationError):
        # LocalEntryNotFoundError covers IncompleteSnapshotError: an interrupted pull is not a model.
        return None


def _cached_repos() -> tuple[object | None, dict]:
    """One scan of the cache: the scan itself (None without a cache) and its model repos by id."""
    directory = cache_dir()
    if not directory.is_dir():
        return None, {}
    info = scan_cache_dir(directory)
    return info, {r.repo_id: r for r in info.repos if r.repo_type == "model"}


def cached_sizes() -> dict[str, int]:
    """Bytes on disk per cached model repo, from one scan of the cache."""
    return {repo_id: r.size_on_disk for repo_id, r in _cached_repos()[1].items()}


def cached_size(repo_id: str) -> int | None:
    """Bytes on disk for `repo_id` in the cache, or None when it is not there."""
    return cached_sizes().get(repo_id)


def remove(repo_id: str) -> int:
    """Delete every cached revision of `repo_id`; returns the bytes freed (0 if absent)."""
    info, repos = _cached_repos()
    repo = repos.get(repo_id)
    if repo is None:
        return 0
    strategy = info.delete_revisions(*[r.commit_hash for r in repo.revisions])
    strategy.execute()
    # Blobs of a pull that never finished belong to no revision, and a killed download can leave
    # `*.incomplete` files behind: remove the whole repo folder.
    shutil.rmtree(repo.repo_path, ignore_errors=True)
    return strategy.expected_freed_size


# -- planning


def _remote(repo_id: str, token: str | None) -> tuple[str, list[tuple[RemoteFile, str | None]]]:
    """The repo's current commit and the files we would fetch, each with its blob name in the cache."""
    info = HfApi(endpoint=_endpoint()).model_info(repo_id, files_metadata=True, token=token)
    wanted = set(filter_repo_objects([s.rfilename for s in info.siblings or []],
                                     allow_patterns=ALLOW_PATTERNS, ignore_patterns=IGNORE_PATTERNS))
    files = [(RemoteFile(s.rfilename, s.size or 0), s.lfs.sha256 if s.lfs else s.blob_id)
             for s in info.siblings or [] if s.rfilename in wanted]
    return info.sha, files


def plan_download(repo_id: str, token: str | None = None) -> list[RemoteFile]:
    """The files a pull fetches (names and sizes), from one repo-info request."""
    with _hub_errors(repo_id):
        return [f for f, _ in _remote(repo_id, token)[1]]


def bytes_missing(repo_id: str, token: str | None = None) -> int:
    """Bytes a pull would download now: files neither in the snapshot nor in the cache's blobs."""
    with _hub_errors(repo_id):
        sha, files = _remote(repo_id, token)
    storage = cache_dir() / repo_folder_name(repo_id=repo_id, repo_type="model")
    # A blob already cached under another revision is linked, not downloaded again.
    return sum(f.size for f, blob in files
               if not (storage / "snapshots" / sha / f.filename).is_file()
               and not (blob and (storage / "blobs" / blob).is_file()))


def check_free_space(needed_bytes: int, directory: Path) -> None:
    free = disk_free(directory)
    if needed_bytes + SPARE_BYTES > free:
        raise DflashError(f"not enough disk space in {directory}: need {needed_bytes / GB:.1f} GB, "
                          f"{free / GB:.1f} GB free (free some space, or point HF_HOME elsewhere)")


# -- downloading


def pull(repo_id: str, *, token: str | None = None, progress: bool = True) -> Path:
    """Download (or update) `repo_id` into the cache after checking the disk; returns its snapshot directory.

    `token` defaults to huggingface_hub's own (HF_TOKEN, then `hf auth login`). With HF_HUB_OFFLINE set,
    the cached snapshot or a clear error, and no request at all.
    """
    check_repo_id(repo_id)
    if offline():
        return _cached_or_fail(repo_id)
    try:
        needed = bytes_missing(repo_id, token=token)
    except HubUnreachable:
        if (path := local_path(repo_id)) is not None:
            return path  # as huggingface_hub does: the cached snapshot, unchecked for updates
        raise
    check_free_space(needed, cache_dir())
    return _download(repo_id, token, progress)


def pull_pair(pair_or_ids: ModelPair | tuple[str, str], *, token: str | None = None,
              progress: bool = True) -> tuple[Path, Path]:
    """Pull a target and its drafter, checking the disk once for both; returns (target dir, drafter dir)."""
    target, drafter = (pair_or_ids.target, pair_or_ids.drafter) if isinstance(pair_or_ids, ModelPair) else pair_or_ids
    check_repo_id(target)
    check_repo_id(drafter)
    if offline():
        return _cached_or_fail(target), _cached_or_fail(drafter)
    try:
        needed = bytes_missing(target, token=token) + bytes_missing(drafter, token=token)
    except HubUnreachable:
        return pull(target, token=token, progress=progress), pull(drafter, token=token, progress=progress)
    check_free_space(needed, cache_dir())
    return _download(target, token, progress), _download(drafter, token, progress)


def _cached_or_fail(repo_id: str) -> Path:
    path = local_path(repo_id)
    if path is None:
        raise DflashError(f"HF_HUB_OFFLINE is set and {repo_id} is not in the cache ({cache_dir()})")
    return path


def _download(repo_id: str, token: str | None, progress: bool) -> Path:
    # huggingface_hub retries a dropped transfer in place with a Range request; a pull that fails
    # anyway keeps its finished files, and the next one fetches only the rest.
    with _hub_errors(repo_id), _progress_bars(progress):
        return Path(snapshot_download(repo_id, cache_dir=cache_dir(), endpoint=_endpoint(), token=token,
                                      allow_patterns=ALLOW_PATTERNS, ignore_patterns=IGNORE_PATTERNS))


@contextlib.contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    if enabled or are_progress_bars_disabled():  # leave HF_HUB_DISABLE_PROGRESS_BARS to the user
        yield
        return
    disable_progress_bars()
    try:
        yield
    finally:
        enable_progress_bars()


def _is_connection_error(e: Exception) -> bool:
    # huggingface_hub 2.x talks through httpx2 (1.x: httpx): any of its transport errors means no Hub.
    return type(e).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore") and "TransportError" in {
        c.__name__ for c in type(e).__mro__}


@contextlib.contextmanager
def _hub_errors(repo_id: str) -> Iterator[None]:
    """Every Hub failure becomes one line that says what to do."""
    login = "run `hf auth login` or set HF_TOKEN"
    try:
        yield
    except GatedRepoError:  # before RepositoryNotFoundError: it is a subclass
        raise DflashError(f"access to {repo_id} is gated: accept the licence at https://huggingface.co/{repo_id} "
                          f"and {login}") from None
    except RepositoryNotFoundError:
        raise DflashError(f"no such repo: {repo_id} on {_endpoint()} (if it is private, {login})") from None
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else "?"
        if status in (401, 403):
            raise DflashError(f"access to {repo_id} was refused ({status}): {login}") from None
        raise DflashError(f"the Hub answered {status} for {repo_id}: {str(e).strip().splitlines()[0]}") from None
    except HFValidationError as e:
        raise UsageError(f"'{repo_id}' is not a Hub repo id ({str(e).strip().splitlines()[0]})") from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        if offline():
            raise DflashError(f"HF_HUB_OFFLINE is set and {repo_id} is not in the cache ({cache_dir()})") from None
        raise HubUnreachable(f"cannot reach {_endpoint()} to download {repo_id}, and it is not in the cache") from None
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise DflashError(f"the disk holding {cache_dir()} is full") from None
        raise
    except Exception as e:
        if _is_connection_error(e):
            raise HubUnreachable(f"cannot reach {_endpoint()} to download {repo_id} ({type(e).__name__})") from None
        raise
