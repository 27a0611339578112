"""Checkpoints load from the exact Hugging Face layouts, and bad ones fail with one clear line."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from dflash_cli import loader
from dflash_cli.config import DrafterConfig, default_target_layer_ids
from dflash_cli.models import target_config as _target_config
from dflash_cli.errors import DflashError

from .tiny import drafter_config, target_config, write_drafter, write_target


def test_sharded_checkpoint_loads_like_a_single_file(tmp_path):
    cfg = target_config("llama", tie=False)
    one = loader.load(write_target(tmp_path / "one", cfg, seed=9), None, device="cpu")
    three = loader.load(write_target(tmp_path / "three", cfg, seed=9, shards=3), None, device="cpu")
    assert not (tmp_path / "three" / "model.safetensors").exists()
    for a, b in zip(one.target.layers, three.target.layers):
        assert torch.equal(a.mixer.qkv.weight, b.mixer.qkv.weight) and torch.equal(a.mlp.down.weight, b.mlp.down.weight)


def test_tied_embeddings_share_one_tensor(tmp_path):
    m = loader.load(write_target(tmp_path / "t", target_config("qwen3", tie=True)), None, device="cpu")
    assert m.target.lm_head is m.target.embed


def test_weights_load_in_the_requested_dtype(tmp_path):
    m = loader.load(write_target(tmp_path / "t", target_config("qwen3")), None, device="cpu", dtype="bfloat16")
    assert m.target.embed.dtype == torch.bfloat16 and m.target.layers[0].mixer.qkv.weight.dtype == torch.bfloat16


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
        TargetConfig(t)


def test_unsupported_architecture_is_named(tmp_path):
    t = write_target(tmp_path / "t", target_config("qwen3"))
    cfg = json.loads((t / "config.json").read_text()) | {"model_type": "mistral", "architectures": ["MistralForCausalLM"]}
    (t / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DflashError, match="unsupported target architecture 'MistralForCausalLM'.*supported: .*llama"):
        TargetConfig(t)


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


def TargetConfig(directory):
    return _target_config(directory)[1]


QWEN3_8B = {"architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
            "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
            "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 12288,
            "max_position_embeddings": 40960, "max_window_layers": 36, "model_type": "qwen3",
            "num_attention_heads": 32, "num_hidden_layers": 36, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
            "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": False,
            "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936}
QWEN3_8B_DRAFTER = {"architectures": ["DFlashDraftModel"], "auto_map": {"AutoModel": "dflash.DFlashDraftModel"},
                    "attention_bias": False, "block_size": 16, "head_dim": 128, "hidden_size": 4096,
                    "intermediate_size": 12288, "max_position_embeddings": 40960, "model_type": "qwen3",
                    "num_attention_heads": 32, "num_hidden_layers": 5, "num_key_value_heads": 8,
                    "num_target_layers": 36, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000,
                    "layer_types": ["full_attention"] * 5, "vocab_size": 151936,
                    "dflash_config": {"mask_token_id": 151669, "target_layer_ids": [1, 9, 17, 25, 33]}}
LLAMA_31_8B = {"architectures": ["LlamaForCausalLM"], "attention_bias": False, "bos_token_id": 128000,
               "eos_token_id": [128001, 128008, 128009], "head_dim": 128, "hidden_size": 4096,
               "intermediate_size": 14336, "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
               "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
               "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8192, "rope_type": "llama3"},
               "rope_theta": 500000.0, "tie_word_embeddings": False, "vocab_size": 128256}


def test_released_configs_parse_and_pair(tmp_path):
    for name, cfg in (("t", QWEN3_8B), ("d", QWEN3_8B_DRAFTER), ("l", LLAMA_31_8B)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(cfg))
    target, drafter = TargetConfig(tmp_path / "t"), DrafterConfig.from_dir(tmp_path / "d")
    drafter.check_against(target, tmp_path / "d")
    assert (target.family, target.head_dim, target.rope_scaling, target.qk_norm) == ("qwen3", 128, None, True)
    assert (drafter.block_size, drafter.mask_token_id, drafter.target_layer_ids) == (16, 151669, (1, 9, 17, 25, 33))
    llama = TargetConfig(tmp_path / "l")
    assert llama.family == "llama" and not llama.qk_norm and llama.rope_scaling["rope_type"] == "llama3"
