"""Launches at a released target's real widths (issue 26): the tiny models never reduce a weight in K
slices, a released one does (kernels/invariant_linear.splits), so the counter also runs the invariant
linear launcher on each of a released layer's weights at its real N × K (meta tensors, launches counted
and not run). With the merge folded into the split launch, every projection is one launch at any width."""
from __future__ import annotations

import os

import pytest

from .launch_count import real_projections, real_width_extra

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="counts interpreted Triton launches (TRITON_INTERPRET=1, set on a CPU)")


def test_qwen3_8b_layer_at_its_real_widths():
    """The projections as the model holds them (q/k/v and gate_up stacked): q/k/v, o and down are reduced
    in slices at Qwen3-8B's widths, and each is still one launch; the two-launch form would add a merge
    launch for each (what the count would have seen before the fold)."""
    got = {p.name: p for p in real_projections("qwen3-8b", "dense")}
    assert {name: (p.n, p.k) for name, p in got.items()} == {
        "mixer.qkv": (6144, 4096), "mixer.o_proj": (4096, 4096), "mlp.gate_up": (24576, 4096),
        "mlp.down": (4096, 12288)}
    assert {name for name, p in got.items() if p.splits > 1} == {"mixer.qkv", "mixer.o_proj", "mlp.down"}
    assert all(p.launches["last"] == 1 for p in got.values())
    assert all(p.launches["launch"] == 1 + (p.splits > 1) for p in got.values())
    assert real_width_extra("dense", "dense")[0] == 0
    assert real_width_extra("dense", "dense", merge="launch")[0] == 3


@pytest.mark.parametrize("family,kind,attention", [("hybrid", "linear", "mixer.in_proj"),
                                                  ("hybrid", "full", "mixer.qkv"),
                                                  ("gpt-oss", "gpt-oss full", "mixer.qkv")])
def test_each_kind_is_counted_on_a_layer_of_that_kind(family, kind, attention):
    extra, projections = real_width_extra(family, kind)
    assert attention in {p.name for p in projections} and extra == 0
