"""Downloads against a local server that speaks the Hub's protocol (HF_ENDPOINT on 127.0.0.1)."""
from __future__ import annotations

import json

import pytest

from dflash_cli import hub, registry
from dflash_cli.errors import DflashError, UsageError

from .hub_server import HubServer
from .tiny import drafter_config, target_config, write_drafter, write_target


@pytest.fixture
def server(monkeypatch, tmp_path):
    with HubServer() as s:
        monkeypatch.setenv("HF_ENDPOINT", s.url)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
        monkeypatch.delenv("HF_HUB_CACHE", raising=False)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
        yield s


@pytest.fixture
def tiny_repo(server, tmp_path):
    cfg = target_config("qwen3", layers=2)
    t = write_target(tmp_path / "src", cfg, shards=2)
    server.add_dir("Qwen/Tiny", t, extra={"pytorch_model.bin": b"pickle!" * 10, "original/consolidated.pth": b"x" * 50,
                                          "README.md": b"# tiny"})
    return t


def test_pull_fetches_only_what_we_load_into_the_standard_cache(server, tiny_repo, tmp_path):
    path = hub.pull("Qwen/Tiny", progress=False)
    assert path.is_relative_to(tmp_path / "hf" / "hub" / "models--Qwen--Tiny" / "snapshots")
    got = sorted(p.name for p in path.rglob("*") if p.is_file())
    assert got == sorted(["config.json", "generation_config.json", "model.safetensors.index.json",
                          "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                          "tokenizer.json", "tokenizer_config.json"])
    assert (path / "model-00001-of-00002.safetensors").read_bytes() == (tiny_repo / "model-00001-of-00002.safetensors").read_bytes()
    assert hub.local_path("Qwen/Tiny") == path
    assert not server.file_gets("pytorch_model.bin") and not server.file_gets("consolidated.pth")


def test_dropped_connection_resumes_with_a_range_request(server, tiny_repo, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.DOWNLOAD_CHUNK_SIZE", 4096)  # real: 10 MB, tiny files
    shard = "model-00002-of-00002.safetensors"
    server.state.cut_after[shard] = 40960
    path = hub.pull("Qwen/Tiny", progress=False)
    assert (path / shard).read_bytes() == (tiny_repo / shard).read_bytes()
    assert [g.get("range") for g in server.file_gets(shard)] == [None, "bytes=40960-"]  # only the missing bytes


def test_interrupted_pull_keeps_finished_files_and_fetches_only_the_rest(server, tiny_repo):
    shard = "model-00002-of-00002.safetensors"
    server.interrupt(shard, after=40960)
    with pytest.raises(DflashError, match="the Hub answered 503"):
        hub.pull("Qwen/Tiny", progress=False)
    assert hub.local_path("Qwen/Tiny") is None  # a partial snapshot is not a model
    first = {p.split("/")[-1] for m, p, _ in server.state.requests if m == "GET" and "/resolve/" in p}
    assert "config.json" in first
    server.state.requests.clear()
    path = hub.pull("Qwen/Tiny", progress=False)
    again = [p.split("/")[-1] for m, p, _ in server.state.requests if m == "GET" and "/resolve/" in p]
    assert again == [shard]
    assert (path / shard).read_bytes() == (tiny_repo / shard).read_bytes()


def test_gated_repo_says_how_to_get_access(server, tiny_repo, monkeypatch):
    server.add_dir("meta-llama/Gated", tiny_repo, gated_token="secret")
    with pytest.raises(DflashError, match=r"access to meta-llama/Gated is gated: accept its licence .* HF_TOKEN"):
        hub.pull("meta-llama/Gated", progress=False)
    monkeypatch.setenv("HF_TOKEN", "secret")
    assert (hub.pull("meta-llama/Gated", progress=False) / "config.json").is_file()


def test_unknown_repo(server):
    with pytest.raises(DflashError, match="nobody/nothing was not found on the Hub"):
        hub.pull("nobody/nothing", progress=False)


def test_offline_mode_uses_the_cache_and_never_the_network(server, tiny_repo, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DflashError, match="HF_HUB_OFFLINE is set and Qwen/Tiny is not"):
        hub.pull("Qwen/Tiny", progress=False)
    assert not server.state.requests
    monkeypatch.delenv("HF_HUB_OFFLINE")
    path = hub.pull("Qwen/Tiny", progress=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = len(server.state.requests)
    assert hub.pull("Qwen/Tiny", progress=False) == path
    assert len(server.state.requests) == before


def test_full_disk_is_refused_before_any_file_is_fetched(server, tiny_repo, monkeypatch):
    monkeypatch.setattr(hub, "disk_free", lambda path: 10_000)
    with pytest.raises(DflashError, match=r"not enough disk space in .*: need 0.0 GB, 0.0 GB free"):
        hub.pull("Qwen/Tiny", progress=False)
    assert not [r for r in server.state.requests if "/resolve/" in r[1] and r[0] == "GET"]


def test_cached_size_and_remove(server, tiny_repo):
    assert hub.cached_size("Qwen/Tiny") is None
    hub.pull("Qwen/Tiny", progress=False)
    size = hub.cached_size("Qwen/Tiny")
    assert size > 10_000
    assert hub.remove("Qwen/Tiny") >= size * 0.9
    assert hub.cached_size("Qwen/Tiny") is None and hub.local_path("Qwen/Tiny") is None


def test_registry_resolves_aliases_and_suggests():
    assert registry.resolve("Qwen3-8B").drafter == "z-lab/Qwen3-8B-DFlash-b16"
    assert registry.resolve("llama3.1-8b").block_size == 10
    with pytest.raises(UsageError, match=r"unknown model 'qwen-8b' \(did you mean 'qwen3-8b'\?\)"):
        registry.resolve("qwen-8b")
    assert not registry.resolve("gpt-oss-20b").supported
