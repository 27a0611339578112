"""Quantized checkpoints: every on-disk format read into dflash's layouts dequantizes exactly.

Each format is packed here by an independent packer written from the format's documented convention
(not dflash's code), from a quantize → dequantize reference computed in the test; the reader must give
that reference back bit for bit. Where compressed-tensors (a test-only dependency) is installed, its own
packer, compressor and AutoAWQ converter check the packers here and the readers too.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from dflash_cli.errors import DflashError
from dflash_cli.quant import Fp8Linear, Int4Linear, plan_of, read_projection, stored_shapes, take_quantized
from dflash_cli.quant.plan import WeightScheme

from .tiny import target_config, write_target

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


# ---- reference quantizers (the test's own, from the formats' documented math) ----

def act_order_g_idx(in_features: int, group: int, seed: int) -> torch.Tensor:
    """GPTQ act-order: columns visited in a random order, group = position in that order // group."""
    perm = torch.randperm(in_features, generator=torch.Generator().manual_seed(seed))
    g_idx = torch.empty(in_features, dtype=torch.int32)
    g_idx[perm] = (torch.arange(in_features) // group).to(torch.int32)
    return g_idx


def quantize_int4(w: torch.Tensor, group: int, sym: bool, dtype=torch.float16, g_idx=None):
    """Round-to-nearest 4-bit per group → (codes 0..15 [out, in], scales [out, G], zeros [out, G], the
    dequantized reference [out, in] = (q − z)·s rounded once to the scale dtype)."""
    out, inn = w.shape
    g_idx = (torch.arange(inn) // group) if g_idx is None else g_idx.long()
    groups = inn // group
    lo = torch.stack([w[:, g_idx == g].amin(1).clamp(max=0) for g in range(groups)], 1)
    hi = torch.stack([w[:, g_idx == g].amax(1).clamp(min=0) for g in range(groups)], 1)
    scales = (torch.maximum(-lo, hi) / 7 if sym else (hi - lo) / 15).clamp_min(1e-6).to(dtype)
    s = scales.float()
    zeros = torch.full_like(s, 8) if sym else torch.clamp(torch.round(-lo / s), 0, 15)
    codes = torch.clamp(torch.round(w / s[:, g_idx]) + zeros[:, g_idx], 0, 15).to(torch.uint8)
    ref = ((codes.float() - zeros[:, g_idx]) * s[:, g_idx]).to(dtype)
    return codes, scales, zeros.to(torch.uint8), ref


def to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 bit patterns 0..2^32−1 → the int32 a safetensors file stores."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def nibbles_lsb_first(codes: torch.Tensor) -> torch.Tensor:
    """Rows of codes → int32 words, element i at bits 4i of the row's little-endian bit stream (via bytes)."""
    c = codes.to(torch.uint8)
    if c.shape[-1] % 8:
        c = F.pad(c, (0, 8 - c.shape[-1] % 8))
    byte = c[..., 0::2] | (c[..., 1::2] << 4)
    return byte.contiguous().view(torch.int32)  # little-endian host


def pack_compressed_tensors(codes, scales, zeros, sym, g_idx=None):
    """compressed-tensors pack-quantized: signed values + 8 packed along the input; zero points the same
    along the output."""
    t = {"weight_packed": nibbles_lsb_first(codes), "weight_scale": scales,
         "weight_shape": torch.tensor(codes.shape, dtype=torch.int64)}
    if not sym:
        t["weight_zero_point"] = nibbles_lsb_first(zeros.T).T.contiguous()
    if g_idx is not None:
        t["weight_g_idx"] = g_idx
    return t


def pack_words(codes_rows: torch.Tensor, order=range(8)) -> torch.Tensor:
    """[rows, cols] → int32 [rows, cols/8]: nibble j of word c holds column 8c + order[j]."""
    rows, cols = codes_rows.shape
    c = codes_rows.to(torch.int64).reshape(rows, cols // 8, 8)
    words = sum(c[..., order[j]] << (4 * j) for j in range(8))
    return to_int32(words)


def pack_gptq(codes, scales, zeros, v1: bool, g_idx=None):
    """GPTQ: qweight [in/8, out] along the input; qzeros [G, out/8] (v1: zero − 1); scales [G, out]."""
    stored = (zeros.to(torch.int64) - 1) & 0xF if v1 else zeros.to(torch.int64)
    t = {"qweight": pack_words(codes).T.contiguous(), "qzeros": pack_words(stored.T.contiguous()),
         "scales": scales.T.contiguous()}
    t["g_idx"] = (torch.arange(codes.shape[1]) // (codes.shape[1] // scales.shape[1])).to(torch.int32) \
        if g_idx is None else g_idx
    return t


def pack_awq(codes, scales, zeros):
    """AutoAWQ GEMM: qweight [in, out/8] along the output in nibble order [0,2,4,6,1,3,5,7]."""
    return {"qweight": pack_words(codes.T.contiguous(), AWQ_ORDER),
            "qzeros": pack_words(zeros.T.contiguous(), AWQ_ORDER), "scales": scales.T.contiguous()}


def weight(out: int, inn: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(out, inn, generator=torch.Generator().manual_seed(seed)) / inn ** 0.5


# ---- the packers here follow the documented bit layouts ----

def test_gptq_packer_puts_input_column_k_at_bits_4k_of_its_word():
    codes = torch.zeros(8, 16, dtype=torch.uint8)  # [out, in]
    codes[1, 9] = 5  # out 1, in 9 → word row 1, nibble 1
    q = pack_gptq(codes, torch.ones(8, 1), torch.full((8, 1), 8, dtype=torch.uint8), v1=False)["qweight"]
    assert q.shape == (2, 8) and q[1, 1] == 5 << 4 and q.count_nonzero() == 1


def test_awq_packer_puts_column_2_in_nibble_1():
    codes = torch.zeros(8, 1, dtype=torch.uint8)  # [out 8, in 1]
    codes[2, 0] = 3
    assert pack_awq(codes, torch.ones(8, 1), torch.zeros(8, 1, dtype=torch.uint8))["qweight"].item() == 3 << 4


# ---- int4 formats ----

@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("sym", [True, False])
def test_compressed_tensors_pack_quantized_dequantizes_exactly(group, sym):
    w = weight(48, 256, seed=group)
    codes, scales, zeros, ref = quantize_int4(w, group, sym, torch.bfloat16)
    lin = read_projection("p", pack_compressed_tensors(codes, scales, zeros, sym),
                          WeightScheme("pack-quantized", group, sym))
    assert isinstance(lin, Int4Linear) and (lin.zeros is None) == sym and lin.input_perm is None
    assert torch.equal(lin.dequantize(), ref)
    x = torch.randn(3, 256)
    assert torch.equal(lin(x), F.linear(x, ref.float()))
    assert (lin.out_features, lin.in_features) == (48, 256)


def test_compressed_tensors_channel_strategy_is_one_group_per_row():
    w = weight(16, 64)
    codes, scales, zeros, ref = quantize_int4(w, 64, True)
    lin = read_projection("p", pack_compressed_tensors(codes, scales, zeros, True), WeightScheme("pack-quantized"))
    assert lin.group_size == 64 and torch.equal(lin.dequantize(), ref)


def test_act_order_is_resolved_into_contiguous_groups():
    w = weight(32, 256, seed=3)
    g_idx = act_order_g_idx(256, 64, seed=4)
    codes, scales, zeros, ref = quantize_int4(w, 64, False, g_idx=g_idx)
    lin = read_projection("p", pack_compressed_tensors(codes, scales, zeros, False, g_idx),
                          WeightScheme("pack-quantized", 64, False))
    assert lin.input_perm is not None and torch.equal(lin.dequantize(), ref)
    # the layout's columns are input_perm's, each group contiguous: x[..., perm] against the stored rows
    x = torch.randn(2, 256)
    stored = ((lin.codes().float() - lin.zeros.float().repeat_interleave(64, -1))
              * lin.scales.float().repeat_interleave(64, -1)).to(lin.dtype)
    assert torch.allclose(F.linear(x[:, lin.input_perm], stored.float()), F.linear(x, ref.float()), atol=1e-5)
    # a read that ignored g_idx would be wrong
    plain = read_projection("p", pack_compressed_tensors(codes, scales, zeros, False),
                            WeightScheme("pack-quantized", 64, False))
    assert not torch.equal(plain.dequantize(), ref)


def test_trivial_g_idx_leaves_no_permutation():
    w = weight(16, 128)
    codes, scales, zeros, ref = quantize_int4(w, 32, True)
    lin = read_projection("p", pack_gptq(codes, scales, zeros, v1=True), WeightScheme("gptq", 32, True, gptq_v1=True))
    assert lin.input_perm is None and lin.zeros is None and torch.equal(lin.dequantize(), ref)


def test_g_idx_with_unequal_groups_is_refused():
    g_idx = torch.zeros(64, dtype=torch.int32)
    g_idx[:8] = 1
    codes, scales, zeros, _ = quantize_int4(weight(8, 64), 32, True)
    with pytest.raises(DflashError, match="not all group_size"):
        read_projection("p", pack_gptq(codes, scales, zeros, True, g_idx), WeightScheme("gptq", 32, True, gptq_v1=True))


@pytest.mark.parametrize("v1", [True, False])
@pytest.mark.parametrize("desc_act", [False, True])
def test_gptq_dequantizes_exactly(v1, desc_act):
    w = weight(40, 256, seed=7)
    g_idx = act_order_g_idx(256, 32, seed=8) if desc_act else None
    codes, scales, zeros, ref = quantize_int4(w, 32, False, g_idx=g_idx)
    zeros = zeros.clamp(min=1)  # v1 cannot store a zero point of 0 (it stores zero − 1)
    ref = ((codes.float() - zeros[:, (torch.arange(256) // 32) if g_idx is None else g_idx.long()].float())
           * scales.float()[:, (torch.arange(256) // 32) if g_idx is None else g_idx.long()]).to(scales.dtype)
    lin = read_projection("p", pack_gptq(codes, scales, zeros, v1, g_idx), WeightScheme("gptq", 32, False, gptq_v1=v1))
    assert torch.equal(lin.dequantize(), ref)
    assert (lin.input_perm is not None) == desc_act


def test_gptq_v1_and_v2_differ_by_one_in_the_zero_point():
    """A v2 file read as v1 (or the reverse) is off by one step everywhere: the flag matters."""
    codes, scales, zeros, ref = quantize_int4(weight(16, 64), 32, False)
    zeros = zeros.clamp(1, 14)
    z, s = zeros.repeat_interleave(32, 1).float(), scales.float().repeat_interleave(32, 1)
    v2 = pack_gptq(codes, scales, zeros, v1=False)
    right = read_projection("p", dict(v2), WeightScheme("gptq", 32, False, gptq_v1=False)).dequantize()
    wrong = read_projection("p", dict(v2), WeightScheme("gptq", 32, False, gptq_v1=True)).dequantize()
    assert torch.equal(right, ((codes.float() - z) * s).half())
    assert torch.equal(wrong, ((codes.float() - z - 1) * s).half())  # v1 adds the one back
    v1 = pack_gptq(codes, scales, zeros, v1=True)
    assert torch.equal(read_projection("p", v1, WeightScheme("gptq", 32, False, gptq_v1=True)).dequantize(), right)


def test_qwen_gptq_int4_symmetric_v1_stores_seven():
    codes, scales, zeros, ref = quantize_int4(weight(16, 128), 128, True)
    t = pack_gptq(codes, scales, zeros, v1=True)
    assert (t["qzeros"] == 0x77777777).all()  # 8 − 1 in every nibble
    plan = plan_of({"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True,
                                            "desc_act": False, "checkpoint_format": "gptq"}})
    lin = read_projection("p", t, plan.scheme_for("model.layers.0.self_attn.q_proj"))
    assert lin.zeros is None and torch.equal(lin.dequantize(), ref)


def test_awq_gemm_nibble_order_dequantizes_exactly():
    codes, scales, zeros, ref = quantize_int4(weight(64, 256, seed=11), 128, False)
    lin = read_projection("p", pack_awq(codes, scales, zeros), WeightScheme("awq", 128, False))
    assert torch.equal(lin.dequantize(), ref)
    # the same words read in plain sequential order give another weight: the order matters
    seq = {"qweight": pack_words(codes.T.contiguous()), "qzeros": pack_words(zeros.T.contiguous()),
           "scales": scales.T.contiguous()}
    assert not torch.equal(read_projection("p", seq, WeightScheme("awq", 128, False)).dequantize(), ref)


def test_stacked_rows_equal_the_projections_one_by_one():
    w = {}
    refs = []
    for i, (name, out) in enumerate([("q", 32), ("k", 16), ("v", 16)]):
        codes, scales, zeros, ref = quantize_int4(weight(out, 64, seed=i), 32, i == 0)  # q symmetric, k/v not
        w |= {f"a.{name}_proj.{k}": v for k, v in pack_compressed_tensors(codes, scales, zeros, i == 0).items()}
        refs.append(ref)
    plan = plan_of({"quantization_config": {"quant_method": "compressed-tensors", "format": "pack-quantized",
                                            "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
                                                "num_bits": 4, "type": "int", "symmetric": False,
                                                "strategy": "group", "group_size": 32}}}}})
    plan = type(plan)(plan.method, ((("re:.*k_proj", "re:.*v_proj"), WeightScheme("pack-quantized", 32, False)),
                                    (("Linear",), WeightScheme("pack-quantized", 32, True))))
    lin = take_quantized(w, "a.q_proj", "a.k_proj", "a.v_proj", plan=plan)
    assert not w and lin.out_features == 64
    assert torch.equal(lin.dequantize(), torch.cat(refs))


def test_fused_moe_experts_read_per_slice():
    e, out, inn = 3, 16, 64
    per = [quantize_int4(weight(out, inn, seed=20 + i), 32, False, torch.bfloat16) for i in range(e)]
    t = {"weight_packed": torch.stack([nibbles_lsb_first(p[0]) for p in per]),
         "weight_scale": torch.stack([p[1] for p in per]),
         "weight_zero_point": torch.stack([nibbles_lsb_first(p[2].T).T.contiguous() for p in per]),
         "weight_shape": torch.tensor([e, out, inn])}
    lin = read_projection("experts.gate_up_proj", t, WeightScheme("pack-quantized", 32, False))
    assert torch.equal(lin.dequantize(), torch.stack([p[3] for p in per]))
    x = torch.randn(2, inn)
    assert torch.equal(lin.expert(1)(x), F.linear(x, per[1][3].float()))


def test_a_wrongly_typed_tensor_is_one_line():
    with pytest.raises(DflashError, match="p.qweight is torch.float16, not int32"):
        read_projection("p", {"qweight": torch.zeros(2, 8, dtype=torch.float16), "qzeros": torch.zeros(1, 1),
                              "scales": torch.zeros(1, 8)}, WeightScheme("gptq", 16))
    with pytest.raises(DflashError, match="p.qzeros is missing"):
        read_projection("p", {"qweight": torch.zeros(2, 8, dtype=torch.int32)}, WeightScheme("gptq", 16))
    codes, scales, zeros, _ = quantize_int4(weight(8, 64), 32, True)
    t = pack_compressed_tensors(codes, scales, zeros, True)
    t["weight_shape"] = torch.tensor([8, 72])
    with pytest.raises(DflashError, match="p.weight_packed has 8 words per row for 72 columns"):
        read_projection("p", t, WeightScheme("pack-quantized", 8))
    t = pack_gptq(codes, scales, zeros, v1=True)
    del t["g_idx"]
    with pytest.raises(DflashError, match="p.g_idx is missing, and the quantization_config says desc_act"):
        read_projection("p", t, WeightScheme("gptq", 32, act_order=True))


# ---- FP8 ----

def quantize_fp8_blocks(w: torch.Tensor, rows: int, cols: int):
    """Per-block amax/448 scales (fp32) over a grid whose edge blocks are partial."""
    out, inn = w.shape
    grid = torch.empty(-(-out // rows), -(-inn // cols))
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            grid[i, j] = w[i * rows:(i + 1) * rows, j * cols:(j + 1) * cols].abs().amax().clamp_min(1e-8) / 448
    s = grid.repeat_interleave(rows, 0).repeat_interleave(cols, 1)[:out, :inn]
    q = (w / s).to(torch.float8_e4m3fn)
    return q, grid, q.float() * s


@pytest.mark.parametrize("block", [(128, 128), (16, 32)])
def test_qwen_fp8_blocks_with_partial_edges_dequantize_exactly(block):
    w = weight(200, 300, seed=5)  # 200 = 128 + 72 and 300 = 2·128 + 44: partial edge blocks both ways
    q, grid, ref = quantize_fp8_blocks(w, *block)
    plan = plan_of({"quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                            "weight_block_size": list(block)}})
    lin = read_projection("p", {"weight": q, "weight_scale_inv": grid}, plan.scheme_for("model.layers.0.mlp.up_proj"))
    assert isinstance(lin, Fp8Linear)
    assert torch.equal(lin.dequantize(torch.float32), ref)
    assert torch.equal(lin.dequantize(torch.bfloat16), ref.to(torch.bfloat16))
    x = torch.randn(4, 300)
    assert torch.equal(lin(x), F.linear(x, ref))
    if block[0] != block[1]:  # a grid read with the block transposed is refused by its shape
        with pytest.raises(DflashError, match="expected"):
            read_projection("p", {"weight": q, "weight_scale_inv": grid}, WeightScheme("fp8-block", block=block[::-1]))


@pytest.mark.parametrize("strategy", ["tensor", "channel"])
def test_compressed_tensors_float_quantized_dequantizes_exactly(strategy):
    w = weight(24, 64, seed=9)
    rows = 24 if strategy == "tensor" else 1
    q, grid, ref = quantize_fp8_blocks(w, rows, 64)
    scale = grid.reshape(1) if strategy == "tensor" else grid  # [1] or [out, 1]
    lin = read_projection("p", {"weight": q, "weight_scale": scale}, WeightScheme("float-quantized", strategy=strategy))
    assert torch.equal(lin.dequantize(torch.float32), ref)


def test_fp8_per_tensor_projections_stack_as_per_channel():
    parts = []
    for i in range(2):
        q, grid, ref = quantize_fp8_blocks(weight(8, 32, seed=i), 8, 32)
        parts.append((Fp8Linear(q, grid, (8, 32)), ref))
    both = Fp8Linear.cat_rows([p for p, _ in parts])
    assert both.block == (1, 32) and torch.equal(both.dequantize(torch.float32), torch.cat([r for _, r in parts]))


# ---- plans and refusals ----

def ct_config(groups: dict, **extra) -> dict:
    return {"quantization_config": {"quant_method": "compressed-tensors", "format": "pack-quantized",
                                    "quantization_status": "compressed", "config_groups": groups, **extra}}


W4 = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 128}
FP8_CHANNEL = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel"}


def test_plan_names_each_modules_scheme_and_skips_ignored_ones():
    plan = plan_of(ct_config({"group_0": {"targets": ["Linear"], "weights": W4}},
                             ignore=["lm_head", "re:.*mlp.gate$"]))
    assert plan.scheme_for("model.layers.0.self_attn.q_proj") == WeightScheme("pack-quantized", 128, True)
    assert plan.scheme_for("lm_head") is None and plan.scheme_for("model.layers.3.mlp.gate") is None
    assert plan.scheme_for("model.layers.3.mlp.gate_proj") is not None
    assert plan_of({"model_type": "qwen3"}) is None


def test_mixed_config_groups_give_each_module_its_own_format():
    plan = plan_of(ct_config({
        "group_0": {"targets": ["re:.*self_attn.*"], "weights": W4, "format": "pack-quantized"},
        "group_1": {"targets": ["re:.*mlp.*"], "weights": FP8_CHANNEL, "format": "float-quantized",
                    "input_activations": {"num_bits": 8, "type": "float", "dynamic": True, "strategy": "token"}}},
        format="mixed-precision"))
    assert plan.scheme_for("model.layers.0.self_attn.o_proj").format == "pack-quantized"
    mlp = plan.scheme_for("model.layers.0.mlp.down_proj")
    assert mlp.format == "float-quantized" and mlp.strategy == "channel" and "dynamic" in mlp.activations


def test_modules_to_not_convert_match_at_module_boundaries():
    plan = plan_of({"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128],
                                            "modules_to_not_convert": ["mlp.gate", "model.layers.0.linear_attn"]}})
    assert plan.scheme_for("model.layers.5.mlp.gate") is None
    assert plan.scheme_for("model.layers.5.mlp.gate_proj") is not None
    assert plan.scheme_for("model.layers.0.linear_attn.in_proj_a") is None
    assert plan.scheme_for("model.layers.10.linear_attn.in_proj_a") is not None
    assert plan.scheme_for("lm_head") is None


def test_auto_round_auto_gptq_packing_reads_as_gptq_v1():
    plan = plan_of({"quantization_config": {"quant_method": "auto-round", "packing_format": "auto_round:auto_gptq",
                                            "bits": 4, "group_size": 128, "sym": True, "data_type": "int",
                                            "extra_config": {"model.layers.0.mlp.down_proj": {"bits": 16}}}})
    assert plan.scheme_for("model.layers.1.mlp.down_proj") == WeightScheme("gptq", 128, True, gptq_v1=True)
    assert plan.scheme_for("model.layers.0.mlp.down_proj") is None


@pytest.mark.parametrize("quant, says", [
    ({"quant_method": "gptq", "bits": 3, "group_size": 128}, "gptq bits=3"),
    ({"quant_method": "gptq", "bits": 8, "group_size": 128}, "gptq bits=8"),
    ({"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"}, "gptq checkpoint_format 'marlin'"),
    ({"quant_method": "gptq", "bits": 4, "dynamic": {r"+:.*down": {"bits": 8}}}, "gptq dynamic per-module override"),
    ({"quant_method": "awq", "bits": 4, "version": "gemv"}, "awq version 'gemv'"),
    ({"quant_method": "awq", "bits": 4, "zero_point": False}, "awq zero_point false"),
    ({"quant_method": "fp8", "fmt": "e5m2"}, "fp8 fmt 'e5m2'"),
    ({"quant_method": "fp8", "activation_scheme": "static"}, "fp8 activation_scheme 'static'"),
    ({"quant_method": "bitsandbytes"}, "quant_method 'bitsandbytes'"),
    ({"quant_method": "gguf"}, "quant_method 'gguf'"),
    ({"quant_method": "mxfp4"}, "gpt-oss's MXFP4 experts are read by its own family"),
    ({"quant_method": "auto-round", "packing_format": "auto_round:gptqmodel", "bits": 4}, "auto-round packing_format"),
    ({"quant_method": "auto-round", "packing_format": "auto_round:auto_gptq", "bits": 4, "group_size": 128,
      "extra_config": {"model.layers.0.mlp.down_proj": {"bits": 8}}}, "auto-round extra_config"),
    (ct_config({"group_0": {"targets": ["Linear"], "weights": W4},
                "group_1": {"targets": ["re:.*down_proj"], "weights": {**W4, "num_bits": 8}}})["quantization_config"],
     "config_groups.group_1 pack-quantized int8 group"),
    (ct_config({"group_0": {"targets": ["Linear"], "weights": {**W4, "num_bits": 3}}})["quantization_config"],
     "int3"),
    (ct_config({"group_0": {"targets": ["Linear"], "weights": FP8_CHANNEL, "format": "float-quantized",
                            "input_activations": {"num_bits": 8, "type": "float", "dynamic": False,
                                                  "strategy": "tensor"}}})["quantization_config"],
     "static input_activations"),
    (ct_config({"group_0": {"targets": ["Linear"], "format": "nvfp4-pack-quantized", "weights": {
        "num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16}}})["quantization_config"],
     "nvfp4-pack-quantized float4"),
    (ct_config({"group_0": {"targets": ["Linear"], "weights": W4}}, sparsity_config={"format": "sparse-24"})
     ["quantization_config"], "sparsity_config"),
    (ct_config({"group_0": {"targets": ["Linear"], "weights": W4}}, kv_cache_scheme={"num_bits": 8})
     ["quantization_config"], "kv_cache_scheme"),
])
def test_unsupported_variants_are_refused_by_name_in_one_line(quant, says):
    with pytest.raises(DflashError) as e:
        plan_of({"quantization_config": quant})
    assert says in str(e.value) and "\n" not in str(e.value) and "dflash reads" in str(e.value)


def test_quantization_formats_table_runs_int4_and_fp8_on_the_families_tested_quantized():
    """The loader reads them for the families tests/test_quant_models.py runs quantized (dense, the hybrid,
    both MoE layouts) and tests/test_quant_families.py (Gemma 4, Muse-Glimmer); the others (gpt-oss) and the
    formats dflash does not read stay refused by name."""
    from dflash_cli.config import QUANTIZATION_FORMATS
    from dflash_cli.models import FAMILIES
    tested = {"qwen3", "llama", "qwen3_moe", "qwen3_5", "qwen3_5_text", "qwen3_5_moe", "qwen3_5_moe_text",
              "gemma4", "gemma4_text", "gemma4_unified", "gemma4_unified_text", "muse_glimmer"}
    assert tested <= set(FAMILIES) and "gpt_oss" in set(FAMILIES) - tested
    for method in ("compressed-tensors", "gptq", "awq", "fp8", "auto-round"):
        assert set(QUANTIZATION_FORMATS[method][1]) == tested, method
    for method in ("fbgemm_fp8", "bitsandbytes", "gguf", "hqq", "eetq", "torchao"):
        assert QUANTIZATION_FORMATS[method][1] == (), method


# ---- compressed-tensors' own packers (test-only dependency) ----

def test_packers_here_agree_with_compressed_tensors():
    ct = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    codes = torch.randint(0, 16, (24, 72), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    signed = (codes.to(torch.int8) - 8)
    assert torch.equal(ct.pack_to_int32(signed, 4), nibbles_lsb_first(codes))
    assert torch.equal(ct.pack_to_int32(signed, 4, packed_dim=0), nibbles_lsb_first(codes.T).T)


@pytest.mark.parametrize("sym", [True, False])
def test_compressed_tensors_compressor_output_reads_back_as_its_decompressor_does(sym):
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    w = weight(32, 128, seed=2).to(torch.bfloat16)
    codes, scales, zeros, ref = quantize_int4(w.float(), 32, sym, torch.bfloat16)
    args = QuantizationArgs(num_bits=4, type="int", symmetric=sym, strategy="group", group_size=32)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    state = {"weight": w, "weight_scale": scales}
    if not sym:
        state["weight_zero_point"] = (zeros.to(torch.int8) - 8)
    packed = PackedQuantizationCompressor.compress(state, scheme)
    theirs = PackedQuantizationCompressor.decompress(dict(packed), scheme)["weight"]
    ours = read_projection("p", dict(packed), WeightScheme("pack-quantized", 32, sym)).dequantize()
    assert torch.equal(ours, theirs.to(ours.dtype))
    assert (ours.float() - w.float()).abs().max() <= scales.float().max()  # a 4-bit copy of w, not noise


def test_awq_read_equals_compressed_tensors_autoawq_converter():
    conv = pytest.importorskip("compressed_tensors.entrypoints.convert.converters.autoawq")
    codes, scales, zeros, ref = quantize_int4(weight(64, 256, seed=12), 128, False)
    awq = {f"m.{k}": v for k, v in pack_awq(codes, scales, zeros).items()}
    converted = conv.AutoAWQConverter(group_size=128).process(dict(awq))
    via_ct = read_projection("m", {k[2:]: v for k, v in converted.items()}, WeightScheme("pack-quantized", 128, False))
    direct = read_projection("m", {k[2:]: v for k, v in awq.items()}, WeightScheme("awq", 128, False))
    assert torch.equal(via_ct.dequantize(), ref) and torch.equal(direct.dequantize(), ref)


# ---- a tiny checkpoint end to end ----

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def write_tiny_w4a16(tmp_path) -> tuple[dict, dict]:
    """A tiny Qwen3 checkpoint whose projections are asymmetric int4 g32 in compressed-tensors' layout;
    returns its config and the dequantized reference of each projection."""
    cfg = target_config(layers=2)
    write_target(tmp_path, cfg)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        dense = {k: f.get_tensor(k) for k in f.keys()}
    refs, stored = {}, {}
    for name, t in dense.items():
        module = name.removesuffix(".weight")
        if module.split(".layers.")[-1].split(".", 1)[-1] in PROJECTIONS:
            codes, scales, zeros, ref = quantize_int4(t, 32, False, torch.bfloat16)
            stored |= {f"{module}.{k}": v for k, v in pack_compressed_tensors(codes, scales, zeros, False).items()}
            refs[module] = ref
        else:
            stored[name] = t
    save_file(stored, str(tmp_path / "model.safetensors"))
    cfg["quantization_config"] = ct_config({"group_0": {"targets": ["Linear"], "weights": {
        **W4, "symmetric": False, "group_size": 32}}}, ignore=["lm_head"])["quantization_config"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return cfg, refs


def test_tiny_compressed_tensors_checkpoint_reads_back_layer_by_layer(tmp_path):
    cfg, refs = write_tiny_w4a16(tmp_path)
    plan = plan_of(json.loads((tmp_path / "config.json").read_text()))
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        w = {k: f.get_tensor(k) for k in f.keys()}
    assert take_quantized(w, "model.embed_tokens", plan=plan) is None
    layer = "model.layers.1"
    qkv = take_quantized(w, *(f"{layer}.self_attn.{p}_proj" for p in "qkv"), plan=plan)
    x = torch.randn(5, cfg["hidden_size"])
    expect = torch.cat([F.linear(x, refs[f"{layer}.self_attn.{p}_proj"].float()) for p in "qkv"], -1)
    assert torch.equal(qkv(x), expect)
    for p in ("self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
        lin = take_quantized(w, f"{layer}.{p}", plan=plan)
        assert torch.equal(lin.dequantize(), refs[f"{layer}.{p}"])
        xin = torch.randn(3, lin.in_features)
        assert torch.equal(lin(xin), F.linear(xin, refs[f"{layer}.{p}"].float()))


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`")
def test_tiny_checkpoint_dequantizes_as_transformers_does(tmp_path):
    """transformers (with compressed-tensors) dequantizes the same file on the CPU: equal, weight by weight."""
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    cfg, refs = write_tiny_w4a16(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=CompressedTensorsConfig(dequantize=True),
                                                 dtype=torch.float32)
    theirs = model.state_dict()
    plan = plan_of(cfg)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        w = {k: f.get_tensor(k) for k in f.keys()}
    for module, ref in refs.items():
        ours = take_quantized(w, module, plan=plan).dequantize(torch.float32)
        assert torch.equal(ours, theirs[f"{module}.weight"]), module


@pytest.mark.parametrize("scheme, pack", [
    (WeightScheme("pack-quantized", 32, False), lambda c, s, z: pack_compressed_tensors(c, s, z, False)),
    (WeightScheme("pack-quantized", 32, True), lambda c, s, z: pack_compressed_tensors(c, s, z, True)),
    (WeightScheme("gptq", 32, True, gptq_v1=True), lambda c, s, z: pack_gptq(c, s, z, True)),
    (WeightScheme("gptq", None, False), lambda c, s, z: pack_gptq(c, s, z, False)),
    (WeightScheme("awq", 32, False), pack_awq),
])
def test_stored_shapes_are_what_each_format_stores(scheme, pack):
    group = scheme.group_size or 64
    codes, scales, zeros, ref = quantize_int4(weight(24, 64), group, scheme.symmetric)
    t = pack(codes, scales, zeros)
    shapes = stored_shapes(scheme, 24, 64)
    assert {k: tuple(t[k].shape) for k in shapes} == {k: s for k, (s, _) in shapes.items()}
    assert all(d is None or t[k].dtype == d for k, (_, d) in shapes.items())
    assert torch.equal(read_projection("p", t, scheme).dequantize(), ref)  # group_size None: one group per row


@pytest.mark.parametrize("scheme", [WeightScheme("fp8-block", block=(16, 32)),
                                    WeightScheme("float-quantized", strategy="channel"),
                                    WeightScheme("float-quantized", strategy="tensor")])
def test_stored_shapes_of_fp8(scheme):
    shapes = stored_shapes(scheme, 40, 72)
    scale = [s for k, (s, _) in shapes.items() if k.startswith("weight_scale")][0]
    expected = {"fp8-block": (3, 3), "channel": (40, 1), "tensor": (1,)}
    assert shapes["weight"] == ((40, 72), torch.float8_e4m3fn)
    assert scale == expected["fp8-block" if scheme.format == "fp8-block" else scheme.strategy]


def test_per_expert_projections_stack_into_one_3d_layout():
    w, refs = {}, []
    for e in range(3):
        codes, scales, zeros, ref = quantize_int4(weight(16, 64, seed=30 + e), 32, True)
        w |= {f"mlp.experts.{e}.up_proj.{k}": v for k, v in pack_gptq(codes, scales, zeros, v1=True).items()}
        refs.append(ref)
    plan = plan_of({"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": True}})
    experts = Int4Linear.stack_experts([take_quantized(w, f"mlp.experts.{e}.up_proj", plan=plan) for e in range(3)])
    assert not w and torch.equal(experts.dequantize(), torch.stack(refs))
    q, grid, ref = quantize_fp8_blocks(weight(16, 64), 8, 32)
    both = Fp8Linear.stack_experts([Fp8Linear(q, grid, (8, 32))] * 2)
    assert torch.equal(both.dequantize(torch.float32), torch.stack([ref, ref]))


def _layout(kind: str, seed: int, bias: bool):
    """A 16×64 projection in `kind`'s layout (fp32 scales), with a bias when `bias`."""
    from dflash_cli.quant import Int8Linear

    b = torch.randn(16, generator=torch.Generator().manual_seed(seed)) if bias else None
    if kind == "int4":
        codes, scales, zeros, _ = quantize_int4(weight(16, 64, seed=seed), 32, False, torch.float32)
        return Int4Linear.from_codes(codes, scales, zeros, 32, None, b)
    if kind == "fp8":
        q, grid, _ = quantize_fp8_blocks(weight(16, 64, seed=seed), 8, 32)
        return Fp8Linear(q, grid, (8, 32), b)
    w = weight(16, 64, seed=seed)
    scale = w.abs().amax(-1, keepdim=True) / 127
    return Int8Linear(torch.round(w / scale).to(torch.int8), scale, b)


@pytest.mark.parametrize("kind", ["int4", "int8", "fp8"])
def test_every_layout_stacks_takes_and_stacks_rows_as_its_parts(kind):
    """The layouts' shared seams (quant/layout.py): a stack of experts gives each expert back, `take_experts`
    gathers them by index, still packed, and rows stacked into one GEMM are the parts' rows, a part without a
    bias adding zeros."""
    parts = [_layout(kind, 40 + e, bias=True) for e in range(3)]
    stack = type(parts[0]).stack_experts(parts)
    for e, part in enumerate(parts):
        one = stack.expert(e)
        assert torch.equal(one.dequantize(), part.dequantize()) and torch.equal(one.bias, part.bias)
    taken = stack.take_experts(torch.tensor([2, 0, 0]))
    assert type(taken) is type(stack) and taken.packed.dtype == stack.packed.dtype
    assert torch.equal(taken.dequantize(), torch.stack([parts[i].dequantize() for i in (2, 0, 0)]))
    assert torch.equal(taken.bias, torch.stack([parts[i].bias for i in (2, 0, 0)]))
    mixed = [_layout(kind, 50, bias=False), _layout(kind, 51, bias=True)]
    rows = type(mixed[0]).cat_rows(mixed)
    assert rows.out_features == 32 and rows.dtype == torch.float32
    assert torch.equal(rows.dequantize(), torch.cat([p.dequantize() for p in mixed]))
    assert torch.equal(rows.bias, torch.cat([torch.zeros(16), mixed[1].bias]))
    assert type(rows).cat_rows([_layout(kind, 52, bias=False)] * 2).bias is None
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    assert torch.equal(stack.expert(1).forward(x), F.linear(x, parts[1].dequantize(), parts[1].bias))
