"""Downloads against a local server that speaks the Hub's protocol (HF_ENDPOINT on 127.0.0.1), and the registry."""
from __future__ import annotations

import socket

import pytest
from huggingface_hub import constants, snapshot_download, try_to_load_from_cache

from dflash_cli import hub, registry
from dflash_cli.errors import DflashError, UsageError

from .hub_server import HubServer
from .tiny import target_config, write_target

SHARD = "model-00002-of-00002.safetensors"
WE_LOAD = ["chat_template.jinja", "config.json", "generation_config.json", "merges.txt",
           "model-00001-of-00002.safetensors", SHARD, "model.safetensors.index.json", "tokenizer.json",
           "tokenizer.model", "tokenizer_config.json"]


@pytest.fixture
def server(monkeypatch, tmp_path):
    """A local Hub; HF_HOME in tmp_path; no token, not offline, whatever the developer's environment says."""
    with HubServer() as s:
        monkeypatch.setenv("HF_ENDPOINT", s.url)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
        for var in ("HF_HUB_CACHE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HF_HUB_OFFLINE",
                    "HF_OIDC_RESOURCE"):
            monkeypatch.delenv(var, raising=False)
        # huggingface_hub read the environment at import: make its constants agree with the above. Not
        # ENDPOINT: hf_hub_url rewrites the import-time URL template only while ENDPOINT still matches it.
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf" / "token"))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(socket, "getaddrinfo", _loopback_only(socket.getaddrinfo))
        yield s


def _loopback_only(getaddrinfo):
    """Name resolution that refuses every host but this machine: a request meant for the real Hub fails loudly."""
    def resolve(host, *args, **kwargs):
        if host not in ("127.0.0.1", "localhost", "::1", b"127.0.0.1", b"localhost"):
            raise OSError(f"test tried to reach {host!r}: only 127.0.0.1 is allowed")
        return getaddrinfo(host, *args, **kwargs)
    return resolve


@pytest.fixture
def tiny_repo(server, tmp_path):
    """A sharded tiny Qwen3 served as Qwen/Tiny, with files we must not fetch beside the ones we load."""
    t = write_target(tmp_path / "src", target_config("qwen3", layers=2), shards=2)
    server.add_dir("Qwen/Tiny", t, extra={
        "merges.txt": b"#version: 0.2\n", "chat_template.jinja": b"{{ messages }}", "tokenizer.model": b"spm" * 20,
        "pytorch_model.bin": b"pickle!" * 10, "original/consolidated.00.pth": b"x" * 50,
        "original/params.json": b"{}", "README.md": b"# tiny", ".gitattributes": b"*.safetensors filter=lfs\n"})
    return t


def fetched_files(server: HubServer) -> list[str]:
    return [r.file for r in server.file_gets()]


def test_pull_fetches_only_what_we_load_into_the_standard_cache(server, tiny_repo, tmp_path):
    path = hub.pull("Qwen/Tiny", progress=False)
    assert path.parent == tmp_path / "hf" / "hub" / "models--Qwen--Tiny" / "snapshots"
    assert sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()) == WE_LOAD
    assert (path / SHARD).read_bytes() == (tiny_repo / SHARD).read_bytes()
    assert sorted(fetched_files(server)) == WE_LOAD
    assert {r.host for r in server.file_gets(SHARD)} == {"cdn"}  # LFS files come from the storage host
    # The layout transformers and vLLM read: they find our download, we find theirs.
    assert try_to_load_from_cache("Qwen/Tiny", "config.json", cache_dir=tmp_path / "hf" / "hub") == str(path / "config.json")
    assert hub.local_path("Qwen/Tiny") == path


def test_plan_lists_the_files_we_load_and_what_is_missing(server, tiny_repo):
    plan = hub.plan_download("Qwen/Tiny")
    assert sorted(f.filename for f in plan) == WE_LOAD
    assert dict(plan)[SHARD] == (tiny_repo / SHARD).stat().st_size
    assert hub.bytes_missing("Qwen/Tiny") == sum(f.size for f in plan)
    assert not server.files_requested()  # one repo-info request, no file touched
    hub.pull("Qwen/Tiny", progress=False)
    assert hub.bytes_missing("Qwen/Tiny") == 0


def test_dropped_connection_resumes_with_a_range_request(server, tiny_repo, monkeypatch):
    # huggingface_hub writes what it received in DOWNLOAD_CHUNK_SIZE pieces (10 MB): smaller for tiny files.
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 4096)
    server.cut(SHARD, after=40960)
    path = hub.pull("Qwen/Tiny", progress=False)
    assert (path / SHARD).read_bytes() == (tiny_repo / SHARD).read_bytes()
    assert [g.headers.get("range") for g in server.file_gets(SHARD)] == [None, "bytes=40960-"]  # only the rest


def test_failed_pull_keeps_finished_files_and_the_next_fetches_only_the_rest(server, tiny_repo):
    size = (tiny_repo / SHARD).stat().st_size
    server.interrupt(SHARD, after=40960)
    with pytest.raises(DflashError, match=r"^the Hub answered 503 for Qwen/Tiny: "):
        hub.pull("Qwen/Tiny", progress=False)
    assert hub.local_path("Qwen/Tiny") is None  # a partial snapshot is not a model
    assert "config.json" in fetched_files(server)
    # huggingface_hub 2.x drops a failed file's partial bytes: the next pull fetches that file whole.
    assert hub.bytes_missing("Qwen/Tiny") == size
    assert not list(hub.cache_dir().rglob("*.incomplete"))
    server.clear()
    path = hub.pull("Qwen/Tiny", progress=False)
    assert fetched_files(server) == [SHARD]
    assert (path / SHARD).read_bytes() == (tiny_repo / SHARD).read_bytes()


def test_gated_repo_says_how_to_get_access(server, tiny_repo, monkeypatch):
    server.add_dir("meta-llama/Gated", tiny_repo, gated_token="accepted")
    hint = (r"^access to meta-llama/Gated is gated: accept the licence at https://huggingface.co/meta-llama/Gated "
            r"and run `hf auth login` or set HF_TOKEN$")
    with pytest.raises(DflashError, match=hint):  # 401: no token
        hub.pull("meta-llama/Gated", progress=False)
    monkeypatch.setenv("HF_TOKEN", "not-accepted")
    with pytest.raises(DflashError, match=hint):  # 403: a token whose user has not accepted the licence
        hub.pull("meta-llama/Gated", progress=False)
    assert not server.file_gets()
    monkeypatch.setenv("HF_TOKEN", "accepted")
    assert (hub.pull("meta-llama/Gated", progress=False) / "config.json").is_file()
    assert server.file_gets("config.json")[0].headers["authorization"] == "Bearer accepted"
    assert "authorization" not in server.file_gets(SHARD)[0].headers  # the token never leaves the Hub


def test_an_explicit_token_opens_a_gated_repo(server, tiny_repo):
    server.add_dir("meta-llama/Gated", tiny_repo, gated_token="accepted")
    assert hub.pull("meta-llama/Gated", token="accepted", progress=False).is_dir()


def test_unknown_repo_is_one_line(server):
    with pytest.raises(DflashError, match=r"^no such repo: nobody/nothing on http://127\.0\.0\.1:\d+ "
                                          r"\(if it is private, run `hf auth login` or set HF_TOKEN\)$"):
        hub.pull("nobody/nothing", progress=False)


def test_unreachable_hub_is_one_line_unless_the_cache_has_the_model(server, tiny_repo, monkeypatch):
    path = hub.pull("Qwen/Tiny", progress=False)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(hub.HubUnreachable, match=rf"^cannot reach http://127.0.0.1:{port} to download Qwen/Other "
                                                 r"\(ConnectError\)$"):
        hub.pull("Qwen/Other", progress=False)
    assert hub.pull("Qwen/Tiny", progress=False) == path
    assert hub.pull_pair(("Qwen/Tiny", "Qwen/Tiny"), progress=False) == (path, path)


@pytest.mark.parametrize("how", ["environment", "constant"])
def test_offline_mode_uses_the_cache_and_never_the_network(server, tiny_repo, monkeypatch, how):
    def offline(on: bool) -> None:
        if how == "environment":  # set after huggingface_hub was imported: its constant still says online
            monkeypatch.setenv("HF_HUB_OFFLINE", "1" if on else "0")
        else:  # set before the import, so in huggingface_hub's constant
            monkeypatch.setattr(constants, "HF_HUB_OFFLINE", on)

    offline(True)
    with pytest.raises(DflashError, match=r"^HF_HUB_OFFLINE is set and Qwen/Tiny is not in the cache \(.*hf/hub\)$"):
        hub.pull("Qwen/Tiny", progress=False)
    assert not server.requests
    offline(False)
    path = hub.pull("Qwen/Tiny", progress=False)
    offline(True)
    server.clear()
    assert hub.pull("Qwen/Tiny", progress=False) == path
    assert hub.pull_pair(("Qwen/Tiny", "Qwen/Tiny"), progress=False) == (path, path)
    assert not server.requests


def test_full_disk_is_refused_before_any_file_is_fetched(server, tiny_repo, monkeypatch):
    monkeypatch.setattr(hub, "disk_free", lambda path: 10_000)
    with pytest.raises(DflashError, match=r"^not enough disk space in .*hf/hub: need 0.0 GB, 0.0 GB free"):
        hub.pull("Qwen/Tiny", progress=False)
    assert not server.files_requested()
    assert hub.cached_size("Qwen/Tiny") is None


def test_pull_pair_checks_the_disk_once_for_both(server, tiny_repo, monkeypatch):
    server.add_repo("z-lab/Tiny-DFlash", {"config.json": b"{}", "model.safetensors": b"w" * 50_000})
    pair = registry.ModelPair("tiny", "Qwen/Tiny", "z-lab/Tiny-DFlash", 16)
    both = hub.bytes_missing("Qwen/Tiny") + hub.bytes_missing("z-lab/Tiny-DFlash")
    monkeypatch.setattr(hub, "disk_free", lambda path: hub.SPARE_BYTES + both - 1)  # room for either, not both
    with pytest.raises(DflashError, match="not enough disk space"):
        hub.pull_pair(pair, progress=False)
    assert not server.files_requested()
    monkeypatch.setattr(hub, "disk_free", lambda path: hub.SPARE_BYTES + both)
    target, drafter = hub.pull_pair(pair, progress=False)
    assert (target / SHARD).is_file() and (drafter / "model.safetensors").stat().st_size == 50_000


def test_cached_size_and_remove(server, tiny_repo):
    assert hub.cached_size("Qwen/Tiny") is None and hub.remove("Qwen/Tiny") == 0
    hub.pull("Qwen/Tiny", progress=False)
    size = hub.cached_size("Qwen/Tiny")
    assert size >= sum(f.size for f in hub.plan_download("Qwen/Tiny"))
    assert hub.remove("Qwen/Tiny") == size
    assert hub.cached_size("Qwen/Tiny") is None and hub.local_path("Qwen/Tiny") is None
    assert not (hub.cache_dir() / "models--Qwen--Tiny").exists()


def test_remove_clears_a_pull_that_never_finished(server, tiny_repo):
    server.interrupt(SHARD, after=40960)
    with pytest.raises(DflashError):
        hub.pull("Qwen/Tiny", progress=False)
    assert hub.cached_size("Qwen/Tiny") > 0
    hub.remove("Qwen/Tiny")
    assert not (hub.cache_dir() / "models--Qwen--Tiny").exists()


def test_a_snapshot_fetched_by_another_tool_is_reused(server, tiny_repo):
    snapshot_download("Qwen/Tiny", cache_dir=hub.cache_dir(), endpoint=server.url)  # everything, as vLLM would
    server.clear()
    path = hub.local_path("Qwen/Tiny")
    assert path is not None and (path / "pytorch_model.bin").is_file()
    assert hub.pull("Qwen/Tiny", progress=False) == path
    assert not server.files_requested()


def test_hf_hub_cache_wins_over_hf_home(server, tiny_repo, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    assert hub.pull("Qwen/Tiny", progress=False).is_relative_to(tmp_path / "elsewhere" / "models--Qwen--Tiny")
    assert hub.cached_size("Qwen/Tiny") > 0


def test_local_path_takes_a_directory_or_a_cached_repo_id(server, tiny_repo, tmp_path):
    assert hub.local_path(tiny_repo) == tiny_repo
    assert hub.local_path(str(tiny_repo)) == tiny_repo
    assert hub.local_path("Qwen/Tiny") is None  # not pulled yet
    assert hub.local_path("not a repo id") is None
    assert not server.requests


def test_auth_status_reads_no_network(server, monkeypatch, tmp_path):
    assert hub.auth_status() == "not logged in"
    (tmp_path / "hf").mkdir(exist_ok=True)
    (tmp_path / "hf" / "token").write_text("hf_xyz\n")
    assert hub.auth_status() == "logged in (token from `hf auth login`)"
    monkeypatch.setenv("HF_TOKEN", "hf_abc")
    assert hub.auth_status() == "HF_TOKEN is set"
    assert not server.requests


def test_allow_patterns_keep_what_we_load_only():
    from huggingface_hub.utils import filter_repo_objects

    names = ["model.safetensors", "config.json", "tokenizer.model", "merges.txt", "chat_template.jinja",
             "pytorch_model.bin", "consolidated.pt", "x.pth", "original/params.json", "original/tokenizer.model",
             "sub/original/params.json", "README.md", ".gitattributes"]
    kept = filter_repo_objects(names, allow_patterns=hub.ALLOW_PATTERNS, ignore_patterns=hub.IGNORE_PATTERNS)
    assert sorted(kept) == ["chat_template.jinja", "config.json", "merges.txt", "model.safetensors", "tokenizer.model"]


# -- registry


def test_registry_resolves_aliases_case_insensitively():
    assert registry.resolve("Qwen3-8B").drafter == "z-lab/Qwen3-8B-DFlash-b16"
    assert registry.resolve("qwen3-4b").target == "Qwen/Qwen3-4B"
    llama = registry.resolve("LLAMA3.1-8B")
    assert (llama.target, llama.drafter, llama.block_size, llama.gated) == (
        "meta-llama/Llama-3.1-8B-Instruct", "z-lab/LLaMA3.1-8B-Instruct-DFlash-UltraChat", 10, True)
    assert registry.resolve("qwen3.5-35b-a3b").drafter == "z-lab/Qwen3.5-35B-A3B-DFlash"


def test_registry_suggests_the_closest_alias():
    with pytest.raises(UsageError, match=r"^unknown model 'qwen-8b' \(did you mean 'qwen3-8b'\?\)$"):
        registry.resolve("qwen-8b")
    with pytest.raises(UsageError, match=r"^unknown model 'zzz' \(see `dflash models`\)$"):
        registry.resolve("zzz")


def test_registry_lists_every_released_pair_and_what_runs():
    pairs = registry.all_pairs()
    assert len({p.alias for p in pairs}) == len(pairs) == 23  # 18 on one GPU, 5 handed to SGLang/vLLM
    assert {p.alias for p in pairs if p.supported} == {"qwen3-4b", "qwen3-8b", "llama3.1-8b", "qwen3.5-4b",
                                                        "qwen3.5-9b", "qwen3.5-27b", "qwen3.6-27b", "qwen3-coder-30b-a3b",
                                                        "qwen3.5-35b-a3b", "qwen3.6-35b-a3b", "qwen3.8-27b",
                                                        "gpt-oss-20b", "gpt-oss-120b", "muse-glimmer-30b",
                                                        "gemma-4-12b", "gemma-4-31b", "gemma-4-26b-a4b"}
    assert all(p.note for p in pairs if not p.supported)
    assert all(p.drafter.split("/")[0] in ("z-lab", "incoai") and "DFlash" in p.drafter for p in pairs)
    assert all(("DFlash2" in p.drafter) == (p.alias in ("qwen3.8-27b", "muse-glimmer-30b", "glm-5.3-flash"))
               for p in pairs)
    assert "target architecture" in registry.resolve("glm-5.3-flash").note
    assert registry.resolve("qwen3-coder-30b-a3b").kind == "moe" and not registry.resolve("qwen3-coder-30b-a3b").think
    assert all(registry.resolve(a).kind == "gpt-oss" and registry.resolve(a).think for a in ("gpt-oss-20b", "gpt-oss-120b"))
    assert registry.resolve("qwen3.6-27b").think and not registry.resolve("qwen3-8b").think
