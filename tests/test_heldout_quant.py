"""Quantized checkpoints as a new user makes one: transformers' own model, quantized by compressed-tensors'
own `apply_quantization_config` and `ModelCompressor` (llm-compressor's path, with round-to-nearest
scales), saved by `save_pretrained` with the quantization_config compressed-tensors writes. dflash's greedy
tokens on the quantized directory equal transformers' (which dequantizes the format on a CPU), and a
random drafter's speculative tokens equal plain decoding. (tests/test_quant_models.py packs tensors with
the same compressors, into configs written by the tests.)"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers

from .test_heldout_checkpoints import PROMPT, NEW_TOKENS, dflash_json, scaled, transformers_greedy
from .tiny import STORIES, drafter_config, write_drafter

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors import ModelCompressor  # noqa: E402
from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,  # noqa: E402
                                             QuantizationStatus, apply_quantization_config)
from compressed_tensors.quantization.utils import calculate_qparams  # noqa: E402

BASE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, max_position_embeddings=256, rms_norm_eps=1e-6, bos_token_id=1,
            eos_token_id=2)
SCHEMES = {  # name → (weights, format)
    "W4A16 groups of 32": (dict(num_bits=4, type="int", symmetric=True, strategy="group", group_size=32),
                           "pack-quantized"),
    "W8A16 per channel": (dict(num_bits=8, type="int", symmetric=True, strategy="channel"), "int-quantized"),
    "FP8 per channel": (dict(num_bits=8, type="float", symmetric=True, strategy="channel"), "float-quantized"),
    "FP8 blocks of 32x32": (dict(num_bits=8, type="float", symmetric=True, strategy="block", block_structure=[32, 32]),
                            "float-quantized"),
}


def round_to_nearest_scales(model: torch.nn.Module) -> None:
    """Each quantized Linear's scale (and zero point) from its weight's range, as an RTN observer sets them."""
    for module in model.modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is None or scheme.weights is None:
            continue
        w, args = module.weight.data.float(), scheme.weights
        if args.strategy == "group":
            w = w.reshape(w.shape[0], -1, args.group_size)
            low, high = w.amin(-1), w.amax(-1)
        elif args.strategy == "block":
            rows, cols = args.block_structure
            w = w.reshape(w.shape[0] // rows, rows, w.shape[1] // cols, cols)
            low, high = w.amin((1, 3)), w.amax((1, 3))
        else:
            low, high = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
        scale, zero = calculate_qparams(low, high, args)
        module.weight_scale.data = scale.to(module.weight_scale.dtype).reshape(module.weight_scale.shape)
        if hasattr(module, "weight_zero_point"):
            module.weight_zero_point.data = zero.to(module.weight_zero_point.dtype).reshape(
                module.weight_zero_point.shape)


@pytest.mark.parametrize("family", ["qwen3", "llama"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_compressed_tensors_checkpoint_runs_as_transformers_generates(scheme, family, tmp_path, capsys):
    weights, fmt = SCHEMES[scheme]
    config = (transformers.Qwen3Config if family == "qwen3" else transformers.LlamaConfig)(**BASE)
    torch.manual_seed(0)
    model = scaled(transformers.AutoModelForCausalLM.from_config(config), seed=1)
    apply_quantization_config(model, QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**weights))},
        ignore=["lm_head"], format=fmt, quantization_status=QuantizationStatus.INITIALIZED), show_progress=False)
    round_to_nearest_scales(model)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=fmt)
    compressor.compress_model(model)
    d = tmp_path / "quantized"
    model.save_pretrained(d)
    compressor.update_config(d)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(STORIES / name, d / name)
    capsys.readouterr()
    raw = json.loads((d / "config.json").read_text())
    assert raw["quantization_config"]["format"] == fmt

    plain = dflash_json(capsys, d, "--no-spec")
    from dflash_cli.loader import load_tokenizer

    want = transformers_greedy(d, transformers.AutoModelForCausalLM, load_tokenizer(d).encode(PROMPT), NEW_TOKENS)
    assert plain["token_ids"] == want
    drafter = write_drafter(tmp_path / "drafter", drafter_config(raw, block_size=4, target_layer_ids=(0, 1)))
    assert dflash_json(capsys, "--target", d, "--drafter", drafter)["token_ids"] == want
