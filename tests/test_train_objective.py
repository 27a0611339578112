"""The training forward is the inference drafter, batched: one block-sparse forward over many
anchors equals one engine draft per anchor; a training step lowers the loss; resuming is exact."""
from __future__ import annotations

import math

import pytest
import torch

from dflash_cli import loader
from dflash_cli.config import DrafterConfig
from dflash_cli.rope import rope_table
from dflash_cli.train.data import target_features
from dflash_cli.train.evaluate import attach_drafter
from dflash_cli.train.loop import Schedule, Trainer, TrainOptions
from dflash_cli.train.model import drafter_config, new_drafter, save_weights
from dflash_cli.train.objective import (Sequence, anchor_candidates, block_hidden, block_loss, loss_gamma,
                                        make_batch, sample_anchors)

from .tiny import target_config, write_target


@pytest.fixture(scope="module", params=["qwen3", "llama"])
def target(request, tmp_path_factory):
    """A tiny random target (GQA: 4 query heads over 2 KV heads) loaded through the engine."""
    cfg = target_config(request.param, tie=request.param == "llama", layers=3)
    d = write_target(tmp_path_factory.mktemp(request.param), cfg, seed=11)
    return loader.load(d, None, device="cpu")


def _drafter(target, directory, *, block_size=6, layers=2, seed=5, sliding=False):
    cfg = drafter_config(target.target.cfg, block_size=block_size, num_layers=layers, target_layer_ids=[0, 2],
                         mask_token_id=target.target.cfg.vocab_size - 1)
    if sliding:  # the Qwen3.6 drafters' layout: a sliding layer (causal inside the block), then a full one
        cfg |= {"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 9, "use_sliding_window": True}
    net = new_drafter(directory, cfg, seed)
    with torch.no_grad():  # larger than the 0.02 init, so that every part of the forward matters
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.2)
    return net


def _sequences(vocab: int) -> list[Sequence]:
    g = torch.Generator().manual_seed(3)
    return [Sequence(torch.randint(3, vocab - 1, (n,), generator=g).tolist(), p) for n, p in ((41, 6), (23, 4), (30, 1))]


@pytest.mark.parametrize("sliding", [False, True], ids=["full", "sliding-causal"])
def test_block_sparse_forward_equals_one_inference_draft_per_anchor(target, tmp_path, sliding):
    net = _drafter(target, tmp_path, sliding=sliding)
    save_weights(tmp_path, net, torch.float32, {})
    seqs = _sequences(target.target.cfg.vocab_size)
    feats = [target_features(target.target, torch.tensor(s.ids), net.cfg.target_layer_ids) for s in seqs]
    anchors = [[6, 7, 20, 39], [4, 21], [1, 15, 28]]  # first answer token, neighbours, the last ones
    batch = make_batch(seqs, feats, anchors, net.cfg.block_size)
    cos_sin = rope_table(net.cfg.head_dim, net.cfg.rope_theta, net.cfg.rope_scaling, 64)
    with torch.no_grad():
        logits = torch.nn.functional.linear(block_hidden(net, target.target.embed, cos_sin, batch),
                                            target.target.lm_head)
    drafter = attach_drafter(target.target, tmp_path)  # the engine's drafter, from the saved files
    b = net.cfg.block_size
    for i, seq in enumerate(seqs):
        for j, a in enumerate(anchors[i]):
            cache = drafter.new_cache(64)
            drafter.add_context(feats[i][:a], cache)
            expected = drafter.draft_logits(torch.tensor([seq.ids[a]]), cache, b)
            torch.testing.assert_close(logits[i, j], expected, rtol=1e-4, atol=1e-4)
    # labels are the tokens after the anchor; positions past the end are not trained
    assert batch.labels[0, 0].tolist() == seqs[0].ids[7:7 + b - 1]
    assert batch.valid[0, 3].tolist() == [True] + [False] * (b - 2)  # anchor 39 of 41 tokens
    assert not batch.valid[1, 2:].any()  # padding anchors


def test_anchors_are_answer_tokens_with_something_after_them():
    seqs = [Sequence(list(range(20)), 7), Sequence(list(range(5)), 0)]
    assert anchor_candidates(seqs[0]) == range(7, 19)
    assert anchor_candidates(seqs[1]) == range(1, 4)  # never position 0: there is no context there
    picked = sample_anchors(seqs, 100, torch.Generator().manual_seed(0))
    assert picked == [list(range(7, 19)), [1, 2, 3]]
    few = sample_anchors(seqs, 3, torch.Generator().manual_seed(0))
    assert len(few[0]) == 3 and few[0] == sorted(few[0]) and set(few[0]) <= set(range(7, 19))


def test_position_weights_decay_as_released():
    assert (loss_gamma(16), loss_gamma(10), loss_gamma(8)) == (7.0, 5.0, 4.0)


def test_one_step_decreases_the_loss_on_a_fixed_batch(target, tmp_path):
    net = _drafter(target, tmp_path, seed=1)
    seqs = _sequences(target.target.cfg.vocab_size)
    feats = [target_features(target.target, torch.tensor(s.ids), net.cfg.target_layer_ids) for s in seqs]
    batch = make_batch(seqs, feats, sample_anchors(seqs, 8, torch.Generator().manual_seed(1)), net.cfg.block_size)
    cos_sin = rope_table(net.cfg.head_dim, net.cfg.rope_theta, net.cfg.rope_scaling, 64)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.0)
    embed, head = target.target.embed, target.target.lm_head

    def loss() -> torch.Tensor:
        return block_loss(net, embed, head, cos_sin, batch, gamma=3.0, chunk_rows=7).loss  # several head chunks

    before = loss()
    before.backward()
    assert embed.grad is None and head.grad is None  # the target's embedding and head stay frozen
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    opt.step()
    with torch.no_grad():
        after = loss()
    assert after < before and math.isfinite(float(after))


def test_gradient_checkpointing_changes_nothing(target, tmp_path):
    net = _drafter(target, tmp_path, seed=2)
    seqs = _sequences(target.target.cfg.vocab_size)
    feats = [target_features(target.target, torch.tensor(s.ids), net.cfg.target_layer_ids) for s in seqs]
    batch = make_batch(seqs, feats, sample_anchors(seqs, 5, torch.Generator().manual_seed(2)), net.cfg.block_size)
    cos_sin = rope_table(net.cfg.head_dim, net.cfg.rope_theta, net.cfg.rope_scaling, 64)
    grads = []
    for ckpt in (False, True):
        net.zero_grad()
        block_loss(net, target.target.embed, target.target.lm_head, cos_sin, batch, gamma=3.0,
                   grad_checkpoint=ckpt).loss.backward()
        grads.append([p.grad.clone() for p in net.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_resumed_training_takes_the_same_steps(target, tmp_path):
    """Batches and anchors are keyed by the step: 3 steps, save, reload, 3 more = 6 steps at once."""
    seqs = _sequences(target.target.cfg.vocab_size) * 3
    opts = TrainOptions(Schedule(steps=6, lr=3e-3), batch=2, anchors=4, gamma=3.0, seed=4)

    def trainer(directory):
        return Trainer(_drafter(target, directory, seed=9), target.target, seqs, opts)

    straight = trainer(tmp_path / "a")
    assert straight.run(lambda: False)
    first = trainer(tmp_path / "b")
    assert not first.run(lambda: first.progress.step == 3)  # stopped as by Ctrl-C after step 3
    first.save(tmp_path / "b", torch.float32)
    second = trainer(tmp_path / "b")
    second.load(tmp_path / "b")
    assert second.progress.step == 3
    assert second.run(lambda: False) and second.progress.step == 6
    for (name, a), b in zip(straight.net.named_parameters(), second.net.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert DrafterConfig.from_dir(tmp_path / "b").block_size == 6
