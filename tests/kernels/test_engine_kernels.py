"""The whole engine through the Triton kernels (interpreted on CPU) is still lossless.

A tiny Qwen3 target and block-4 drafter (the interpreter runs a few programs per millisecond):
the speculative tokens through every kernel equal the tokens of the torch-reference path.
"""
import pytest
import torch

from dflash_cli import loader
from dflash_cli.engine import Engine, Request
from dflash_cli.sampling import SamplingParams

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
    assert _generate(model, 4, SamplingParams(), 16) == reference
    assert _generate(model, 1, SamplingParams(), 16) == reference  # the decode-shaped kernels too


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
    layers through the zero-centred, partial-rotary q/k norm kernel: the tokens of the torch path, and a
    device step without host reads (what a CUDA graph captures)."""
    model = loader.load(*hybrid_pair, device=DEVICE, dtype="float32")
    monkeypatch.setenv("DFLASH_KERNELS", "torch")
    reference = _generate(model, 4, SamplingParams(), 12)
    assert reference == _generate(model, 1, SamplingParams(), 12)
    monkeypatch.setenv("DFLASH_KERNELS", "triton")
    assert _generate(model, 4, SamplingParams(), 12) == reference
    engine = Engine(model.target, model.drafter)
    steps = engine.generate(Request(PROMPT, 16))
    next(steps)
    with torch.inference_mode(), HostReads() as reads:
        engine._device_step(SamplingParams().mode)(torch.tensor([7], device=DEVICE))
    assert reads.seen == []


@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU the engine captures real graphs (benchmarks/gpu_check.py)")
def test_the_kernels_captured_and_replayed_give_the_reference_tokens(pair, monkeypatch):
    """The GPU's own configuration, end to end on the CPU: the Triton kernels (interpreted) captured as a
    graph by the checked stand-in for torch.cuda (tests/fake_cuda.py: a host read or an upload inside the
    capture fails it), then replayed with lookahead; the tokens of the torch reference path."""
    from ..fake_cuda import stand_in

    model = loader.load(*pair, device=DEVICE, dtype="float32")
    monkeypatch.setenv("DFLASH_KERNELS", "torch")
    reference = _generate(model, 4, SamplingParams(), 16)
    with stand_in(kernels="triton") as gpu:  # DFLASH_KERNELS unset inside: the GPU branch picks the kernels
        on_gpu = loader.load(*pair, device="cuda", dtype="float32")
        engine = Engine(on_gpu.target, on_gpu.drafter, block_size=4)
        assert engine.graphs.enabled and engine.lookahead
        got = [t for s in engine.generate(Request(PROMPT, 16)) for t in s.tokens]
    assert got == reference
    assert gpu.captures == 1 and gpu.replays >= 16 // 4 and engine.graphs.enabled  # no fallback to eager
