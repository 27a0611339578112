"""The whole engine through the Triton kernels (interpreted on CPU) is still lossless.

A tiny Qwen3 target and block-4 drafter (the interpreter runs a few programs per millisecond):
the speculative tokens through every kernel equal the tokens of the torch-reference path, and so do
the kernels captured as a graph and replayed with lookahead, as a GPU runs them (on a CPU through the
checked stand-in for torch.cuda, tests/fake_cuda.py, which refuses a host read inside the capture).
"""
import contextlib

import pytest
import torch

from dflash_cli import loader
from dflash_cli.engine import Engine, Request
from dflash_cli.sampling import SamplingParams

from ..fake_cuda import stand_in
from ..host_reads import HostReads
from ..tiny import drafter_config, target_config, write_drafter, write_target
from .conftest import DEVICE

PROMPT = list(range(5, 25))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("kernel-e2e")
    cfg = target_config("qwen3", layers=2, tie=False, hidden=64, heads=4, kv_heads=2, head_dim=16)
    return (write_target(d / "t", cfg, seed=21),
            write_drafter(d / "d", drafter_config(cfg, block_size=4, target_layer_ids=(0, 1))))


@contextlib.contextmanager
def on_the_gpu(pair):
    """The pair loaded on the GPU (its branch of the engine: kernels, captured graphs, lookahead), and the
    stand-in for torch.cuda where the GPU is played by the CPU (None on a real one)."""
    if DEVICE == "cuda":
        yield loader.load(*pair, device="cuda", dtype="float32"), None
        return
    with stand_in(kernels="triton") as fake:
        yield loader.load(*pair, device="cuda", dtype="float32"), fake


def _generate(model, block_size: int, sampling: SamplingParams, new_tokens: int) -> list[int]:
    spec = block_size > 1
    engine = Engine(model.target, model.drafter if spec else None, block_size=block_size if spec else None)
    return [t for s in engine.generate(Request(PROMPT, new_tokens, sampling=sampling)) for t in s.tokens]


def test_greedy_speculative_tokens_through_kernels_equal_the_reference_path(pair, monkeypatch):
    model = loader.load(*pair, device=DEVICE, dtype="float32")  # fp32: paths that round alike (DESIGN §1)
    monkeypatch.setenv("DFLASH_KERNELS", "torch")
    reference = _generate(model, 4, SamplingParams(), 16)
    assert reference == _generate(model, 1, SamplingParams(), 16)
    monkeypatch.setenv("DFLASH_KERNELS", "triton")
    assert _generate(model, 1, SamplingParams(), 16) == reference  # the decode-shaped kernels, eagerly
    with on_the_gpu(pair) as (gpu_model, fake):  # the kernels captured once, then replayed with lookahead
        engine = Engine(gpu_model.target, gpu_model.drafter, block_size=4)
        assert engine.graphs.enabled and engine.lookahead
        assert [t for s in engine.generate(Request(PROMPT, 16)) for t in s.tokens] == reference
        assert engine.graphs.enabled  # no capture failed back to eager
    if fake is not None:
        assert fake.captures == 1 and fake.replays >= 16 // 4


def test_seeded_sampled_tokens_through_kernels_equal_the_reference_path(pair, monkeypatch):
    """Same seed, same tokens: the kernel sampler draws the reference's draws, keyed by position."""
    model = loader.load(*pair, device=DEVICE, dtype="float32")  # fp32: paths that round alike (DESIGN §1)
    sampling = SamplingParams(temperature=0.8, top_k=40, top_p=0.95, seed=3)
    monkeypatch.setenv("DFLASH_KERNELS", "torch")
    reference = _generate(model, 1, sampling, 8)
    monkeypatch.setenv("DFLASH_KERNELS", "triton")
    assert _generate(model, 4, sampling, 8) == reference


@pytest.mark.parametrize("sampling", [SamplingParams(), SamplingParams(temperature=0.8, top_p=0.9, seed=5)],
                         ids=["greedy", "sampled"])
def test_the_device_step_through_kernels_never_reads_back_to_the_host(pair, monkeypatch, sampling):
    """What a CUDA graph captures (tests/test_graph_safety.py checks the engine's glue on the torch path)."""
    monkeypatch.setenv("DFLASH_KERNELS", "triton")
    model = loader.load(*pair, device=DEVICE, dtype="float32")  # fp32: paths that round alike (DESIGN §1)
    engine = Engine(model.target, model.drafter)
    steps = engine.generate(Request(PROMPT, 16, sampling=sampling))
    next(steps)  # the prefill runs eagerly
    step = engine._device_step(sampling.mode)
    with torch.inference_mode(), HostReads() as reads:
        packed, _ = step(torch.tensor([7], device=DEVICE))
    assert reads.seen == [] and packed.shape == (1 + 2 * engine.block_size,)


@pytest.fixture(scope="module")
def hybrid_pair(tmp_path_factory):
    from ..tiny import qwen35_config, write_qwen35

    d = tmp_path_factory.mktemp("kernel-e2e-hybrid")
    cfg = qwen35_config()
    return (write_qwen35(d / "t", cfg, seed=21, slow_decay=True),
            write_drafter(d / "d", drafter_config(cfg["text_config"], block_size=4, target_layer_ids=(1, 3),
                                                  mask_token_id=500)))


def test_the_hybrid_through_kernels_gives_the_reference_tokens_and_never_reads_back(hybrid_pair, monkeypatch):
    """Qwen3.5's linear layers through fla-core's recurrent kernel and our conv/commit kernels, its full
    layers through the zero-centred, partial-rotary q/k norm kernel, captured as a graph and replayed
    (the masked replay of the recurrent state included): the tokens of the torch path, and a device step
    without host reads."""
    model = loader.load(*hybrid_pair, device=DEVICE, dtype="float32")
    monkeypatch.setenv("DFLASH_KERNELS", "torch")
    reference = _generate(model, 4, SamplingParams(), 12)
    assert reference == _generate(model, 1, SamplingParams(), 12)
    monkeypatch.setenv("DFLASH_KERNELS", "triton")
    with on_the_gpu(hybrid_pair) as (gpu_model, fake):  # fla's kernels and ours, captured and replayed
        engine = Engine(gpu_model.target, gpu_model.drafter, block_size=4)
        assert [t for s in engine.generate(Request(PROMPT, 12)) for t in s.tokens] == reference
        assert engine.graphs.enabled  # no capture failed back to eager
    assert fake is None or fake.captures == 1
    engine = Engine(model.target, model.drafter)
    steps = engine.generate(Request(PROMPT, 16))
    next(steps)
    with torch.inference_mode(), HostReads() as reads:
        engine._device_step(SamplingParams().mode)(torch.tensor([7], device=DEVICE))
    assert reads.seen == []

