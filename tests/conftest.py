"""Session fixtures: tiny checkpoints in the exact released layouts, built once per test run."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from dflash_cli import loader, registry

from .tiny import (copy_qwen3_tokenizer, copy_stories, drafter_config, target_config, write_drafter,
                   write_target)

# Story openings the tests decode (the demo drafter was not trained on these exact prompts, but on
# openings like them: every acceptance length from 1 to 8 occurs in their answers).
STORY_PROMPTS = ["Once upon a time", "Lily and Ben", "The cat", "One day, a little boy",
                 "Tom had a big", "The sun was", "Sue liked to", "There was a dog"]


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def qwen3_pair(models) -> tuple[Path, Path]:
    """Random tiny Qwen3 (vocab 512, no tokenizer) and a random block-16 drafter."""
    cfg = target_config("qwen3", tie=False)
    t = write_target(models / "qwen3", cfg)
    d = write_drafter(models / "qwen3-drafter", drafter_config(cfg, block_size=16, target_layer_ids=(0, 2)))
    return t, d


@pytest.fixture(scope="session")
def llama_pair(models) -> tuple[Path, Path]:
    """Random tiny Llama 3.1 (llama3 rope scaling, tied embeddings, sharded) and a drafter."""
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    cfg = target_config("llama", tie=False, rope_scaling=scaling, layers=3)
    t = write_target(models / "llama", cfg, seed=3, shards=3)
    d = write_drafter(models / "llama-drafter", drafter_config(cfg, block_size=16, target_layer_ids=(0, 1),
                                                               mask_token_id=300, top_level=True))
    return t, d


@pytest.fixture(scope="session")
def qwen3_chat_pair(models) -> tuple[Path, Path]:
    """Tiny Qwen3 with the real Qwen3 tokenizer and chat template (vocab 151936, as released)."""
    cfg = target_config("qwen3", vocab=151936, hidden=32, layers=2, heads=2, kv_heads=1, head_dim=16,
                        intermediate=64, tie=True)
    cfg |= {"bos_token_id": 151643, "eos_token_id": 151645}
    t = write_target(models / "qwen3-chat", cfg, seed=5)
    copy_qwen3_tokenizer(t)
    (t / "generation_config.json").write_text(json.dumps({"eos_token_id": [151645, 151643]}))
    d = write_drafter(models / "qwen3-chat-drafter",
                      drafter_config(cfg, block_size=16, target_layer_ids=(0, 1), mask_token_id=151669,
                                     heads=2, kv_heads=1, intermediate=64))
    return t, d


@pytest.fixture(scope="session")
def stories_pair(models) -> tuple[Path, Path]:
    """The real trained stories260K Llama and its block-8 drafter, both as shipped in the package
    (the drafter trained by `dflash train`: scripts/make_demo_pair.py), copied so no test can
    touch the package's files."""
    t = copy_stories(models / "stories")
    d = models / "stories-drafter"
    d.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(registry.demo_dirs()[1] / name, d / name)
    return t, d


@pytest.fixture(scope="session")
def stories_model(stories_pair) -> loader.Model:
    return loader.load(*stories_pair, device="cpu")


def pytest_configure(config):
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
