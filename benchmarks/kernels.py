"""Each Triton kernel against torch eager (its reference) at Qwen3-8B shapes, bf16, on CUDA.

Shapes: hidden 4096, 32 q / 8 kv heads of 128, intermediate 12288, vocab 151936, block B = 16,
context 2048, 5 draft layers. Prints time per call (triton.testing.do_bench, median µs), the
bytes each op must move at the least (its inputs read once, its outputs written once) over the
kernel's time, and that rate as a share of a measured device-to-device copy (read + write).
Attention is timed in a cache sized for the context and in one sized for 40k tokens: the kernel's
splits follow the valid length on the device, so the two should cost the same.
Without CUDA it says so and exits 0. Usage: python benchmarks/kernels.py
"""
from __future__ import annotations

import sys

import torch

H, HQ, HKV, D, I, V, B, CTX, LAYERS = 4096, 32, 8, 128, 12288, 151936, 16, 2048, 5
BIG_CAPACITY = 40960  # Qwen3's max_position_embeddings: a chat session's cache


def nbytes(*ts: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def cases(dev: str, dt: torch.dtype):
    """(name, triton fn, torch fn, call(fn), bytes moved) at Qwen3-8B shapes."""
    from dflash_cli.kernels import accept, attention, draft_kv, rmsnorm, rope_cache, swiglu
    from dflash_cli.rope import rope_table

    cap = CTX + B
    x, res = torch.randn(B, H, dtype=dt, device=dev), torch.randn(B, H, dtype=dt, device=dev)
    w = torch.randn(H, dtype=dt, device=dev)
    gu = torch.randn(B, 2 * I, dtype=dt, device=dev)
    qkv = torch.randn(B, (HQ + 2 * HKV) * D, dtype=dt, device=dev)
    q, k, v = (t.view(B, -1, D) for t in qkv.split([HQ * D, HKV * D, HKV * D], -1))  # views, as in the model
    qn, kn = torch.randn(D, dtype=dt, device=dev), torch.randn(D, dtype=dt, device=dev)
    cs = rope_table(D, 1e6, None, BIG_CAPACITY, dev)
    pos = torch.arange(CTX - B, CTX, device=dev)
    length = torch.tensor(CTX, device=dev)
    caches = {c: (torch.randn(HKV, c, D, dtype=dt, device=dev), torch.randn(HKV, c, D, dtype=dt, device=dev))
              for c in (cap, BIG_CAPACITY)}
    kc, vc = caches[cap]
    q_rot = torch.randn(B, HQ, D, dtype=dt, device=dev)
    ctx = torch.randn(B, H, dtype=dt, device=dev)
    wkv = torch.randn(LAYERS * 2 * HKV * D, H, dtype=dt, device=dev) / 64
    dkn = torch.randn(LAYERS, D, dtype=dt, device=dev)
    dkc = torch.randn(LAYERS, HKV, cap, D, dtype=dt, device=dev)
    dvc = torch.randn_like(dkc)
    logits = torch.randn(B, V, dtype=dt, device=dev) * 3
    block = torch.randint(0, V, (B,), device=dev)
    seed = torch.tensor(1234, device=dev)
    kv_read = 2 * HKV * CTX * D * kc.element_size()
    qwen_default = dict(temperature=0.6, top_k=20, top_p=0.95)  # Qwen3's thinking-mode defaults

    yield ("rms_norm (B × 4096)", rmsnorm.rms_norm, rmsnorm.rms_norm_ref,
           lambda f: f(x, w, 1e-6), nbytes(x, w, x))
    yield ("rms_norm + residual (B × 4096)", rmsnorm.rms_norm, rmsnorm.rms_norm_ref,
           lambda f: f(x, w, 1e-6, res), nbytes(x, res, w, res, x))
    yield ("swiglu (B × 12288)", swiglu.swiglu, swiglu.swiglu_ref, lambda f: f(gu), nbytes(gu) * 3 // 2)
    yield ("q/k norm + rope + cache (B)", rope_cache.qk_norm_rope_cache, rope_cache.qk_norm_rope_cache_ref,
           lambda f: f(q, k, v, qn, kn, 1e-6, cs, pos, kc, vc), 2 * nbytes(qkv))
    for name, n_q, causal in (("verify", B, True), ("decode", 1, True), ("draft", B, False)):
        for c in (cap, BIG_CAPACITY):
            kc_c, vc_c = caches[c]
            yield (f"attention {name} q={n_q} (cache {c // 1024}k)", attention.attention, attention.attention_ref,
                   lambda f, n_q=n_q, causal=causal, kc_c=kc_c, vc_c=vc_c: f(
                       q_rot[:n_q], kc_c, vc_c, length, causal=causal, scale=D**-0.5),
                   kv_read + 2 * nbytes(q_rot[:n_q]))
    yield ("draft context K/V (B, 5 layers)", draft_kv.draft_ctx_kv, draft_kv.draft_ctx_kv_ref,
           lambda f: f(ctx, wkv, dkn, 1e-6, cs, pos, dkc, dvc), nbytes(ctx, wkv) + 2 * LAYERS * HKV * B * D * 2)
    yield ("sample greedy (1 × 151936)", accept.sample, accept.sample_ref,
           lambda f: f(logits[:1], pos[:1], temperature=0.0), nbytes(logits[:1]))
    yield ("accept greedy (B × 151936)", accept.accept, accept.accept_ref,
           lambda f: f(logits, block, length.clone(), temperature=0.0), nbytes(logits))
    yield ("accept T=1 (B × 151936)", accept.accept, accept.accept_ref,
           lambda f: f(logits, block, length.clone(), temperature=1.0, seed=seed), nbytes(logits))
    yield ("accept T=0.7 top-p 0.9", accept.accept, accept.accept_ref,
           lambda f: f(logits, block, length.clone(), temperature=0.7, top_p=0.9, seed=seed), nbytes(logits))
    yield ("accept T=0.6 top-k 20 top-p 0.95", accept.accept, accept.accept_ref,
           lambda f: f(logits, block, length.clone(), seed=seed, **qwen_default), nbytes(logits))
    yield ("accept T=1 min-p 0.05", accept.accept, accept.accept_ref,
           lambda f: f(logits, block, length.clone(), temperature=1.0, min_p=0.05, seed=seed), nbytes(logits))


def main() -> int:
    if not torch.cuda.is_available():
        print("benchmarks/kernels.py needs a CUDA GPU; nothing measured")
        return 0
    from triton.testing import do_bench

    torch.manual_seed(0)
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_rate = 2 * src.numel() / (do_bench(lambda: dst.copy_(src)) * 1e-3)  # bytes read + written per s
    del src, dst

    print(f"{torch.cuda.get_device_name(0)} · copy {copy_rate / 1e9:.0f} GB/s · bf16 · Qwen3-8B shapes, "
          f"B={B}, context {CTX}")
    print(f"| {'op':<40} | {'triton µs':>9} | {'torch µs':>9} | {'speedup':>7} | {'GB/s':>6} | {'% copy':>6} |")
    print(f"|{'-' * 42}|{'-' * 11}|{'-' * 11}|{'-' * 9}|{'-' * 8}|{'-' * 8}|")
    for name, kern, ref, call, moved in cases("cuda", torch.bfloat16):
        t_k = do_bench(lambda: call(kern), return_mode="median") * 1e3
        t_r = do_bench(lambda: call(ref), return_mode="median") * 1e3
        rate = moved / (t_k * 1e-6)
        print(f"| {name:<40} | {t_k:9.1f} | {t_r:9.1f} | {t_r / t_k:6.1f}× | {rate / 1e9:6.0f} | "
              f"{100 * rate / copy_rate:5.1f}% |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
