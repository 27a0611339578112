"""A tree verify on the kernel path (issue 28): the attention kernel takes the tree (kernels/attention.py), so
with the batch-invariant linear layers (DFLASH_KERNELS=triton, DFLASH_LINEAR=invariant) every node's logits
are, bit for bit, those of decoding its own path token by token, in fp32 and in bf16 (Triton's interpreter on
a CPU). tests/test_tree.py checks the same on the torch path, to a tolerance; the fast tier's check of the kernel
is tests/kernels/test_attention_tree.py."""
from __future__ import annotations

import pytest
import torch

from dflash_cli import loader, tree as trees

from .kernels.conftest import DEVICE
from .test_bf16_exact import TARGETS


@pytest.fixture
def exact_path(monkeypatch):
    monkeypatch.setenv("DFLASH_KERNELS", "triton")
    monkeypatch.setenv("DFLASH_LINEAR", "invariant")


def _path(tree: trees.Tree, i: int) -> list[int]:
    nodes = [i]
    while nodes[-1] != 0:
        nodes.append(int(tree.parents[nodes[-1]]))
    return nodes[::-1]


def node_and_path_logits(target, budget: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(each node's logits from one tree verify, the same nodes' logits from decoding their paths)."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, 256, (11,), generator=g)
    logits = torch.full((4, target.cfg.vocab_size), -1e9)
    logits[:, 3:6] = torch.randn(4, 3, generator=g)  # three candidates per position: a bushy tree
    tree = trees.build(torch.tensor([7]), logits, budget)
    assert len(set(tree.parents.tolist())) > 2 and int(tree.depths.max()) >= 3  # branches, and depth

    def fresh():
        cache = target.new_cache(64, budget)
        target.forward(prompt.to(DEVICE), cache, commit=True)
        return cache

    got, _ = target.forward(tree.tokens.to(DEVICE), fresh(), logits_from=0, tree=tree)
    want = []
    for i in range(budget):
        cache = fresh()
        for token in tree.tokens[_path(tree, i)]:  # one decode step per token, as plain decoding runs
            step, _ = target.forward(token.view(1).to(DEVICE), cache, logits_from=0, commit=True)
        want.append(step[0])
    return got, torch.stack(want)


@pytest.mark.slow  # a target through the interpreter, a tree and its 8 paths: ~2 minutes each on 2 cores
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_every_tree_node_has_the_logits_of_decoding_its_path_bit_for_bit(dtype, qwen3_kernel_pair, exact_path):
    target = loader.load(qwen3_kernel_pair[0], None, device=DEVICE, dtype=dtype).target
    got, want = node_and_path_logits(target, 8)
    differ = (got != want).any(-1).nonzero().flatten().tolist()
    assert torch.equal(got, want), f"nodes {differ} differ from decoding their paths"


@pytest.mark.slow  # gpt-oss through the interpreter: its window of 8 by position, its sinks
def test_a_gpt_oss_tree_node_has_the_logits_of_decoding_its_path_bit_for_bit(tmp_path, exact_path):
    target = loader.load(TARGETS["gpt-oss"](tmp_path / "gpt-oss"), None, device=DEVICE, dtype="bfloat16").target
    got, want = node_and_path_logits(target, 8)
    differ = (got != want).any(-1).nonzero().flatten().tolist()
    assert torch.equal(got, want), f"nodes {differ} differ from decoding their paths"
