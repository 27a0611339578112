"""config.json at the boundary: formats dflash does not implement are refused by name before a weight is
read, and every key is read as transformers reads it, aliases included."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from dflash_cli.cli import main
from dflash_cli.config import CONFIG_ALIASES, QUANTIZATION_FORMATS, DrafterConfig, read_config
from dflash_cli.errors import DflashError
from dflash_cli.models import FAMILIES, target_config

from .tiny import dflash2_config, drafter_config, qwen3_moe_config, target_config as tiny_target_config, write_target
from .tiny_gpt_oss import gpt_oss_config, gpt_oss_drafter_config

FP8 = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}


def _config_only(directory: Path, cfg: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(cfg))
    return directory


FBGEMM = {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0}  # a format dflash does not read


def test_an_unread_quantized_checkpoint_is_refused_by_name_before_loading(tmp_path):
    d = _config_only(tmp_path / "fp8", tiny_target_config("qwen3") | {"quantization_config": FBGEMM})
    with pytest.raises(DflashError) as e:
        target_config(d)
    assert str(e.value) == (f"{d}: this checkpoint is quantized (fbgemm_fp8, weight_scale); dflash cannot run "
                            "quantized weights yet: use the bf16 checkpoint")


def test_a_format_read_for_other_families_is_refused_for_gpt_oss(tmp_path):
    d = _config_only(tmp_path / "oss8", gpt_oss_config() | {"quantization_config": FP8})
    with pytest.raises(DflashError, match=r"quantized \(fp8, weight_scale_inv\); dflash cannot run quantized weights yet"):
        target_config(d)


def test_the_refusal_is_one_line_from_the_cli_with_no_weight_read(capsys, tmp_path):
    t = write_target(tmp_path / "t", tiny_target_config("qwen3"))
    cfg = json.loads((t / "config.json").read_text())
    (t / "config.json").write_text(json.dumps(cfg | {"quantization_config": FBGEMM}))
    (t / "model.safetensors").write_bytes(b"not read")  # a weight read would fail differently
    assert main(["run", "--target", str(t), "--no-spec", "-p", "Once", "-n", "2", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Error: ") and len(err.strip().splitlines()) == 1, err
    assert "quantized (fbgemm_fp8, weight_scale)" in err and "use the bf16 checkpoint" in err


def test_an_unread_variant_of_a_read_format_is_one_line_from_the_cli_with_no_weight_read(capsys, tmp_path):
    t = write_target(tmp_path / "t", tiny_target_config("qwen3"))
    cfg = json.loads((t / "config.json").read_text())
    (t / "config.json").write_text(json.dumps(cfg | {"quantization_config": {"quant_method": "gptq", "bits": 3}}))
    (t / "model.safetensors").write_bytes(b"not read")
    assert main(["run", "--target", str(t), "--no-spec", "-p", "Once", "-n", "2", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Error: ") and len(err.strip().splitlines()) == 1, err
    assert "gptq bits=3 is not supported" in err


@pytest.mark.parametrize("quant, named", [
    ({"quant_method": "fbgemm_fp8"}, "fbgemm_fp8, weight_scale"),
    ({"quant_method": "torchao"}, "torchao, packed weights"),
    ({"quant_method": "mxfp4"}, "mxfp4"),  # implemented for gpt_oss only, not for Qwen3
    ({"quant_method": "nvfp5-future"}, "nvfp5-future"),  # a format nobody listed yet
    ({"load_in_4bit": True}, "bitsandbytes"),
])
def test_every_unimplemented_quantization_is_refused(tmp_path, quant, named):
    d = _config_only(tmp_path / "q", tiny_target_config("qwen3") | {"quantization_config": quant})
    with pytest.raises(DflashError, match="this checkpoint is quantized") as e:
        target_config(d)
    assert f"({named}" in str(e.value)


def test_a_quantized_multimodal_wrapper_is_refused_through_its_text_config(tmp_path):
    from .tiny import qwen35_config

    cfg = qwen35_config()
    cfg["text_config"]["quantization_config"] = FBGEMM
    with pytest.raises(DflashError, match=r"quantized \(fbgemm_fp8"):
        target_config(_config_only(tmp_path / "vl", cfg))


def test_gpt_oss_mxfp4_still_loads_and_a_quantized_drafter_is_refused(tmp_path):
    cfg = gpt_oss_config()
    assert cfg["quantization_config"]["quant_method"] == "mxfp4"
    _, tcfg = target_config(_config_only(tmp_path / "oss", cfg))
    assert tcfg.quant == "mxfp4"
    dcfg = gpt_oss_drafter_config(cfg, block_size=8, layers=2, target_layer_ids=(1, 3))
    with pytest.raises(DflashError, match=r"quantized \(mxfp4.*in a drafter"):
        DrafterConfig.from_dir(_config_only(tmp_path / "d", dcfg | {"quantization_config": {"quant_method": "mxfp4"}}))
    with pytest.raises(DflashError, match=r"quantized \(fp8, weight_scale_inv\)"):
        DrafterConfig.from_dir(_config_only(tmp_path / "d8", drafter_config(tiny_target_config()) |
                                            {"quantization_config": FP8}))


def test_the_format_table_names_only_families_dflash_has():
    for method, (_, model_types) in QUANTIZATION_FORMATS.items():
        assert set(model_types) <= set(FAMILIES), method


def test_the_alias_table_is_transformers_attribute_map_for_every_family_and_drafter():
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    checked = 0
    for model_type in set(FAMILIES) | {"qwen3", "gpt_oss"}:  # the drafters are model_type qwen3 or gpt_oss
        if model_type not in CONFIG_MAPPING:  # an older transformers without the family
            continue
        cls = CONFIG_MAPPING[model_type]
        assert CONFIG_ALIASES.get(model_type, {}) == dict(cls.attribute_map), model_type
        for sub in (getattr(cls, "sub_configs", None) or {}).values():
            sub_type = getattr(sub, "model_type", None)
            if sub_type in FAMILIES:
                assert CONFIG_ALIASES.get(sub_type, {}) == dict(sub.attribute_map), sub_type
        checked += 1
    assert checked >= 3
    assert set(CONFIG_ALIASES) <= set(FAMILIES)


def test_a_qwen3_moe_config_saved_by_current_transformers_reads(tmp_path):
    cfg = qwen3_moe_config(experts=16)
    cfg["num_local_experts"] = cfg.pop("num_experts")  # how transformers 5 writes it
    _, tcfg = target_config(_config_only(tmp_path / "moe", cfg))
    assert tcfg.num_experts == 16
    both = qwen3_moe_config(experts=16) | {"num_local_experts": 8}  # transformers: the attribute's own name wins
    assert target_config(_config_only(tmp_path / "both", both))[1].num_experts == 8


def test_a_gpt_oss_config_spelling_num_experts_reads(tmp_path):
    cfg = gpt_oss_config()
    cfg["num_experts"] = cfg.pop("num_local_experts")
    assert target_config(_config_only(tmp_path / "oss", cfg))[1].num_experts == gpt_oss_config()["num_local_experts"]


def test_read_config_as_transformers_reads_it(tmp_path):
    from transformers import Qwen3MoeConfig

    cfg = qwen3_moe_config(experts=12)
    cfg["num_local_experts"] = cfg.pop("num_experts")
    raw = read_config(_config_only(tmp_path / "moe", cfg))
    ours = Qwen3MoeConfig.from_dict(cfg)
    for alias, name in CONFIG_ALIASES["qwen3_moe"].items():
        assert raw[alias] == raw[name] == getattr(ours, alias) == getattr(ours, name) == 12


@pytest.mark.parametrize("extra, refused", [
    ({"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 2}, True),
    ({"use_sliding_window": True, "sliding_window": 16, "layer_types": ["full_attention", "sliding_attention"] * 2},
     True),
    ({"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 4}, False),  # no layer slides
    ({"use_sliding_window": False, "sliding_window": 16, "max_window_layers": 0}, False),  # Qwen3-8B as released
])
def test_a_qwen3_sliding_window_is_refused_by_name(tmp_path, extra, refused):
    d = _config_only(tmp_path / "sw", tiny_target_config("qwen3", layers=4) | extra)
    if not refused:
        target_config(d)
        return
    with pytest.raises(DflashError, match="use_sliding_window is true .*dflash does not implement Qwen3's sliding"):
        target_config(d)


def test_a_qwen3_moe_sliding_window_is_refused_and_a_dflash2_drafter_still_slides(tmp_path):
    cfg = qwen3_moe_config() | {"use_sliding_window": True, "sliding_window": 64}
    with pytest.raises(DflashError, match="use_sliding_window is true"):
        target_config(_config_only(tmp_path / "moe", cfg))
    drafter = DrafterConfig.from_dir(_config_only(tmp_path / "d2", dflash2_config(tiny_target_config())))
    assert drafter.sliding_windows == (16, 16)
