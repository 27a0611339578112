"""Gemma 4 (dense and the 26B-A4B's routed experts) and Muse-Glimmer run quantized, exactly.

For each family's tiny checkpoint (tests/tiny_gemma4.py: the `gemma4` wrapper, dense and with experts;
tests/tiny_muse.py: the VL wrapper), quantized two ways:
- packed by compressed-tensors' own compressors (int4 pack-quantized, fp8 float-quantized; Gemma's experts
  as fused [E, out, in] stacks, the layout transformers names them in), by tests/test_quant_models.py's
  builder, beside its dequantized twin;
- quantized at load by dflash (int4, int8, fp8; Gemma's experts written per expert), beside a twin
  dequantized by compressed-tensors' own decompressor (Gemma's experts fused back into transformers' stacks).
Then dflash's fp32 logits equal the twin's bit for bit, fp32 greedy output equals transformers' `generate`
on the twin (transformers' Gemma4 / MuseGlimmer classes), and speculative output equals plain decoding at
b = 1, 2, 4 and the drafter's B. What is never quantized (embeddings, head, norms, routers, Gemma's
layer_scalar, the vision towers) is checked by name.
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

from dflash_cli import loader
from dflash_cli.engine import Engine
from dflash_cli.models.layers.mlp import PER_EXPERT, ExpertList, GemmaExperts
from dflash_cli.quant import Fp8Linear, Int4Linear, Int8Linear
from dflash_cli.quant.quantize import quantize_checkpoint as quantize_at_load

from .test_quant_models import (FORMATS, _kinds, _prefill_logits, _tokens, assert_generates_as, built_once, realign,
                                write_plain_and_drafter)
from .test_quant_models import quantize_checkpoint as pack_checkpoint
from .tiny import drafter_config, save_weights, write_target
from .tiny_gemma4 import gemma4_config, gemma4_drafter_config, write_gemma4
from .tiny_muse import muse_config, write_muse

pytest.importorskip("compressed_tensors")


@dataclass(frozen=True)
class Case:
    write: Callable[[Path], Path]
    drafter: Callable[[dict], dict]


def _gemma_drafter(cfg: dict) -> dict:
    return gemma4_drafter_config(cfg["text_config"], block_size=8)


def _muse_drafter(cfg: dict) -> dict:
    text = cfg["text_config"]
    return drafter_config(text, block_size=8, layers=1, target_layer_ids=(0, text["num_hidden_layers"] - 1),
                          mask_token_id=500, layer_types=["sliding_attention"], sliding_window=16) | {"is_causal": False}


def _gemma_per_expert(d: Path) -> Path:
    """The 26B-A4B's layers with the experts stored one by one (`experts.{e}.gate_proj.weight`: how GPTQ and
    AWQ checkpoints, which name no fused layout, store them), the embedding drawn as write_gemma4's."""
    from safetensors.torch import load_file

    cfg = gemma4_config(tie=False, moe=True)
    write_target(d, cfg, seed=19, layout=PER_EXPERT)
    w = load_file(str(d / "model.safetensors"))
    w["model.language_model.embed_tokens.weight"] *= cfg["text_config"]["hidden_size"] ** -0.5
    save_weights(d, w)
    return d


CASES = {
    "gemma4": Case(lambda d: write_gemma4(d, gemma4_config(), seed=11), _gemma_drafter),
    "gemma4-moe": Case(lambda d: write_gemma4(d, gemma4_config(tie=False, moe=True), seed=13), _gemma_drafter),
    "gemma4-moe-per-expert": Case(_gemma_per_expert, _gemma_drafter),
    "muse": Case(lambda d: write_muse(d, muse_config(layers=4), seed=17), _muse_drafter),
}
PROMPTS = ((1, 17, 300, 42, 7), (5, 9, 250, 101, 33, 64, 2, 480))
# compressed-tensors' compressors (Gemma's experts as fused 3-D stacks) and test_quant.py's packers for the
# formats without a fused layout (GPTQ, AWQ, AutoRound: Gemma's experts one by one); groups of 32 divide
# every tiny width (Gemma's 96-wide MLP, its 32-wide experts)
PACKED = {"gemma4": ("ct-int4-sym-g32", "ct-int4-asym-g32-actorder", "gptq-v1-sym-desc_act", "auto-round-auto_gptq",
                     "awq-gemm-g32", "fp8-block128", "ct-fp8-tensor", "ct-fp8-channel"),
          "gemma4-moe": ("ct-int4-sym-g32", "fp8-block128", "ct-fp8-channel"),
          "gemma4-moe-per-expert": ("gptq-v1-sym-desc_act", "awq-gemm-g32", "auto-round-auto_gptq"),
          "muse": ("ct-int4-sym-g32", "gptq-v1-sym-desc_act", "awq-gemm-g32", "fp8-block128", "ct-fp8-channel")}
# (not asymmetric act-order compressed-tensors where a width is one group: 32-wide experts, Muse's 32-wide
# vision tower, which the builder packs too: test_quant.pack_compressed_tensors cannot view a 1-row zero grid)
AT_LOAD = ("int4", "int8", "fp8")
KIND = {"int4": Int4Linear, "int8": Int8Linear, "fp8": Fp8Linear}


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def dequantized_twin(quantized: Path, twin: Path) -> Path:
    """`quantized` (what dflash wrote) with every projection replaced by compressed-tensors' own
    decompression of it, fp32, and per-expert projections fused back into transformers' stacks
    ([E, 2I, H] gate rows first, [E, H, I])."""
    from compressed_tensors.compressors.base import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme

    config = json.loads((quantized / "config.json").read_text())
    qc = config.pop("quantization_config")
    compressor = BaseCompressor.load_from_registry(qc["format"])
    w, out, experts = _tensors(quantized), {}, {}
    modules = {k.rsplit(".", 1)[0] for k in w if k.endswith(("weight_packed", ".weight_scale"))}
    for name, t in w.items():
        if not name.startswith(tuple(m + "." for m in modules)):
            out[name] = t
    for m in modules:
        group = next(g for g in qc["config_groups"].values() if any(re.match(t[3:], m) for t in g["targets"]))
        state = {k[len(m) + 1:]: v for k, v in w.items() if k.startswith(m + ".")}
        dense = compressor.decompress(state, QuantizationScheme(targets=group["targets"], weights=group["weights"]))
        dense = dense["weight"].to(torch.float32)
        e = re.match(r"(.*\.experts\.)(\d+)\.(gate_proj|up_proj|down_proj)$", m)
        if e:
            experts.setdefault(e.group(1), {}).setdefault(int(e.group(2)), {})[e.group(3)] = dense
        else:
            out[m + ".weight"] = dense
    shutil.copytree(quantized, twin, ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    save_file(_fused(out, experts), str(twin / "model.safetensors"), metadata={"format": "pt"})
    (twin / "config.json").write_text(json.dumps(config))
    return twin


def _fused(out: dict, experts: dict) -> dict:
    """`out` with per-expert projections (prefix → expert → part → [out, in]) fused into transformers' stacks."""
    for prefix, by_expert in experts.items():
        order = sorted(by_expert)
        out[prefix + "gate_up_proj"] = torch.stack([torch.cat([by_expert[i]["gate_proj"], by_expert[i]["up_proj"]])
                                                    for i in order])
        out[prefix + "down_proj"] = torch.stack([by_expert[i]["down_proj"] for i in order])
    return {k: v.contiguous() for k, v in out.items()}


def fuse_twin(twin: Path) -> None:
    """A plain twin's per-expert tensors fused into transformers' stacks (its Gemma4 class names no other)."""
    w, out, experts = _tensors(twin), {}, {}
    for name, t in w.items():
        e = re.match(r"(.*\.experts\.)(\d+)\.(gate_proj|up_proj|down_proj)\.weight$", name)
        if e:
            experts.setdefault(e.group(1), {}).setdefault(int(e.group(2)), {})[e.group(3)] = t
        else:
            out[name] = t
    save_file(_fused(out, experts), str(twin / "model.safetensors"), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(case, how) → (quantized dir, twin dir, drafter dir, plain dir), each written once per module."""
    def make(root: Path, case: str, how: str) -> tuple:
        plain, drafter = write_plain_and_drafter(CASES[case], root)
        if how in AT_LOAD:
            quantize_at_load(plain, root / "q", how)
            dequantized_twin(root / "q", root / "twin")
        else:
            pack_checkpoint(plain, root / "q", root / "twin", FORMATS[how])
            fuse_twin(root / "twin")
        return root / "q", root / "twin", drafter, plain
    return built_once(tmp_path_factory, make)


def _gemma_experts(target) -> list[GemmaExperts]:
    return [layer.mlp.experts for layer in target.layers if getattr(layer.mlp, "experts", None) is not None]


def _all_projections(target) -> list:
    out = []
    for layer in target.layers:
        mixer = getattr(layer.mixer, "inner", layer.mixer)  # Muse: the attention inside its sandwich
        out += [mixer.qkv, mixer.o_proj]
        mlp = getattr(layer.mlp, "inner", None) or getattr(layer.mlp, "mlp", None) or layer.mlp  # Muse, Gemma
        out += [mlp.gate_up, mlp.down]
    return out


MATRIX = [(c, h) for c in CASES for h in (*PACKED[c], *AT_LOAD)]


@pytest.mark.parametrize("case, how", [pytest.param(c, h, id=f"{c}-{h}") for c, h in MATRIX])
def test_quantized_target_runs_exactly_as_its_dequantized_twin(case, how, built):
    import transformers

    qdir, twin_dir, drafter_dir, _ = built(case, how)
    q = loader.load(qdir, drafter_dir, device="cpu", max_context=64)
    kind = KIND.get(how) or (Fp8Linear if "fp8" in how else Int4Linear)
    # read packed: every projection of attention and MLP (Muse's gate_proj inside qkv) is the quantized kind
    for lin in _all_projections(q.target):
        assert _kinds(lin) == {kind}, (how, _kinds(lin))
    for experts in _gemma_experts(q.target):  # the experts stay packed; the router stays dense
        for stack in (experts.gate_up, experts.down):  # act-order GPTQ: each expert its own column order
            assert all(_kinds(e) == {kind} for e in stack.experts) if isinstance(stack, ExpertList) else \
                isinstance(stack, kind), type(stack)
        assert not isinstance(experts.proj, (Int4Linear, Int8Linear, Fp8Linear))
    exact_q = realign(loader.load(qdir, None, device="cpu", max_context=64).target)
    exact_twin = realign(loader.load(twin_dir, None, device="cpu", max_context=64).target)
    ids = torch.randint(0, 500, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    # 40 rows: the experts' loop over experts (more than GATHER_ROWS tokens); 1 and 4: gathered per token
    for chunks in ((40,), (1, 4, 35)):
        assert torch.equal(_prefill_logits(exact_q, ids, chunks), _prefill_logits(exact_twin, ids, chunks)), chunks

    arch = json.loads((twin_dir / "config.json").read_text())["architectures"][0]
    reference = getattr(transformers, arch).from_pretrained(twin_dir, dtype=torch.float32).eval()
    assert_generates_as(reference, q, PROMPTS)


@pytest.mark.parametrize("case", CASES)
def test_quantizing_at_load_keeps_what_is_never_quantized_plain(case, built):
    """Every 2-D projection of the decoder layers is written quantized (Gemma's fused experts per expert);
    the embedding, head, norms (Gemma's numbered ones), routers, Gemma's layer_scalar and the vision tower
    are copied as they are."""
    qdir, _, _, plain = built(case, "int4")
    before, after = _tensors(plain), _tensors(qdir)
    kept = [k for k in before if k in after]
    for name, t in before.items():
        module = name.removesuffix(".weight")
        layer = re.search(r"language_model\.layers\.\d+\.", name) is not None
        projection = layer and (name.endswith("_proj.weight") or re.search(r"experts\.(gate_up|down)_proj$", name))
        if projection and ".router." not in name:
            assert name not in after, name
            if name.endswith(".weight"):
                assert module + ".weight_packed" in after, name
            else:  # a fused stack: one projection per expert
                part = "down_proj" if name.endswith("down_proj") else "gate_proj"
                assert all(f"{name.rsplit('.', 1)[0]}.{e}.{part}.weight_packed" in after for e in range(t.shape[0]))
        else:
            assert torch.equal(after[name], t), name
    names = " ".join(kept)
    for must in ("embed_tokens", "norm", "vision" if case == "muse" else "layer_scalar"):
        assert must in names, must
    if case == "gemma4-moe":
        assert all(f"layers.0.{n}" in names for n in ("router.proj.weight", "router.scale", "router.per_expert_scale",
                                                      "pre_feedforward_layernorm_2", "post_feedforward_layernorm_1"))
    if case == "muse":
        assert "model.language_model.layers.0.self_attn.gate_proj.weight_packed" in after


def test_the_memory_plan_counts_gemma_experts_quantized_and_its_router_dense():
    """memory.quantizable (the catalog's int4/fp8 sizes) agrees with what loads packed: Gemma 4's fused and
    per-expert experts and projections are quantized, its router.proj (a "proj" under `router`) is not."""
    from dflash_cli.memory import quantizable
    from dflash_cli.models import family_of
    from dflash_cli.models.layers.mlp import FUSED, PER_EXPERT

    cfg = gemma4_config(moe=True)
    family = family_of(cfg, Path("."))
    c = family.Config.from_raw(cfg, Path("."))
    p = "model.language_model.layers.0."
    for layout in (FUSED, PER_EXPERT):
        q = {w.name: quantizable(w) for w in family.weight_table(c, layout)}
        assert not q[p + "router.proj.weight"] and not q[p + "router.scale"] and not q[p + "layer_scalar"]
        assert q[p + "self_attn.q_proj.weight"] and q[p + "mlp.down_proj.weight"]
        assert all(q[n] for n in ((p + "experts.gate_up_proj", p + "experts.down_proj") if layout == FUSED else
                                  (p + "experts.7.gate_proj.weight", p + "experts.0.down_proj.weight")))


@pytest.mark.slow  # Triton's interpreter on shared cores
@pytest.mark.parametrize("case, how", [("gemma4-moe", "int4"), ("gemma4-moe-per-expert", "gptq-v1-sym-desc_act"),
                                       ("muse", "fp8-block128"), ("gemma4", "int8")])
def test_bf16_through_the_interpreted_kernels_speculative_output_equals_plain_decoding(case, how, built, monkeypatch):
    """bf16 through the Triton kernels (the CPU's torch GEMMs are not batch-invariant in bf16, for any family,
    quantized or not): a step's logits do not depend on how many tokens it verifies, so speculative output
    is plain decoding's at every b."""
    monkeypatch.setenv("DFLASH_KERNELS", "triton")
    monkeypatch.setenv("DFLASH_LINEAR", "invariant")  # the dense head and routers too, not only the quantized kernels
    qdir, _, drafter_dir, _ = built(case, how)
    model = loader.load(qdir, drafter_dir, device="cpu", dtype="bfloat16", max_context=64)
    target = realign(model.target)
    ids = list(range(5, 14))
    assert torch.equal(_prefill_logits(target, ids, (9,)), _prefill_logits(target, ids, (1,) * 9))
    prompt = PROMPTS[0]
    plain = _tokens(Engine(target), prompt, 6)
    for b in (1, 2, 4, 8):
        assert _tokens(Engine(target, model.drafter, block_size=b), prompt, 6) == plain, b


@pytest.mark.parametrize("case", ["gemma4-moe", "muse"])
def test_load_quantizes_these_families_once_and_answers_as_the_copy(case, built, tmp_path, monkeypatch):
    """`load(..., quantize=)` (the cache path, which refuses families outside config.QUANT_FAMILIES) quantizes
    the wrapper checkpoint, and the pair's speculative answer is the cached copy's plain greedy answer."""
    from dflash_cli import load
    from dflash_cli.quant import cache as qcache

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    _, _, drafter_dir, plain = built(case, "int4")
    pair = load(target=plain, drafter=drafter_dir, device="cpu", quantize="int4", block_size=4)
    copy = qcache.copy_dir(plain, "int4")
    assert pair.model.target_dir == copy and (copy / "config.json").is_file()
    prompt = list(PROMPTS[1])
    want = _tokens(Engine(loader.load(copy, None, device="cpu", max_context=64).target), prompt, 12)
    assert _tokens(Engine(pair.model.target, pair.model.drafter, block_size=4), prompt, 12) == want


def test_a_gemma_router_stored_quantized_is_refused_by_name_in_one_line(built, tmp_path):
    from dflash_cli.errors import DflashError

    from .test_quant import pack_compressed_tensors
    from .test_quant_models import _int4_of, _requantize

    qdir, _, _, _ = built("gemma4-moe", "ct-int4-sym-g32")
    name = "model.language_model.layers.1.router.proj"
    bad = _requantize(qdir, tmp_path / "bad", lambda w: _int4_of(w, name + ".weight",
                                                                 lambda c, s, z: pack_compressed_tensors(c, s, z, True)))
    with pytest.raises(DflashError) as e:
        loader.load(bad, None, device="cpu", max_context=64)
    assert f"{name} is stored quantized, but it is a router" in str(e.value) and "\n" not in str(e.value)
