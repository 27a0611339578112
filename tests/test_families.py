"""The family plug-in contract and the commit plan.

Every registered family declares a complete `Family` (nothing is probed for); no family code applies
a raw weight tensor (projections go through the `Linear` seam); a new family is one small file and one
registry row (shown with a throwaway family defined here, run end to end). Caches commit by a
`CommitPlan`: by count (chains), or by path (the verify rows of an accepted path, gathered into place),
on attention K/V and on the hybrid's recurrent state.
"""
from __future__ import annotations

import dataclasses
import inspect
import re
import sys
import types
from pathlib import Path

import pytest
import torch

from dflash_cli import loader, models
from dflash_cli.cache import Cache, CommitPlan, KVCache
from dflash_cli.engine import Engine, Request
from dflash_cli.models.base import Decoder, DecoderConfig, Family
from dflash_cli.sampling import SamplingParams

from .conftest import random_prompts
from .tiny import drafter_config, qwen35_config, target_config, write_drafter, write_qwen35, write_target

MODELS = Path(models.__file__).parent


@pytest.mark.parametrize("module", sorted(set(models.FAMILIES.values())))
def test_every_registered_family_declares_the_whole_protocol(module):
    family = models.family_named(module)
    assert isinstance(family, Family)
    assert set(family.model_types) == {t for t, m in models.FAMILIES.items() if m == module}
    assert issubclass(family.Config, DecoderConfig) and dataclasses.is_dataclass(family.Config)
    assert list(inspect.signature(family.Config.from_raw).parameters) == ["raw", "where"]
    for hook, params in (("weight_table", ["c", "layout"]), ("build", ["c", "w", "max_positions"]),
                         ("cache_bytes", ["c", "dtype", "block_size"])):
        assert list(inspect.signature(getattr(family, hook)).parameters)[:len(params)] == params, hook
    assert callable(family.layout_of) and callable(family.drafter_defaults)


def test_no_family_code_probes_or_applies_a_raw_weight():
    """Projections go through layers/linear.py (the seam a quantized kind plugs into); the loader reads
    family members, it never probes for them."""
    for path in [*MODELS.glob("*.py"), *(MODELS / "layers").glob("*.py")]:
        text = path.read_text()
        if path.name != "linear.py":
            assert "F.linear" not in text, path
        assert not re.search(r"\b(hasattr|getattr)\(\s*family", text), path
    assert "getattr(family" not in (MODELS.parent / "loader.py").read_text()
    assert "models.gpt_oss" not in (MODELS.parent / "config.py").read_text()


# ---- a new family: one file (this module), one registry row --------------------------------------------
TOY = '''
"""A toy family: Llama with q/k/v/o biases, sinks, and a sliding window on even layers."""
from dataclasses import dataclass
from dflash_cli.config import Fields
from dflash_cli.models import dense
from dflash_cli.models.base import Decoder, DecoderConfig, Family, head_weights, kv_cache_bytes, layer_norm_weights
from dflash_cli.models.layers.attention import Attention, attention_weights
from dflash_cli.models.layers.mlp import SwiGLU, mlp_weights

@dataclass(frozen=True)
class Config(DecoderConfig):
    sliding_window: int

    @classmethod
    def from_raw(cls, raw, where):
        f = Fields(raw, where)
        return cls(**DecoderConfig.shared(raw, f), sliding_window=f.req("sliding_window"))

    def window(self, i):
        return self.sliding_window if i % 2 == 0 else None

def weight_table(c, layout=None):
    table = head_weights(c)
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        table += layer_norm_weights(c, p) + attention_weights(p, c.hidden_size, c.num_heads, c.num_kv_heads,
                                                              c.head_dim, bias=True, sinks=True)
        table += mlp_weights(p + "mlp.", c.hidden_size, c.intermediate_size)
    return table

def build(c, w, max_positions):
    return Decoder(c, w, max_positions, norm_style="plain",
                   mixer=lambda i, p: Attention.take(w, p, c, slot=i, bias=True, window=c.window(i)),
                   mlp=lambda i, p: SwiGLU.take(w, p + "mlp."), cache=dense.kv_cache)

FAMILY = Family(("toy",), Config, weight_table, build, kv_cache_bytes)
'''


@pytest.fixture
def toy_family(monkeypatch):
    module = types.ModuleType("dflash_cli.models.toy")
    monkeypatch.setitem(sys.modules, "dflash_cli.models.toy", module)  # as if models/toy.py existed
    exec(compile(TOY, "toy.py", "exec"), module.__dict__)
    monkeypatch.setitem(models.FAMILIES, "toy", "toy")  # the registry row
    assert len(TOY.strip().splitlines()) < 50
    return module


def test_a_new_family_is_one_small_file_and_one_registry_row(toy_family, tmp_path):
    test_every_registered_family_declares_the_whole_protocol("toy")
    cfg = target_config("llama", layers=4) | {"model_type": "toy", "sliding_window": 6}
    t = write_target(tmp_path / "toy", cfg, seed=7)
    d = write_drafter(tmp_path / "toy-d", drafter_config(cfg, block_size=4, target_layer_ids=(0, 2)))
    m = loader.load(t, d, device="cpu", max_context=128)
    assert isinstance(m.target, Decoder) and m.target.layers[0].mixer.window == 6
    assert m.target.layers[1].mixer.window is None and m.target.layers[0].mixer.sinks is not None
    ids = torch.tensor(random_prompts(1, 500, seed=1, longest=30)[0] + [5, 6, 7, 8, 9, 10, 11, 12])
    one, _ = m.target.forward(ids, m.target.new_cache(64), logits_from=0, commit=True)
    cache, chunks = m.target.new_cache(64), []
    for part in ids.split(3):  # the window and the sinks hold across prefill chunks
        chunks.append(m.target.forward(part, cache, logits_from=0, commit=True)[0])
    torch.testing.assert_close(torch.cat(chunks), one, rtol=1e-4, atol=1e-4)
    for temperature in (0.0, 0.8):  # speculative decoding is lossless for it, as for every family
        outs = []
        for drafter, b in ((m.drafter, 4), (None, None)):
            engine = Engine(m.target, drafter, block_size=b, max_context=100)
            assert all(isinstance(c, Cache) and c.nbytes() > 0 for c in engine.caches)
            request = Request(ids.tolist(), 24, sampling=SamplingParams(temperature=temperature, seed=3))
            outs.append([t for s in engine.generate(request) for t in s.tokens])
        assert outs[0] == outs[1] and len(outs[0]) == 24


# ---- caches: commit by plan, snapshot, bytes, the batch axis --------------------------------------------
def test_a_kv_cache_commits_a_path_by_gathering_its_rows_into_place():
    cache = KVCache.allocate(2, 1, 3, 16, torch.float32, torch.device("cpu"))
    cache.rollback(5)
    rows = torch.arange(4 * 3, dtype=torch.float32).view(4, 3) + 100
    cache.k[:, 0, 5:9], cache.v[:, 0, 5:9] = rows, -rows
    before = cache.k[:, :, :5].clone()
    cache.commit(CommitPlan(torch.tensor(3), path=torch.tensor([0, 2, 3, 1])))
    assert int(cache.length) == 8
    torch.testing.assert_close(cache.k[:, 0, 5:8], rows[[0, 2, 3]].expand(2, 3, 3), rtol=0, atol=0)
    torch.testing.assert_close(cache.v[:, 0, 5:8], -rows[[0, 2, 3]].expand(2, 3, 3), rtol=0, atol=0)
    assert torch.equal(cache.k[:, :, :5], before)  # the committed prefix is untouched
    cache.commit(CommitPlan(2))  # a chain: the length moves, nothing is gathered
    assert int(cache.length) == 10 and cache.lengths.shape == (1,) and int(cache.lengths[0]) == 10


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory):
    cfg = qwen35_config(wrapper=False)
    d = tmp_path_factory.mktemp("hybrid")
    return loader.load(write_qwen35(d / "t", cfg, seed=11, slow_decay=True), None, device="cpu", max_context=128)


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    d = tmp_path_factory.mktemp("dense")
    return loader.load(write_target(d / "t", target_config("qwen3", tie=False)), None, device="cpu", max_context=128)


def _shuffle_verify_rows(cache, start: int, perm: torch.Tensor) -> None:
    """Reorder the last verify forward's rows as a tree verify might have laid them out: row i of the
    result is row perm[i] of the chain's (K/V past the length, and the recurrent records)."""
    kv = cache.kv
    n = perm.shape[0]
    kv.k[:, :, start:start + n] = kv.k[:, :, start + perm].clone()
    kv.v[:, :, start:start + n] = kv.v[:, :, start + perm].clone()
    rec = getattr(cache, "rec", None)
    for r in () if rec is None else (rec.rec_x, rec.rec_k, rec.rec_v, rec.rec_g, rec.rec_beta):
        r[:, :n] = r[:, perm].clone()


@pytest.mark.parametrize("family", ["dense", "hybrid"])
@pytest.mark.parametrize("accepted", [0, 3, 7])
def test_commit_by_path_equals_commit_by_count_of_the_same_rows(request, family, accepted):
    """Verify a block of 8, lay its rows out shuffled, commit by the path that reads them back in order:
    the caches (K/V, recurrent states, conv windows) and the next logits equal a chain's commit."""
    model = request.getfixturevalue(family).target
    g = torch.Generator().manual_seed(accepted)
    prompt, block = torch.randint(0, 500, (13,), generator=g), torch.randint(0, 500, (8,), generator=g)
    perm = torch.randperm(8, generator=g)
    caches = []
    for by_path in (False, True):
        cache = model.new_cache(64, 8)
        model.forward(prompt, cache, commit=True)
        model.forward(block, cache, logits_from=0)
        if by_path:
            _shuffle_verify_rows(cache, len(prompt), perm)
            cache.commit(CommitPlan(torch.tensor(accepted + 1), path=torch.argsort(perm)))
        else:
            cache.commit(CommitPlan(torch.tensor(accepted + 1)))
        caches.append(cache)
    chain, path = caches
    n = len(prompt) + accepted + 1
    assert int(chain.length) == int(path.length) == n
    assert torch.equal(chain.kv.k[:, :, :n], path.kv.k[:, :, :n])
    assert torch.equal(chain.kv.v[:, :, :n], path.kv.v[:, :, :n])
    if family == "hybrid":
        assert torch.equal(chain.state, path.state) and torch.equal(chain.conv, path.conv)
    nxt = torch.randint(0, 500, (3,), generator=g)
    want, _ = model.forward(nxt, chain, logits_from=0, commit=True)
    got, _ = model.forward(nxt, path, logits_from=0, commit=True)
    assert torch.equal(got, want)


@pytest.mark.parametrize("family", ["dense", "hybrid"])
def test_caches_report_their_bytes_as_the_memory_plan_counts_them(request, family):
    m = request.getfixturevalue(family)
    fam = models.family_of({"model_type": "qwen3" if family == "dense" else "qwen3_5_text"}, Path("."))
    per_token, fixed = fam.cache_bytes(m.target.cfg, m.target.dtype, 8)
    cache = m.target.new_cache(64, 8)
    assert isinstance(cache, Cache)
    live = cache.kv.nbytes() + (0 if family == "dense" else cache.rec.nbytes())
    # fixed counts the live state three times (the prefix snapshot, a capture's copy) and the record once
    assert live <= 64 * per_token + fixed and cache.kv.nbytes() == 64 * per_token
    snap = cache.snapshot()
    m.target.forward(torch.tensor([5, 6, 7]), cache, commit=True)
    cache.restore(snap)
    assert int(cache.length) == 0 and cache.lengths.shape == (1,)
