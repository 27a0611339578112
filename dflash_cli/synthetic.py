"""`dflash bench --synthetic SHAPE`: random weights at a released pair's real shapes, no download.

For checking a GPU: times each phase of an iteration at a realistic context length, compares the
decode step with the memory-bandwidth roofline (weight bytes over a measured device-to-device copy
rate), and projects tokens/s for an acceptance length τ. The projection is arithmetic on measured
step times, labelled as such; it is not a measurement of generation. Each shape is a released
config.json, read by its model family like a real checkpoint; the weights come from the family's
weight table, drawn on the device.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import drafter as drafter_module
from . import ops
from .config import DrafterConfig
from .drafter import Drafter
from .engine import Engine, cache_slack
from .errors import DflashError, UsageError
from .graphs import capture, graphs_enabled
from .memory import GiB, needs_for, workspace_bytes
from .models import family_of
from .models.weights import random_weights
from .sampling import Mode

_QWEN3 = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", head_dim=128, num_attention_heads=32,
              num_key_value_heads=8, rms_norm_eps=1e-6, rope_theta=1000000, max_position_embeddings=40960,
              vocab_size=151936)
_LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 8192}
TARGETS = {
    "qwen3-8b": _QWEN3 | dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, tie_word_embeddings=False),
    "qwen3-4b": _QWEN3 | dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, tie_word_embeddings=True),
    "llama3.1-8b": dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096,
                        intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                        head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=_LLAMA3,
                        max_position_embeddings=131072, vocab_size=128256, tie_word_embeddings=False),
    "tiny": dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_size=64, intermediate_size=128,
                 num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
                 rope_theta=1e6, max_position_embeddings=40960, vocab_size=512, tie_word_embeddings=False),
}


def _drafter(target: dict, block: int, layer_ids, mask: int, layers: int = 5, **extra) -> dict:
    """A released drafter's config.json for `target` (DESIGN §2): a Qwen3 config plus dflash_config."""
    keys = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
            "rms_norm_eps", "rope_theta", "rope_scaling", "vocab_size", "max_position_embeddings")
    return {k: target[k] for k in keys if k in target} | dict(
        architectures=["DFlashDraftModel"], model_type="qwen3", num_hidden_layers=layers,
        num_target_layers=target["num_hidden_layers"],
        dflash_config=dict(block_size=block, mask_token_id=mask, target_layer_ids=list(layer_ids))) | extra


# shape name → (target config.json, drafter config.json, published τ or None). τ: DFlash's GSM8K figure at T=0 (DESIGN §4).
SHAPES: dict[str, tuple[dict, dict, float | None]] = {
    "qwen3-8b": (TARGETS["qwen3-8b"], _drafter(TARGETS["qwen3-8b"], 16, (1, 9, 17, 25, 33), 151669), 6.55),
    "qwen3-4b": (TARGETS["qwen3-4b"], _drafter(TARGETS["qwen3-4b"], 16, (1, 9, 17, 25, 33), 151669), None),
    "llama3.1-8b": (TARGETS["llama3.1-8b"], _drafter(TARGETS["llama3.1-8b"], 10, (1, 8, 15, 22, 29), 128002), None),
    "tiny": (TARGETS["tiny"], _drafter(TARGETS["tiny"], 8, (1, 2), 511, layers=2), None),
}


def configs(name: str):
    """(family module, target Config, DrafterConfig, published τ) of a synthetic shape."""
    if name not in SHAPES:
        raise UsageError(f"unknown synthetic shape '{name}' (choose from {', '.join(SHAPES)})")
    raw_target, raw_drafter, tau = SHAPES[name]
    where = Path(f"<synthetic {name}>")
    family = family_of(raw_target, where)
    return family, family.Config.from_raw(raw_target, where), DrafterConfig.from_raw(raw_drafter, where), tau


def random_pair(name: str, dtype: torch.dtype, device: torch.device, positions: int):
    """A target and drafter of shape `name` with random weights (the families' tables, on `device`)."""
    family, t, d, _ = configs(name)
    target = family.Model(t, random_weights(family.weight_table(t), dtype=dtype, device=device), positions)
    w = random_weights(drafter_module.weight_table(d), seed=1, dtype=dtype, device=device)
    return target, Drafter.from_weights(d, w, target.embed, target.lm_head, positions)


def host_memory() -> int:
    """Bytes of memory the system can still give this process (Linux: available pages)."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 1 << 62  # unknown: let the allocator decide


def check_memory(name: str, dtype: torch.dtype, device: torch.device, context: int, block: int) -> None:
    """Refuse, with the numbers, a shape that does not fit where it would be built."""
    family, t, d, _ = configs(name)
    needs = needs_for(family, t, d, dtype, block, cache_slack(block))
    need = needs.total(context) - workspace_bytes(t, block) + workspace_bytes(t, block, prefill_chunk=1)
    if device.type == "cuda":
        free, where = torch.cuda.mem_get_info(device)[0], "on the GPU"
    else:
        free, where = host_memory(), "in host memory"
    if need > free:
        raise DflashError(f"synthetic {name} in {str(dtype).removeprefix('torch.')} needs {need / GiB:.1f} GiB {where} "
                          f"(weights {needs.weights / GiB:.1f} GiB); {free / GiB:.1f} GiB is free"
                          + (": it is meant for a GPU (try the shape 'tiny' here)" if device.type != "cuda" else ""))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_it(fn: Callable[[], object], device: torch.device, iters: int, warmup: int = 3) -> float:
    """Median seconds per call of the whole call, host included: synchronised around each call."""
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


def device_time(fn: Callable[[], object], device: torch.device, iters: int, warmup: int = 3) -> float:
    """Seconds of device time per call: on CUDA, events around `iters` calls queued back to back (no
    host sync between them, so host time hides behind the GPU's); on a CPU, `time_it`."""
    if device.type != "cuda":
        return time_it(fn, device, iters, warmup)
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    _sync(device)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


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
    seconds = device_time(lambda: dst.copy_(src), device, iters=20)
    return 2 * nbytes / seconds


def weight_bytes(name: str, dtype: torch.dtype) -> int:
    """Bytes one target forward reads: every weight but the embedding table (a forward reads only its
    rows), and the lm_head, which is the embedding when tied."""
    from .models.weights import table_bytes

    family, t, _, _ = configs(name)
    table = family.weight_table(t)
    tied = not any(w.name == "lm_head.weight" for w in table)
    return table_bytes([w for w in table if w.init != "embed" or tied], dtype)


@dataclass
class SyntheticReport:
    shape: str
    device: str
    dtype: str
    context: int
    block_size: int
    decode_s: float  # one plain-decoding iteration, whole (device work, readback, host), synced
    verify_s: float  # device time of each phase, replayed as graphs of their own
    draft_s: float
    accept_s: float
    iteration_s: float  # one DFlash iteration, whole, synced (read back before the next is launched)
    step_device_s: float  # device time of that iteration's captured step, back to back
    weight_bytes: int
    copy_bytes_per_s: float
    tau: float | None
    decode_device_s: float = 0.0  # device time of the plain-decoding step
    # The auto engine's cost curve: one iteration at each candidate block size, as the engine measures it.
    iteration_by_block: dict[int, float] = field(default_factory=dict)

    @property
    def break_even(self) -> dict[int, float]:
        """τ at which each block size commits tokens as fast as b = 1 (the same engine at b = 1)."""
        one = self.iteration_by_block.get(1)
        return {b: s / one for b, s in self.iteration_by_block.items()} if one else {}

    @property
    def host_overhead_s(self) -> float:
        """What one iteration costs beyond its device work: launch, readback, Python (measured as the
        synced iteration minus the device time of its step; lookahead hides most of it)."""
        return max(0.0, self.iteration_s - self.step_device_s)

    @property
    def decode_bandwidth(self) -> float:
        return self.weight_bytes / (self.decode_device_s or self.decode_s)

    @property
    def roofline_fraction(self) -> float:
        return self.decode_bandwidth / self.copy_bytes_per_s

    @property
    def projected_tps(self) -> float | None:
        return self.tau / self.iteration_s if self.tau else None

    def to_json(self) -> dict:
        out = dict(vars(self))
        out["iteration_by_block"] = {str(b): t for b, t in self.iteration_by_block.items()}
        out |= {"break_even_tau": {str(b): t for b, t in self.break_even.items()}, "host_overhead_s": self.host_overhead_s, "decode_bandwidth": self.decode_bandwidth,
                "roofline_fraction": self.roofline_fraction, "projected_tps": self.projected_tps,
                "plain_tps": 1 / self.decode_s, "projection": "tau / iteration_s, from measured step times"}
        return out


def run_synthetic(shape: str, *, device: torch.device, dtype: torch.dtype, context: int = 1024,
                  block_size: int | None = None, tau: float | None = None, iters: int = 20) -> SyntheticReport:
    family, target_cfg, drafter_cfg, published = configs(shape)
    b = block_size or drafter_cfg.block_size
    if not 2 <= b <= drafter_cfg.block_size:
        raise UsageError(f"--block-size must be between 2 and the drafter's {drafter_cfg.block_size}, got {b}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    check_memory(shape, dtype, device, context + b, drafter_cfg.block_size)
    target, drafter = random_pair(shape, dtype, device, context + b + 2 * drafter_cfg.block_size + 1)
    engine = Engine(target, drafter, block_size=b, max_context=context + b, adaptive=True)  # its cost curve too
    plain = Engine(target, max_context=context + b)
    with torch.inference_mode():
        for e in (engine, plain):  # a context of `context` tokens in both caches
            e.target_cache.rollback(context)
            if e.draft_cache is not None:
                e.draft_cache.rollback(context)
        caches = (engine.target_cache, engine.draft_cache, plain.target_cache)
        saved = [c.snapshot() for c in caches]
        greedy = Mode(greedy=True)
        params = dict(mode=greedy, temperature=0.0, seed=0)
        bonus = torch.zeros(1, dtype=torch.int64, device=device)
        block = torch.zeros(b, dtype=torch.int64, device=device)
        logits = torch.randn(b, target_cfg.vocab_size, dtype=dtype, device=device)
        features = torch.randn(b, len(drafter_cfg.target_layer_ids) * target_cfg.hidden_size, dtype=dtype, device=device)

        def at_context(fn):  # every timed call starts from the same caches
            def call():
                fn()
                for cache, snap in zip(caches, saved):
                    cache.restore(snap)
            return call

        # decode and iteration are whole engine iterations (their own graph, host readback, Python);
        # the phases are replayed as graphs of their own and timed on the device.
        def runner(e: Engine):
            return e.graphs.get(greedy, lambda: e._device_step(greedy), bonus)

        def iterate(e: Engine):  # one whole iteration, read back before the next (no lookahead)
            r = runner(e)
            return at_context(lambda: (r.launch(bonus), r.result()))

        def step_only(e: Engine):  # the captured step alone (eager on a CPU)
            r = runner(e)
            return at_context(lambda: r.run(bonus))

        verify = graphed(at_context(lambda: target.forward(block, engine.target_cache, logits_from=0,
                                                           feature_layers=drafter_cfg.target_layer_ids)), device)
        draft = graphed(at_context(lambda: (drafter.add_context(features, engine.draft_cache, count=b),
                                            drafter.draft(bonus, engine.draft_cache, b))), device)
        accept = graphed(at_context(lambda: ops.accept(logits, block, engine.target_cache.length, **params)), device)
        report = SyntheticReport(
            shape=shape, device=str(device), dtype=str(dtype).removeprefix("torch."), context=context, block_size=b,
            decode_s=time_it(iterate(plain), device, iters), verify_s=device_time(verify, device, iters),
            draft_s=device_time(draft, device, iters), accept_s=device_time(accept, device, iters),
            iteration_s=time_it(iterate(engine), device, iters),
            step_device_s=device_time(step_only(engine), device, iters),
            decode_device_s=device_time(step_only(plain), device, iters),
            weight_bytes=weight_bytes(shape, dtype),
            copy_bytes_per_s=copy_bandwidth(device, 1 << 30 if device.type == "cuda" else 1 << 27),
            tau=tau if tau is not None else published,
            iteration_by_block=engine.measure(greedy, bonus),
        )
    return report
