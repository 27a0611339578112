"""Quantize at load: what `--quantize int4|int8|fp8` writes is compressed-tensors, read back exactly (by
compressed-tensors' own decompressors, transformers and dflash's readers), streamed one tensor at a time,
and cached (written atomically, found by the next load, removed by `dflash rm`)."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dflash_cli.errors import DflashError, UsageError
from dflash_cli.quant import Int8Linear, plan_of, read_projection
from dflash_cli.quant import cache as qcache
from dflash_cli.quant.fp8 import Fp8Linear
from dflash_cli.quant.plan import WeightScheme
from dflash_cli.quant.quantize import int4_codes, quantize_checkpoint, quantize_fp8, quantize_int8

from .tiny import qwen35_config, qwen35_moe_config, target_config, write_qwen35, write_target

ROOT = Path(__file__).resolve().parents[1]


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            out |= {k: f.get_tensor(k) for k in f.keys()}
    return out


def modules(w: dict[str, torch.Tensor], suffix: str) -> list[str]:
    return sorted(k.removesuffix("." + suffix) for k in w if k.endswith("." + suffix))


def ours(d: Path, w: dict, module: str):
    """dflash's reader on one projection of the written checkpoint."""
    plan = plan_of(json.loads((d / "config.json").read_text()))
    scheme = plan.scheme_for(module)
    return read_projection(module, {k[len(module) + 1:]: v for k, v in w.items() if k.startswith(module + ".")
                                    and k[len(module) + 1:].startswith("weight")}, scheme)


# ---- the quantizers ----

def test_int8_is_per_channel_round_to_nearest():
    w = torch.randn(48, 96) * torch.linspace(0.1, 3, 48)[:, None]
    t = quantize_int8(w, torch.float32)
    lin = Int8Linear(t["weight"], t["weight_scale"])
    assert torch.equal(t["weight_scale"][:, 0], w.abs().amax(1) / 127)
    assert ((lin.dequantize() - w).abs() <= t["weight_scale"] / 2 + 1e-7).all()
    assert t["weight"].abs().amax() == 127


def test_fp8_is_e4m3_per_channel():
    w = torch.randn(40, 72)
    t = quantize_fp8(w, torch.bfloat16)
    deq = Fp8Linear(t["weight"], t["weight_scale"].float(), (1, 72)).dequantize(torch.float32)
    assert t["weight"].dtype == torch.float8_e4m3fn and t["weight_scale"].shape == (40, 1)
    assert ((deq - w).abs() <= w.abs().amax(1, keepdim=True) * 2**-4).all()  # 3 mantissa bits


def test_int4_scale_search_never_does_worse_than_rtn_per_group():
    w = torch.randn(64, 256)
    w[:, 3] *= 8  # an outlier column: RTN's scale wastes most codes on it
    errs = {}
    for search in (False, True):
        q, s = int4_codes(w, 128, torch.float32, search)
        deq = (q.float().reshape(64, 2, 128) * s[..., None]).reshape(64, 256)
        errs[search] = ((deq - w) ** 2).reshape(64, 2, 128).sum(-1)
        assert q.min() >= -8 and q.max() <= 7
    assert (errs[True] <= errs[False]).all() and errs[True].sum() < 0.97 * errs[False].sum()


# ---- the checkpoint it writes ----

def _ct_scheme(config: dict, module: str):
    from compressed_tensors.quantization import QuantizationScheme

    for group in config["quantization_config"]["config_groups"].values():
        if any(re.match(t[3:], module) for t in group["targets"]):
            return QuantizationScheme(targets=group["targets"], weights=group["weights"])
    return None


@pytest.mark.parametrize("scheme", ["int4", "int8", "fp8"])
def test_written_checkpoint_decompresses_as_compressed_tensors_does(tmp_path, scheme):
    """Every projection: compressed-tensors' own decompressor for the format the config names gives what
    dflash's reader gives, and that is a close copy of the source weight; everything else is copied."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.base import BaseCompressor

    src = write_target(tmp_path / "src", target_config(hidden=128, intermediate=192, layers=2, head_dim=32))
    quantized = quantize_checkpoint(src, tmp_path / "q", scheme)
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    qc = config["quantization_config"]
    compressor = BaseCompressor.load_from_registry(qc["format"])
    before, after = tensors(src), tensors(tmp_path / "q")
    assert len(quantized) == 2 * 7
    for module in quantized:
        ct = _ct_scheme(config, module)
        state = {k[len(module) + 1:]: v for k, v in after.items() if k.startswith(module + ".")}
        theirs = compressor.decompress(state, ct)["weight"]
        mine = ours(tmp_path / "q", after, module).dequantize(torch.float32)
        assert torch.equal(mine, theirs.to(torch.float32)), module
        w = before[module + ".weight"]
        rel = ((mine - w) ** 2).mean() / (w ** 2).mean()
        assert rel < {"int4": 0.02, "int8": 1e-4, "fp8": 2e-3}[scheme], (module, rel)
    plain = [k for k in before if k.removesuffix(".weight") not in quantized]
    assert plain and all(torch.equal(before[k], after[k]) for k in plain)
    assert (tmp_path / "q" / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()


def test_int4_groups_of_128_where_the_width_allows(tmp_path):
    src = write_target(tmp_path / "src", target_config(hidden=256, intermediate=384, layers=1, head_dim=64))
    quantize_checkpoint(src, tmp_path / "q", "int4")
    after = tensors(tmp_path / "q")
    assert after["model.layers.0.self_attn.q_proj.weight_scale"].shape == (256, 2)
    assert after["model.layers.0.mlp.down_proj.weight_scale"].shape == (256, 3)
    groups = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["config_groups"]
    assert [g["weights"]["group_size"] for g in groups.values()] == [128]


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`")
@pytest.mark.parametrize("scheme", ["int4", "int8", "fp8"])
def test_transformers_reads_the_written_checkpoint_as_dflash_does(tmp_path, scheme):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    src = write_target(tmp_path / "src", target_config(hidden=128, intermediate=256, layers=2, head_dim=32))
    quantized = quantize_checkpoint(src, tmp_path / "q", scheme)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32,
                                                 quantization_config=CompressedTensorsConfig(dequantize=True))
    theirs, after = model.state_dict(), tensors(tmp_path / "q")
    for module in quantized:
        assert torch.equal(ours(tmp_path / "q", after, module).dequantize(torch.float32), theirs[module + ".weight"])


def test_embedding_head_norms_routers_and_gated_deltanet_state_stay_plain(tmp_path):
    """Qwen3.5-MoE with fused experts: every expert quantized (written per expert), nothing else of note."""
    from dflash_cli.models.layers.mlp import FUSED

    cfg = qwen35_moe_config(layers=4)
    src = write_qwen35(tmp_path / "src", cfg, layout=FUSED)
    quantized = set(quantize_checkpoint(src, tmp_path / "q", "int8"))
    before, after = tensors(src), tensors(tmp_path / "q")
    for never in ("embed_tokens", "lm_head", "norm", "mlp.gate.weight", "shared_expert_gate", "A_log", "dt_bias",
                  "conv1d", "in_proj_a", "in_proj_b", "visual", "mtp."):
        hits = [k for k in before if never in k]
        assert hits, never
        assert all(torch.equal(before[k], after[k]) for k in hits), never
        assert not any(never in m for m in quantized), never
    for m in ("in_proj_qkv", "in_proj_z", "out_proj", "self_attn.q_proj", "shared_expert.down_proj"):
        assert any(m in q for q in quantized), m
    # the fused [E, 2I, H] stack, per expert: gate is its first I rows, up the rest
    stack = before["model.language_model.layers.0.mlp.experts.gate_up_proj"]
    e, inter = 3, stack.shape[1] // 2
    for part, rows in (("gate_proj", stack[e, :inter]), ("up_proj", stack[e, inter:])):
        module = f"model.language_model.layers.0.mlp.experts.{e}.{part}"
        assert module in quantized and "model.language_model.layers.0.mlp.experts.gate_up_proj" not in after
        assert torch.allclose(ours(tmp_path / "q", after, module).dequantize(torch.float32), rows,
                              atol=float(rows.abs().max()) / 127)
    down = before["model.language_model.layers.2.mlp.experts.down_proj"][5]
    assert torch.allclose(ours(tmp_path / "q", after, "model.language_model.layers.2.mlp.experts.5.down_proj")
                          .dequantize(torch.float32), down, atol=float(down.abs().max()) / 127)
    # the plan read back names exactly these modules quantized
    plan = plan_of(json.loads((tmp_path / "q" / "config.json").read_text()))
    names = {k.rsplit(".", 1)[0] for k in after}
    assert {n for n in names if plan.scheme_for(n)} == quantized


def _fp8_blocks(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One [out, in] weight in e4m3 with a block-128 scale grid: (fp8, grid, its dequantization)."""
    o, i = t.shape
    s = torch.zeros(-(-o // 128), -(-i // 128))
    for r in range(s.shape[0]):
        for c in range(s.shape[1]):
            s[r, c] = t[r * 128:(r + 1) * 128, c * 128:(c + 1) * 128].abs().max() / 448
    full = s.repeat_interleave(128, 0).repeat_interleave(128, 1)[:o, :i]
    q = (t / full).to(torch.float8_e4m3fn)
    return q, s, q.float() * full


def _fp8_channels(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One [out, in] weight in e4m3 with a scale per output channel (compressed-tensors float-quantized)."""
    s = t.float().abs().amax(1, keepdim=True) / 448
    q = (t / s).to(torch.float8_e4m3fn)
    return q, s, q.float() * s


FP8_CONFIGS = {
    "block": ("_scale_inv", _fp8_blocks, {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                          "weight_block_size": [128, 128]}),
    "channel": ("_scale", _fp8_channels, {
        "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
            "num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel", "dynamic": False}}},
        "ignore": ["lm_head", "re:.*in_proj_a$", "re:.*in_proj_b$", "re:.*shared_expert_gate$", "re:.*mlp\\.gate$"]}),
}


def _fp8_checkpoint(src: Path, dst: Path, how: str = "block") -> dict[str, torch.Tensor]:
    """`src` as an FP8 release stores it: e4m3 weights with Qwen's block-128 `weight_scale_inv` each (`how`
    "block") or compressed-tensors' per-channel `weight_scale` ("channel"); a fused [E, out, in] expert stack
    in e4m3 with its [E, ...] scale stack beside it, named as Qwen3.5-MoE's -FP8 releases and transformers
    name them (experts.gate_up_proj_scale_inv). Returns each projection's FP8-dequantized weight (a fused
    stack's per expert, gate and up split, as --quantize writes them)."""
    suffix, quantize, config = FP8_CONFIGS[how]
    dst.mkdir()
    w, deq = tensors(src), {}
    out = {}
    for k, t in w.items():
        fused = re.search(r"\.experts\.(gate_up_proj|down_proj)$", k)
        if ".layers." in k and k.endswith("_proj.weight"):
            out[k], out[k + suffix], deq[k.removesuffix(".weight")] = quantize(t)
        elif fused and t.dim() == 3:
            parts = [quantize(t[e]) for e in range(t.shape[0])]
            out[k], out[k + suffix] = torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])
            prefix, half = k[: fused.start(1)], t.shape[1] // 2
            for e, (_, _, d) in enumerate(parts):
                if fused.group(1) == "down_proj":
                    deq[f"{prefix}{e}.down_proj"] = d
                else:
                    deq[f"{prefix}{e}.gate_proj"], deq[f"{prefix}{e}.up_proj"] = d[:half], d[half:]
        else:
            out[k] = t
    save_file(out, str(dst / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = config
    (dst / "config.json").write_text(json.dumps(cfg))
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (src / f).is_file():
            (dst / f).write_bytes((src / f).read_bytes())
    return deq


def test_an_fp8_checkpoint_becomes_int4_from_its_dequantized_weights(tmp_path):
    src = write_target(tmp_path / "bf16", target_config(hidden=256, intermediate=384, layers=1, head_dim=64))
    deq = _fp8_checkpoint(src, tmp_path / "fp8")
    quantized = quantize_checkpoint(tmp_path / "fp8", tmp_path / "q", "int4")
    after = tensors(tmp_path / "q")
    assert set(quantized) == set(deq) and not any("scale_inv" in k for k in after)
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["format"] == "pack-quantized"
    for module, w in deq.items():
        q, s = int4_codes(w, 128, torch.bfloat16)  # the FP8 file's scales are fp32: bf16 scales are written
        expect = (q.float().reshape(q.shape[0], -1, 128) * s.float()[..., None]).reshape(q.shape).to(torch.bfloat16)
        assert torch.equal(ours(tmp_path / "q", after, module).dequantize(), expect), module


@pytest.mark.parametrize("how", ["block", "channel"])
def test_an_fp8_moe_with_fused_experts_becomes_int4_expert_by_expert(tmp_path, how):
    """Qwen3.5-MoE as its -FP8 release stores it: fused [E, out, in] expert stacks in e4m3, a `_scale_inv`
    stack beside each (or compressed-tensors' per-channel `_scale`). --quantize int4 writes every expert
    int4 (per expert, gate and up split) from its FP8-dequantized weights, nothing FP8 left; the loaded
    model holds them int4, its logits are its dequantized twin's (to fp32 rounding), its greedy tokens the
    twin's."""
    from dflash_cli import loader
    from dflash_cli.models.layers.mlp import FUSED, ExpertList
    from dflash_cli.quant import Int4Linear
    from dflash_cli.quant.quantize import int4_group

    from dflash_cli.engine import Engine

    from .test_quant_models import _prefill_logits, _tokens, realign

    cfg = qwen35_moe_config(hidden=128, layers=2, moe_intermediate=64, shared=64, wrapper=False)
    deq = _fp8_checkpoint(write_qwen35(tmp_path / "bf16", cfg, layout=FUSED), tmp_path / "fp8", how)
    fp8 = tensors(tmp_path / "fp8")
    stack = "model.layers.0.mlp.experts.gate_up_proj"
    scales = fp8[stack + FP8_CONFIGS[how][0]]
    assert fp8[stack].dtype == torch.float8_e4m3fn and scales.shape == ((8, 1, 1) if how == "block" else (8, 128, 1))
    experts = {m for m in deq if ".experts." in m}
    assert len(experts) == 2 * 8 * 3
    quantize_checkpoint(tmp_path / "fp8", tmp_path / "q", "int4")
    after = tensors(tmp_path / "q")
    assert not [k for k in after if re.search(r"experts\.(gate_up|down)_proj|scale_inv", k)]
    assert all(t.dtype != torch.float8_e4m3fn for t in after.values())
    for module, w in deq.items():  # every expert's gate, up and down among them
        q, s = int4_codes(w, int4_group(w.shape[1]), torch.bfloat16)
        g = s.shape[1]
        expect = (q.float().reshape(q.shape[0], g, -1) * s.float()[..., None]).reshape(q.shape).to(torch.bfloat16)
        assert torch.equal(ours(tmp_path / "q", after, module).dequantize(), expect), module
    target = realign(loader.load(tmp_path / "q", None, device="cpu", max_context=64).target)
    for lin in (target.layers[0].mlp.gate_up, target.layers[1].mlp.down):  # held packed: one stack or one by one
        assert {type(e) for e in (lin.experts if isinstance(lin, ExpertList) else [lin])} == {Int4Linear}, lin
    twin = realign(loader.load(dequantized_twin(tmp_path / "q", tmp_path / "twin"), None, device="cpu",
                               max_context=64).target)
    ids = list(range(3, 60, 3))
    for chunks in ((len(ids),), (1, 4, len(ids) - 5)):
        # Gated DeltaNet's in_proj stitches its int4 rows to the plain in_proj_a / in_proj_b rows (a Concat of
        # GEMMs) where the twin runs one fp32 GEMM: they round apart in the last bits, no more
        assert torch.allclose(_prefill_logits(target, ids, chunks), _prefill_logits(twin, ids, chunks),
                              rtol=0, atol=1e-3), chunks
    for prompt in ((1, 17, 300, 42, 7), (5, 9, 250, 101, 33, 64, 2, 480)):
        assert _tokens(Engine(target), prompt, 12) == _tokens(Engine(twin), prompt, 12), prompt


def test_a_checkpoint_already_quantized_is_refused_in_one_line(tmp_path, cache_home):
    src = write_target(tmp_path / "bf16", target_config(hidden=128, layers=1, head_dim=32))
    _fp8_checkpoint(src, tmp_path / "fp8")
    with pytest.raises(DflashError, match="already FP8: load it as it is, without --quantize fp8"):
        quantize_checkpoint(tmp_path / "fp8", tmp_path / "q8", "fp8")
    quantize_checkpoint(src, tmp_path / "int4", "int4")
    with pytest.raises(DflashError, match=r"already quantized \(compressed-tensors, pack-quantized\)"):
        quantize_checkpoint(tmp_path / "int4", tmp_path / "again", "int8")
    assert not (tmp_path / "q8").exists() and not (tmp_path / "again").exists()
    with pytest.raises(DflashError, match="already FP8"):  # through the cache: before saying it quantizes
        qcache.quantized(tmp_path / "fp8", "fp8", say=lambda _: pytest.fail("started quantizing"))


def test_sharded_checkpoints_are_written_shard_by_shard_with_an_index(tmp_path):
    src = write_target(tmp_path / "src", target_config(hidden=128, layers=2, head_dim=32), shards=3)
    quantize_checkpoint(src, tmp_path / "q", "int8")
    index = json.loads((tmp_path / "q" / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) == 3 and set(index) == set(tensors(tmp_path / "q"))


# ---- memory: one tensor at a time ----

MEASURE = """
import resource, sys, torch
sys.path.insert(0, {root!r})
from dflash_cli.quant.quantize import quantize_checkpoint
torch.set_num_threads(1)
quantize_checkpoint({tiny!r}, {dst!r} + "/warm", "int4")  # first-call costs (allocator, kernels) paid here
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
quantize_checkpoint({src!r}, {dst!r} + "/q", "int4")
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)
"""


def _checkpoint(directory: Path, count: int, shape: tuple[int, int]) -> Path:
    directory.mkdir()
    save_file({f"model.layers.{i}.mlp.up_proj.weight": torch.randn(shape) for i in range(count)},
              str(directory / "model.safetensors"))
    (directory / "config.json").write_text("{}")
    return directory


def test_each_source_tensor_is_released_before_the_next_is_read(tmp_path, monkeypatch):
    """The fast tier's check of streaming: at every read, no tensor read before is still alive anywhere
    (the RSS measurement below is the slow tier's)."""
    import weakref

    from dflash_cli.quant import quantize as qz

    read, alive_at_read = [], []
    real = qz.Source.read

    def tracked(self, name, index=None):
        alive_at_read.append(sum(r() is not None for r in read))
        t = real(self, name, index)
        read.append(weakref.ref(t))
        return t

    monkeypatch.setattr(qz.Source, "read", tracked)
    src = write_target(tmp_path / "src", target_config(hidden=128, layers=2, head_dim=32))
    quantize_checkpoint(src, tmp_path / "q", "int4")
    assert len(read) > 20 and max(alive_at_read) == 0


@pytest.mark.slow
def test_quantizing_holds_about_one_tensor_in_memory(tmp_path):
    """The peak resident memory quantizing 24 projections of 2 MiB (48 MiB) grows no more than quantizing
    one of them does (its fp32 copy and the scale search's temporaries), give or take one tensor.
    glibc's malloc is told to map every block of 64 KiB or more on its own, so that what is measured is
    what the code holds, not how the heap happens to fragment (glibc does that by itself for blocks over
    32 MiB, which every projection of a real model is)."""
    one_tensor = 1024 * 512 * 4
    tiny = _checkpoint(tmp_path / "tiny", 1, (16, 16))
    env = {**__import__("os").environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    grown = {}
    for count in (1, 24):
        src = _checkpoint(tmp_path / f"n{count}", count, (1024, 512))
        script = MEASURE.format(root=str(ROOT), tiny=str(tiny), src=str(src), dst=str(tmp_path / f"out{count}"))
        grown[count] = int(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                                          env=env).stdout)
    assert grown[24] < grown[1] + one_tensor, {k: v / 2**20 for k, v in grown.items()}
    assert grown[24] < 24 * one_tensor / 4


# ---- the cache ----

@pytest.fixture
def cache_home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "dflash" / "quantized"


def test_a_copy_is_made_once_then_found(tmp_path, cache_home, monkeypatch):
    src = write_target(tmp_path / "src", target_config(hidden=128, layers=1, head_dim=32))
    lines = []
    first = qcache.quantized(src, "int8", say=lines.append)
    assert first.parent == cache_home and first.name.endswith("--int8") and len(lines) == 1
    made = (first / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(qcache, "quantize_checkpoint", lambda *a, **k: pytest.fail("quantized again"))
    assert qcache.quantized(src, "int8", say=lines.append) == first and len(lines) == 1
    assert (first / "model.safetensors").stat().st_mtime_ns == made
    assert list(cache_home.iterdir()) == [first]  # no temporary directory left behind


def test_an_interrupted_copy_leaves_nothing_under_its_name(tmp_path, cache_home, monkeypatch):
    src = write_target(tmp_path / "src", target_config(hidden=128, layers=1, head_dim=32))

    def dies(src_dir, dst_dir, scheme, **kw):
        Path(dst_dir).mkdir(parents=True)
        (Path(dst_dir) / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(qcache, "quantize_checkpoint", dies)
    with pytest.raises(KeyboardInterrupt):
        qcache.quantized(src, "int4", say=lambda _: None)
    assert list(cache_home.iterdir()) == []


def test_hub_snapshots_are_keyed_by_repo_and_revision(tmp_path, cache_home):
    snap = tmp_path / "hub" / "models--Org--Name" / "snapshots" / ("ab" * 20)
    snap.mkdir(parents=True)
    assert qcache.copy_dir(snap, "fp8") == cache_home / f"Org--Name--{'ab' * 20}--fp8"
    other = tmp_path / "hub" / "models--Org--Name-2" / "snapshots" / ("cd" * 20)
    for d, scheme in ((qcache.copy_dir(snap, "fp8"), "fp8"), (qcache.copy_dir(snap, "int4"), "int4"),
                      (qcache.copy_dir(other, "int4"), "int4")):
        d.mkdir(parents=True)
    assert [p.name.rsplit("--", 1)[1] for p in qcache.copies_of("Org/Name")] == ["fp8", "int4"]
    assert qcache.remove_copies("Org/Name") >= 0 and qcache.copies_of("Org/Name") == []
    assert qcache.copies_of("Org/Name-2")


def test_rm_removes_the_quantized_copies_of_the_model(capsys, hub_pair, cache_home):
    from dflash_cli import hub
    from dflash_cli.cli import main

    assert main(["pull", "qwen3-4b"]) == 0
    copy = qcache.quantized(hub.local_path("Test/Stories"), "int8", say=lambda _: None)
    assert copy.is_dir() and copy.name.startswith("Test--Stories--")
    capsys.readouterr()
    assert main(["rm", "qwen3-4b", "--yes"]) == 0
    assert "removed the quantized copies of Test/Stories" in capsys.readouterr().err
    assert not copy.exists()


def test_load_refuses_an_unknown_scheme_in_one_line():
    from dflash_cli import load

    with pytest.raises(UsageError, match="^quantize must be one of int4, int8, fp8, got 'int3'$"):
        load("demo", quantize="int3")


from .test_cli_models import hub_pair  # noqa: E402,F401  (the stories pair as a Hub alias)
from .test_hub import server  # noqa: E402,F401


# ---- the next load: the cached copy, read as a prequantized checkpoint ----

def dequantized_twin(quantized_dir: Path, twin: Path) -> Path:
    """The quantized checkpoint with every projection replaced by its reference dequantization (fp32)."""
    twin.mkdir()
    config = json.loads((quantized_dir / "config.json").read_text())
    plan = plan_of(config)
    w, out = tensors(quantized_dir), {}
    for name in sorted(w):
        module, key = name.rsplit(".", 1)
        if plan.scheme_for(module) is None:
            out[name] = w[name]
        elif key in ("weight", "weight_packed"):
            out[module + ".weight"] = ours(quantized_dir, w, module).dequantize(torch.float32)
    save_file(out, str(twin / "model.safetensors"))
    del config["quantization_config"]
    (twin / "config.json").write_text(json.dumps(config))
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (quantized_dir / f).is_file():
            (twin / f).write_bytes((quantized_dir / f).read_bytes())
    return twin


def _greedy(target: Path, drafter: Path | None, prompt: str, n: int = 24, block_size: int | str = "auto"):
    from dflash_cli import load

    return load(target=target, drafter=drafter, device="cpu", block_size=block_size).generate(
        prompt, raw=True, max_tokens=n).token_ids


@pytest.mark.parametrize("scheme", ["int4", "int8", "fp8"])
def test_the_cached_copy_reloads_with_the_same_tokens(stories_pair, tmp_path, cache_home, scheme, monkeypatch):
    """stories260K with its drafter: the first load quantizes, the second reads the copy (no quantizing);
    both answer the same tokens, which are plain decoding's on the quantized target and the greedy tokens
    of its dequantized twin."""
    from dflash_cli import load

    target, drafter = stories_pair
    first = load(target=target, drafter=drafter, device="cpu", quantize=scheme)
    copy = qcache.copy_dir(target, scheme)
    assert first.model.target_dir == copy and copy.is_dir()
    monkeypatch.setattr(qcache, "quantize_checkpoint", lambda *a, **k: pytest.fail("quantized again"))
    again = load(target=target, drafter=drafter, device="cpu", quantize=scheme)
    prompt = "Once upon a time"
    tokens = first.generate(prompt, raw=True, max_tokens=40).token_ids
    assert again.generate(prompt, raw=True, max_tokens=40).token_ids == tokens
    assert _greedy(copy, None, prompt, 40) == tokens  # plain decoding of the quantized target
    assert _greedy(dequantized_twin(copy, tmp_path / "twin"), None, prompt, 40) == tokens


@pytest.mark.parametrize("scheme", ["int4", "int8", "fp8"])
def test_a_quantized_moe_with_fused_experts_runs_as_its_twin(tmp_path, cache_home, scheme):
    """Qwen3.5-MoE (hybrid attention, fused experts written per expert): the quantized target's greedy
    tokens are its dequantized twin's."""
    from dflash_cli import load
    from dflash_cli.models.layers.mlp import FUSED

    src = write_qwen35(tmp_path / "src", qwen35_moe_config(hidden=128, layers=4, moe_intermediate=128, shared=128),
                       layout=FUSED)
    pair = load(target=src, device="cpu", quantize=scheme)
    tokens = pair.generate("The cat", raw=True, max_tokens=16).token_ids
    assert _greedy(dequantized_twin(qcache.copy_dir(src, scheme), tmp_path / "twin"), None, "The cat", 16) == tokens


def test_a_family_that_cannot_run_quantized_is_refused_before_quantizing(tmp_path, cache_home):
    from .tiny_gpt_oss import gpt_oss_config, write_gpt_oss

    src = write_gpt_oss(tmp_path / "gpt-oss", gpt_oss_config())
    says = r"^--quantize: gpt_oss targets do not run quantized yet \(dflash runs quantized projections for gemma4, "
    with pytest.raises(DflashError, match=says + r"gemma4_unified, llama, muse_glimmer, qwen3, qwen3_5, qwen3_5_moe, "
                                                 r"qwen3_moe\)$"):
        qcache.quantized(src, "int4", say=lambda _: pytest.fail("started quantizing"))
    assert not cache_home.exists() or not list(cache_home.iterdir())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compressed_tensors_int8_compressor_output_reads_back_as_its_decompressor_does(dtype):
    """int-quantized 8-bit written by compressed-tensors' own compressor (their quantizer too): dflash's
    reader gives what their decompressor gives."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.naive_quantized.base import IntQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    w = torch.randn(48, 80).to(dtype)
    args = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel")
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    scale = (w.float().abs().amax(1, keepdim=True) / 127).to(dtype)
    packed = dict(IntQuantizationCompressor.compress({"weight": w, "weight_scale": scale}, scheme))
    assert packed["weight"].dtype == torch.int8
    theirs = IntQuantizationCompressor.decompress(dict(packed), scheme)["weight"]
    mine = read_projection("p", packed, WeightScheme("int-quantized", None, True, strategy="channel"))
    assert isinstance(mine, Int8Linear) and torch.equal(mine.dequantize(), theirs.to(dtype))
    if dtype == torch.float32:  # the same codes as ours (in bf16 they divide in bf16, we in fp32: nearer codes)
        assert torch.equal(quantize_int8(w, dtype)["weight"], packed["weight"])
