"""Quantized targets load and run, for every family: tiny checkpoints in each exact on-disk format.

Each case takes a tiny plain checkpoint of a family (dense Qwen3, the Qwen3.5 hybrid, Qwen3-MoE with
per-expert tensors, Qwen3.5-MoE with fused 3-D experts), quantizes its projections into one format with
the real packer where a package has one (compressed-tensors' own compressors for pack-quantized and
float-quantized; tests/test_quant.py's packers, checked there against the documented layouts and
compressed-tensors' AutoAWQ converter, for GPTQ, AWQ and FP8 blocks), and writes beside it the
*dequantized twin*: the same checkpoint with every quantized projection replaced by its reference
dequantization, plain. Then:

- dflash's fp32 logits on the quantized checkpoint equal its logits on the twin bit for bit (whatever the
  chunking), so the projections were read packed and run exactly as their reference dequantization;
- fp32 greedy output equals transformers' `generate` on the twin, and on the quantized checkpoint itself
  where transformers loads the format on a CPU (compressed-tensors and FP8 blocks, which it dequantizes);
- speculative output equals plain decoding at every block size b (1, 2, 4 and the drafter's B);
- the projections stay packed in memory, and the memory plan counts their packed bytes;
- what dflash needs dense (embedding, lm_head, routers) stored quantized is refused by name, in one line.
"""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dflash_cli import loader, ops
from dflash_cli.engine import Engine, Request
from dflash_cli.errors import DflashError
from dflash_cli.models.layers.linear import Concat, Dense
from dflash_cli.models.layers.mlp import ExpertList
from dflash_cli.quant import Fp8Linear, Int4Linear

from .test_quant import (act_order_g_idx, pack_awq, pack_compressed_tensors, pack_gptq, quantize_fp8_blocks,
                         quantize_int4)
from .tiny import (drafter_config, qwen3_moe_config, qwen35_config, qwen35_moe_config, target_config, write_drafter,
                   write_qwen35, write_target)

ct_base = pytest.importorskip("compressed_tensors.compressors.pack_quantized.base")
from compressed_tensors.compressors.naive_quantized.base import FloatQuantizationCompressor  # noqa: E402
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme  # noqa: E402

PROJECTION = re.compile(r"(?:_proj|experts\.gate_up_proj|experts\.down_proj)$")
KEEP_DENSE = ("in_proj_a", "in_proj_b", "shared_expert_gate")  # as Qwen's own quantized releases keep them


# ---- the formats: quantize one weight [..., out, in] → (stored tensors by key, reference dequantization) ----

@dataclass(frozen=True)
class Format:
    name: str
    config: dict  # the quantization_config
    quantize: Callable  # (weight fp32 [out, in], seed) -> (tensors by key, fp32 reference)
    fused: bool = True  # can store a fused 3-D expert stack (keys named from "weight")


def _ct_int4(group: int, sym: bool, act_order: bool = False) -> Format:
    args = QuantizationArgs(num_bits=4, type="int", symmetric=sym, strategy="group", group_size=group)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)

    def quantize(w, seed):
        g_idx = act_order_g_idx(w.shape[1], group, seed) if act_order else None
        codes, scales, zeros, ref = quantize_int4(w, group, sym, torch.bfloat16, g_idx)
        if act_order:  # compressed-tensors' compressor takes no g_idx: its documented layout, packed here
            return pack_compressed_tensors(codes, scales, zeros, sym, g_idx), ref.float()
        state = {"weight": w, "weight_scale": scales}  # their quantizer and packer, with these scales and zeros
        if not sym:
            state["weight_zero_point"] = zeros.to(torch.int8) - 8
        packed = dict(ct_base.PackedQuantizationCompressor.compress(state, scheme))
        theirs = ct_base.PackedQuantizationCompressor.decompress(dict(packed), scheme)["weight"]
        return packed, theirs.float()  # their dequantizer is the reference

    weights = {"num_bits": 4, "type": "int", "symmetric": sym, "strategy": "group", "group_size": group,
               "actorder": "group" if act_order else None}
    return Format(f"ct-int4-{'sym' if sym else 'asym'}-g{group}{'-actorder' if act_order else ''}",
                  _ct_config("pack-quantized", weights), quantize)


def _ct_fp8(strategy: str) -> Format:
    args = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy=strategy)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)

    def quantize(w, seed):
        out, inn = w.shape
        scale = (w.abs().amax(dim=1, keepdim=True) if strategy == "channel" else w.abs().amax().reshape(1)) / 448
        packed = dict(FloatQuantizationCompressor.compress({"weight": w, "weight_scale": scale}, scheme))
        ref = FloatQuantizationCompressor.decompress(dict(packed), scheme)["weight"].float()
        assert packed["weight"].dtype == torch.float8_e4m3fn
        assert torch.equal(ref, packed["weight"].float() * scale)
        return packed, ref

    weights = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": strategy}
    return Format(f"ct-fp8-{strategy}", _ct_config("float-quantized", weights), quantize)


def _ct_config(fmt: str, weights: dict) -> dict:
    return {"quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}},
            "ignore": ["lm_head", *(f"re:.*{k}$" for k in KEEP_DENSE), "re:.*mlp\\.gate$"]}


def _gptq(v1: bool, sym: bool, desc_act: bool, group: int, auto_round: bool = False) -> Format:
    def quantize(w, seed):
        g_idx = act_order_g_idx(w.shape[1], group, seed) if desc_act else None
        codes, scales, zeros, ref = quantize_int4(w, group, sym, torch.float16, g_idx)
        return pack_gptq(codes, scales, zeros, v1, g_idx), ref.float()

    if auto_round:
        config = {"quant_method": "auto-round", "bits": 4, "group_size": group, "sym": sym, "data_type": "int",
                  "packing_format": "auto_round:auto_gptq", "modules_to_not_convert": list(KEEP_DENSE)}
        name = "auto-round-auto_gptq"
    else:
        config = {"quant_method": "gptq", "bits": 4, "group_size": group, "sym": sym, "desc_act": desc_act,
                  "checkpoint_format": "gptq" if v1 else "gptq_v2", "modules_to_not_convert": list(KEEP_DENSE)}
        name = f"gptq-{'v1' if v1 else 'v2'}-{'sym' if sym else 'asym'}{'-desc_act' if desc_act else ''}"
    return Format(name, config, quantize, fused=False)


def _awq(group: int) -> Format:
    def quantize(w, seed):
        codes, scales, zeros, ref = quantize_int4(w, group, False, torch.float16)
        return pack_awq(codes, scales, zeros), ref.float()

    return Format(f"awq-gemm-g{group}", {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True,
                                         "version": "gemm", "modules_to_not_convert": list(KEEP_DENSE)},
                  quantize, fused=False)


def _fp8_blocks() -> Format:
    def quantize(w, seed):
        q, grid, ref = quantize_fp8_blocks(w, 128, 128)  # tiny shapes: every block is an edge block
        return {"weight": q, "weight_scale_inv": grid}, ref

    return Format("fp8-block128", {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                   "weight_block_size": [128, 128], "modules_to_not_convert": list(KEEP_DENSE)},
                  quantize)


FORMATS = {f.name: f for f in (
    _ct_int4(32, True), _ct_int4(64, False), _ct_int4(128, True, act_order=True), _ct_int4(32, False, act_order=True),
    _gptq(True, True, True, 32), _gptq(False, False, True, 64), _gptq(True, True, False, 32, auto_round=True),
    _awq(32), _awq(64), _fp8_blocks(), _ct_fp8("tensor"), _ct_fp8("channel"))}


# ---- the families: a tiny plain checkpoint, a drafter ----

@dataclass(frozen=True)
class Case:
    name: str
    write: Callable[[Path], Path]  # the plain checkpoint
    drafter: Callable[[dict], dict]  # its config.json → a drafter config
    reference: str  # the transformers class that runs the twin
    prompts: tuple[tuple[int, ...], ...] = ((1, 17, 300, 42, 7), (5, 9, 250, 101, 33, 64, 2, 480))


def _dense(d: Path) -> Path:
    return write_target(d, target_config("qwen3", hidden=128, intermediate=256, layers=2, heads=4, kv_heads=2,
                                         head_dim=32, tie=False), seed=5)


def _hybrid(d: Path) -> Path:
    cfg = qwen35_config(hidden=128, intermediate=256, wrapper=False)
    cfg["linear_value_head_dim"] = 32  # out_proj's 128 inputs: whole groups of 128 too
    return write_qwen35(d, cfg, seed=7, slow_decay=True)


def _hybrid_vl(d: Path) -> Path:
    """The released Qwen3.5 / 3.6 layout (the VL wrapper: weights under model.language_model., a vision
    tower dflash never reads), as Qwen's own -FP8 checkpoints ship it."""
    cfg = qwen35_config(hidden=128, intermediate=256)
    cfg["text_config"]["linear_value_head_dim"] = 32
    return write_qwen35(d, cfg, seed=8, slow_decay=True)


def _moe(d: Path) -> Path:
    return write_target(d, qwen3_moe_config(hidden=128, layers=2, experts=8, top_k=2, moe_intermediate=64), seed=9)


def _moe_fused(d: Path) -> Path:
    cfg = qwen35_moe_config(hidden=128, wrapper=False, experts=8, top_k=2, moe_intermediate=64, shared=64)
    cfg["linear_value_head_dim"] = 32
    return write_qwen35(d, cfg, seed=3, slow_decay=True, layout="fused")


def _drafter(cfg: dict, **kw) -> dict:
    text = cfg.get("text_config", cfg)
    return drafter_config(text, block_size=8, layers=1, target_layer_ids=(0, text["num_hidden_layers"] - 1),
                          mask_token_id=500, **kw)


CASES = {c.name: c for c in (
    Case("dense", _dense, _drafter, "Qwen3ForCausalLM"),
    Case("hybrid", _hybrid, _drafter, "Qwen3_5ForCausalLM"),
    Case("hybrid-vl", _hybrid_vl, _drafter, "Qwen3_5ForConditionalGeneration"),
    Case("moe", _moe, _drafter, "Qwen3MoeForCausalLM"),
    Case("moe-fused", _moe_fused, _drafter, "Qwen3_5MoeForCausalLM"),
)}

# (case, format): dense runs every format; the hybrid and the MoEs one of each kind (int4 formats with
# groups that divide their narrowest projection; per-expert GPTQ/AWQ; fused stacks in the formats that name
# them from "weight").
MATRIX = [("dense", f) for f in FORMATS] + [
    ("hybrid", "ct-int4-asym-g64"), ("hybrid", "ct-int4-sym-g128-actorder"), ("hybrid", "gptq-v1-sym-desc_act"),
    ("hybrid", "awq-gemm-g32"), ("hybrid", "fp8-block128"), ("hybrid", "ct-fp8-channel"),
    ("hybrid-vl", "fp8-block128"),
    ("moe", "ct-int4-asym-g32-actorder"), ("moe", "gptq-v2-asym-desc_act"), ("moe", "awq-gemm-g64"),
    ("moe", "auto-round-auto_gptq"), ("moe", "fp8-block128"), ("moe", "ct-fp8-tensor"),
    ("moe-fused", "ct-int4-sym-g32"), ("moe-fused", "fp8-block128"), ("moe-fused", "ct-fp8-channel"),
]
# transformers loads these formats on a CPU by dequantizing: its generate runs on the quantized checkpoint too.
# Not the others: GPTQ/AWQ need gptqmodel (a CUDA build), FP8 blocks need accelerate (not installed here),
# compressed-tensors 0.20 refuses `actorder: "group"` (older checkpoints' weight_g_idx, which dflash still
# reads), and transformers names no int4 layout for fused 3-D experts.
TRANSFORMERS_READS = {("dense", "ct-int4-sym-g32"), ("dense", "ct-int4-asym-g64"), ("dense", "fp8-block128"),
                      ("hybrid", "ct-int4-asym-g64"), ("hybrid", "ct-fp8-channel"), ("moe", "ct-fp8-tensor"),
                      ("dense", "ct-fp8-channel")}


def quantize_checkpoint(plain: Path, out: Path, twin: Path, fmt: Format) -> None:
    """`out`: `plain` with its projections stored in `fmt`; `twin`: `plain` with them replaced by their
    reference dequantization (fp32, no quantization_config)."""
    with safe_open(str(plain / "model.safetensors"), "pt") as f:
        dense = {k: f.get_tensor(k) for k in f.keys()}
    stored, twin_w, seed = {}, {}, 0
    for name, t in dense.items():
        module, fused = (name[:-len(".weight")], False) if name.endswith(".weight") else (name, True)
        if not PROJECTION.search(module) or any(k in module for k in KEEP_DENSE) or not name.startswith("model.") \
                or ".visual." in name:
            stored[name] = twin_w[name] = t
            continue
        seed += 1
        if fused:
            assert fmt.fused, (fmt.name, name)
            parts = [fmt.quantize(t[e].float(), seed * 100 + e) for e in range(t.shape[0])]
            for key in parts[0][0]:
                s = torch.stack([p[0][key] for p in parts]) if key != "weight_shape" else \
                    torch.tensor([t.shape[0], *parts[0][0][key].tolist()])
                stored[module + key.removeprefix("weight")] = s
            twin_w[name] = torch.stack([p[1] for p in parts])
        else:
            tensors, ref = fmt.quantize(t.float(), seed)
            stored |= {f"{module}.{k}": v for k, v in tensors.items()}
            twin_w[name] = ref
    for d, w in ((out, stored), (twin, twin_w)):
        shutil.copytree(plain, d)
        save_file({k: v.contiguous() for k, v in w.items()}, str(d / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((plain / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(cfg | {"quantization_config": fmt.config}))


def built_once(tmp_path_factory, make: Callable[[Path, str, str], tuple]) -> Callable[[str, str], tuple]:
    """(case, how) → make(a directory of its own, case, how), each written once per module."""
    cache: dict = {}

    def get(case: str, how: str) -> tuple:
        if (case, how) not in cache:
            cache[(case, how)] = make(tmp_path_factory.mktemp(f"{case}-{how}"), case, how)
        return cache[(case, how)]
    return get


def write_plain_and_drafter(case, root: Path) -> tuple[Path, Path]:
    """A case's plain checkpoint (root/plain) and its drafter (root/drafter, seed 2)."""
    plain = case.write(root / "plain")
    return plain, write_drafter(root / "drafter", case.drafter(json.loads((plain / "config.json").read_text())), seed=2)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(case, format) → (quantized dir, twin dir, drafter dir), each written once per module."""
    def make(root: Path, case: str, fmt: str) -> tuple:
        plain, drafter = write_plain_and_drafter(CASES[case], root)
        quantize_checkpoint(plain, root / "q", root / "twin", FORMATS[fmt])
        return root / "q", root / "twin", drafter
    return built_once(tmp_path_factory, make)


def _prefill_logits(target, ids: list[int], chunks) -> torch.Tensor:
    cache, out, start = target.new_cache(64, 8), [], 0
    for size in chunks:
        logits, _ = target.forward(torch.tensor(ids[start:start + size]), cache, logits_from=0, commit=True)
        out.append(logits)
        start += size
    return torch.cat(out)


def _tokens(engine: Engine, prompt, n: int) -> list[int]:
    return [t for s in engine.generate(Request(list(prompt), n)) for t in s.tokens]


def _projections(target) -> list:
    out = []
    for layer in target.layers:
        mixer = layer.mixer
        out += [getattr(mixer, n) for n in ("qkv", "o_proj", "in_proj", "out_proj") if hasattr(mixer, n)]
        mlp = layer.mlp
        out += [getattr(mlp, n) for n in ("gate_up", "down") if hasattr(mlp, n)]
        out = [e for lin in out for e in (lin.experts if isinstance(lin, ExpertList) else [lin])]
    return out


def realign(obj, seen=None):
    """Every tensor the model holds, copied into fresh memory. A checkpoint's tensors are views of its mapped
    file at whatever byte offset the file gives them, and a CPU GEMV (M = 1) rounds differently by the
    alignment of its operand: two files holding the same values would otherwise differ in the last bit."""
    seen = set() if seen is None else seen
    if id(obj) in seen or isinstance(obj, (str, int, float, bool, type(None), torch.dtype, torch.device)):
        return obj
    seen.add(id(obj))
    if isinstance(obj, list):
        obj[:] = [realign(v, seen) for v in obj]
        return obj
    attrs = getattr(obj, "__dict__", None)
    if attrs is None:
        return obj
    for k, v in list(attrs.items()):
        if isinstance(v, torch.Tensor):
            setattr(obj, k, v.clone())
        elif not callable(v) or hasattr(v, "__dict__"):
            realign(v, seen)
    return obj


def assert_generates_as(reference, q: loader.Model, prompts, n: int = 12) -> None:
    """Greedy output of `q`'s target, plain and with its drafter at b = 1, 2, 4 and B, is transformers'
    `reference`'s, prompt by prompt."""
    for prompt in prompts:
        x = torch.tensor([prompt])
        want = reference.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert _tokens(Engine(q.target), prompt, n) == want, prompt
        for b in (1, 2, 4, q.drafter.cfg.block_size):
            assert _tokens(Engine(q.target, q.drafter, block_size=b), prompt, n) == want, (prompt, b)


def _kinds(lin) -> set:
    return set().union(*(_kinds(p) for p in lin.parts)) if isinstance(lin, Concat) else {type(lin)}


# ---- 1. exact against the dequantized twin; greedy = transformers; speculative = plain at every b ----

@pytest.mark.parametrize("case, fmt", [pytest.param(c, f, id=f"{c}-{f}") for c, f in MATRIX])
def test_quantized_target_runs_exactly_as_its_dequantized_twin(case, fmt, built):
    import transformers

    qdir, twin_dir, drafter_dir = built(case, fmt)
    q = loader.load(qdir, drafter_dir, device="cpu", max_context=64)
    twin = loader.load(twin_dir, None, device="cpu", max_context=64)
    exact_q, exact_twin = realign(loader.load(qdir, None, device="cpu", max_context=64).target), realign(twin.target)
    # read packed: every quantized projection is an int4 / fp8 kind, none dense
    kind = Fp8Linear if "fp8" in fmt else Int4Linear
    kinds = set().union(*(_kinds(p) for p in _projections(q.target)))
    assert kind in kinds and not kinds - {kind, Dense}, kinds
    for lin in _projections(q.target):
        if isinstance(lin, torch.Tensor):  # MoE experts: the stack stays quantized
            raise AssertionError("a quantized expert stack was dequantized at load")
    ids = torch.randint(0, 500, (21,), generator=torch.Generator().manual_seed(1)).tolist()
    for chunks in ((21,), (1, 4, 16)):
        assert torch.equal(_prefill_logits(exact_q, ids, chunks), _prefill_logits(exact_twin, ids, chunks)), chunks

    reference = getattr(transformers, CASES[case].reference).from_pretrained(twin_dir, dtype=torch.float32).eval()
    assert_generates_as(reference, q, CASES[case].prompts)


@pytest.mark.parametrize("case, fmt", sorted(TRANSFORMERS_READS))
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_greedy_output_equals_transformers_on_the_quantized_checkpoint_itself(case, fmt, built):
    import transformers
    from transformers.utils.quantization_config import CompressedTensorsConfig

    if fmt == "fp8-block128":
        pytest.importorskip("accelerate", reason="transformers reads FP8 blocks through accelerate")
    qdir, _, _ = built(case, fmt)
    extra = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if fmt.startswith("ct-") else {}
    hf = getattr(transformers, CASES[case].reference).from_pretrained(qdir, dtype=torch.float32, **extra).eval()
    model = loader.load(qdir, None, device="cpu", max_context=64)
    for prompt in CASES[case].prompts:
        x = torch.tensor([prompt])
        want = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=12, do_sample=False,
                           eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert _tokens(Engine(model.target), prompt, 12) == want, prompt


@pytest.mark.slow  # about 65 s: Triton's interpreter on 2 shared cores (fp32, fast: the twin test's moe case)
def test_bf16_through_the_interpreted_kernels_speculative_output_equals_plain_decoding(built, monkeypatch):
    """bf16 on the kernel path (Triton's interpreter; DFLASH_LINEAR=invariant for the dense lm_head and the
    other plain projections), where a step's logits do not depend on how many tokens it verifies: speculative
    output is plain decoding's at every b. On the CPU's torch path bf16 is not batch-invariant (a verify row
    and the decode step of the same token round differently), so there the equality would hold by luck."""
    monkeypatch.setenv("DFLASH_KERNELS", "triton")
    monkeypatch.setenv("DFLASH_LINEAR", "invariant")
    qdir, _, drafter_dir = built("moe", "gptq-v2-asym-desc_act")
    model = loader.load(qdir, drafter_dir, device="cpu", dtype="bfloat16", max_context=64)
    target = realign(model.target)
    ids = list(range(5, 14))
    assert torch.equal(_prefill_logits(target, ids, (9,)), _prefill_logits(target, ids, (1,) * 9))
    prompt = CASES["moe"].prompts[0]
    plain = _tokens(Engine(target), prompt, 6)
    for b in (1, 2, 4, 8):
        assert _tokens(Engine(target, model.drafter, block_size=b), prompt, 6) == plain, b


# ---- 2. memory: packed at load, counted packed ----

def _held_bytes(obj, seen=None, storages=None) -> int:
    """Bytes of every distinct tensor storage a model holds (what loading it allocated)."""
    seen, storages = (set(), {}) if seen is None else (seen, storages)
    if id(obj) in seen or isinstance(obj, (str, int, float, bool, type(None), torch.dtype, torch.device)):
        return 0
    seen.add(id(obj))
    items = obj if isinstance(obj, list) else list(getattr(obj, "__dict__", {}).values())
    for v in items:
        if isinstance(v, torch.Tensor):
            storages[v.untyped_storage().data_ptr()] = v.untyped_storage().nbytes()
        elif isinstance(v, list) or hasattr(v, "__dict__"):
            _held_bytes(v, seen, storages)
    return sum(storages.values())


def test_projections_stay_packed_in_memory_and_the_plan_counts_their_packed_bytes(built):
    from dflash_cli.models import target_config as family_config
    from dflash_cli.models.weights import table_bytes

    qdir, twin_dir, _ = built("dense", "ct-int4-sym-g32")
    family, cfg = family_config(qdir)
    planned = loader.target_weight_bytes(qdir, family, cfg, torch.float32)
    with safe_open(str(qdir / "model.safetensors"), "pt") as f:  # every tensor of this file is read
        on_disk = sum(f.get_tensor(k).nbytes for k in f.keys())
    assert planned == on_disk
    dense = table_bytes(family.weight_table(cfg), torch.float32)
    assert loader.target_weight_bytes(twin_dir, family, cfg, torch.float32) is None  # plain: the table's bytes
    target = loader.load(qdir, None, device="cpu", max_context=64).target
    held = _held_bytes(target) - sum(t.untyped_storage().nbytes() for t in (target.cos_sin, target.offsets))  # tables
    # int4 projections (a quarter of a bf16 copy, an eighth of fp32) plus fp32 embedding, head and norms
    assert held <= planned < 0.6 * dense, (held, planned, dense)
    q_proj_bytes = 8 * 2 * 128 * 128 * 4  # what one dense fp32 [q; k; v] of layer 0 would take, and more
    assert planned - held < q_proj_bytes  # nothing was dequantized at load


# ---- 3. what dflash needs dense, stored quantized: refused by name in one line ----

def _requantize(src: Path, dst: Path, change: Callable[[dict], None], config: dict | None = None) -> Path:
    shutil.copytree(src, dst)
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        w = {k: f.get_tensor(k) for k in f.keys()}
    change(w)
    save_file(w, str(dst / "model.safetensors"), metadata={"format": "pt"})
    if config is not None:
        cfg = json.loads((src / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps(cfg | {"quantization_config": config}))
    return dst


def _int4_of(w: dict, name: str, pack) -> None:
    module = name.removesuffix(".weight")
    t = w.pop(name).float()
    codes, scales, zeros, _ = quantize_int4(t, 32, True)
    w.update({f"{module}.{k}": v for k, v in pack(codes, scales, zeros).items()})


@pytest.mark.parametrize("what, fmt, change, says", [
    ("embedding", "ct-int4-sym-g32",
     lambda w: _int4_of(w, "model.embed_tokens.weight", lambda c, s, z: pack_compressed_tensors(c, s, z, True)),
     "model.embed_tokens is stored quantized (model.embed_tokens.weight_packed), but it is a tensor dflash reads dense"),
    ("lm_head", "gptq-v1-sym-desc_act",
     lambda w: _int4_of(w, "lm_head.weight", lambda c, s, z: pack_gptq(c, s, z, True)),
     "lm_head is stored quantized (lm_head.qweight)"),
    ("router", "fp8-block128",
     lambda w: w.update({"model.layers.0.mlp.gate.weight_scale_inv": torch.ones(1, 1)}),
     "model.layers.0.mlp.gate is stored quantized"),
    ("missing scale", "fp8-block128", lambda w: w.pop("model.layers.1.mlp.down_proj.weight_scale_inv"),
     "model.layers.1.mlp.down_proj.weight is FP8 but its weight_scale_inv is missing"),
    ("wrong shape", "awq-gemm-g32",
     lambda w: w.update({"model.layers.0.mlp.up_proj.qweight": torch.zeros(128, 16, dtype=torch.int32)}),
     "model.layers.0.mlp.up_proj.qweight has shape (128, 16), config.json and the quantization_config imply (128, 32)"),
])
def test_a_tensor_stored_unlike_its_config_says_is_one_line_naming_it(what, fmt, change, says, built, tmp_path, capsys):
    from dflash_cli.cli import main

    case = "moe" if what == "router" else "dense"
    qdir, _, _ = built(case, fmt)
    bad = _requantize(qdir, tmp_path / "bad", change)
    with pytest.raises(DflashError) as e:
        loader.load(bad, None, device="cpu", max_context=64)
    assert says in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert main(["run", "--target", str(bad), "--no-spec", "-p", "Once", "-n", "2", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Error: ") and len(err.strip().splitlines()) == 1 and says in err, err


def test_a_projection_kept_plain_under_a_class_target_reads_plain(built, tmp_path):
    """`targets: ["Linear"]` matches every projection, but a checkpoint may keep some plain without listing
    them in `ignore` (llm-compressor's own skips): those read as Dense and the rest stay quantized."""
    qdir, twin_dir, _ = built("dense", "ct-int4-asym-g64")
    with safe_open(str(twin_dir / "model.safetensors"), "pt") as f:
        plain_down = f.get_tensor("model.layers.1.mlp.down_proj.weight")

    def keep_plain(w):
        for k in [k for k in w if k.startswith("model.layers.1.mlp.down_proj.")]:
            del w[k]
        w["model.layers.1.mlp.down_proj.weight"] = plain_down

    mixed = _requantize(qdir, tmp_path / "mixed", keep_plain)
    target = loader.load(mixed, None, device="cpu", max_context=64).target
    assert isinstance(target.layers[1].mlp.down, Dense) and isinstance(target.layers[0].mlp.down, Int4Linear)
    twin = loader.load(twin_dir, None, device="cpu", max_context=64).target
    ids = list(range(3, 40, 3))
    assert torch.equal(_prefill_logits(realign(target), ids, (len(ids),)), _prefill_logits(realign(twin), ids, (len(ids),)))


# ---- 4. the seam's row operations are exact ----

def _dequantized(lin) -> torch.Tensor:
    from dflash_cli.models.layers.mlp import dequantize_linear
    return dequantize_linear(lin, torch.float32)


@pytest.mark.parametrize("head", [128, 32])  # Qwen3.5's 256-row heads keep 128-row FP8 blocks whole; tiny ones cut them
def test_reordered_and_stacked_rows_dequantize_to_the_reordered_and_stacked_reference(head):
    from dflash_cli.models.layers.linear import fp8_row_blocks, permute_rows, stack_rows

    g = torch.Generator().manual_seed(0)
    w = torch.randn(4 * head, 256, generator=g) / 16
    order = torch.arange(4 * head).view(2, 2, head).transpose(0, 1).reshape(-1)  # [q0 q1 | g0 g1] from q0 g0 q1 g1
    q, grid, ref = quantize_fp8_blocks(w, 128, 128)
    fp8 = Fp8Linear(q, grid, (128, 128))
    moved = permute_rows(fp8, order)
    assert torch.equal(_dequantized(moved), ref[order])
    assert moved.block == ((128, 128) if head == 128 else (1, 128))  # whole blocks move as blocks
    assert torch.equal(_dequantized(fp8_row_blocks(fp8, 64)), ref)
    codes, scales, zeros, ref4 = quantize_int4(w, 32, False, torch.bfloat16)
    int4 = Int4Linear.from_codes(codes, scales, zeros, 32)
    assert torch.equal(_dequantized(permute_rows(int4, order)), ref4.float()[order])
    # unlike kinds and blocks: one projection where they are alike, else a Concat, the same row by row
    k, kgrid, kref = quantize_fp8_blocks(w[:72], 72, 256)  # per tensor, 72 rows: not a whole 128-row block
    stacked = stack_rows([fp8, Fp8Linear(k, kgrid, (72, 256)), Dense(w[:8])])
    assert isinstance(stacked, Concat) and isinstance(stacked.parts[0], Fp8Linear)
    assert torch.equal(_dequantized(stacked), torch.cat([ref, kref, w[:8]]))
    x = torch.randn(3, 256, generator=g)
    assert torch.allclose(stacked(x), x @ torch.cat([ref, kref, w[:8]]).T, atol=1e-5)


@pytest.mark.slow  # 30-60 s each: Triton's interpreter on 2 shared cores
@pytest.mark.parametrize("case, fmt", [("moe", "ct-int4-asym-g64"), ("hybrid", "fp8-block128")])
def test_through_the_interpreted_kernels_the_quantized_target_is_its_twin(case, fmt, built, monkeypatch):
    """The Triton kernels (the MoE kernel on the experts the quantized path dequantizes: one per pair for
    1 and 2 tokens, all of them for 6) give the twin's logits bit for bit. The twin's dense projections run the
    invariant linear kernel, whose tiling, split-K and merge order the int4/FP8 kernels share (under cuBLAS
    the twin would round its sums in F.linear's order instead), unfused: the fused norm prologue
    (kernels/fused_linear.py) sums a row's squares in another fixed order than kernels/rmsnorm.py, which a
    quantized q/k/v (not fused) does not take."""
    monkeypatch.setenv("DFLASH_KERNELS", "triton")
    monkeypatch.setenv("DFLASH_LINEAR", "invariant")
    monkeypatch.setattr(ops, "fused_linear_applies", lambda x: False)
    qdir, twin_dir, _ = built(case, fmt)
    q = realign(loader.load(qdir, None, device="cpu", max_context=64).target)
    twin = realign(loader.load(twin_dir, None, device="cpu", max_context=64).target)
    ids = list(range(3, 30, 3))
    for chunks in ((9,), (1, 2, 6)):
        assert torch.equal(_prefill_logits(q, ids, chunks), _prefill_logits(twin, ids, chunks)), chunks
