"""Tree verification (DDTree, dflash_cli/tree.py): the best-first tree builder, the walk, and the engine's
tree iterations, lossless against transformers' `generate`, the chain and plain decoding."""
from __future__ import annotations

import itertools

import pytest
import torch

from dflash_cli import loader, tree as trees
from dflash_cli.engine import Engine, Request
from dflash_cli.errors import DflashError
from dflash_cli.sampling import SamplingParams

from .conftest import HYBRID_PROMPTS
from .families import FAMILIES
from .host_reads import HostReads


# ---- the builder -------------------------------------------------------------------------------------------
def _best_prefixes(logits: torch.Tensor, count: int) -> list[tuple[float, tuple[int, ...]]]:
    """Brute force: every prefix of rank sequences over the per-position top-K, by path log-probability."""
    logp, ids = trees.top_k(logits, trees.branching(count + 1, logits.shape[-1]))
    found = []
    for depth in range(1, logits.shape[0] + 1):
        for ranks in itertools.product(range(logp.shape[1]), repeat=depth):
            score = sum(float(logp[d, r]) for d, r in enumerate(ranks))
            found.append((score, tuple(int(ids[d, r]) for d, r in enumerate(ranks))))
    return sorted(found, key=lambda f: -f[0])[:count]


def _paths(tree: trees.Tree) -> list[tuple[int, ...]]:
    """Each node's tokens from depth 1 down to it (the root's: ())."""
    parents, tokens = tree.parents.tolist(), tree.tokens.tolist()
    out = []
    for i in range(tree.budget):
        path, node = [], i
        while node != 0:
            path.append(tokens[node])
            node = parents[node]
        out.append(tuple(reversed(path)))
    return out


@pytest.mark.parametrize("depth, vocab, budget, seed", [(3, 5, 8, 0), (4, 6, 16, 1), (2, 7, 12, 2), (5, 3, 30, 3)])
def test_the_tree_holds_the_best_prefixes_in_best_first_order(depth, vocab, budget, seed):
    logits = torch.randn(depth, vocab, generator=torch.Generator().manual_seed(seed)) * 2
    tree = trees.build(torch.tensor([9]), logits, budget)
    assert tree.tokens.shape == tree.parents.shape == tree.depths.shape == (budget,)
    assert tree.ancestors.shape == (budget, budget)
    assert int(tree.tokens[0]) == 9 and int(tree.depths[0]) == 0
    want = _best_prefixes(logits, budget - 1)
    paths = _paths(tree)[1:]
    assert [p for p in paths] == [w[1] for w in want]  # the same prefixes, in the same (score) order
    torch.testing.assert_close(tree.scores[1:], torch.tensor([w[0] for w in want]), rtol=0, atol=1e-5)
    for i in range(1, budget):  # a parent comes first, one level up
        p = int(tree.parents[i])
        assert p < i and int(tree.depths[i]) == int(tree.depths[p]) + 1


def test_the_mask_is_each_node_and_its_ancestors():
    tree = trees.build(torch.tensor([1]), torch.randn(4, 6, generator=torch.Generator().manual_seed(5)), 14)
    parents = tree.parents.tolist()
    for i in range(tree.budget):
        seen, node = {i}, i
        while node != 0:
            node = parents[node]
            seen.add(node)
        assert set(torch.nonzero(tree.ancestors[i]).flatten().tolist()) == seen
    mask, keys = trees.attention_mask(tree, torch.tensor(5), 32)
    assert mask[:, :5].all() and not mask[:, 5 + tree.budget:].any()
    assert torch.equal(mask[:, 5:5 + tree.budget], tree.ancestors)
    assert torch.equal(keys[5:5 + tree.budget], 5 + tree.depths) and torch.equal(keys[:5], torch.arange(5))


def test_a_budget_past_every_prefix_leaves_nodes_that_are_never_walked_to():
    logits = torch.randn(2, 2, generator=torch.Generator().manual_seed(0))
    tree = trees.build(torch.tensor([0]), logits, 10)  # 2 + 4 prefixes: 3 nodes unfilled
    assert tree.tokens.tolist()[7:] == [-1] * 3 and torch.isinf(tree.scores[7:]).all()
    assert all(tree.ancestors[i].nonzero().flatten().tolist() == [i] for i in range(7, 10))


def test_the_walk_follows_the_targets_tokens_and_stops_at_the_first_miss():
    # root 5 → {1: 7, 2: 8}; 1 → {3: 4}; 3 → {4: 2}
    tree = trees.Tree(torch.tensor([5, 7, 8, 4, 2]), torch.tensor([0, 0, 0, 1, 3]), torch.tensor([0, 1, 1, 2, 3]),
                      torch.eye(5, dtype=torch.bool), torch.zeros(5))
    path, accepted = trees.walk(tree, torch.tensor([7, 4, 0, 3, 0]), 4)  # 7, then 4, then 3 is nobody's
    assert path.tolist() == [0, 1, 3, 3, 3] and int(accepted) == 2
    path, accepted = trees.walk(tree, torch.tensor([8, 4, 6, 3, 0]), 4)  # 8 is node 2, whose 6 is no child
    assert path.tolist() == [0, 2, 2, 2, 2] and int(accepted) == 1
    path, accepted = trees.walk(tree, torch.tensor([9, 4, 6, 3, 0]), 4)
    assert path.tolist() == [0] * 5 and int(accepted) == 0


def test_building_and_walking_read_nothing_back_to_the_host():
    logits = torch.randn(7, 50)
    with torch.inference_mode(), HostReads() as reads:
        tree = trees.build(torch.tensor([3]), logits, 16)
        trees.attention_mask(tree, torch.tensor(4), 40)
        trees.walk(tree, torch.randint(0, 50, (16,)), 7)
    assert reads.seen == []


# ---- the target's tree verify --------------------------------------------------------------------------------
@pytest.mark.parametrize("fixture", ["qwen3_pair", "qwen3_moe_pair", "gpt_oss_pair", "gemma4_pair", "gemma4_moe_pair",
                                     "muse_pair", "qwen35_pair", "qwen35_moe_pair"])
def test_a_tree_verify_gives_each_node_the_logits_of_its_own_path_and_commits_the_accepted_one(fixture, request):
    """Every node's logits = those of decoding its path token by token (gpt-oss: past its window of 8, with
    sinks; the hybrids: each node's conv window and recurrent state from its ancestors); committing a path
    leaves the cache as decoding that path does (the next logits are the same)."""
    from dflash_cli.cache import CommitPlan

    target = loader.load(request.getfixturevalue(fixture)[0], None, device="cpu", dtype="float32").target
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, 256, (11,), generator=g)
    logits = torch.randn(6, target.cfg.vocab_size, generator=g)
    logits[:, 256:] = -1e9  # ids below 256: every family's tiny vocabulary
    tree = trees.build(torch.tensor([7]), logits, 16)

    def path_of(i: int) -> list[int]:
        nodes = [i]
        while nodes[-1] != 0:
            nodes.append(int(tree.parents[nodes[-1]]))
        return nodes[::-1]

    def decoded(ids: torch.Tensor):
        cache = target.new_cache(64, 16)
        target.forward(prompt, cache, commit=True)
        return target.forward(ids, cache, logits_from=0, commit=True)[0], cache

    cache = target.new_cache(64, 16)
    target.forward(prompt, cache, commit=True)
    got, _ = target.forward(tree.tokens, cache, logits_from=0, tree=tree)
    for i in range(tree.budget):
        want, _ = decoded(tree.tokens[path_of(i)])
        torch.testing.assert_close(got[i], want[-1], rtol=1e-4, atol=1e-4, msg=lambda m: f"node {i}: {m}")
    deepest = int(tree.depths.argmax())
    path = torch.tensor(path_of(deepest))
    target.commit(cache, CommitPlan(torch.tensor(len(path)), path))
    _, steps = decoded(tree.tokens[path])
    assert int(cache.length) == int(steps.length) == 11 + len(path)
    nxt = torch.randint(3, 256, (3,), generator=g)
    after, _ = target.forward(nxt, cache, logits_from=0, commit=True)
    want, _ = target.forward(nxt, steps, logits_from=0, commit=True)
    torch.testing.assert_close(after, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fixture, path", [
    ("qwen35_pair", "torch"), pytest.param("qwen35_moe_pair", "torch", marks=pytest.mark.slow),
    pytest.param("qwen35_pair", "triton", marks=pytest.mark.slow)])  # ~30 s interpreted
def test_a_hybrid_tree_commit_leaves_the_state_of_a_fresh_prefill_bit_for_bit(fixture, path, request, monkeypatch):
    """Commit a path that leaves the first-child chain (its rows are not 0..d): every linear layer's
    recurrent state and conv window equal those of a fresh prefill of prompt + path. Bit for bit on the
    kernel path (interpreted) with the batch-invariant linear layers, as on a GPU with
    DFLASH_LINEAR=invariant: a row rounds alike whatever M is. The CPU's torch path rounds its GEMMs,
    convs and short reductions by M (a chain's commit differs from a one-chunk prefill there too), so
    there it is checked to the chain's tolerance."""
    from dflash_cli.cache import CommitPlan

    if path == "triton":
        monkeypatch.setenv("DFLASH_KERNELS", "triton")
        monkeypatch.setenv("DFLASH_LINEAR", "invariant")
    target = loader.load(request.getfixturevalue(fixture)[0], None, device="cpu", dtype="float32").target
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(3, 256, (9,), generator=g)
    logits = torch.randn(5, target.cfg.vocab_size, generator=g) * 6  # peaked: a deep tree
    logits[:, 256:] = -1e9
    tree = trees.build(torch.tensor([5]), logits, 12)
    parents = tree.parents.tolist()

    def path_of(i: int) -> list[int]:
        nodes = [i]
        while nodes[-1] != 0:
            nodes.append(parents[nodes[-1]])
        return nodes[::-1]

    node = max((i for i in range(tree.budget) if path_of(i) != list(range(len(path_of(i))))),
               key=lambda i: (len(path_of(i)), i))
    nodes = torch.tensor(path_of(node))
    assert len(nodes) >= 4, nodes
    cache = target.new_cache(64, 12)
    target.forward(prompt, cache, commit=True)
    target.forward(tree.tokens, cache, logits_from=0, tree=tree)
    padded = torch.cat((nodes, nodes[-1:].expand(5 + 1 - len(nodes))))  # as the walk gives it: depth + 1 nodes
    target.commit(cache, CommitPlan(torch.tensor(len(nodes)), padded))
    fresh = target.new_cache(64, 12)
    target.forward(torch.cat((prompt, tree.tokens[nodes])), fresh, commit=True)
    assert int(cache.length) == int(fresh.length) == len(prompt) + len(nodes)
    exact = dict(rtol=0, atol=0) if path == "triton" else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache.state, fresh.state, **exact)
    torch.testing.assert_close(cache.conv, fresh.conv, **exact)


# ---- the engine ----------------------------------------------------------------------------------------------
BUDGETS = (4, 8, 16)
PAIRS = {  # a pair with a trained or fitted drafter (drafts really are accepted), its prompts and sampling
    "dense": ("stories_pair", lambda m: [m.tokenizer.encode(p) for p in ("Once upon a time", "The cat sat")],
              SamplingParams(temperature=0.8, seed=1)),
    "moe": ("qwen3_moe_pair", lambda m: HYBRID_PROMPTS[:2], SamplingParams(temperature=0.8, top_k=40, seed=2)),
    "gpt-oss": ("gpt_oss_pair", lambda m: HYBRID_PROMPTS[:2], SamplingParams(temperature=0.7, top_p=0.9, seed=3)),
    "hybrid": ("qwen35_pair", lambda m: HYBRID_PROMPTS[:2], SamplingParams(temperature=0.8, top_p=0.95, seed=4)),
    "hybrid-moe": ("qwen35_moe_pair", lambda m: HYBRID_PROMPTS[:2], SamplingParams(temperature=0.8, seed=5)),
}


def _tokens(engine: Engine, prompt, n: int, sampling: SamplingParams | None = None, budgets=None):
    """The answer, and each iteration's τ; `budgets`: the tree budget of each iteration, in turn."""
    out, taus, turn = [], [], itertools.cycle(budgets or [engine.tree_budget])
    for step in engine.generate(Request(prompt, n, sampling=sampling or SamplingParams())):
        out += step.tokens
        if not step.prefill:
            taus.append(step.acceptance_length)
        engine.tree_budget = next(turn)
    return out, taus


@pytest.mark.parametrize("name", [pytest.param(n, marks=[] if n in ("dense", "hybrid") else [pytest.mark.slow])
                                  for n in PAIRS])
def test_tree_answers_equal_generate_the_chain_and_plain_sampling(name, request):
    """Greedy: transformers' `generate` and the chain's answer, at budgets 4, 8, 16 and with the budget
    changing between iterations (0, the chain, among them); seeded sampling: plain decoding's answer."""
    fixture, prompts, sampling = PAIRS[name]
    pair = request.getfixturevalue(fixture)
    model = loader.load(*pair, device="cpu", dtype="float32")
    hf = next(f for f in FAMILIES if f.pair == fixture).reference(pair[0])
    b, n = model.drafter.cfg.block_size, 24
    taus = {0: [], **{budget: [] for budget in BUDGETS}}
    for prompt in prompts(model):
        ids = torch.tensor([prompt])
        want = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                           eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        chain, tau = _tokens(Engine(model.target, model.drafter, block_size=b, lookahead=False), prompt, n)
        assert chain == want
        taus[0] += tau
        for budget in BUDGETS:
            got, tau = _tokens(Engine(model.target, model.drafter, block_size=b, tree_budget=budget), prompt, n)
            assert got == want, f"budget {budget}, prompt {prompt}"
            taus[budget] += tau
        engine = Engine(model.target, model.drafter, block_size=b, tree_budget=16)
        got, _ = _tokens(engine, prompt, n, budgets=[4, 16, 0, 8])  # the budget changes between iterations
        assert got == want
    assert all(max(t) > 2 for t in taus.values()), taus  # drafts are accepted, down the tree too
    prompt = prompts(model)[0]
    plain, _ = _tokens(Engine(model.target), prompt, n, sampling)
    for budget in BUDGETS:
        got, _ = _tokens(Engine(model.target, model.drafter, block_size=b, tree_budget=budget), prompt, n, sampling)
        assert got == plain, f"sampled, budget {budget}"
    got, _ = _tokens(Engine(model.target, model.drafter, block_size=b, tree_budget=16), prompt, n, sampling,
                     budgets=[8, 0, 16, 4])
    assert got == plain


@pytest.mark.slow  # ~1 min: the hybrid's step interpreted, every node's rule in kernels/gated_delta_tree.py
def test_the_hybrids_tree_on_the_kernel_path_answers_as_plain_decoding(qwen35_kernel_pair, monkeypatch):
    """Greedy, through the Triton kernels (interpreted): the tree answer (budget 8, then changing) is the
    torch path's plain decoding."""
    model = loader.load(*qwen35_kernel_pair, device="cpu", dtype="float32")
    prompt, n = HYBRID_PROMPTS[0][:12], 12
    monkeypatch.setenv("DFLASH_KERNELS", "torch")
    want, _ = _tokens(Engine(model.target), prompt, n)
    monkeypatch.setenv("DFLASH_KERNELS", "triton")
    b = model.drafter.cfg.block_size
    got, taus = _tokens(Engine(model.target, model.drafter, block_size=b, tree_budget=8), prompt, n,
                        budgets=[8, 4, 0, 8])
    assert got == want, taus


@pytest.mark.parametrize("fixture", ["stories_pair", "qwen35_pair"])
def test_the_tree_step_reads_nothing_back_to_the_host(fixture, request, monkeypatch):
    """The dense tree step, and the hybrid's (each node's conv window and state gathered on the device)."""
    from dflash_cli import ops

    from .fake_cuda import attention_masked_on_device

    monkeypatch.setattr(ops, "attention", attention_masked_on_device)  # the chain's reference reads kv_len
    model = loader.load(*request.getfixturevalue(fixture), device="cpu", dtype="float32")
    b = model.drafter.cfg.block_size
    prompt = model.tokenizer.encode("Once upon a time") if fixture == "stories_pair" else HYBRID_PROMPTS[0]
    engine = Engine(model.target, model.drafter, block_size=b, tree_budget=48)
    # 48: a tree of more nodes than a kernel-path block (ops.MAX_KERNEL_Q_LEN) still keeps its length on the device
    for sampling, budget in ((SamplingParams(), 16), (SamplingParams(temperature=0.8, top_p=0.9, seed=1), 16),
                             (SamplingParams(), 48)):
        steps = engine.generate(Request(prompt, 32, sampling=sampling))
        bonus = torch.tensor([next(steps).tokens[-1]])
        with torch.inference_mode(), HostReads() as reads:
            packed, _ = engine._tree_step(sampling.mode, b, budget)(bonus)
        steps.close()
        assert reads.seen == []
        assert packed.shape == (1 + 2 * b + (b - 1) + b,)  # and adaptive.walk_record: ranks, children


def test_trees_are_refused_by_name_for_dflash2_drafters(qwen3_moe_pair):
    model = loader.load(*qwen3_moe_pair, device="cpu", dtype="float32")
    model.drafter.selector = object()  # what a DFlash2 drafter has
    with pytest.raises(DflashError, match="DFlash2 drafters keep their selector chain"):
        Engine(model.target, model.drafter, block_size=4, tree_budget=8)
    model.drafter.selector = None
    with pytest.raises(DflashError, match="tree budget must be 0"):
        Engine(model.target, model.drafter, block_size=4, tree_budget=1)
    engine = Engine(model.target, model.drafter, block_size=4, tree_budget=8)
    engine.tree_budget = 4
    with pytest.raises(DflashError, match="at most the 8 nodes"):  # the caches are sized for 8
        engine.tree_budget = 16


# ---- the flag ------------------------------------------------------------------------------------------------
def test_the_tree_budget_flag_reads_a_budget_and_refuses_the_rest_in_one_line():
    from dflash_cli.api import parse_tree_budget
    from dflash_cli.errors import UsageError

    assert parse_tree_budget("16") == 16 and parse_tree_budget("0") == 0 and parse_tree_budget(None) == 0
    assert parse_tree_budget("auto") == parse_tree_budget(" Auto ") == "auto"
    for bad, why in (("1", "at least 2"), ("-3", "at least 2"), ("x", "node budget")):
        with pytest.raises(UsageError, match=why):
            parse_tree_budget(bad)


@pytest.mark.slow  # three CLI processes (~30 s on 2 cores); the engine tests above cover the answer
def test_run_with_a_tree_budget_writes_the_chains_answer_and_reports_the_budget(stories_pair):
    import json
    import subprocess
    import sys
    from pathlib import Path

    t, d = stories_pair
    answers = {}
    for budget in ("0", "16"):
        p = subprocess.run([sys.executable, "-m", "dflash_cli", "run", "--target", str(t), "--drafter", str(d), "-p",
                            "Once upon a time", "-n", "32", "-b", "8", "--tree-budget", budget, "--json"],
                           cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr
        answers[budget] = json.loads(p.stdout)
        assert answers[budget]["tree_budget"] == int(budget)
        assert answers[budget]["tree_budgets"] == [int(budget)] * len(answers[budget]["acceptance_lengths"])
    assert answers["16"]["token_ids"] == answers["0"]["token_ids"]


@pytest.mark.slow  # ~30 s a case (make_fx traces the unrolled search); the host-read test covers the fast tier
@pytest.mark.parametrize("fixture, lookahead", [("stories_pair", False), ("stories_pair", True),
                                                ("qwen35_pair", True)],
                         ids=["read-then-launch", "lookahead", "hybrid-lookahead"])
def test_replaying_one_recorded_tree_step_gives_the_eager_tokens(fixture, lookahead, request, monkeypatch):
    """The tree step as a captured graph runs it: recorded once (make_fx, in place of a CUDA capture) by the
    warm-up, then replayed for every iteration, with iteration i+1 queued before i is read (lookahead); the
    hybrid's too (each node's conv window and state gathered by device index)."""
    from dflash_cli import engine as engine_module
    from dflash_cli import ops

    from .fake_cuda import attention_masked_on_device
    from .test_conformance import TracedStep

    monkeypatch.setattr(ops, "attention", attention_masked_on_device)
    model = loader.load(*request.getfixturevalue(fixture), device="cpu", dtype="float32")
    if fixture == "stories_pair":
        prompts = [model.tokenizer.encode(p) for p in ("Once upon a time", "The dog ran")]
    else:
        prompts = HYBRID_PROMPTS[:2]
    for sampling in (SamplingParams(), SamplingParams(temperature=0.8, top_p=0.9, seed=4)):
        want = [_tokens(Engine(model.target), p, 40, sampling)[0] for p in prompts]
        traced: list[TracedStep] = []

        def record(self, step, bonus):
            traced.append(TracedStep(step, bonus, self.caches))
            return traced[-1]

        monkeypatch.setattr(engine_module.StepGraphs, "_runner", record)
        engine = Engine(model.target, model.drafter, block_size=8, tree_budget=16, lookahead=lookahead)
        engine.graphs.enabled = True
        assert engine.warm_up(sampling) is not None and len(traced) == 1
        assert [_tokens(engine, p, 40, sampling)[0] for p in prompts] == want
        assert len(traced) == 1 and traced[0].replays >= 4


# ---- --tree-budget auto (h-auto): the policy picks the chain or a tree per iteration ----------------------
def test_walk_record_reads_each_path_nodes_rank_and_the_children_of_each_node():
    from dflash_cli.adaptive import read_walk, walk_record

    gen = torch.Generator().manual_seed(5)
    depth, budget = 4, 12
    tree = trees.build(torch.tensor([3]), torch.randn(depth, 6, generator=gen), budget)
    parents, tokens = tree.parents.tolist(), tree.tokens.tolist()
    real = [i for i in range(1, budget) if tokens[i] >= 0]
    for node in range(budget):
        path = [node]
        while path[-1] != 0:
            path.append(parents[path[-1]])
        path = path[::-1]  # root .. node
        accepted = len(path) - 1
        padded = torch.tensor(path + [path[-1]] * (depth + 1 - len(path)))
        record = walk_record(tree, padded).tolist()
        assert len(record) == 2 * depth + 1
        walk = read_walk(record, accepted)
        want_ranks = tuple(sum(1 for u in real if parents[u] == parents[v] and u < v) for v in path[1:])
        assert walk.ranks == want_ranks
        children = sum(1 for u in real if parents[u] == node)
        assert walk.stop_children == (children if accepted < depth else 0)


class _Forced:
    """A policy that plays the given (b, tree budget) decisions in turn, as auto could pick them."""

    adaptive = True

    def __init__(self, turns, largest: int = 8):
        from dflash_cli.adaptive import Acceptance

        self.sizes, self.tree_budgets = [1, 2, 4, largest], (4, 8, 16, 32)
        self.turns, self.acceptance, self.walks = itertools.cycle(turns), Acceptance(largest - 1), 0

    def reset(self) -> None:
        pass

    def decide(self, costs, tree_costs=None):
        from dflash_cli.adaptive import Decision

        b, n = next(self.turns)
        return Decision(b, 1.0, 1.0, tree_budget=n)

    def observe(self, block_size, accepted, walk=None) -> None:
        self.walks += walk is not None
        assert walk is None or len(walk.ranks) == accepted


@pytest.mark.parametrize("sampling", [SamplingParams(), SamplingParams(temperature=0.8, top_p=0.9, seed=6)],
                         ids=["greedy", "seeded"])
def test_auto_writes_plain_decodings_answer_whatever_it_picks(sampling, stories_pair):
    """Whatever auto picks per iteration (chain or tree, any budget, b = 1 between), the answer is plain
    decoding's, and each iteration reports the budget it verified."""
    from dflash_cli.generate import Stats

    model = loader.load(*stories_pair, device="cpu", dtype="float32")
    prompt = model.tokenizer.encode("Once upon a time")
    plain, _ = _tokens(Engine(model.target), prompt, 48, sampling)
    engine = Engine(model.target, model.drafter, block_size=8, tree_budget="auto", adaptive=True)
    # 64 nodes is past the attention kernel's graph-safe rows (ops.MAX_KERNEL_Q_LEN = 32): auto stops at 32
    assert engine.most_nodes == 32 and engine.tree_setting == "auto"
    assert engine.describe().endswith("tree budget auto (0, 4, 8, 16, 32)")
    turns = [(8, 16), (4, 4), (1, 0), (8, 0), (8, 32), (2, 8), (8, 4)]
    engine.policy = _Forced(turns)
    stats, out = Stats(), []
    for step in engine.generate(Request(prompt, 48, sampling=sampling)):
        stats.add(step)
        out += step.tokens
    assert out == plain
    assert stats.tree_budgets == [n for _, n in turns * 9][:len(stats.tree_budgets)]
    assert engine.policy.walks == sum(n > 0 for n in stats.tree_budgets)


def test_auto_uses_trees_when_nodes_are_cheap_and_the_chain_when_they_are_steep(stories_pair, monkeypatch):
    """The real policy on synthetic measured costs: trees cost what the chain does (a GPU's flat verify)
    → it verifies trees; each node adds a chain's cost (steep) → the chain only. Same answer either way."""
    model = loader.load(*stories_pair, device="cpu", dtype="float32")
    prompt = model.tokenizer.encode("The cat sat")
    sampling = SamplingParams(temperature=0.8, seed=2)
    plain, _ = _tokens(Engine(model.target), prompt, 40, sampling)
    chain = {1: 1.0, 2: 1.02, 4: 1.04, 8: 1.05}
    for name, per_node in (("flat", 0.0), ("steep", 1.0)):
        engine = Engine(model.target, model.drafter, block_size=8, tree_budget="auto", adaptive=True)
        costs = chain | {(8, n): 1.05 + per_node * n for n in engine.policy.tree_budgets}
        monkeypatch.setattr(engine, "measure", lambda mode, bonus: costs)
        budgets, out = [], []
        for step in engine.generate(Request(prompt, 40, sampling=sampling)):
            out += step.tokens
            budgets += [] if step.prefill else [step.tree_budget]
        assert out == plain, name
        assert (any(budgets) if name == "flat" else not any(budgets)), (name, budgets)


def test_auto_keeps_the_chain_where_trees_are_not_supported(stories_pair, models):
    """DFlash2 drafters keep their selector chain; a hybrid target takes trees (each Gated DeltaNet node from
    its ancestors), so auto offers it the budgets."""
    from .tiny import qwen35_config, write_qwen35

    model = loader.load(*stories_pair, device="cpu", dtype="float32")
    model.drafter.selector = object()  # what a DFlash2 drafter has
    engine = Engine(model.target, model.drafter, block_size=4, tree_budget="auto")
    assert engine.most_nodes == 0 and engine.policy.tree_budgets == () and not engine.measures
    model.drafter.selector = None
    hybrid = loader.load(write_qwen35(models / "auto-qwen35", qwen35_config(), seed=11), None, device="cpu").target
    hybrid_engine = Engine(hybrid, model.drafter, block_size=4, tree_budget="auto")
    assert hybrid_engine.tree_budget == 0 and hybrid_engine.policy.tree_budgets != ()


def test_run_json_reports_auto_and_the_budget_each_iteration_verified(capsys, stories_pair):
    """`run --tree-budget auto --json`: "tree_budget" is "auto", "tree_budgets" has one entry per iteration
    (beside "block_sizes" and "acceptance_lengths", their τ), each 0 (the chain) or a budget auto may use."""
    import json

    from dflash_cli.cli import main

    t, d = stories_pair
    base = ["run", "--target", str(t), "--drafter", str(d), "--device", "cpu", "-p", "Once upon a time", "-n", "24",
            "--json", "-q"]
    assert main(base + ["--no-spec"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(base + ["--tree-budget", "auto"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["token_ids"] == plain["token_ids"] and r["tree_budget"] == "auto"
    assert len(r["tree_budgets"]) == len(r["block_sizes"]) == len(r["acceptance_lengths"]) > 0
    assert set(r["tree_budgets"]) <= {0, 4, 8, 16, 32}
