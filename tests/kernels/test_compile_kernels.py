"""Every kernel compiles as it is launched, for sm_80/86/89/90/120, on this CPU-only machine: Triton's CUDA
backend lowers to PTX and runs its bundled ptxas without a GPU. The launches are recorded from the
launchers at real model shapes (tests/kernels/compile_kernels.py), so the divisibility hints, constexprs
and warp counts are the ones that run. Catches what the interpreter cannot: type errors, unsupported ops
and layouts, and shared memory beyond a GPU's limit (sm_86/89 have 99 KB)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("compile_kernels.py")
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="records in the interpreter (CPU runs only)")
@pytest.mark.slow
def test_every_launch_compiles_for_every_target(tmp_path):
    pytest.importorskip("triton.backends.nvidia")
    launches = tmp_path / "launches.json"
    env = os.environ | {"TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, str(SCRIPT), "record", str(launches)], capture_output=True, text=True,
                       env=env, timeout=1800, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    upcast = [e for e in json.loads(launches.read_text()) if "UPCAST" in e["params"]]
    assert upcast and all(e["params"]["UPCAST"] == ["constexpr", False] for e in upcast), \
        "the bf16 dots are compiled as a GPU launches them, not as the interpreter's fp32 fallback"
    prologue = [e for e in json.loads(launches.read_text())
                if e["name"] == "_attn_kernel" and e["params"]["ROPE"] == ["constexpr", True]]
    assert {e["params"]["TREE"][1] > 0 for e in prologue} == {False, True}, \
        "attention with its q/k-norm, rope and cache-write prologue (issue 26) is compiled, a tree's too"
    # DFlash2's drafter layer (kernels/fused_linear.py): the norm storing its rows, the pre-conv in the loader,
    # the post-conv in the merge are each recorded (and so compiled below)
    fused = [e["params"] for e in json.loads(launches.read_text()) if e["name"] == "_fused_partial_kernel"]
    assert all(any(p.get(flag) == ["constexpr", True] for p in fused) for flag in ("NORMED_OUT", "CONV_IN", "CONV_OUT"))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_DEFAULT_FP_FUSION": "1"}
    p = subprocess.run([sys.executable, str(SCRIPT), "compile", str(launches)], capture_output=True, text=True,
                       env=env, timeout=1800, cwd=ROOT)
    assert p.returncode == 0 and p.stdout.splitlines()[-1] == "0 failed", p.stdout[-6000:] + p.stderr[-3000:]
    compiled = [line for line in p.stdout.splitlines() if line.startswith("ok ")]
    kernels = {line.split()[2] for line in compiled}
    for name in ("attention._attn_kernel", "attention._attn_merge_kernel", "accept._select_kernel", "moe._gate_up_kernel",
                 "gated_delta._causal_conv_kernel", "fused_recurrent.fused_recurrent_gated_delta_rule_fwd_kernel",
                 "invariant_linear._partial_kernel",
                 "quant_linear._int4_partial_kernel", "quant_linear._int8_partial_kernel",
                 "quant_linear._fp8_partial_kernel", "fused_linear._fused_partial_kernel", "gated_delta._l2norm_kernel",
                 "gated_delta._gated_rms_norm_kernel", "moe._route_kernel", "gdn_glue._prologue_kernel",
                 "gdn_glue._rule_norm_kernel", "moe._down_kernel",
                 "gated_delta_tree._tree_rule_norm_kernel", "gdn_replay._replay_kernel", "gdn_replay._commit_kernel",
                 "selector._selector_kernel",
                 "tree_build._build_kernel", "tree_build._verdict_kernel", "tree_build._mask_kernel",
                 "gated_delta_tree._tree_windows_kernel"):
        assert name in kernels, sorted(kernels)
    assert {line.split()[1] for line in compiled} == {"sm_80", "sm_86", "sm_89", "sm_90", "sm_120"}
    # kernels/pdl.py: the linear kernels as an sm_90+ GPU launches them (PDL on), and only there; a split
    # weight's merge runs in its last split program (no merge kernel is launched)
    pdl = {(line.split()[1], line.split()[2]) for line in compiled if line.split()[-4] == "pdl"}
    for name in ("invariant_linear._partial_kernel", "quant_linear._int4_partial_kernel",
                 "quant_linear._int8_partial_kernel", "quant_linear._fp8_partial_kernel",
                 "fused_linear._fused_partial_kernel"):
        assert {("sm_90", name), ("sm_120", name)} <= pdl, sorted(pdl)
    assert {target for target, _ in pdl} == {"sm_90", "sm_120"}
    assert not kernels & {"invariant_linear._merge_kernel", "fused_linear._swiglu_merge_kernel"}
    # kernels/moe.py: routing is one launch, the combine the down launch's epilogue
    assert not kernels & {"moe._router_kernel", "moe._top_k_kernel", "moe._combine_kernel"}
