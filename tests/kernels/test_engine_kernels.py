"""The whole engine through the Triton kernels (interpreted on CPU) is still lossless."""
import pytest
import torch

from dflash_cli import loader
from dflash_cli.engine import Engine, Request
from dflash_cli.sampling import SamplingParams

from ..tiny import drafter_config, target_config, write_drafter, write_target
from .conftest import DEVICE


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("kernel-e2e")
    cfg = target_config("qwen3", layers=2, tie=False, hidden=64, heads=4, kv_heads=2, head_dim=16)
    return (write_target(d / "t", cfg, seed=21),
            write_drafter(d / "d", drafter_config(cfg, block_size=4, target_layer_ids=(0, 1))))


def _generate(model, block_size, sampling):
    engine = Engine(model.target, model.drafter if block_size > 1 else None, block_size=block_size if block_size > 1 else None)
    return [t for s in engine.generate(Request(list(range(5, 25)), 16, sampling=sampling)) for t in s.tokens]


@pytest.mark.parametrize("sampling", [SamplingParams(), SamplingParams(temperature=0.8, top_k=40, seed=3)],
                         ids=["greedy", "sampled"])
def test_speculative_output_through_kernels_equals_the_reference_path(pair, monkeypatch, sampling):
    model = loader.load(*pair, device=DEVICE)
    monkeypatch.setenv("DFLASH_KERNELS", "torch")
    plain_ref = _generate(model, 1, sampling)
    monkeypatch.setenv("DFLASH_KERNELS", "triton")
    assert _generate(model, 4, sampling) == plain_ref
    assert _generate(model, 1, sampling) == plain_ref
