"""Each Triton kernel against torch eager (its reference) at Qwen3-8B shapes, bf16, on CUDA.

Prints time per call, achieved GB/s (bytes each op must move, counted from its inputs and
outputs) and that rate as a share of a measured device-to-device copy. Without CUDA it says so
and exits 0. Usage: python benchmarks/kernels.py
"""
from __future__ import annotations

import sys

import torch


def main() -> int:
    if not torch.cuda.is_available():
        print("benchmarks/kernels.py needs a CUDA GPU; nothing measured")
        return 0
    from triton.testing import do_bench

    from dflash_cli.kernels import accept, attention, draft_kv, rmsnorm, rope_cache, swiglu
    from dflash_cli.rope import rope_table

    dev, bf = "cuda", torch.bfloat16
    H, HQ, HKV, D, I, V, B, CTX, LD = 4096, 32, 8, 128, 12288, 151936, 16, 2048, 5
    cap = CTX + 64
    size = lambda *ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731

    src = torch.empty(1 << 29, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    copy_rate = 2 * src.numel() / (do_bench(lambda: dst.copy_(src)) * 1e-3)

    x = torch.randn(B, H, dtype=bf, device=dev)
    res = torch.randn(B, H, dtype=bf, device=dev)
    w = torch.randn(H, dtype=bf, device=dev)
    gu = torch.randn(B, 2 * I, dtype=bf, device=dev)
    q = torch.randn(B, HQ, D, dtype=bf, device=dev)
    k = torch.randn(B, HKV, D, dtype=bf, device=dev)
    v = torch.randn(B, HKV, D, dtype=bf, device=dev)
    kc = torch.randn(HKV, cap, D, dtype=bf, device=dev)
    vc = torch.randn(HKV, cap, D, dtype=bf, device=dev)
    cs = rope_table(D, 1e6, None, cap, dev)
    pos = torch.arange(CTX - B, CTX, device=dev)
    length = torch.tensor(CTX, device=dev)
    ctx = torch.randn(B, H, dtype=bf, device=dev)
    wkv = torch.randn(LD * 2 * HKV * D, H, dtype=bf, device=dev) / 64
    kn = torch.randn(LD, D, dtype=bf, device=dev)
    dkc = torch.randn(LD, HKV, cap, D, dtype=bf, device=dev)
    dvc = torch.randn_like(dkc)
    logits = torch.randn(B, V, dtype=bf, device=dev) * 3
    block = torch.randint(0, V, (B,), device=dev)
    qn = torch.randn(D, dtype=bf, device=dev)

    cases = [
        ("rms_norm + residual (B rows)", rmsnorm.rms_norm, rmsnorm.rms_norm_ref, lambda f: f(x, w, 1e-6, res), size(x, res, res, x)),
        ("swiglu (B × 12288)", swiglu.swiglu, swiglu.swiglu_ref, lambda f: f(gu), size(gu) * 3 // 2),
        ("q/k norm + rope + cache", rope_cache.qk_norm_rope_cache, rope_cache.qk_norm_rope_cache_ref,
         lambda f: f(q, k, v, qn, qn, 1e-6, cs, pos, kc, vc), 2 * size(q, k, v)),
        ("attention verify (B=16, ctx 2048)", attention.attention, attention.attention_ref,
         lambda f: f(q, kc, vc, length, causal=True, scale=D**-0.5), size(kc, vc) * CTX // cap),
        ("attention decode (1, ctx 2048)", attention.attention, attention.attention_ref,
         lambda f: f(q[:1], kc, vc, length, causal=True, scale=D**-0.5), size(kc, vc) * CTX // cap),
        ("draft context K/V (5 layers)", draft_kv.draft_ctx_kv, draft_kv.draft_ctx_kv_ref,
         lambda f: f(ctx, wkv, kn, 1e-6, cs, pos, dkc, dvc), size(wkv)),
        ("accept greedy (B × 151936)", accept.accept, accept.accept_ref,
         lambda f: f(logits, block, length.clone(), temperature=0.0), size(logits)),
        ("accept T=0.7 top-p 0.9", accept.accept, accept.accept_ref,
         lambda f: f(logits, block, length.clone(), temperature=0.7, top_p=0.9, seed=1), size(logits)),
    ]
    print(f"{torch.cuda.get_device_name(0)} · copy {copy_rate / 1e9:.0f} GB/s · bf16 · Qwen3-8B shapes")
    print(f"| {'op':<34} | {'triton µs':>9} | {'torch µs':>9} | {'GB/s':>7} | {'% copy':>6} |")
    print(f"|{'-' * 36}|{'-' * 11}|{'-' * 11}|{'-' * 9}|{'-' * 8}|")
    for name, kern, ref, call, nbytes in cases:
        t_k = do_bench(lambda: call(kern)) * 1e3
        t_r = do_bench(lambda: call(ref)) * 1e3
        rate = nbytes / (t_k * 1e-6)
        print(f"| {name:<34} | {t_k:9.1f} | {t_r:9.1f} | {rate / 1e9:7.0f} | {100 * rate / copy_rate:5.1f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
