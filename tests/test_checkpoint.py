"""Checkpoints load from the exact Hugging Face layouts, and bad ones fail with one clear line."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from dflash_cli import loader
from dflash_cli.config import DrafterConfig, TargetConfig, default_target_layer_ids
from dflash_cli.errors import DflashError

from .tiny import drafter_config, target_config, write_drafter, write_target


def test_sharded_checkpoint_loads_like_a_single_file(tmp_path):
    cfg = target_config("llama", tie=False)
    one = loader.load(write_target(tmp_path / "one", cfg, seed=9), None, device="cpu")
    three = loader.load(write_target(tmp_path / "three", cfg, seed=9, shards=3), None, device="cpu")
    assert not (tmp_path / "three" / "model.safetensors").exists()
    for a, b in zip(one.target.layers, three.target.layers):
        assert torch.equal(a.qkv, b.qkv) and torch.equal(a.down, b.down)


def test_tied_embeddings_share_one_tensor(tmp_path):
    m = loader.load(write_target(tmp_path / "t", target_config("qwen3", tie=True)), None, device="cpu")
    assert m.target.lm_head is m.target.embed


def test_weights_load_in_the_requested_dtype(tmp_path):
    m = loader.load(write_target(tmp_path / "t", target_config("qwen3")), None, device="cpu", dtype="bfloat16")
    assert m.target.embed.dtype == torch.bfloat16 and m.target.layers[0].qkv.dtype == torch.bfloat16


def test_float16_is_refused():
    with pytest.raises(DflashError, match="float16"):
        loader.resolve_dtype("float16", torch.device("cpu"))


def test_truncated_safetensors_is_named(tmp_path):
    t = write_target(tmp_path / "t", target_config("qwen3"))
    f = t / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(DflashError, match="truncated"):
        loader.load(t, None, device="cpu")


def test_missing_shard_is_named(tmp_path):
    t = write_target(tmp_path / "t", target_config("qwen3"), shards=2)
    (t / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(DflashError, match="model-00002-of-00002.safetensors.*missing"):
        loader.load(t, None, device="cpu")


def test_pickle_checkpoints_are_never_loaded(tmp_path):
    t = write_target(tmp_path / "t", target_config("qwen3"))
    (t / "model.safetensors").rename(t / "pytorch_model.bin")
    with pytest.raises(DflashError, match="pickle checkpoints are never loaded"):
        loader.load(t, None, device="cpu")


def test_missing_config_field_is_named(tmp_path):
    t = write_target(tmp_path / "t", target_config("qwen3"))
    cfg = json.loads((t / "config.json").read_text())
    del cfg["num_hidden_layers"]
    (t / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DflashError, match="missing 'num_hidden_layers'"):
        TargetConfig.from_dir(t)


def test_unsupported_architecture_is_named(tmp_path):
    t = write_target(tmp_path / "t", target_config("qwen3"))
    cfg = json.loads((t / "config.json").read_text()) | {"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"]}
    (t / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DflashError, match="unsupported target architecture 'Qwen3MoeForCausalLM'"):
        TargetConfig.from_dir(t)


def test_missing_weight_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    t = write_target(tmp_path / "t", target_config("qwen3"))
    w = load_file(str(t / "model.safetensors"))
    del w["model.layers.1.mlp.up_proj.weight"]
    save_file(w, str(t / "model.safetensors"))
    with pytest.raises(DflashError, match="model.layers.1.mlp.up_proj.weight' is missing"):
        loader.load(t, None, device="cpu")


@pytest.fixture
def pair(tmp_path):
    cfg = target_config("qwen3")
    return write_target(tmp_path / "t", cfg), cfg, tmp_path


@pytest.mark.parametrize("change, message", [
    (dict(hidden=None), "hidden size 96 vs target 64"),
    (dict(vocab=1000), "vocab size 1000 vs target 512"),
    (dict(target_layer_ids=(1, 4)), r"target_layer_ids \[4\] outside the target's 4 layers"),
    (dict(mask_token_id=512), "mask_token_id 512 outside the vocab"),
])
def test_mismatched_pairs_are_refused_before_loading_weights(pair, change, message):
    t, cfg, tmp = pair
    dcfg = drafter_config(cfg, **{k: v for k, v in change.items() if k in ("target_layer_ids", "mask_token_id")})
    if "hidden" in change:
        dcfg["hidden_size"] = 96
    if "vocab" in change:
        dcfg["vocab_size"] = change["vocab"]
    d = write_drafter(tmp / "d", dcfg)
    (d / "model.safetensors").write_bytes(b"")  # proves no weight is read before the check
    with pytest.raises(DflashError, match=message):
        loader.load(t, d, device="cpu")


def test_drafter_weights_that_disagree_with_config_are_named(pair):
    t, cfg, tmp = pair
    d = write_drafter(tmp / "d", drafter_config(cfg, target_layer_ids=(1, 2)))
    dcfg = json.loads((d / "config.json").read_text())
    dcfg["dflash_config"]["target_layer_ids"] = [0, 1, 2]
    (d / "config.json").write_text(json.dumps(dcfg))
    with pytest.raises(DflashError, match=r"fc.weight is \(64, 128\), but 3 target layers"):
        loader.load(t, d, device="cpu")


def test_block_size_and_mask_id_read_at_top_level_or_in_dflash_config(pair):
    t, cfg, tmp = pair
    top = write_drafter(tmp / "top", drafter_config(cfg, block_size=10, mask_token_id=7, top_level=True))
    inner = write_drafter(tmp / "inner", drafter_config(cfg, block_size=10, mask_token_id=7))
    for d in (top, inner):
        c = DrafterConfig.from_dir(d)
        assert (c.block_size, c.mask_token_id) == (10, 7)


def test_missing_target_layer_ids_falls_back_with_a_warning(pair):
    t, cfg, tmp = pair
    d = write_drafter(tmp / "d", drafter_config(cfg))
    dcfg = json.loads((d / "config.json").read_text())
    del dcfg["dflash_config"]["target_layer_ids"]
    dcfg["num_target_layers"] = 36
    dcfg["num_hidden_layers"] = 5
    (d / "config.json").write_text(json.dumps(dcfg))
    with pytest.warns(UserWarning, match="wrong for most released drafters"):
        c = DrafterConfig.from_dir(d)
    assert c.target_layer_ids == (1, 9, 17, 25, 33)  # the released Qwen3-8B ids happen to match here
    assert default_target_layer_ids(32, 5) == [1, 8, 15, 22, 29]
    assert default_target_layer_ids(36, 1) == [18]
