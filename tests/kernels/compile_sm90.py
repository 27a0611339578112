"""Compile every Triton kernel for a Hopper GPU (sm_90, the H200) without one: Triton's CUDA
backend lowers to PTX and runs ptxas on the host. Run as a script, outside TRITON_INTERPRET
(which replaces kernels by interpreted functions). Prints one line per kernel; exits 1 on failure."""
from __future__ import annotations

import os
import sys
import traceback

assert os.environ.get("TRITON_INTERPRET") != "1", "run without TRITON_INTERPRET"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from dflash_cli.kernels import accept, attention, draft_kv, moe, rmsnorm, rope_cache, swiglu  # noqa: E402


def cases(dt: str):
    p = f"*{dt}"
    for one_block, fp32_weight in ((True, False), (False, False), (True, True)):
        yield f"rms_norm(one block={one_block}, fp32 weight={fp32_weight})", rmsnorm._rms_norm_kernel, dict(
            x_ptr=p, res_ptr=p, w_ptr="*fp32" if fp32_weight else p, out_ptr=p, n_cols="i32", eps="fp32"), dict(
            HAS_RESIDUAL=True, BLOCK=4096 if one_block else 8192, ONE_BLOCK=one_block, OFFSET=False,
            FP32_WEIGHT=fp32_weight)
    yield "swiglu", swiglu._swiglu_kernel, dict(gu_ptr=p, out_ptr=p, inter="i32"), dict(BLOCK=1024)
    for norm in (True, False):
        yield f"qk_norm_rope_cache(norm={norm})", rope_cache._qk_norm_rope_cache_kernel, dict(
            q_ptr=p, k_ptr=p, v_ptr=p, qn_ptr=p, kn_ptr=p, cs_ptr="*fp32", pos_ptr="*i64", kc_ptr=p, vc_ptr=p,
            qo_ptr=p, sq_t="i32", sq_h="i32", sk_t="i32", sk_h="i32", sv_t="i32", sv_h="i32", n_q_heads="i32",
            capacity="i32", half="i32", rot="i32", d="i32", eps="fp32"), dict(HAS_NORM=norm, OFFSET=False, BLOCK_H=64,
                                                                               BLOCK_P=1, BLOCK_D=128)
    yield "draft_ctx_kv", draft_kv._ctx_kv_kernel, dict(
        kv_ptr=p, kn_ptr=p, cs_ptr="*fp32", pos_ptr="*i64", kc_ptr=p, vc_ptr=p, n_layers="i32", n_heads="i32",
        capacity="i32", half="i32", eps="fp32"), dict(BLOCK_H=64)
    for causal, window in ((True, False), (False, True)):
        yield f"attention split(causal={causal}, window={window})", attention._attn_split_kernel, dict(
            q_ptr=p, k_ptr=p, v_ptr=p, len_ptr="*i64", acc_ptr="*fp32", m_ptr="*fp32", l_ptr="*fp32", q_len="i32",
            group="i32", capacity="i32", n_splits="i32", n_rows="i32", window="i32", scale="fp32"), dict(
            CAUSAL=causal, WINDOW=window, D=128, BLOCK_D=128, BLOCK_M=64, BLOCK_N=attention._BLOCK_N,
            MIN_CHUNK=attention._MIN_CHUNK, UPCAST=False, PRECISION="ieee" if dt == "fp32" else "tf32")
    for sinks in (False, True):
        yield f"attention merge(sinks={sinks})", attention._attn_merge_kernel, dict(
            acc_ptr="*fp32", m_ptr="*fp32", l_ptr="*fp32", o_ptr=p, len_ptr="*i64", sinks_ptr="*fp32", q_len="i32",
            group="i32", n_splits="i32", n_rows="i32", window="i32"), dict(
            WINDOW=True, D=128, BLOCK_D=128, BLOCK_N=attention._BLOCK_N, MIN_CHUNK=attention._MIN_CHUNK, BLOCK_S=32,
            SINKS=sinks)
    yield "moe router(bias)", moe._router_kernel, dict(x_ptr=p, w_ptr=p, b_ptr=p, out_ptr="*fp32", n_experts="i32",
                                                      hidden="i32"), dict(BLOCK_E=64, BLOCK_H=128, HAS_BIAS=True)
    slots = dict(order_ptr="*i64", slot_expert_ptr="*i64", slot_start_ptr="*i64", slot_count_ptr="*i64")
    precision = "ieee" if dt == "fp32" else "tf32"
    for mxfp4, gpt_oss in ((False, False), (False, True), (True, True)):
        w = "*u8" if mxfp4 else p
        flags = dict(BLOCK_M=moe._BLOCK_M, BLOCK_N=64, BLOCK_K=64, UPCAST=False, PRECISION=precision, MXFP4=mxfp4,
                     HAS_BIAS=gpt_oss)
        yield f"moe gate_up(mxfp4={mxfp4}, gpt-oss={gpt_oss})", moe._gate_up_kernel, dict(
            x_ptr=p, w_ptr=w, act_ptr=p, **slots, top_k="i32", hidden="i32", inter="i32", s_ptr="*u8" if mxfp4 else p,
            b_ptr=p, limit="fp32", alpha="fp32"), flags | dict(CLAMPED=gpt_oss)
        yield f"moe down(mxfp4={mxfp4}, gpt-oss={gpt_oss})", moe._down_kernel, dict(
            act_ptr=p, w_ptr=w, weight_ptr=p, out_ptr="*fp32", **slots, hidden="i32", inter="i32",
            s_ptr="*u8" if mxfp4 else p, b_ptr=p), flags
    common = dict(logits_ptr=p, stride="i32", rows_ptr="*i64", seed_ptr="*i64", vocab="i32", values_ptr="*fp32",
                  best_ptr="*fp32", index_ptr="*i32", cand_ptr="*i64", low_ptr="*i64", sum_ptr="*fp32")
    for mode, need_sum in ((0, False), (1, False), (2, True)):
        yield f"sample chunks(mode={mode})", accept._chunk_kernel, common, dict(
            MODE=mode, ROW_OFFSET=mode == 1, NEED_SUM=need_sum, CHUNK=accept.CHUNK, KC=accept.CANDIDATES)
    for mode, top_k, top_p, min_p in ((0, False, False, False), (1, False, False, False), (2, True, True, True),
                                      (2, False, True, False)):
        yield f"sample select(mode={mode}, top_k={top_k}, top_p={top_p}, min_p={min_p})", accept._select_kernel, \
            common | dict(out_ptr="*i64", n_chunks="i32", top_k_ptr="*i64", exact_ptr="*i32"), dict(
            MODE=mode, TOP_K=top_k, TOP_P=top_p, MIN_P=min_p, ROW_OFFSET=False, KC=accept.CANDIDATES, BLOCK_C=32,
            BLOCK_CAND=2048, BLOCK=1024, PROBES=accept.PROBES, STEPS=accept._search_steps(accept.PROBES),
            ROW_STEPS=accept._search_steps(8), TRACE=False)
    yield "accept", accept._accept_kernel, dict(block_ptr="*i64", y_ptr="*i64", acc_ptr="*i64", b="i32"), dict(BLOCK=16)


def ones(sig: dict, consts: dict) -> tuple[dict, dict]:
    """The same call with every integer argument equal to 1 (a decode's q_len, one split, one chunk,
    top_k=1...): Triton's launcher compiles such arguments as constants, so `.to()` and the like on
    them break only then."""
    ints = {k for k, v in sig.items() if v == "i32"}
    return {k: v for k, v in sig.items() if k not in ints}, consts | {k: 1 for k in ints}


def main() -> int:
    target = GPUTarget("cuda", 90, 32)
    failed = 0
    for dt in ("bf16", "fp32", "bf16, int args = 1"):
        for name, fn, sig, consts in cases(dt.split(",")[0]):
            if dt.endswith("= 1"):
                sig, consts = ones(sig, consts)
            signature = sig | {k: "constexpr" for k in consts}
            try:
                triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts), target=target)
                print(f"ok   {dt} {name}")
            except Exception:
                failed += 1
                print(f"FAIL {dt} {name}\n{traceback.format_exc()}")
    print(f"{failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
