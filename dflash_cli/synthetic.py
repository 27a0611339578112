"""`dflash bench --synthetic SHAPE`: random weights at a released pair's real shapes, no download.

For checking a GPU: times each phase of an iteration at a realistic context length, compares the
decode step with the memory-bandwidth roofline (weight bytes over a measured device-to-device copy
rate), and projects tokens/s for an acceptance length τ. The projection is arithmetic on measured
step times, labelled as such; it is not a measurement of generation.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from . import ops
from .config import DrafterConfig, TargetConfig
from .drafter import DraftLayer, Drafter
from .engine import Engine
from .graphs import capture, graphs_enabled
from .errors import UsageError
from .sampling import Mode
from .target import Target, TargetLayer


def _target(vocab, hidden, inter, layers, heads, kv, head_dim, family="qwen3", theta=1e6, scaling=None):
    return TargetConfig(family, vocab, hidden, inter, layers, heads, kv, head_dim, 1e-6, theta, scaling, 40960, False)


def _drafter(t: TargetConfig, block, layer_ids, mask, layers=5, inter=None):
    return DrafterConfig(block, mask, tuple(layer_ids), t.vocab_size, t.hidden_size, inter or t.intermediate_size,
                         layers, t.num_heads, t.num_kv_heads, t.head_dim, 1e-6, t.rope_theta, None, (None,) * layers)


_LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 8192}
_Q8 = _target(151936, 4096, 12288, 36, 32, 8, 128)
_Q4 = _target(151936, 2560, 9728, 36, 32, 8, 128)
_L8 = _target(128256, 4096, 14336, 32, 32, 8, 128, family="llama", theta=500000.0, scaling=_LLAMA3)
_TINY = _target(512, 64, 128, 4, 4, 2, 16)

# shape name → (target, drafter, published τ or None). τ: DFlash's GSM8K figure at T=0 (DESIGN §4).
SHAPES: dict[str, tuple[TargetConfig, DrafterConfig, float | None]] = {
    "qwen3-8b": (_Q8, _drafter(_Q8, 16, (1, 9, 17, 25, 33), 151669), 6.55),
    "qwen3-4b": (_Q4, _drafter(_Q4, 16, (1, 9, 17, 25, 33), 151669), None),
    "llama3.1-8b": (_L8, _drafter(_L8, 10, (1, 8, 15, 22, 29), 128002), None),
    "tiny": (_TINY, _drafter(_TINY, 8, (1, 2), 511, layers=2), None),
}


def random_pair(name: str, dtype: torch.dtype, device: torch.device, positions: int) -> tuple[Target, Drafter]:
    t, d, _ = SHAPES[name]

    def w(*shape, scale=None):
        x = torch.randn(*shape, dtype=dtype, device=device)
        return x.mul_(scale if scale is not None else shape[-1] ** -0.5)

    def ones(n):
        return torch.ones(n, dtype=dtype, device=device)

    hd, q_rows, kv_rows = t.head_dim, t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
    layers = [TargetLayer(ones(t.hidden_size), w(q_rows + 2 * kv_rows, t.hidden_size), ones(hd), ones(hd),
                          w(t.hidden_size, q_rows), ones(t.hidden_size), w(2 * t.intermediate_size, t.hidden_size),
                          w(t.hidden_size, t.intermediate_size)) for _ in range(t.num_layers)]
    if t.family != "qwen3":
        for layer in layers:
            layer.q_norm = layer.k_norm = None
    embed = w(t.vocab_size, t.hidden_size, scale=1.0)
    target = Target(t, embed, layers, ones(t.hidden_size), w(t.vocab_size, t.hidden_size), positions)
    w_kv = w(d.num_layers * 2 * kv_rows, d.hidden_size)
    rows = 2 * kv_rows
    dlayers = [DraftLayer(ones(d.hidden_size), w(q_rows, d.hidden_size), w_kv[i * rows:(i + 1) * rows], ones(hd),
                          ones(hd), w(d.hidden_size, q_rows), ones(d.hidden_size), w(2 * d.intermediate_size, d.hidden_size),
                          w(d.hidden_size, d.intermediate_size), None) for i in range(d.num_layers)]
    drafter = Drafter(d, w(d.hidden_size, len(d.target_layer_ids) * d.hidden_size), ones(d.hidden_size),
                      ones(d.hidden_size), dlayers, w_kv, target.embed, target.lm_head, positions)
    return target, drafter


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_it(fn: Callable[[], object], device: torch.device, iters: int, warmup: int = 3) -> float:
    """Median seconds per call, synchronised around each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def graphed(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """`fn` captured as a CUDA graph and replayed per call, as the engine runs its step, so that a
    phase is timed without the launch overhead the engine does not pay; `fn` itself where graphs
    are off (CPU, DFLASH_CUDA_GRAPHS=0)."""
    if not graphs_enabled(device):
        return fn
    graph, _ = capture(fn)
    return graph.replay


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Bytes/s of a device-to-device copy (read + write counted), the practical roofline."""
    src = torch.empty(nbytes // 2, dtype=torch.float16, device=device)
    dst = torch.empty_like(src)
    seconds = time_it(lambda: dst.copy_(src), device, iters=10)
    return 2 * nbytes / seconds


def weight_bytes(target: Target) -> int:
    """Bytes one target forward reads: every layer, the final norm and the lm_head (not the embedding
    table: a forward reads only its rows)."""
    tensors = [target.norm, target.lm_head] + [t for layer in target.layers for t in vars(layer).values()
                                                 if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class SyntheticReport:
    shape: str
    device: str
    dtype: str
    context: int
    block_size: int
    decode_s: float
    verify_s: float
    draft_s: float
    accept_s: float
    iteration_s: float
    weight_bytes: int
    copy_bytes_per_s: float
    tau: float | None

    @property
    def host_overhead_s(self) -> float:
        return max(0.0, self.iteration_s - self.draft_s - self.verify_s - self.accept_s)

    @property
    def decode_bandwidth(self) -> float:
        return self.weight_bytes / self.decode_s

    @property
    def roofline_fraction(self) -> float:
        return self.decode_bandwidth / self.copy_bytes_per_s

    @property
    def projected_tps(self) -> float | None:
        return self.tau / self.iteration_s if self.tau else None

    def to_json(self) -> dict:
        out = dict(vars(self))
        out |= {"host_overhead_s": self.host_overhead_s, "decode_bandwidth": self.decode_bandwidth,
                "roofline_fraction": self.roofline_fraction, "projected_tps": self.projected_tps,
                "plain_tps": 1 / self.decode_s, "projection": "tau / iteration_s, from measured step times"}
        return out


def run_synthetic(shape: str, *, device: torch.device, dtype: torch.dtype, context: int = 1024,
                  block_size: int | None = None, tau: float | None = None, iters: int = 20) -> SyntheticReport:
    if shape not in SHAPES:
        raise UsageError(f"unknown synthetic shape '{shape}' (choose from {', '.join(SHAPES)})")
    target_cfg, drafter_cfg, published = SHAPES[shape]
    target, drafter = random_pair(shape, dtype, device, context + 2 * drafter_cfg.block_size + 1)
    b = block_size or drafter_cfg.block_size
    engine = Engine(target, drafter, block_size=b, max_context=context + b)
    plain = Engine(target, max_context=context + b)
    with torch.inference_mode():
        for e in (engine, plain):  # a context of `context` tokens in both caches
            e.target_cache.rollback(context)
            if e.draft_cache is not None:
                e.draft_cache.rollback(context)
        greedy = Mode(greedy=True)
        params = dict(mode=greedy, temperature=0.0, seed=0)
        bonus = torch.zeros(1, dtype=torch.int64, device=device)
        block = torch.zeros(b, dtype=torch.int64, device=device)
        logits = torch.randn(b, target_cfg.vocab_size, dtype=dtype, device=device)
        features = torch.randn(b, len(drafter_cfg.target_layer_ids) * target_cfg.hidden_size, dtype=dtype, device=device)

        def at_context(fn):
            def call():
                fn()
                for cache in (engine.target_cache, engine.draft_cache, plain.target_cache):
                    cache.rollback(context)
            return call

        # decode and iteration are whole engine iterations (their own graph, host readback, Python);
        # the phases are replayed as graphs of their own, so their sum leaves the host's share.
        def iterate(e: Engine):  # one whole iteration, read back before the next (no lookahead)
            runner = e.graphs.get(greedy, lambda: e._device_step(greedy), bonus)
            return lambda: (runner.launch(bonus), runner.result())

        decode = at_context(iterate(plain))
        verify = graphed(at_context(lambda: target.forward(block, engine.target_cache, logits_from=0,
                                                           feature_layers=drafter_cfg.target_layer_ids)), device)
        draft = graphed(at_context(lambda: (drafter.add_context(features, engine.draft_cache, count=b),
                                            drafter.draft(bonus, engine.draft_cache, b))), device)
        accept = graphed(at_context(lambda: ops.accept(logits, block, engine.target_cache.length, **params)), device)
        iteration = at_context(iterate(engine))
        report = SyntheticReport(
            shape=shape, device=str(device), dtype=str(dtype).removeprefix("torch."), context=context, block_size=b,
            decode_s=time_it(decode, device, iters), verify_s=time_it(verify, device, iters),
            draft_s=time_it(draft, device, iters), accept_s=time_it(accept, device, iters),
            iteration_s=time_it(iteration, device, iters), weight_bytes=weight_bytes(target),
            copy_bytes_per_s=copy_bandwidth(device, 1 << 30 if device.type == "cuda" else 1 << 27),
            tau=tau if tau is not None else published,
        )
    return report
