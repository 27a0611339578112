"""Counting the device launches of one captured step (issue 26), on the CPU.

Under the stand-in for torch.cuda (tests/fake_cuda.py) with `kernels="triton"`, the engine captures its
device step as a graph whose recording is every aten op and every (interpreted) Triton launch the
step runs, in order: the list of nodes a CUDA graph replays. A node is a launch unless it is one of
the ops below that launch nothing on a GPU (a view, metadata, an allocation), so

    launches(recording) = Triton launches + the aten ops that run a kernel.

An aten op the interpreter runs around a Triton launch (its argument copies) is part of that launch:
the recording already folds it in, so a Triton launch counts once. A `copy_` (or `contiguous`, `clone`,
`cat`...) moves data and counts. Each other aten op counts as one launch: a GEMM (`linear`, bias in its
epilogue) is one, but a few ops (`sort`, `topk`, `cumsum`, `scatter_reduce`) may launch two or more
kernels on a GPU, so where they occur (MoE routing) the count is a floor.

Which layer a launch belongs to is found by difference, so nothing here depends on how the model code
is laid out: a step of a model with one more layer of a kind, less the step of the model without it,
is that kind's launches per layer; what no layer accounts for is the step's fixed work (embedding,
features, head, sampling, accept, commit). Only public entry points are used: the loader, `Engine`,
and the graph it captures.
"""
from __future__ import annotations

import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

aten = torch.ops.aten

# Ops that launch nothing on a GPU: views and reshapes (metadata only), allocations (a graph's memory is
# static), and aliasing. Written out (not guessed from an op's tags) so that an op missing here shows up
# as a counted launch, never as a silently dropped one.
NOT_LAUNCHES = frozenset({
    "view", "_unsafe_view", "_reshape_alias", "view_as", "expand", "expand_as", "as_strided",
    "t", "transpose", "permute", "unsqueeze", "squeeze", "slice", "select", "narrow", "alias", "detach",
    "split", "split_with_sizes", "unbind", "chunk", "tensor_split", "unflatten", "movedim",
    "diagonal", "view_as_real", "view_as_complex", "lift_fresh",
    "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "resize_",
    "set_", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "is_same_size", "size", "stride",
    "dim", "numel", "_local_scalar_dense", "numpy_T", "mT", "mH", "adjoint", "matrix_H",
})
# Ops that return their input itself when there is nothing to do (`to` the same dtype, `contiguous` of a
# contiguous tensor, a `reshape` that can be a view): a launch only when their output is new memory.
ALIAS_WHEN_IDLE = frozenset({"to", "contiguous", "reshape", "type_as", "flatten", "_to_copy"})


def op_name(node) -> str:
    """'triton:<kernel>' for a Triton launch, the aten overload packet's name otherwise."""
    if hasattr(node, "executor"):  # fake_cuda.Launch
        fn = getattr(node.executor, "fn", None)
        return "triton:" + getattr(fn, "__name__", "kernel")
    return node.func.overloadpacket.__name__


def _storages(tree) -> set[int]:
    from torch.utils._pytree import tree_leaves

    return {t.untyped_storage().data_ptr() for t in tree_leaves(tree) if isinstance(t, torch.Tensor)}


def is_launch(node) -> bool:
    name = op_name(node)
    if name.startswith("triton:"):
        return True
    if name in NOT_LAUNCHES:
        return False
    if name in ALIAS_WHEN_IDLE:  # its input returned as it was: nothing ran
        return not _storages(node.out) <= _storages((node.args, node.kwargs))
    return True


def launches(recording) -> int:
    return sum(map(is_launch, recording))


def breakdown(recording) -> Counter:
    """Launches by op name: where a count comes from."""
    return Counter(op_name(n) for n in recording if is_launch(n))


def captured_step(target_dir: Path, drafter_dir: Path | None = None, block_size: int | None = None,
                  linear: str | None = None, tree_budget: int = 0) -> list:
    """The recording of one captured device step: plain decoding (b = 1) without a drafter, the DFlash
    iteration at `block_size` (draft, verify, accept, commit, drafter context) with one, and with
    `tree_budget` > 0 a tree iteration instead (draft, build the best-first tree of that many nodes, verify
    them under the ancestor mask, walk, commit the path). Triton kernels run in the interpreter
    (TRITON_INTERPRET=1 must be set before triton is imported). `linear`: the DFLASH_LINEAR mode to count
    under (None: as the environment says)."""
    import pytest

    from dflash_cli import loader
    from dflash_cli.engine import Engine, Request

    from .fake_cuda import stand_in

    with pytest.MonkeyPatch.context() as env, stand_in(kernels="triton") as gpu:
        if linear is not None:
            env.setenv("DFLASH_LINEAR", linear)
        graphs, make = [], gpu.CUDAGraph
        gpu.CUDAGraph = lambda: graphs.append(make()) or graphs[-1]  # keep what the engine captures
        model = loader.load(target_dir, drafter_dir, device="cuda", dtype="float32", max_context=64)
        engine = Engine(model.target, model.drafter, block_size=block_size, lookahead=False, tree_budget=tree_budget)
        assert engine.tree_budget == tree_budget
        assert engine.graphs.enabled
        for _ in engine.generate(Request([3, 4, 5], 2)):  # the prefill's token, then one captured step
            pass
    assert len(graphs) == 1 and graphs[0].ops is not None, f"expected one captured step, got {len(graphs)}"
    return graphs[0].ops


# The drafter's taps: layer 0 only, never the last layer. A tap on the last layer is free (the final norm
# leaves its residual), so a tap there would move a clone between the fixed work and the layer appended.
TAPS = (0,)


# ---- the families --------------------------------------------------------------------------------------
# Each family is a writer of tiny checkpoints (tests/tiny.py, tests/tiny_gpt_oss.py) taking the target's
# layer kinds and the drafter's layer count, so that one more layer of a kind can be added.
@dataclass
class Family:
    name: str
    kinds: tuple[str, ...]  # the target's layer kinds, in the base model's order
    write: Callable[[Path, tuple[str, ...], int], tuple[Path, Path]]  # (dir, target kinds, drafter layers)
    drafter_kind: str = "drafter"
    block_size: int = 4
    trees: bool = True  # the engine verifies trees for it (DFlash2 drafters keep their selector chain)


def _dense(d: Path, kinds, drafter_layers: int):
    from .tiny import drafter_config, target_config, write_drafter, write_target

    cfg = target_config("qwen3", layers=len(kinds), tie=False)
    return (write_target(d / "t", cfg), write_drafter(d / "d", drafter_config(cfg, block_size=4, layers=drafter_layers,
                                                                             target_layer_ids=TAPS)))


def _dflash2(d: Path, kinds, drafter_layers: int):
    from .tiny import dflash2_config, target_config, write_drafter, write_target

    cfg = target_config("qwen3", layers=len(kinds), tie=False)
    return (write_target(d / "t", cfg),
            write_drafter(d / "d", dflash2_config(cfg, layers=drafter_layers, block_size=4, target_layer_ids=TAPS,
                                                  mask_token_id=500)))


def _moe(d: Path, kinds, drafter_layers: int):
    from .tiny import drafter_config, qwen3_moe_config, write_drafter, write_target

    cfg = qwen3_moe_config(layers=len(kinds))
    return (write_target(d / "t", cfg), write_drafter(d / "d", drafter_config(cfg, block_size=4, layers=drafter_layers,
                                                                             target_layer_ids=TAPS,
                                                                             mask_token_id=500)))


def _hybrid(moe: bool):
    def write(d: Path, kinds, drafter_layers: int):
        from .tiny import drafter_config, qwen35_config, qwen35_moe_config, write_drafter, write_qwen35

        types = ["linear_attention" if k.startswith("linear") else "full_attention" for k in kinds]
        cfg = (qwen35_moe_config if moe else qwen35_config)(layers=len(kinds), layer_types=types, wrapper=False)
        return (write_qwen35(d / "t", cfg, layout="fused" if moe else None),
                write_drafter(d / "d", drafter_config(cfg, block_size=4, layers=drafter_layers,
                                                      target_layer_ids=TAPS, mask_token_id=500)))
    return write


def _gpt_oss(d: Path, kinds, drafter_layers: int):
    from .tiny import write_drafter
    from .tiny_gpt_oss import gpt_oss_config, gpt_oss_drafter_config, write_gpt_oss

    cfg = gpt_oss_config(layers=len(kinds))
    cfg["layer_types"] = [("sliding" if k.endswith("sliding") else "full") + "_attention" for k in kinds]
    return (write_gpt_oss(d / "t", cfg),
            write_drafter(d / "d", gpt_oss_drafter_config(cfg, block_size=4, layers=drafter_layers,
                                                          target_layer_ids=TAPS)))


FAMILIES = {
    "dense": Family("dense", ("dense", "dense"), _dense),
    "hybrid": Family("hybrid", ("linear", "full"), _hybrid(moe=False)),
    "moe": Family("moe", ("moe", "moe"), _moe),
    "hybrid-moe": Family("hybrid-moe", ("linear+moe", "full+moe"), _hybrid(moe=True)),
    "gpt-oss": Family("gpt-oss", ("gpt-oss sliding", "gpt-oss full"), _gpt_oss),
    "dflash2": Family("dflash2", ("dense", "dense"), _dflash2, drafter_kind="dflash2 drafter", trees=False),
}

# The budgets (per decode step; verify: the same plus a few). They need the fusions of issue 26;
# the counts today are above them. Kinds of two parts (a hybrid layer with a MoE MLP) get the sum of the
# attention part's budget and the MoE MLP's excess over a dense MLP (12 - 6): derived, not the issue's.
BUDGETS = {"dense": 6, "linear": 12, "full": 8, "moe": 12, "linear+moe": 18, "full+moe": 14,
           "gpt-oss sliding": 10, "gpt-oss full": 10, "drafter": 6, "dflash2 drafter": 6, "fixed": 20}


@dataclass
class Counts:
    family: str
    per_layer: dict[str, dict[str, int]] = field(default_factory=dict)  # step -> kind -> launches per layer
    total: dict[str, int] = field(default_factory=dict)  # step -> launches in the base model's step
    fixed: dict[str, int] = field(default_factory=dict)  # step -> launches no layer accounts for
    linear: str = "cublas"  # the DFLASH_LINEAR mode counted
    layers: dict[str, int] = field(default_factory=dict)  # kind -> how many the base model has
    ops: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)  # step -> kind or "fixed" -> op -> launches


def tree_step(budget: int) -> str:
    """The name of a tree iteration's step at `budget` nodes (count_family's steps_wanted, Counts' keys)."""
    return f"tree {budget}"


def _tree_budget(step: str) -> int:
    """The tree budget of a drafting step: 0 for "verify" (the chain), N for "tree N"."""
    return int(step.split()[1]) if step.startswith("tree ") else 0


def count_family(family: Family, steps_wanted: tuple[str, ...] = ("decode", "verify"),
                 workdir: Path | None = None, linear: str | None = None) -> Counts:
    """Per-layer launches by difference: the base model (family.kinds, a one-layer drafter), then the
    same with one more layer of each kind (appended), for each step wanted: "decode", "verify" (the chain
    at the family's block size), `tree_step(N)` (a tree iteration of N nodes at that block size); `linear`:
    the DFLASH_LINEAR mode (None: the environment's)."""
    drafting = [s for s in steps_wanted if s != "decode"]
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        tmp = Path(tmp)

        def steps(name: str, kinds, drafter_layers: int, decode: bool = True) -> dict[str, Counter]:
            t, d = family.write(tmp / name, kinds, drafter_layers)
            out = {}
            for step in steps_wanted:  # in the order asked (the table's rows)
                if step != "decode":
                    out[step] = breakdown(captured_step(t, d, family.block_size, linear, _tree_budget(step)))
                elif decode:
                    out[step] = breakdown(captured_step(t, linear=linear))
            return out

        base = steps("base", family.kinds, 1)
        c = Counts(family.name, {s: {} for s in base}, {s: n.total() for s, n in base.items()},
                   linear=linear or os.environ.get("DFLASH_LINEAR", "cublas"))
        c.layers = dict(Counter(family.kinds)) | {family.drafter_kind: 1}
        c.ops = {s: {} for s in base}
        for kind in dict.fromkeys(family.kinds):
            more = steps(kind.replace(" ", "_").replace("+", "_"), family.kinds + (kind,), 1)
            for step in base:
                c.ops[step][kind] = _minus(more[step], base[step])
        if drafting:
            more = steps("drafter", family.kinds, 2, decode=False)
            for step in drafting:
                c.ops[step][family.drafter_kind] = _minus(more[step], base[step])
        for step in base:
            c.per_layer[step] = {k: sum(ops.values()) for k, ops in c.ops[step].items()}
            fixed = Counter(base[step])
            for kind, ops in c.ops[step].items():
                for op, n in ops.items():
                    fixed[op] -= n * c.layers[kind]
            c.ops[step]["fixed"] = {op: n for op, n in sorted(fixed.items()) if n}
            c.fixed[step] = sum(fixed.values())
    return c


def _minus(a: Counter, b: Counter) -> dict[str, int]:
    """a - b per op, negatives kept (a layer can also remove a launch from the fixed work)."""
    return {op: a[op] - b[op] for op in sorted(set(a) | set(b)) if a[op] != b[op]}


# ---- at a released target's real widths ------------------------------------------------------------------
# The tiny models' projections are narrow, so the invariant linear kernels reduce each in one slice; a
# released model's are reduced in K slices (kernels/invariant_linear.splits), and a launcher that merged the
# slices in a second kernel would launch more there than here. What a layer's projections launch at the
# real widths is found by running the launcher on each of the layer's weights at its real N × K, on meta
# tensors, with the Triton launches counted and not run: the layer built by its family from the released
# config (dflash_cli.synthetic), one projection at a time, so no weight is ever allocated.
RELEASED = {"dense": "qwen3-8b", "hybrid": "qwen3.5-27b", "moe": "qwen3-coder-30b-a3b",
            "hybrid-moe": "qwen3.5-35b-a3b", "gpt-oss": "gpt-oss-20b"}
# The layer type (config.json's layer_types) of each layer kind; kinds without one are every layer.
KIND_TYPES = {"linear": "linear_attention", "linear+moe": "linear_attention", "full": "full_attention",
              "full+moe": "full_attention", "gpt-oss sliding": "sliding_attention", "gpt-oss full": "full_attention"}


@dataclass
class Projection:
    name: str  # the weight's place in the layer, as the model holds it (q/k/v stacked, gate_up stacked)
    n: int
    k: int
    splits: int  # the K slices the invariant kernels reduce it in
    launches: dict[str, int]  # merge form ("last": folded, "launch": a merge kernel) -> Triton launches


def real_projections(target: str, kind: str) -> list[Projection]:
    """The dense projections of one layer of `kind` of the released `target` at its real widths, each with
    the launches the invariant linear launcher makes for it (run on meta tensors, kernels not run)."""
    from dflash_cli import synthetic
    from dflash_cli.models import family_of
    from dflash_cli.models.layers.linear import Dense

    raw, where = dict(synthetic.TARGETS[target]), Path(f"<released {target}>")
    family = family_of(raw, where)
    types = getattr(family.Config.from_raw(raw, where), "layer_types", None)  # the family's own defaults
    index = list(types).index(KIND_TYPES[kind]) if types and kind in KIND_TYPES else 0
    raw["num_hidden_layers"] = index + 1  # the layers up to the first of its kind: nothing else is built
    if types:
        raw["layer_types"] = list(types[:index + 1])
    cfg = family.Config.from_raw(raw, where)
    dtypes = {"model": torch.bfloat16, "float32": torch.float32, "raw": torch.uint8}
    weights = {w.name: torch.empty(w.shape, dtype=dtypes[w.dtype], device="meta")
               for w in family.weight_table(cfg, "fused")}
    layer = family.build(cfg, weights, 64).layers[index]
    found: list[tuple[str, Dense]] = []

    def walk(obj, path: str, depth: int = 0) -> None:
        if isinstance(obj, Dense):
            found.append((path, obj))
        elif isinstance(obj, (list, tuple)):
            for i, item in enumerate(obj):
                walk(item, f"{path}[{i}]", depth + 1)
        elif hasattr(obj, "__dict__") and not isinstance(obj, (torch.Tensor, torch.nn.Module)) and depth < 6:
            for name, value in vars(obj).items():
                walk(value, f"{path}.{name}" if path else name, depth + 1)
    walk(layer, "")
    return [Projection(name, *d.weight.shape, _splits(*d.weight.shape),
                       {merge: linear_launches(*d.weight.shape, merge) for merge in ("last", "launch")})
            for name, d in found]


def _splits(n: int, k: int) -> int:
    from dflash_cli.kernels.invariant_linear import plan

    return plan(n, k)[0]


def linear_launches(n: int, k: int, merge: str = "last") -> int:
    """Triton launches of the invariant linear launcher for one step row through a weight [n, k], the
    launcher run on meta tensors with the launches counted, not run (TRITON_INTERPRET=1)."""
    from triton.runtime import interpreter

    from dflash_cli.kernels.invariant_linear import invariant_linear

    launched, run = [], interpreter.GridExecutor.__call__
    interpreter.GridExecutor.__call__ = lambda executor, *args, **kwargs: launched.append(executor.fn.__name__)
    try:
        x, w = (torch.empty(shape, dtype=torch.bfloat16, device="meta") for shape in ((1, k), (n, k)))
        invariant_linear(x, w, merge=merge)
    finally:
        interpreter.GridExecutor.__call__ = run
    return len(launched)


def real_width_extra(family: str, kind: str, merge: str = "last") -> tuple[int, list[Projection]]:
    """Launches a layer of `kind` makes at its released target's widths beyond the tiny model's count,
    under DFLASH_LINEAR=invariant: each projection's launches less the one launch it makes at a tiny width
    (where every weight is one slice). Under cublas a projection is one F.linear at any width: 0."""
    projections = real_projections(RELEASED[family], kind)
    return sum(p.launches[merge] - 1 for p in projections), projections
