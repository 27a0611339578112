"""Each Triton kernel against torch eager (its reference) at real shapes, bf16, on CUDA.

Dense ops at Qwen3-8B shapes: hidden 4096, 32 q / 8 kv heads of 128, intermediate 12288, vocab
151936, block B = 16, context 2048, 5 draft layers. The hybrid's ops at Qwen3.5-27B shapes (heads of
256 with 64 rotated dims, Gated DeltaNet with 16 key / 48 value heads of 128, 48 linear layers), and
the experts at Qwen3-Coder-30B-A3B's (128 experts of 768, top-8, hidden 2048) for T = 1, 8 and 16
tokens: an expert kernel's bytes are the distinct experts the tokens touch, read once. Prints time per call (triton.testing.do_bench, median µs), the
bytes each op must move at the least (its inputs read once, its outputs written once) over the
kernel's time, and that rate as a share of a measured device-to-device copy (read + write).
Attention is timed in a cache sized for the context and in one sized for 40k tokens: the kernel's
grid follows the capacity but only the splits (256 keys at absolute positions) that hold valid keys
work, so the two should cost about the same; and at 32k of the 40k cache, where verify's fp32 partials
(2 × rows / 256 of the K/V bytes: half for 16 × GQA 4) show against decode's.
First, F.linear at M = 1 and M = B for each Qwen3-8B weight (cuBLAS, not ours: what verify costs
over a decode step comes down to it), then the batch-invariant linear kernel beside F.linear at M = 1,
4, 8, B for each weight (GB/s of each, and a layer's M = B over M = 1 on each path), the int4, int8 and FP8
kernels beside the bf16 ones at M = 1, 2, 4, 8, B (GB/s on the bytes each reads: packed weights + scales), and a
check of the grouped-GEMM experts against the reference.
Every row runs on its own: a failure prints `n/a (ExcType: message)` and the next row runs.
Without CUDA it says so and exits 0.
Usage: python benchmarks/kernel_speed.py [--budget SECONDS] [--json FILE] [--device cpu (a rehearsal)]
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's dflash_cli, not an installed one

H, HQ, HKV, D, I, V, B, CTX, LAYERS = 4096, 32, 8, 128, 12288, 151936, 16, 2048, 5
BIG_CAPACITY = 40960  # Qwen3's max_position_embeddings: a chat session's cache
LONG_CTX = 32768  # a long context in that cache


def nbytes(*ts: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def cases(dev: str, dt: torch.dtype, sample_rows: int = B):
    """(name, triton fn, torch fn, call(fn), bytes moved) at Qwen3-8B shapes. `sample_rows`: rows of
    logits the sampler cases take (the launch shape does not depend on it; Triton's CPU interpreter,
    which records these launches, is slow over 152k-wide rows)."""
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
    logits = torch.randn(sample_rows, V, dtype=dt, device=dev) * 3
    block = torch.randint(0, V, (sample_rows,), device=dev)
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
    long_len = torch.tensor(LONG_CTX, device=dev)
    for name, n_q in (("verify", B), ("decode", 1)):  # the batch-invariant split size's cost at long context
        yield (f"attention {name} q={n_q} (32k of 40k cache)", attention.attention, attention.attention_ref,
               lambda f, n_q=n_q: f(q_rot[:n_q], *caches[BIG_CAPACITY], long_len, causal=True, scale=D**-0.5),
               2 * HKV * LONG_CTX * D * kc.element_size() + 2 * nbytes(q_rot[:n_q]))
    yield ("draft context K/V (B, 5 layers)", draft_kv.draft_ctx_kv, draft_kv.draft_ctx_kv_ref,
           lambda f: f(ctx, wkv, dkn, 1e-6, cs, pos[0], dkc, dvc), nbytes(ctx, wkv) + 2 * LAYERS * HKV * B * D * 2)
    from dflash_cli.kernels import dynamic_conv, selector

    conv_base = torch.randn(2, 4, H, dtype=dt, device=dev)  # DFlash2: 4 taps, groups of 64 channels
    conv_dyn = torch.randn(B, 2, 4, H // 64, dtype=dt, device=dev)
    yield ("DFlash2 dynamic conv (B × 4096, 4 taps)", dynamic_conv.dynamic_conv, dynamic_conv.dynamic_conv_ref,
           lambda f: f(x, conv_base[0], conv_dyn[:, 0]), nbytes(x, conv_base[0], x))
    from dflash_cli.kernels import embed_block

    table = torch.randn(1024, H, dtype=dt, device=dev)  # the launch does not depend on the vocabulary
    yield ("drafter block input (B × 4096)", embed_block.embed_block, embed_block.embed_block_ref,
           lambda f: f(block[:1] % 1024, block[1:B] % 1024, table), 2 * nbytes(x))
    # DFlash2's selector at the released drafters' sizes (top-16, rank 256) over this vocabulary: B - 1 rows
    sel_p, sel_logits = torch.randn(B - 1, 256, dtype=dt, device=dev), torch.randn(B - 1, V, dtype=dt, device=dev)
    codebooks = torch.randn(2, V, 256, dtype=dt, device=dev)
    yield ("DFlash2 selector (B - 1 rows × 151936, top-16, rank 256)", selector.selector, selector.selector_ref,
           lambda f: f(sel_p, sel_logits, block[:1], codebooks[0], codebooks[1], 16),
           nbytes(sel_logits) + 16 * (B - 1) * 2 * 256 * codebooks.element_size())
    yield ("DFlash2 selector, Muse-Glimmer's head (x 1/sqrt(26), softcap 20)", selector.selector, selector.selector_ref,
           lambda f: f(sel_p, sel_logits, block[:1], codebooks[0], codebooks[1], 16, 0.19611613513818404, 20.0),
           nbytes(sel_logits) + 16 * (B - 1) * 2 * 256 * codebooks.element_size())
    from dflash_cli.kernels import tree_build

    tree_logp = torch.randn(B - 1, 31, device=dev).sort(dim=1, descending=True).values.log_softmax(1)
    tree_ids = torch.randint(0, V, (B - 1, 31), device=dev)
    anchor = torch.tensor([3], device=dev)
    yield ("tree build (32 nodes, B - 1 depths, top-31)", tree_build.tree_build, tree_build.tree_build_ref,
           lambda f: f(anchor, tree_logp, tree_ids, 32), nbytes(tree_logp, tree_ids))
    tree = tree_build.tree_build_ref(anchor, tree_logp, tree_ids, 32)
    tree_targets = torch.randint(0, V, (32,), device=dev)
    yield ("tree walk + verdict (32 nodes, depth B - 1)", tree_build.tree_verdict, tree_build.tree_verdict_ref,
           lambda f: f(tree[0], tree[1], tree_targets, B - 1), nbytes(tree[0], tree[1], tree_targets))
    tree_length = torch.tensor(CTX, device=dev)
    yield ("tree verify mask (32 nodes, 2048 + 64 cache)", tree_build.tree_mask, tree_build.tree_mask_ref,
           lambda f: f(tree[3], tree[2], tree_length, CTX + 64), 32 * (CTX + 64) + 8 * (CTX + 64))
    yield ("sample greedy (1 × 151936)", accept.sample, accept.sample_ref,
           lambda f: f(logits[:1], pos[:1], temperature=0.0), nbytes(logits[:1]))
    yield ("accept greedy (B × 151936)", accept.accept, accept.accept_ref,
           lambda f: f(logits, block, length.clone(), temperature=0.0), nbytes(logits))
    yield ("verdict greedy (B × 151936)", accept.verdict, accept.verdict_ref,  # accept, packed: the engine's call
           lambda f: f(logits, block, length.clone(), temperature=0.0), nbytes(logits))
    yield ("accept T=1 (B × 151936)", accept.accept, accept.accept_ref,
           lambda f: f(logits, block, length.clone(), temperature=1.0, seed=seed), nbytes(logits))
    yield ("accept T=0.7 top-p 0.9", accept.accept, accept.accept_ref,
           lambda f: f(logits, block, length.clone(), temperature=0.7, top_p=0.9, seed=seed), nbytes(logits))
    yield ("accept T=0.6 top-k 20 top-p 0.95", accept.accept, accept.accept_ref,
           lambda f: f(logits, block, length.clone(), seed=seed, **qwen_default), nbytes(logits))
    yield ("accept T=1 min-p 0.05", accept.accept, accept.accept_ref,
           lambda f: f(logits, block, length.clone(), temperature=1.0, min_p=0.05, seed=seed), nbytes(logits))


def hybrid_cases(dev: str, dt: torch.dtype):
    """The hybrid family's own ops at Qwen3.5-27B shapes."""
    from dflash_cli.kernels import attention, gated_delta, gated_delta_tree, rmsnorm, rope_cache
    from dflash_cli.rope import rope_table

    h, hq, hkv, d, rot, hk, hv, dk, n_lin = 5120, 24, 4, 256, 64, 16, 48, 128, 48
    conv_dim = 2 * hk * dk + hv * dk
    x, w32 = torch.randn(B, h, dtype=dt, device=dev), torch.randn(h, device=dev) * 0.1
    yield ("rms_norm (1 + w) (B × 5120)", lambda *a: rmsnorm.rms_norm(*a, offset=True),
           lambda *a: rmsnorm.rms_norm_ref(*a, offset=True), lambda f: f(x, w32, 1e-6), nbytes(x, w32, x))
    cap = CTX + B
    qkv = torch.randn(B, (hq + 2 * hkv) * d, dtype=dt, device=dev)
    q, k, v = (t.view(B, -1, d) for t in qkv.split([hq * d, hkv * d, hkv * d], -1))
    qn, kn = torch.randn(d, device=dev) * 0.1, torch.randn(d, device=dev) * 0.1
    cs, pos = rope_table(rot, 1e7, None, cap, dev), torch.arange(CTX - B, CTX, device=dev)
    kc, vc = torch.randn(hkv, cap, d, dtype=dt, device=dev), torch.randn(hkv, cap, d, dtype=dt, device=dev)
    yield ("q/k norm (1 + w) + rope 64/256 + cache", lambda *a: rope_cache.qk_norm_rope_cache(*a, offset=True),
           lambda *a: rope_cache.qk_norm_rope_cache_ref(*a, offset=True),
           lambda f: f(q, k, v, qn, kn, 1e-6, cs, pos, kc, vc), 2 * nbytes(qkv))
    q_rot, length = torch.randn(B, hq, d, dtype=dt, device=dev), torch.tensor(CTX, device=dev)
    for name, n_q in (("verify", B), ("decode", 1)):
        yield (f"attention head 256 {name} q={n_q}", attention.attention, attention.attention_ref,
               lambda f, n_q=n_q: f(q_rot[:n_q], kc, vc, length, causal=True, scale=d**-0.5),
               2 * hkv * CTX * d * kc.element_size())
    window = torch.randn(3 + B, conv_dim, dtype=dt, device=dev)
    conv_w = torch.randn(conv_dim, 4, dtype=dt, device=dev) * 0.5
    yield ("causal conv + silu (B × 10240)", gated_delta.causal_conv, gated_delta.causal_conv_ref,
           lambda f: f(window, conv_w), nbytes(window, conv_w) + B * conv_dim * window.element_size())
    conv = torch.randn(n_lin, 3, conv_dim, dtype=dt, device=dev)
    xs, count = torch.randn(n_lin, B, conv_dim, dtype=dt, device=dev), torch.tensor(5, device=dev)
    yield ("conv-window commit (48 layers)", gated_delta.conv_commit, gated_delta.conv_commit_ref,
           lambda f: f(conv.clone(), xs, count), 2 * nbytes(conv) + nbytes(xs) * 3 // B)
    g = torch.Generator(device=dev).manual_seed(0)
    heads = torch.randn(B, hv, dk, dtype=dt, device=dev, generator=g)
    yield ("l2norm (B × heads × 128)", gated_delta.l2norm, gated_delta.l2norm_ref, lambda f: f(heads),
           nbytes(heads) + heads.numel() * 4)
    norm_w = torch.randn(dk, device=dev, generator=g)
    yield ("gated rms_norm (B × heads × 128)", gated_delta.gated_rms_norm, gated_delta.gated_rms_norm_ref,
           lambda f: f(heads, heads, norm_w, 1e-6), 3 * nbytes(heads))
    qk = gated_delta.l2norm_ref(torch.randn(1, B, hk, dk, device=dev, generator=g))
    vv = torch.randn(1, B, hv, dk, device=dev, generator=g)
    gg, bb = -torch.rand(1, B, hv, device=dev, generator=g), torch.rand(1, B, hv, device=dev, generator=g)
    state = torch.randn(1, hv, dk, dk, device=dev, generator=g)
    yield ("gated delta rule, verify (1 layer, B)", gated_delta.gated_delta_rule, gated_delta.gated_delta_rule_ref,
           lambda f: f(qk, qk, vv, gg, bb, state, dk**-0.5), 2 * nbytes(state) + nbytes(qk, qk, vv))
    from dflash_cli.kernels import gdn_glue  # the two fused launches a linear layer's step runs (issue 26)

    z = torch.randn(B, hv * dk, dtype=dt, device=dev, generator=g)
    yield ("gdn rule + gated norm, verify (1 layer, B)", gdn_glue.gdn_rule_norm, gdn_glue.gdn_rule_norm_ref,
           lambda f: f(qk[0], qk[0], vv[0], gg[0], bb[0], state[0], dk**-0.5, z, norm_w, 1e-6, False),
           nbytes(state) + nbytes(qk, qk, vv, z, z))
    proj = torch.randn(B, conv_dim + hv * dk + 2 * hv, dtype=dt, device=dev, generator=g)
    rec = (torch.empty(B, hk, dk, device=dev), torch.empty(B, hv, dk, device=dev), torch.empty(B, hv, device=dev),
           torch.empty(B, hv, device=dev), torch.empty(B, conv_dim, dtype=dt, device=dev))
    a_log, dt_bias = torch.randn(hv, device=dev, generator=g), torch.randn(hv, device=dev, generator=g)
    yield ("gdn prologue: conv + norms + g/beta + record (B)", gdn_glue.gdn_prologue, gdn_glue.gdn_prologue_ref,
           lambda f: f(proj, window[:3], conv_w, a_log, dt_bias, hk, *rec),
           nbytes(proj, window[:3], conv_w) + sum(nbytes(r) for r in rec) + nbytes(rec[0]))
    states = state.expand(n_lin, -1, -1, -1).contiguous()
    kr, vr = qk.expand(n_lin, -1, -1, -1).contiguous(), vv.expand(n_lin, -1, -1, -1).contiguous()
    gr, br = gg.expand(n_lin, -1, -1).contiguous(), bb.expand(n_lin, -1, -1).contiguous()
    from dflash_cli.kernels import gdn_replay

    yield ("replay commit (48 layers)", gdn_replay.replay, gated_delta.replay_ref,
           lambda f: f(states.clone(), kr, vr, gr, br, count), 2 * nbytes(states) + nbytes(kr, vr))
    parents = torch.cat((torch.zeros(1, dtype=torch.int64), torch.arange(B - 1) // 2)).to(dev)  # a binary tree
    yield ("gdn rule + gated norm, tree verify (1 layer, B nodes)", gated_delta_tree.tree_rule_norm,
           gated_delta_tree.tree_rule_norm_ref,
           lambda f: f(qk[0], qk[0], vv[0], gg[0], bb[0], state[0], parents, dk**-0.5, z, norm_w, 1e-6),
           (B + 1) * 2 * nbytes(state) + nbytes(qk, qk, vv, z, z))
    tree_mask = torch.tril(torch.ones(B, B + 64, dtype=torch.bool, device=dev), diagonal=64)  # a chain as a tree
    tree_rows = torch.arange(64, 64 + B, device=dev)
    yield ("tree shape: parents + conv windows (B nodes)", gated_delta_tree.tree_windows,
           gated_delta_tree.tree_windows_ref, lambda f: f(tree_mask, tree_rows, 3), nbytes(tree_mask))
    yield ("hybrid commit: replay + conv windows (48 layers)", gdn_replay.gdn_commit, gdn_replay.gdn_commit_ref,
           lambda f: f(states.clone(), kr, vr, gr, br, conv.clone(), xs, count), 2 * nbytes(states) + nbytes(kr, vr, xs))
    path = torch.tensor([0, 2, 5, 7, 9, 9], device=dev)  # a tree's accepted path: its rows gathered in the launch
    yield ("hybrid tree commit: a path's rows (48 layers)", gdn_replay.gdn_commit, gdn_replay.gdn_commit_ref,
           lambda f: f(states.clone(), kr, vr, gr, br, conv.clone(), xs, count, path),
           2 * nbytes(states) + nbytes(kr, vr, xs))


def grouped_mm() -> tuple[str, object]:
    """torch's grouped GEMM: F.grouped_mm where torch has it (2.9+?), else the private torch._grouped_mm
    it wraps (same arguments), else (name, None)."""
    import torch.nn.functional as F

    for name, fn in (("F.grouped_mm", getattr(F, "grouped_mm", None)), ("torch._grouped_mm", getattr(torch, "_grouped_mm", None))):
        if fn is not None:
            return name, fn
    return "F.grouped_mm", None


def grouped_mm_experts(x, gate_up, down, idx, weights):
    """The experts through torch's grouped GEMM (F.grouped_mm, SM80+, bf16): the alternative the fused
    kernel is measured against. Pairs sorted by expert; offs are each expert's end row. The weights are
    [E, N, K] (out = x @ w.T per expert), and grouped_mm contracts mat_a [M, K] with mat_b [E, K, N]:
    hence the transposed views (research/gpu-review-2.md F5; `check_grouped_mm` holds it to the reference)."""
    import torch.nn.functional as F

    name, gmm = grouped_mm()
    if gmm is None:
        raise AttributeError(f"torch {torch.__version__} has neither F.grouped_mm nor torch._grouped_mm")
    t, k = idx.shape
    pairs = idx.reshape(-1)
    order = torch.sort(pairs, stable=True).indices
    counts = torch.zeros(gate_up.shape[0], dtype=torch.int64, device=x.device).scatter_add(0, pairs, torch.ones_like(pairs))
    offs = counts.cumsum(0).to(torch.int32)
    gu = gmm(x.repeat_interleave(k, 0)[order], gate_up.transpose(1, 2), offs=offs)
    gate, up = gu.chunk(2, dim=-1)
    out = gmm((F.silu(gate) * up).to(x.dtype), down.transpose(1, 2), offs=offs) * weights.reshape(-1)[order, None]
    back = torch.empty_like(out)
    back[order] = out
    back = back.view(t, k, -1)
    y = back[:, 0]
    for j in range(1, k):
        y = y + back[:, j]
    return y


def check_grouped_mm(dev: str) -> str:
    """grouped_mm_experts against moe.experts_ref at small bf16 shapes (8 experts, top-2, 5 tokens)."""
    from dflash_cli.kernels import moe

    g = torch.Generator().manual_seed(0)
    e, h, i, t, top_k = 8, 64, 48, 5, 2
    gate_up = (torch.randn(e, 2 * i, h, generator=g) / h**0.5).to(dev, torch.bfloat16)
    down = (torch.randn(e, h, i, generator=g) / i**0.5).to(dev, torch.bfloat16)
    x = torch.randn(t, h, generator=g).to(dev, torch.bfloat16)
    router = (torch.randn(e, h, generator=g) / h**0.5).to(dev, torch.bfloat16)
    idx, weights = moe.route_ref(x, router, top_k, True)
    got = grouped_mm_experts(x, gate_up, down, idx, weights).float()
    want = moe.experts_ref(x, gate_up, down, idx, weights).float()
    err, scale = (got - want).abs().max().item(), want.abs().max().item()
    ok = err <= 2e-2 * scale
    return f"{grouped_mm()[0]} layout: {'matches' if ok else 'DIFFERS FROM'} moe.experts_ref (max |Δ| {err:.1e} of {scale:.1e})"


def moe_cases(dev: str, dt: torch.dtype, tokens=(1, 8, 16), grouped: bool | None = None):
    """The router and experts at Qwen3-Coder-30B-A3B shapes; with `grouped` (default: bf16 on a GPU)
    the experts through torch's grouped GEMM beside them."""
    from dflash_cli.kernels import moe

    h, e, i, top_k = 2048, 128, 768, 8
    gate_up = torch.randn(e, 2 * i, h, dtype=dt, device=dev) / h**0.5
    down = torch.randn(e, h, i, dtype=dt, device=dev) / i**0.5
    router = torch.randn(e, h, dtype=dt, device=dev) / h**0.5
    x = torch.randn(max(tokens), h, dtype=dt, device=dev)
    yield (f"router (T={max(tokens)}, 128 experts)", moe.route, moe.route_ref, lambda f: f(x, router, top_k, True),
           nbytes(router, x))
    for t in tokens:
        idx, weights = moe.route_ref(x[:t], router, top_k, True)
        touched = int(idx.unique().numel())
        moved = touched * 3 * i * h * gate_up.element_size() + 2 * nbytes(x[:t])
        yield (f"experts T={t} ({touched} of 128 touched)", moe.experts, moe.experts_ref,
               lambda f, t=t, idx=idx, weights=weights: f(x[:t], gate_up, down, idx, weights), moved)
        if grouped if grouped is not None else (dev != "cpu" and dt == torch.bfloat16):
            yield (f"experts T={t} via {grouped_mm()[0]}", grouped_mm_experts, moe.experts_ref,
                   lambda f, t=t, idx=idx, weights=weights: f(x[:t], gate_up, down, idx, weights), moved)


def gpt_oss_cases(dev: str, dt: torch.dtype, tokens=(1, 8, 16)):
    """gpt-oss's own ops at gpt-oss-20b shapes: the fp32-weight norm, attention with sinks over a
    128-token window, the biased router (softmax over the top 4) and the MXFP4 experts with biases and
    the clamped SwiGLU, and the biased draft context K/V."""
    from dflash_cli.kernels import attention, draft_kv, moe, rmsnorm
    from dflash_cli.rope import rope_table

    h, hq, hkv, d, e, i, top_k = 2880, 64, 8, 64, 32, 2880, 4
    x, w32 = torch.randn(B, h, dtype=dt, device=dev), torch.randn(h, device=dev)
    yield ("rms_norm fp32 weight (B × 2880)", lambda *a: rmsnorm.rms_norm(*a, fp32_weight=True),
           lambda *a: rmsnorm.rms_norm_ref(*a, fp32_weight=True), lambda f: f(x, w32, 1e-5), nbytes(x, w32, x))
    cap = CTX + B
    kc, vc = torch.randn(hkv, cap, d, dtype=dt, device=dev), torch.randn(hkv, cap, d, dtype=dt, device=dev)
    q, length = torch.randn(B, hq, d, dtype=dt, device=dev), torch.tensor(CTX, device=dev)
    sinks = torch.randn(hq, device=dev)
    for name, window in (("full", None), ("window 128", 128)):
        read = 2 * hkv * (window or CTX) * d * kc.element_size()
        yield (f"attention + sinks {name} verify q={B}", attention.attention, attention.attention_ref,
               lambda f, window=window: f(q, kc, vc, length, causal=True, scale=d**-0.5, sliding_window=window,
                                          sinks=sinks), read)
    packed = lambda rows, cols: (torch.randint(0, 256, (e, rows, cols // 32, 16), dtype=torch.uint8, device=dev),
                                 torch.randint(118, 126, (e, rows, cols // 32), dtype=torch.uint8, device=dev))
    gate_up, gu_scales = packed(2 * i, h)
    down, dn_scales = packed(h, i)
    kw = dict(gate_up_bias=torch.randn(e, 2 * i, dtype=dt, device=dev), down_bias=torch.randn(e, h, dtype=dt, device=dev),
              gate_up_scales=gu_scales, down_scales=dn_scales, swiglu_limit=7.0, swiglu_alpha=1.702)
    router, router_bias = torch.randn(e, h, dtype=dt, device=dev) / h**0.5, torch.randn(e, dtype=dt, device=dev)
    xs = torch.randn(max(tokens), h, dtype=dt, device=dev)
    yield (f"router + bias, top-4 softmax (T={max(tokens)})", moe.route, moe.route_ref,
           lambda f: f(xs, router, top_k, False, router_bias, softmax_after_topk=True), nbytes(router, xs))
    for t in tokens:
        idx, weights = moe.route_ref(xs[:t], router, top_k, False, router_bias, softmax_after_topk=True)
        touched = int(idx.unique().numel())
        moved = touched * (nbytes(gate_up[0], gu_scales[0], down[0], dn_scales[0])) + 2 * nbytes(xs[:t])
        yield (f"experts MXFP4 T={t} ({touched} of 32 touched)", moe.experts, moe.experts_ref,
               lambda f, t=t, idx=idx, weights=weights: f(xs[:t], gate_up, down, idx, weights, **kw), moved)
    layers = 2
    ctx = torch.randn(B, h, dtype=dt, device=dev)
    wkv = torch.randn(layers * 2 * hkv * d, h, dtype=dt, device=dev) / 64
    bkv = torch.randn(layers * 2 * hkv * d, dtype=dt, device=dev)
    dkn = torch.randn(layers, d, dtype=dt, device=dev)
    dkc = torch.randn(layers, hkv, cap, d, dtype=dt, device=dev)
    cs, pos = rope_table(d, 150000.0, None, cap, dev), torch.arange(CTX - B, CTX, device=dev)
    yield ("draft context K/V + bias (B, 2 layers)", draft_kv.draft_ctx_kv, draft_kv.draft_ctx_kv_ref,
           lambda f: f(ctx, wkv, dkn, 1e-5, cs, pos, dkc, torch.randn_like(dkc), b_kv=bkv), nbytes(ctx, wkv, bkv))


# Qwen3-8B's weight matrices (name, N, K): a decoder layer's four, then the lm_head.
WEIGHTS = (("q/k/v (6144 × 4096)", (HQ + 2 * HKV) * D, H), ("o (4096 × 4096)", H, HQ * D),
           ("gate/up (24576 × 4096)", 2 * I, H), ("down (4096 × 12288)", H, I), ("lm_head (151936 × 4096)", V, H))
LINEAR_ROWS = (1, 4, 8, B)


def linear_cases(dev: str, dt: torch.dtype, rows=LINEAR_ROWS, lm_head: bool = True):
    """The batch-invariant linear kernel at each Qwen3-8B weight for M = `rows`, against F.linear (cuBLAS),
    then gpt-oss-20b's biased q/k/v and, in float32, float32 rows through a bf16 weight (the mixed pair).
    Without `lm_head` (the compile check's recording: 1.2-2.5 GB on the host) its weight is left out."""
    import torch.nn.functional as F

    from dflash_cli.kernels import invariant_linear as il

    for name, n_out, n_in in WEIGHTS[:None if lm_head else -1]:
        w = torch.randn(n_out, n_in, dtype=dt, device=dev) / 64
        x = torch.randn(max(rows), n_in, dtype=dt, device=dev)
        for m in rows:
            yield (f"invariant linear {name.split(' (')[0]} M={m}", il.invariant_linear, F.linear,
                   lambda f, m=m, x=x, w=w: f(x[:m], w), nbytes(w, x[:m]) + m * n_out * x.element_size())
    w = torch.randn(5120, 2880, dtype=dt, device=dev) / 64
    b, x = torch.randn(5120, dtype=dt, device=dev), torch.randn(B, 2880, dtype=dt, device=dev)
    yield ("invariant linear gpt-oss q/k/v + bias M=B", il.invariant_linear, F.linear, lambda f: f(x, w, b),
           nbytes(w, b, x) + B * 5120 * x.element_size())
    if dt == torch.float32:
        wb = w.to(torch.bfloat16)
        yield ("invariant linear fp32 rows, bf16 weight", il.invariant_linear, il.invariant_linear_ref,
               lambda f: f(x, wb, b), nbytes(wb, b, x) + B * 5120 * x.element_size())


def invariant_rows(dev: str, dt: torch.dtype, do_bench, copy_rate: float, scale: int = 1,
                   deadline: float | None = None) -> list[dict]:
    """The batch-invariant linear kernel (issue 24) against F.linear (cuBLAS) at M = 1, 4, 8, B for each
    Qwen3-8B weight: µs and GB/s (the weight read once, the rows read and written) of each, and the
    share of copy bandwidth (the target: ≥ 90% at every M ≤ 16). Then a decoder layer's four projections
    at M = B over M = 1 on each path: what the projections make of verify(B) / decode (target ≤ 1.05).
    `scale` divides the weights' sides (a CPU rehearsal); no row starts after `deadline` (perf_counter)."""
    import time

    import torch.nn.functional as F

    from dflash_cli.kernels.invariant_linear import invariant_linear

    print(f"| {'invariant_linear vs F.linear':<28} | {'M':>2} | {'inv µs':>8} | {'cuBLAS µs':>9} | "
          f"{'inv GB/s':>8} | {'cuBLAS GB/s':>11} | {'inv % copy':>10} | {'cuBLAS % copy':>13} |")
    print(f"|{'-' * 30}|{'-' * 4}|{'-' * 10}|{'-' * 11}|{'-' * 10}|{'-' * 13}|{'-' * 12}|{'-' * 15}|")
    rows, layer, layer_rows = [], {(path, m): 0.0 for path in ("inv", "cublas") for m in LINEAR_ROWS}, 0
    for name, n_out, n_in in WEIGHTS:
        if deadline is not None and time.perf_counter() > deadline:
            print(f"(invariant_linear rows stopped at the budget before {name})", flush=True)
            break
        try:
            w = torch.randn(n_out // scale, n_in // scale, dtype=dt, device=dev) / 64
            x = torch.randn(max(LINEAR_ROWS), n_in // scale, dtype=dt, device=dev)
            for m in LINEAR_ROWS:
                moved = nbytes(w, x[:m]) + m * w.shape[0] * x.element_size()
                t_inv = do_bench(lambda: invariant_linear(x[:m], w)) * 1e3
                t_cub = do_bench(lambda: F.linear(x[:m], w)) * 1e3
                if not name.startswith("lm_head"):
                    layer["inv", m] += t_inv
                    layer["cublas", m] += t_cub
                    layer_rows += 1
                r_inv, r_cub = moved / (t_inv * 1e-6), moved / (t_cub * 1e-6)
                rows.append(dict(weight=name, m=m, invariant_us=t_inv, cublas_us=t_cub, invariant_bytes_per_s=r_inv,
                                 cublas_bytes_per_s=r_cub, invariant_copy_share=r_inv / copy_rate,
                                 cublas_copy_share=r_cub / copy_rate))
                print(f"| {name:<28} | {m:>2} | {t_inv:8.1f} | {t_cub:9.1f} | {r_inv / 1e9:8.0f} | {r_cub / 1e9:11.0f} | "
                      f"{100 * r_inv / copy_rate:9.1f}% | {100 * r_cub / copy_rate:12.1f}% |", flush=True)
        except Exception as e:  # the next weight still runs
            print(f"| {name:<28} | n/a ({type(e).__name__}: {first_line(e)}) |", flush=True)
        finally:
            w = x = None
    if layer_rows == 4 * len(LINEAR_ROWS):  # every one of a layer's four weights at every M
        print(f"a layer's four projections, M={B} over M=1: invariant {layer['inv', B] / layer['inv', 1]:.2f}, "
              f"cuBLAS {layer['cublas', B] / layer['cublas', 1]:.2f} (target ≤ 1.05)", flush=True)
    return rows


QUANT_ROWS = (1, 2, 4, 8, B)


def quantized_weights(n_out: int, n_in: int, dev: str, dt: torch.dtype):
    """Qwen3-8B-sized int4 (group 128, symmetric, scales in x's dtype: what `--quantize int4` writes), int8
    (per output channel, scales in x's dtype: what `--quantize int8` writes) and FP8 (Qwen's block-128
    `weight_scale_inv`, fp32) layouts of a random [n_out, n_in] weight."""
    from dflash_cli.quant import Fp8Linear, Int4Linear, Int8Linear

    g = 128 if n_in % 128 == 0 else n_in
    int4 = Int4Linear(torch.randint(-2**31, 2**31 - 1, (n_out, n_in // 8), dtype=torch.int32, device=dev),
                      (torch.rand(n_out, n_in // g, device=dev) * 0.01).to(dt), None, g, n_in)
    fp8 = Fp8Linear((torch.randn(n_out, n_in, device=dev) * 64).to(torch.float8_e4m3fn),
                    torch.rand(-(-n_out // 128), -(-n_in // 128), device=dev) * 1e-3, (128, 128))
    int8 = Int8Linear(torch.randint(-128, 128, (n_out, n_in), dtype=torch.int8, device=dev),
                      (torch.rand(n_out, 1, device=dev) * 4e-4).to(dt))
    return int4, int8, fp8


def quant_bytes(layer) -> int:
    """What a quantized kernel must read of its weight: the packed codes (or e4m3 bytes) and the scales
    (and zero points), once."""
    return sum(nbytes(t) for t in vars(layer).values() if isinstance(t, torch.Tensor))


def quant_linear_cases(dev: str, dt: torch.dtype, rows=(1, B), lm_head: bool = False):
    """The int4, int8 and FP8 batch-invariant kernels at each Qwen3-8B weight for M = `rows`, and the variants
    a checkpoint may bring (zero points with fp16 scales and act-order; int8 with fp16 or fp32 scales and a
    bias; FP8 per channel with bf16 scales and a bias; per tensor), for the compile check. The reference
    column dequantizes then runs F.linear."""
    from dflash_cli.kernels import quant_linear as ql
    from dflash_cli.quant import Fp8Linear, Int4Linear, Int8Linear

    def int4_call(layer, x):
        return lambda f: f(x, layer.qweight, layer.scales, layer.zeros, layer.group_size, layer.bias, layer.input_perm)

    def fp8_call(layer, x):
        return lambda f: f(x, layer.weight, layer.scale, layer.block, layer.bias)

    def int8_call(layer, x):
        return lambda f: f(x, layer.weight, layer.scale, layer.bias)

    for name, n_out, n_in in WEIGHTS[:None if lm_head else -1]:
        int4, int8, fp8 = quantized_weights(n_out, n_in, dev, dt)
        x = torch.randn(max(rows), n_in, dtype=dt, device=dev)
        for m in rows:
            out = m * n_out * x.element_size()
            yield (f"int4 g128 linear {name.split(' (')[0]} M={m}", ql.int4_linear, ql.int4_linear_ref,
                   int4_call(int4, x[:m]), quant_bytes(int4) + nbytes(x[:m]) + out)
            yield (f"int8 per-channel linear {name.split(' (')[0]} M={m}", ql.int8_linear, ql.int8_linear_ref,
                   int8_call(int8, x[:m]), quant_bytes(int8) + nbytes(x[:m]) + out)
            yield (f"fp8 block-128 linear {name.split(' (')[0]} M={m}", ql.fp8_linear, ql.fp8_linear_ref,
                   fp8_call(fp8, x[:m]), quant_bytes(fp8) + nbytes(x[:m]) + out)
    n, k, group = H, H, 128
    x = torch.randn(B, k, dtype=dt, device=dev)
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, device=dev)
    asym = Int4Linear.from_codes(codes, torch.rand(n, k // group, device=dev).half(),
                                 torch.randint(0, 16, (n, k // group), dtype=torch.uint8, device=dev), group,
                                 g_idx=torch.randperm(k, device=dev) % (k // group))
    yield ("int4 g128 asym act-order fp16 scales M=B", ql.int4_linear, ql.int4_linear_ref, int4_call(asym, x),
           quant_bytes(asym) + nbytes(x) + B * n * x.element_size())
    q8 = torch.randint(-128, 128, (n, k), dtype=torch.int8, device=dev)
    for label, scale_dtype in (("fp16 scales", torch.float16), ("fp32 scales, bias", torch.float32)):
        layer = Int8Linear(q8, (torch.rand(n, 1, device=dev) * 4e-4).to(scale_dtype),
                           torch.randn(n, device=dev).to(scale_dtype) if "bias" in label else None)
        yield (f"int8 {label} M=B", ql.int8_linear, ql.int8_linear_ref, int8_call(layer, x),
               quant_bytes(layer) + nbytes(x) + B * n * x.element_size())
    w = (torch.randn(n, k, device=dev) * 64).to(torch.float8_e4m3fn)
    per_channel = torch.rand(n, 1, device=dev).to(torch.bfloat16)
    for label, scale, block in (("per channel, bf16 scales, bias", per_channel, (1, k)),
                                ("per tensor", torch.rand(1, 1, device=dev), (n, k))):
        layer = Fp8Linear(w, scale, block, torch.randn(n, dtype=dt, device=dev) if "bias" in label else None)
        yield (f"fp8 {label} M=B", ql.fp8_linear, ql.fp8_linear_ref, fp8_call(layer, x),
               quant_bytes(layer) + nbytes(x) + B * n * x.element_size())


def quant_rows(dev: str, dt: torch.dtype, do_bench, copy_rate: float, scale: int = 1,
               deadline: float | None = None) -> list[dict]:
    """The int4 (group 128), int8 (per channel) and FP8 (block 128) batch-invariant kernels against the bf16
    ones (ours and cuBLAS's F.linear) at M = 1, 2, 4, 8, B for each Qwen3-8B weight: µs and GB/s, counted on
    the bytes each actually reads (packed weights + scales, the rows; the outputs written), and that as a
    share of copy bandwidth (the target: ≥ 80%). `scale` divides the weights' sides (a CPU rehearsal)."""
    import time

    import torch.nn.functional as F

    from dflash_cli.kernels.invariant_linear import invariant_linear
    from dflash_cli.kernels.quant_linear import fp8_linear, int4_linear, int8_linear

    print(f"| {'quantized linear':<24} | {'M':>2} | {'int4 µs':>8} | {'int4 GB/s':>9} | {'int4 % copy':>11} | "
          f"{'int8 µs':>8} | {'int8 GB/s':>9} | {'int8 % copy':>11} | "
          f"{'fp8 µs':>8} | {'fp8 GB/s':>8} | {'fp8 % copy':>10} | {'bf16 inv µs':>11} | {'cuBLAS µs':>9} |")
    print(f"|{'-' * 26}|{'-' * 4}|{'-' * 10}|{'-' * 11}|{'-' * 13}|{'-' * 10}|{'-' * 11}|{'-' * 13}|{'-' * 10}|"
          f"{'-' * 10}|{'-' * 12}|{'-' * 13}|{'-' * 11}|")
    rows = []
    for name, n_out, n_in in WEIGHTS[:-1]:  # the lm_head stays bf16 (issue 25: never quantized)
        if deadline is not None and time.perf_counter() > deadline:
            print(f"(quantized rows stopped at the budget before {name})", flush=True)
            break
        try:
            int4, int8, fp8 = quantized_weights(n_out // scale, n_in // scale, dev, dt)
            w = torch.randn(n_out // scale, n_in // scale, dtype=dt, device=dev) / 64
            x = torch.randn(max(QUANT_ROWS), n_in // scale, dtype=dt, device=dev)
            for m in QUANT_ROWS:
                xm, io = x[:m], nbytes(x[:m]) + m * w.shape[0] * x.element_size()
                t4 = do_bench(lambda: int4_linear(xm, int4.qweight, int4.scales, None, int4.group_size)) * 1e3
                ti = do_bench(lambda: int8_linear(xm, int8.weight, int8.scale)) * 1e3
                t8 = do_bench(lambda: fp8_linear(xm, fp8.weight, fp8.scale, fp8.block)) * 1e3
                tb = do_bench(lambda: invariant_linear(xm, w)) * 1e3
                tc = do_bench(lambda: F.linear(xm, w)) * 1e3
                r4, r8 = (quant_bytes(int4) + io) / (t4 * 1e-6), (quant_bytes(fp8) + io) / (t8 * 1e-6)
                ri = (quant_bytes(int8) + io) / (ti * 1e-6)
                rb = (nbytes(w) + io) / (tb * 1e-6)
                rows.append(dict(weight=name, m=m, int4_us=t4, int4_bytes_per_s=r4, int4_copy_share=r4 / copy_rate,
                                 int8_us=ti, int8_bytes_per_s=ri, int8_copy_share=ri / copy_rate, fp8_us=t8,
                                 fp8_bytes_per_s=r8, fp8_copy_share=r8 / copy_rate, bf16_invariant_us=tb,
                                 bf16_invariant_bytes_per_s=rb, cublas_us=tc))
                print(f"| {name.split(' (')[0]:<24} | {m:>2} | {t4:8.1f} | {r4 / 1e9:9.0f} | {100 * r4 / copy_rate:10.1f}% | "
                      f"{ti:8.1f} | {ri / 1e9:9.0f} | {100 * ri / copy_rate:10.1f}% | "
                      f"{t8:8.1f} | {r8 / 1e9:8.0f} | {100 * r8 / copy_rate:9.1f}% | {tb:11.1f} | {tc:9.1f} |", flush=True)
        except Exception as e:  # the next weight still runs
            print(f"| {name:<24} | n/a ({type(e).__name__}: {first_line(e)}) |", flush=True)
    return rows


def gemm_rows(dev: str, dt: torch.dtype, do_bench, copy_rate: float, scale: int = 1) -> list[dict]:
    """F.linear (cuBLAS) at M = 1 (a decode step) and M = B (a verify block) for each of Qwen3-8B's
    weight matrices: verify(B) can only cost about a decode step if the M = B GEMM reads its weight
    at the same rate (gpu-review.md finding 8). Prints each and the M = B over M = 1 time. `scale`
    divides the weights' sides (a CPU rehearsal)."""
    import torch.nn.functional as F

    print(f"| {'F.linear, Qwen3-8B weight':<32} | {'M=1 µs':>7} | {f'M={B} µs':>8} | {'ratio':>5} | {'% copy (M=1)':>12} |")
    print(f"|{'-' * 34}|{'-' * 9}|{'-' * 10}|{'-' * 7}|{'-' * 14}|")
    rows = []
    for name, n_out, n_in in WEIGHTS:
        try:
            w = torch.randn(n_out // scale, n_in // scale, dtype=dt, device=dev) / 64
            times = {m: do_bench(lambda m=m, x=torch.randn(m, n_in // scale, dtype=dt, device=dev): F.linear(x, w))
                     * 1e3 for m in (1, B)}
            rate = nbytes(w) / (times[1] * 1e-6)
            rows.append(dict(weight=name, m1_us=times[1], mb_us=times[B], ratio=times[B] / times[1],
                             copy_share_m1=rate / copy_rate))
            print(f"| {name:<32} | {times[1]:7.1f} | {times[B]:8.1f} | {times[B] / times[1]:5.2f} | "
                  f"{100 * rate / copy_rate:11.1f}% |", flush=True)
        except Exception as e:  # the next weight still runs
            print(f"| {name:<32} | n/a ({type(e).__name__}: {first_line(e)}) |", flush=True)
        finally:
            w = None
    return rows


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:120]


def cpu_bench(fn, return_mode: str = "median") -> float:
    """Milliseconds per call on a CPU (a rehearsal: Triton's do_bench needs a GPU), median of 3."""
    import time

    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[1]


def main() -> int:
    import argparse
    import json
    import time

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda, or cpu: a rehearsal (kernels in Triton's interpreter, "
                                                         "GEMMs at 1/16 of each side, timings meaningless)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds: print no further invariant_linear or kernel row once this much has passed "
                             "(the F.linear rows come first)")
    parser.add_argument("--json", default=None, help="write every row here")
    args = parser.parse_args()
    rehearsal = args.device == "cpu"
    if rehearsal:
        import os

        os.environ.setdefault("TRITON_INTERPRET", "1")
    elif not torch.cuda.is_available():
        print("benchmarks/kernel_speed.py needs a CUDA GPU; nothing measured (--device cpu rehearses)")
        return 0
    if rehearsal:
        bench, dev = cpu_bench, "cpu"
    else:
        from triton.testing import do_bench

        def bench(fn, return_mode: str = "median") -> float:  # ms; rep 20 ms (not 100): half the run
            return do_bench(fn, rep=20, return_mode=return_mode)

        dev = "cuda"
    started = time.perf_counter()
    torch.manual_seed(0)
    src = torch.empty((1 << 30) if not rehearsal else (1 << 24), dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    copy_rate = 2 * src.numel() / (bench(lambda: dst.copy_(src)) * 1e-3)  # bytes read + written per s
    del src, dst
    name = torch.cuda.get_device_name(0) if not rehearsal else "CPU (rehearsal)"
    print(f"{name} · copy {copy_rate / 1e9:.0f} GB/s · bf16 · Qwen3-8B shapes, B={B}, context {CTX}", flush=True)
    report = {"device": name, "copy_bytes_per_s": copy_rate, "gemm": [], "kernels": []}
    report["gemm"] = gemm_rows(dev, torch.bfloat16, bench, copy_rate, scale=16 if rehearsal else 1)
    try:
        report["invariant_linear"] = invariant_rows(dev, torch.bfloat16, bench, copy_rate, scale=16 if rehearsal else 1,
                                                    deadline=None if args.budget is None else started + args.budget)
    except Exception as e:  # the kernel rows still run
        print(f"invariant_linear rows: n/a ({type(e).__name__}: {first_line(e)})", flush=True)
    try:
        report["quant_linear"] = quant_rows(dev, torch.bfloat16, bench, copy_rate, scale=16 if rehearsal else 1,
                                            deadline=None if args.budget is None else started + args.budget)
    except Exception as e:  # the kernel rows still run
        print(f"quantized linear rows: n/a ({type(e).__name__}: {first_line(e)})", flush=True)
    try:
        print(check_grouped_mm(dev), flush=True)
    except Exception as e:
        print(f"grouped_mm layout check: n/a ({type(e).__name__}: {first_line(e)})", flush=True)
    print(f"| {'op':<40} | {'triton µs':>9} | {'torch µs':>9} | {'speedup':>7} | {'GB/s':>6} | {'% copy':>6} |")
    print(f"|{'-' * 42}|{'-' * 11}|{'-' * 11}|{'-' * 9}|{'-' * 8}|{'-' * 8}|")
    groups = [lambda: cases(dev, torch.bfloat16), lambda: hybrid_cases(dev, torch.bfloat16),
              lambda: moe_cases(dev, torch.bfloat16, grouped=True), lambda: gpt_oss_cases(dev, torch.bfloat16)]
    done, stopped = 0, False
    for group in groups:  # each family's inputs are built only when it is reached
        try:
            for name, kern, ref, call, moved in group():
                if args.budget is not None and time.perf_counter() - started > args.budget:
                    stopped = True
                    break
                try:
                    t_k = bench(lambda: call(kern), return_mode="median") * 1e3
                    t_r = bench(lambda: call(ref), return_mode="median") * 1e3
                    rate = moved / (t_k * 1e-6)
                    report["kernels"].append(dict(op=name, triton_us=t_k, torch_us=t_r, bytes_per_s=rate,
                                                  copy_share=rate / copy_rate))
                    print(f"| {name:<40} | {t_k:9.1f} | {t_r:9.1f} | {t_r / t_k:6.1f}× | {rate / 1e9:6.0f} | "
                          f"{100 * rate / copy_rate:5.1f}% |", flush=True)
                except Exception as e:  # one case's failure loses only its row
                    report["kernels"].append(dict(op=name, error=f"{type(e).__name__}: {first_line(e)}"))
                    print(f"| {name:<40} | n/a ({type(e).__name__}: {first_line(e)}) |", flush=True)
                done += 1
        except Exception as e:  # building a family's inputs failed: the next family still runs
            print(f"| (a family's inputs) n/a ({type(e).__name__}: {first_line(e)}) |", flush=True)
        if stopped:
            break
    if stopped:
        print(f"(stopped at the budget of {args.budget:.0f} s after {done} kernel rows; without --budget every row runs)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
