"""Compile every Triton kernel exactly as the engine launches it, for the GPUs people run: sm_80 (A100),
sm_86 (RTX 30xx/A6000), sm_89 (RTX 40xx/L40), sm_90 (H100/H200) and sm_120 (RTX 50xx), on this CPU-only
machine (Triton's CUDA backend lowers to PTX and runs ptxas on the host).

"As launched" is recorded, not written down: `record` runs each launcher once at a released model's real
shapes (benchmarks/kernel_speed.py's cases: Qwen3-8B, Qwen3.5-27B, Qwen3-Coder-30B-A3B, gpt-oss-20b; the invariant linear kernel and its int4 / int8 / FP8 variants at Qwen3-8B's weights) with Triton's CPU
interpreter's launch path and captures every launch (without running it): the kernel, each argument's type and specialisation as Triton's own
launcher computes it (16-byte-aligned pointers and ints that are multiples of 16 get the divisibility hint;
an int equal to 1 becomes a constant; `do_not_specialize` is honoured), the constexprs and num_warps /
num_stages. fla-core's kernels (the Gated DeltaNet rule) are recorded too. `compile` then builds each
distinct launch for each target. A kernel with a PDL constexpr (kernels/pdl.py) is recorded twice: as the
interpreter launches it (PDL off), built for every target, and as an sm_90+ GPU launches it (PDL=True,
`launch_pdl`), built for the targets where kernels/pdl.py turns it on (sm_90, sm_120). Usage:
    TRITON_INTERPRET=1 python tests/kernels/compile_kernels.py record FILE
    python tests/kernels/compile_kernels.py compile FILE [sm_90 ...]
"""
from __future__ import annotations

import importlib
import json
import os
import sys
import traceback
from pathlib import Path

TARGETS = ("sm_80", "sm_86", "sm_89", "sm_90", "sm_120")
# The most shared memory one block may use (the opt-in maximum, bytes): beyond it the launch fails with
# "out of resources" at run time, so it is checked here. A100, RTX 30xx/A6000, RTX 40xx/L40, H100/H200,
# RTX 50xx (consumer Blackwell: 99 KB, as sm_86/89).
SHARED_LIMIT = {"sm_80": 166912, "sm_86": 101376, "sm_89": 101376, "sm_90": 232448, "sm_120": 101376}
LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg", "launch_pdl", "enable_fp_fusion")
PDL_TARGETS = ("sm_90", "sm_120")  # kernels/pdl.py: capability 9.0 and later


def record(path: Path) -> int:
    assert os.environ.get("TRITON_INTERPRET") == "1", "record runs the launchers in Triton's interpreter"
    import inspect

    import torch
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime import interpreter

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from benchmarks import kernel_speed as bench

    launches: dict[str, dict] = {}

    def run(self, *args, **kwargs):
        fn = self.fn
        options = {k: kwargs[k] for k in LAUNCH_OPTIONS if k in kwargs}
        bound = inspect.signature(fn).bind(*args, **{k: v for k, v in kwargs.items()
                                                     if k not in LAUNCH_OPTIONS and k not in ("grid", "warmup")})
        bound.apply_defaults()
        params = {}
        for name, value in bound.arguments.items():
            annotation = str(inspect.signature(fn).parameters[name].annotation)
            if name == "UPCAST":  # bf16 dots upcast only in the interpreter (which mis-computes them): a GPU passes False
                params[name] = ["constexpr", False]
            elif "constexpr" in annotation:
                params[name] = ["constexpr", value if not isinstance(value, torch.dtype) else str(value)]
            else:
                kind, attr = native_specialize_impl(CUDABackend, value, False, True, True)
                params[name] = [kind, attr if kind == "constexpr" else (attr or "")]
        entry = {"module": fn.__module__, "name": fn.__name__, "params": params,
                 "options": {"num_warps": options.get("num_warps", 4), "num_stages": options.get("num_stages", 3),
                             **({"enable_fp_fusion": options["enable_fp_fusion"]} if "enable_fp_fusion" in options
                                else {})}}
        launches[json.dumps(entry, sort_keys=True, default=str)] = entry
        if params.get("PDL") == ["constexpr", False]:  # the launch as an sm_90+ GPU makes it
            pdl = {**entry, "params": {**params, "PDL": ["constexpr", True]},
                   "options": {**entry["options"], "launch_pdl": True}, "targets": list(PDL_TARGETS)}
            launches[json.dumps(pdl, sort_keys=True, default=str)] = pdl
        # Not run: a launch's parameters never depend on what an earlier kernel computed (nothing on the
        # engine's path reads device values back), and interpreting every kernel at real shapes takes
        # minutes. The interpreter's correctness runs are the other kernel tests.

    interpreter.InterpretedFunction.run = run
    torch.manual_seed(0)
    for dtype in (torch.bfloat16, torch.float32):
        for case in (*bench.cases("cpu", dtype, sample_rows=2), *bench.hybrid_cases("cpu", dtype),
                     *bench.moe_cases("cpu", dtype), *bench.gpt_oss_cases("cpu", dtype),
                     *bench.linear_cases("cpu", dtype, rows=(1, bench.B), lm_head=False),
                     *bench.quant_linear_cases("cpu", dtype, rows=(1, bench.B))):
            name, kernel, _, call, _ = case
            call(kernel)
            print(f"ran  {str(dtype).removeprefix('torch.'):<9} {name}", flush=True)
        for name, call in (*fused_linear_launches(dtype, bench), *gdn_glue_launches(dtype, bench),
                           *moe_launches(dtype), *attention_launches(dtype, bench),
                           *attention_rope_launches(dtype, bench)):
            call()
            print(f"ran  {str(dtype).removeprefix('torch.'):<9} {name}", flush=True)
    path.write_text(json.dumps(list(launches.values()), indent=1, default=str))
    print(f"{len(launches)} distinct launches")
    return 0


def fused_linear_launches(dtype, bench):
    """kernels/fused_linear.py at Qwen3-8B's weights, as the dense layer launches it (M = 1 and B): the
    SwiGLU epilogue, the post-norm (+ residual) prologue with it, and the norm prologue before a weight
    reduced in slices (q/k/v: the partial kernel with NORM, then the merge); and a gate_up reduced in
    slices (Qwen3.5-35B-A3B's shared expert: the SwiGLU epilogue in the merge)."""
    import torch

    from dflash_cli.kernels import fused_linear as fl

    h, inter, qkv = bench.H, bench.I, (bench.HQ + 2 * bench.HKV) * bench.D
    gate_up, w_qkv = torch.empty(2 * inter, h, dtype=dtype), torch.empty(qkv, h, dtype=dtype)
    norm_w = torch.ones(h, dtype=dtype)
    for m in (1, bench.B):
        x, res = torch.zeros(m, h, dtype=dtype), torch.zeros(m, h, dtype=dtype)
        yield f"fused swiglu linear M={m}", lambda x=x: fl.swiglu_linear(x, gate_up)
        yield f"fused norm + swiglu linear M={m}", lambda x=x, res=res: fl.norm_swiglu_linear(x, norm_w, 1e-6, gate_up,
                                                                                            None, res)
        yield f"fused norm + q/k/v (split) M={m}", lambda x=x, res=res: fl.norm_linear(x, norm_w, 1e-6, w_qkv, None, res)
    # gpt-oss-20b's input norm (float32 weight, one rounding) before its biased q/k/v (H 2880, 64 + 2·8 heads)
    w_oss, b_oss, nw_oss = torch.empty(5120, 2880, dtype=dtype), torch.empty(5120, dtype=dtype), torch.ones(2880)
    for m in (1, bench.B):
        x, res = torch.zeros(m, 2880, dtype=dtype), torch.zeros(m, 2880, dtype=dtype)
        yield f"fused gpt-oss norm + q/k/v M={m}", lambda x=x, res=res: fl.norm_linear(x, nw_oss, 1e-5, w_oss, b_oss,
                                                                                      res, fp32_weight=True)
    # DFlash2's drafter layer at Qwen3-8B's width with the released conv (2 taps, groups of 16 channels): the norm
    # before the conv's kernel projection (the normed rows stored), the pre-conv before q/k/v and before gate_up
    # (+ SwiGLU), the post-conv after o and after down (the merge in the last program of each output column)
    taps, groups = 2, h // 16
    proj, base = torch.empty(2 * taps * groups, h, dtype=dtype), torch.empty(2, taps, h, dtype=dtype)
    w_o, w_down = torch.empty(h, bench.HQ * bench.D, dtype=dtype), torch.empty(h, inter, dtype=dtype)
    for m in (1, bench.B):
        x, res, dyn = torch.zeros(m, h, dtype=dtype), torch.zeros(m, h, dtype=dtype), torch.empty(m, 2, taps, groups,
                                                                                                     dtype=dtype)
        attn, act = torch.zeros(m, bench.HQ * bench.D, dtype=dtype), torch.zeros(m, inter, dtype=dtype)
        yield f"DFlash2 norm + conv kernels M={m}", lambda x=x, res=res: fl.norm_linear_rows(x, norm_w, 1e-6, proj,
                                                                                            None, res)
        yield f"DFlash2 pre-conv + q/k/v M={m}", lambda x=x, d=dyn: fl.conv_linear(x, base[0], d[:, 0], w_qkv)
        yield f"DFlash2 pre-conv + gate_up + SwiGLU M={m}", lambda x=x, d=dyn: fl.conv_linear(x, base[0], d[:, 0],
                                                                                             gate_up, swiglu=True)
        yield f"DFlash2 o + post-conv M={m}", lambda a=attn, d=dyn: fl.linear_conv(a, w_o, None, base[1], d[:, 1])
        yield f"DFlash2 down + post-conv M={m}", lambda a=act, d=dyn: fl.linear_conv(a, w_down, None, base[1], d[:, 1])
    shared = torch.empty(2 * 512, 2048, dtype=dtype)  # Qwen3.5-35B-A3B's shared expert: gate_up in slices
    for m in (1, bench.B):
        x = torch.zeros(m, 2048, dtype=dtype)
        yield f"fused swiglu linear (split) M={m}", lambda x=x: fl.swiglu_linear(x, shared)


def gdn_glue_launches(dtype, bench):
    """kernels/gdn_glue.py at Qwen3.5-27B's linear-attention shapes (16 key and 48 value heads of 128, a conv
    of 4), as the layer launches it: a decode step and a verify block (recorded), a tree verify's nodes (by
    window), a prefill chunk (written through)."""
    import torch

    from dflash_cli.kernels import gdn_glue as gg

    hk, hv, d, k = 16, 48, 128, 4
    c = 2 * hk * d + hv * d
    conv, weight = torch.empty(k - 1, c, dtype=dtype), torch.empty(c, k, dtype=dtype)
    a_log, dt_bias, norm_w, state = torch.empty(hv), torch.empty(hv), torch.empty(d), torch.empty(hv, d, d)
    for m, record in ((1, True), (bench.B, True), (bench.B, False)):
        proj = torch.empty(m, c + hv * d + 2 * hv, dtype=dtype)
        k_, v, g, beta = torch.empty(m, hk, d), torch.empty(m, hv, d), torch.empty(m, hv), torch.empty(m, hv)
        x = torch.empty(m, c, dtype=dtype) if record else None
        args = (proj, conv, weight, a_log, dt_bias, hk, k_, v, g, beta, x)
        yield f"gdn prologue M={m}{' recorded' if record else ''}", lambda a=args: gg.gdn_prologue(*a)
        z = proj[:, c:c + hv * d]
        yield f"gdn rule + gated norm M={m}{'' if record else ' (state written)'}", \
            lambda a=(k_, k_, v, g, beta, state, d**-0.5, z, norm_w, 1e-6, not record): gg.gdn_rule_norm(*a)
        if record:  # a tree verify's nodes: each its own conv window (the replay and tree rule: kernel_speed's)
            windows = torch.zeros(m, k, dtype=torch.int64)
            yield f"gdn prologue M={m} tree windows", lambda a=args, w=windows: gg.gdn_prologue(*a, windows=w)


def moe_launches(dtype):
    """kernels/moe.py at Qwen3.5-35B-A3B's shapes (256 experts, top-8, H 2048, I 512), as its layer launches
    them (T = 1 and 16): the router and top-k in one launch over 256 experts, the alignment over 256 experts
    inside gate_up, and the combine with the gated shared expert in the down launch's epilogue (the Qwen3-Coder
    cases of kernel_speed have neither)."""
    import torch

    from dflash_cli.kernels import moe

    e, h, i, k = 256, 2048, 512, 8
    gate_up, down = torch.empty(e, 2 * i, h, dtype=dtype), torch.empty(e, h, i, dtype=dtype)
    router = torch.empty(e, h, dtype=dtype)
    for t in (1, 16):
        x, shared, gate = torch.zeros(t, h, dtype=dtype), torch.zeros(t, h, dtype=dtype), torch.zeros(t, 1, dtype=dtype)
        idx, weights = torch.arange(t * k).view(t, k) % e, torch.zeros(t, k, dtype=dtype)
        yield f"moe route T={t} (256 experts: 4 blocks, one ticket per row)", \
            lambda x=x, router=router: moe.route(x, router, k, True)
        yield f"moe experts + shared expert T={t} (256 experts)", \
            lambda x=x, shared=shared, gate=gate, idx=idx, weights=weights: moe.experts(
                x, gate_up, down, idx, weights, shared=shared, shared_gate=gate)


def attention_launches(dtype, bench):
    """kernels/attention.py's launches that kernel_speed.py's cases leave out: the output gate in the merge
    (Qwen3.5-27B: 24 heads of 256, the gate a strided view of the projection) and a tree verify (Qwen3-8B at
    budgets 16 and 48; gpt-oss-20b's window and sinks at 16), each also with the two-launch merge."""
    import torch

    from dflash_cli import tree as trees
    from dflash_cli.kernels import attention

    cap = bench.CTX + 64
    length = torch.tensor(bench.CTX)
    for hq, hkv, d in ((24, 4, 256),):
        kc = torch.empty(hkv, cap, d, dtype=dtype)
        for n in (1, bench.B):
            qkv = torch.empty(n, (2 * hq + 2 * hkv) * d, dtype=dtype)
            q, gate = (x.view(n, hq, d) for x in qkv[:, :2 * hq * d].split(hq * d, -1))
            for one in (True, False):
                yield (f"attention + gate head {d} q={n} one_launch={one}",
                       lambda q=q, gate=gate, kc=kc, one=one: attention.attention(
                           q, kc, kc, length, causal=True, scale=d**-0.5, gate=gate, one_launch=one))
    for (hq, hkv, d, window, sinks), budget in (((bench.HQ, bench.HKV, bench.D, None, False), 16),
                                               ((bench.HQ, bench.HKV, bench.D, None, False), 48),
                                               ((64, 8, 64, 128, True), 16)):
        tree = trees.build(torch.tensor([1]), torch.randn(6, 50), budget)
        mask, _ = trees.attention_mask(tree, length, cap)
        kc, q = torch.empty(hkv, cap, d, dtype=dtype), torch.empty(budget, hq, d, dtype=dtype)
        for one in (True, False):
            yield (f"attention tree {budget} head {d} window={window} one_launch={one}",
                   lambda q=q, kc=kc, mask=mask, tree=tree, window=window, sinks=sinks, one=one, hq=hq, d=d:
                   attention.attention(q, kc, kc, length + q.shape[0], causal=True, scale=d**-0.5,
                                       sliding_window=window, sinks=torch.empty(hq) if sinks else None,
                                       tree=(mask, length + tree.depths), one_launch=one))


def attention_rope_launches(dtype, bench):
    """The attention kernel with its prologue (q/k-norm, rope, the K/V write: `attention(rope=...)`, issue 26), as
    the layers launch it: Qwen3-8B (q/k norm, 128 rotated) at a decode step and a verify block, Qwen3.5-27B's
    gated layer (24 heads of 256, 64 rotated, (1 + w) norms), gpt-oss-20b's (no norm, a window, sinks), the
    drafter's bidirectional block, and a tree verify."""
    import torch

    from dflash_cli import tree as trees
    from dflash_cli.kernels import attention
    from dflash_cli.rope import rope_table

    cap = bench.CTX + 64
    length = torch.tensor(bench.CTX)
    for (hq, hkv, d, rot, norm, window, sinks, gated), causal, rows in (
            ((bench.HQ, bench.HKV, bench.D, bench.D, "w", None, False, False), True, (1, bench.B)),
            ((bench.HQ, bench.HKV, bench.D, bench.D, "w", None, False, False), False, (bench.B,)),
            ((24, 4, 256, 64, "1+w", None, False, True), True, (1, bench.B)),
            ((64, 8, 64, 64, None, 128, True, False), True, (1, bench.B))):
        kc = torch.empty(hkv, cap, d, dtype=dtype)
        cos_sin = rope_table(rot, 1e6, None, cap, "cpu")
        norm_dtype = torch.float32 if norm == "1+w" else dtype
        q_norm = torch.ones(d, dtype=norm_dtype) if norm else None
        for n in rows:
            qkv = torch.empty(n, ((2 if gated else 1) * hq + 2 * hkv) * d, dtype=dtype)
            parts = qkv.split([hq * d] * (2 if gated else 1) + [hkv * d] * 2, -1)
            q, k, v = (x.view(n, -1, d) for x in (parts[0], *parts[-2:]))
            gate = parts[1].view(n, hq, d) if gated else None
            rope = attention.Rope(k, v, q_norm, q_norm, 1e-6, cos_sin, length + torch.arange(n), norm == "1+w")
            yield (f"attention + rope/cache head {d} rot {rot} norm {norm} q={n} causal={causal} window={window}",
                   lambda q=q, kc=kc, gate=gate, rope=rope, causal=causal, window=window, sinks=sinks, hq=hq, d=d:
                   attention.attention(q, kc, kc, length + q.shape[0], causal=causal, scale=d**-0.5,
                                       sliding_window=window, sinks=torch.empty(hq) if sinks else None, gate=gate,
                                       rope=rope))
    hq, hkv, d, budget = bench.HQ, bench.HKV, bench.D, 16
    tree = trees.build(torch.tensor([1]), torch.randn(6, 50), budget)
    mask, _ = trees.attention_mask(tree, length, cap)
    kc, q, kv = torch.empty(hkv, cap, d, dtype=dtype), torch.empty(budget, hq, d, dtype=dtype), \
        torch.empty(budget, hkv, d, dtype=dtype)
    positions = length + tree.depths
    rope = attention.Rope(kv, kv, torch.ones(d, dtype=dtype), torch.ones(d, dtype=dtype), 1e-6,
                          rope_table(d, 1e6, None, cap, "cpu"), positions)
    yield (f"attention + rope/cache tree {budget} head {d}",
           lambda: attention.attention(q, kc, kc, length + budget, causal=True, scale=d**-0.5,
                                       tree=(mask, positions), rope=rope))


def _source(entry: dict):
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    module = importlib.import_module(entry["module"])
    fn = getattr(module, entry["name"])
    while not isinstance(fn, JITFunction):  # heuristics / autotune wrappers around the JITFunction
        fn = fn.fn
    dont = {fn.arg_names[i] if isinstance(i, int) else i for i in (fn.do_not_specialize or [])}
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        kind, value = entry["params"][name]
        if name in dont and kind == "constexpr" and value == 1:
            kind, value = "i32", ""  # not specialised: an ordinary int argument
        if kind == "constexpr":
            signature[name] = "constexpr"
            constexprs[name] = value
        else:
            signature[name] = kind
            if value == "D" and name not in dont:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return fn, ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)


def compile_all(path: Path, targets: tuple[str, ...]) -> int:
    import triton
    from triton.backends.compiler import GPUTarget

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's kernels, not an installed copy's
    failed = 0
    for entry in json.loads(path.read_text()):
        for target in (t for t in targets if t in entry.get("targets", targets)):
            dtypes = sorted({k for k, _ in entry["params"].values() if k.startswith("*") and k[1:] in ("bf16", "fp32")})
            label = (f"{target} {entry['module'].rsplit('.', 1)[-1]}.{entry['name']} "
                     f"warps={entry['options']['num_warps']} {'/'.join(dtypes)}"
                     + (" pdl" if entry["options"].get("launch_pdl") else ""))
            try:
                fn, src = _source(entry)
                kernel = triton.compile(src, target=GPUTarget("cuda", int(target[3:]), 32), options=entry["options"])
                if kernel.metadata.shared > SHARED_LIMIT[target]:
                    raise RuntimeError(f"{kernel.metadata.shared} B of shared memory: {target} allows "
                                       f"{SHARED_LIMIT[target]} per block ({json.dumps(entry['params'])[:400]})")
                print(f"ok   {label} ({kernel.metadata.shared} B shared)")
            except Exception:
                failed += 1
                print(f"FAIL {label} {json.dumps(entry['params'])[:300]}\n{traceback.format_exc()}")
    print(f"{failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    mode, file = sys.argv[1], Path(sys.argv[2])
    if mode == "record":
        sys.exit(record(file))
    sys.exit(compile_all(file, tuple(sys.argv[3:]) or TARGETS))
