"""Settings in chat and run share one set of limits; a bad value is one line and loses nothing;
a temperature too small to sample at is greedy decoding, in the sampler itself."""
from __future__ import annotations

import pytest
import torch

from dflash_cli import loader, ops, registry
from dflash_cli.chat import ChatSession
from dflash_cli.engine import Engine
from dflash_cli.errors import UsageError
from dflash_cli.sampling import KINDS, DeviceSampling, SamplingParams


@pytest.fixture
def demo_session():
    m = loader.load(*registry.demo_dirs(), device="cpu")
    return ChatSession(m, Engine(m.target, m.drafter, max_context=m.max_context), max_tokens=16)


BAD = [
    ("top_k", "99999999999999999999"), ("top_k", "9223372036854775808"), ("top_k", "-1"), ("top_k", "1e3"),
    ("temperature", "1e39"), ("temperature", "nan"), ("temperature", "-inf"), ("temperature", "x"),
    ("top_p", "0"), ("top_p", "1e-50"), ("top_p", "1.5"), ("top_p", "nan"), ("min_p", "1"), ("min_p", "-0.1"), ("min_p", "nan"),
    ("max_tokens", "0"), ("max_tokens", "1.5"), ("seed", "1.5"), ("seed", "many"),
]


def test_every_setting_has_bad_values_here():
    assert {name for name, _ in BAD} == set(KINDS)


@pytest.mark.parametrize("name, value", BAD)
def test_a_bad_setting_is_one_line_and_the_chat_goes_on(demo_session, name, value):
    s = demo_session
    first = "".join(c.text for c in s.ask("Once upon a time"))
    before = (s.sampling, s.max_tokens, list(s.messages))
    with pytest.raises(UsageError) as e:
        s.command(f"/set {name} {value}")
    assert str(e.value).startswith(f"/set {name}: ") and "\n" not in str(e.value)
    assert (s.sampling, s.max_tokens, s.messages) == before
    second = "".join(c.text for c in s.ask("The dog"))
    assert first and second and len(s.messages) == 4


def test_huge_but_valid_settings_answer(demo_session):
    s = demo_session
    for line in ("/set temperature 0.8", "/set top_k 2147483647", "/set seed 99999999999999999999999",
                 "/set max_tokens 99999999999999999999"):
        s.command(line)
    assert "".join(c.text for c in s.ask("Once upon a time"))


@pytest.mark.parametrize("temperature", [1e-45, 1e-40, 1e-38, 5e-38, 1e-30])
def test_the_sampler_is_greedy_below_a_temperature_it_could_sample_at(temperature):
    """The engine's path: the values as device scalars, the mode they select, ops.sample."""
    logits = torch.randn(6, 512, generator=torch.Generator().manual_seed(0)) * 8
    rows = torch.arange(6)
    device = DeviceSampling(torch.device("cpu"))
    for params in (SamplingParams(temperature, seed=1), SamplingParams(temperature, top_k=40, top_p=0.9, seed=1)):
        mode = device.load(params)
        assert params.greedy and mode.greedy
        assert torch.equal(ops.sample(logits, rows, **device.kernel_args(mode)), logits.argmax(-1))


def test_a_temperature_that_samples_still_samples():
    params = SamplingParams(1e-3, seed=1)
    assert not params.greedy and not params.mode.greedy
