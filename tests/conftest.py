"""Session fixtures: tiny checkpoints in the exact released layouts, built once per test run."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from dflash_cli import loader, registry


# Triton decides at import whether its functions are interpreted (CPU) or compiled: without a GPU the
# interpreter must be on before anything (transformers included) imports triton. On a CPU nothing runs
# a Triton kernel unless a test asks for it (tests/kernels, DFLASH_KERNELS=triton).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _import_transformers_references_without_fla() -> None:
    """transformers binds fla-core's Triton kernels for the Gated DeltaNet models at import when fla is
    importable (it is: dflash depends on it for CUDA), and those cannot run on a CPU. The tests use
    transformers as the independent reference, so import its hybrid models once with fla hidden: they
    keep their torch paths. dflash itself imports fla only on CUDA or under TRITON_INTERPRET. A
    transformers without one of these models (an older one, as on a GPU machine's image) is no reason
    to fail collecting every test: the tests that compare with that model fail on their own."""
    import importlib
    import sys

    hidden = {k: sys.modules.pop(k) for k in list(sys.modules) if k == "fla" or k.startswith("fla.")}
    sys.modules["fla"] = None  # `import fla` raises ImportError
    try:
        for name in ("qwen3_5", "qwen3_5_moe", "qwen3_next"):
            try:
                importlib.import_module(f"transformers.models.{name}.modeling_{name}")
            except ImportError:
                pass
    finally:
        del sys.modules["fla"]
        sys.modules.update(hidden)


_import_transformers_references_without_fla()

from . import fit_cache
from .fit import fit_drafter
from .tiny import (copy_qwen3_tokenizer, copy_stories, drafter_config, qwen3_moe_config, qwen35_config,
                   qwen35_moe_config, target_config, write_drafter, write_qwen35, write_target)

# Story openings the tests decode (the demo drafter was not trained on these exact prompts, but on
# openings like them: every acceptance length from 1 to 8 occurs in their answers).
STORY_PROMPTS = ["Once upon a time", "Lily and Ben", "The cat", "One day, a little boy",
                 "Tom had a big", "The sun was", "Sue liked to", "There was a dog"]


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def qwen3_pair(models) -> tuple[Path, Path]:
    """Random tiny Qwen3 (vocab 512, no tokenizer) and a random block-16 drafter."""
    cfg = target_config("qwen3", tie=False)
    t = write_target(models / "qwen3", cfg)
    d = write_drafter(models / "qwen3-drafter", drafter_config(cfg, block_size=16, target_layer_ids=(0, 2)))
    return t, d


@pytest.fixture(scope="session")
def llama_pair(models) -> tuple[Path, Path]:
    """Random tiny Llama 3.1 (llama3 rope scaling, tied embeddings, sharded) and a drafter."""
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    cfg = target_config("llama", tie=False, rope_scaling=scaling, layers=3)
    t = write_target(models / "llama", cfg, seed=3, shards=3)
    d = write_drafter(models / "llama-drafter", drafter_config(cfg, block_size=16, target_layer_ids=(0, 1),
                                                               mask_token_id=300, top_level=True))
    return t, d


@pytest.fixture(scope="session")
def qwen3_chat_pair(models) -> tuple[Path, Path]:
    """Tiny Qwen3 with the real Qwen3 tokenizer and chat template (vocab 151936, as released)."""
    cfg = target_config("qwen3", vocab=151936, hidden=32, layers=2, heads=2, kv_heads=1, head_dim=16,
                        intermediate=64, tie=True)
    cfg |= {"bos_token_id": 151643, "eos_token_id": 151645}
    t = write_target(models / "qwen3-chat", cfg, seed=5)
    copy_qwen3_tokenizer(t)
    (t / "generation_config.json").write_text(json.dumps({"eos_token_id": [151645, 151643]}))
    d = write_drafter(models / "qwen3-chat-drafter",
                      drafter_config(cfg, block_size=16, target_layer_ids=(0, 1), mask_token_id=151669,
                                     heads=2, kv_heads=1, intermediate=64))
    return t, d


@pytest.fixture(scope="session")
def stories_pair(models) -> tuple[Path, Path]:
    """The real trained stories260K Llama and its block-8 drafter, both as shipped in the package
    (the drafter trained by `dflash train`: scripts/make_demo_pair.py), copied so no test can
    touch the package's files."""
    t = copy_stories(models / "stories")
    d = models / "stories-drafter"
    d.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(registry.demo_dirs()[1] / name, d / name)
    return t, d


def random_prompts(count: int, vocab: int, seed: int, longest: int = 40) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab - 1, (int(torch.randint(1, longest, (1,), generator=g)),), generator=g).tolist()
            for _ in range(count)]


def ctrl_c_reaches_it() -> None:
    """preexec_fn for a child the test will Ctrl-C: a shell without job control starts background jobs
    with SIGINT ignored, and Python keeps an ignored SIGINT ignored, so a test suite run in the
    background would see the child ignore its Ctrl-C. The child gets the default disposition instead."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def fitted(name: str, target: Path, out_dir: Path, drafter_cfg: dict, prompts: list[list[int]], steps: int) -> Path:
    """`fit_drafter`'s drafter, fitted once and then copied from tests/.cache (tests/fit_cache.py)."""
    digest = fit_cache.key(target, {"fit": "v1", "cfg": drafter_cfg, "prompts": prompts, "steps": steps})
    return fit_cache.cached(name, out_dir, digest, lambda d: fit_drafter(target, d, drafter_cfg, prompts, steps=steps))


# Prompts a hybrid pair's drafter is fitted to (random ids: the random target's own continuations are learnt).
HYBRID_PROMPTS = random_prompts(6, 500, seed=35)


@pytest.fixture(scope="session")
def qwen35_pair(models) -> tuple[Path, Path]:
    """A tiny Qwen3.5 in the released VL-wrapper layout (slow-decaying recurrent states) and a block-8
    drafter in the Qwen3.6 style (a causal sliding layer and a full one, taps on a linear and a full
    layer), fitted to the target's own continuations so that drafts are really accepted."""
    cfg = qwen35_config()
    t = write_qwen35(models / "qwen35", cfg, seed=11, slow_decay=True)
    dcfg = drafter_config(cfg["text_config"], block_size=8, layers=2, target_layer_ids=(1, 3), heads=4, kv_heads=2,
                          head_dim=16, intermediate=128, mask_token_id=500,
                          layer_types=["sliding_attention", "full_attention"], sliding_window=16)
    return t, fitted("qwen35", t, models / "qwen35-drafter", dcfg, HYBRID_PROMPTS, steps=600)


@pytest.fixture(scope="session")
def slow_stories_pair(models) -> tuple[Path, Path]:
    """The trained stories260K target with a random drafter made wide (a ~77 MB MLP read per
    iteration), so that its real story text comes at tens of tokens/s on a CPU: slow enough that a
    signal or a terminal resize lands mid-answer. The drafter is never right, which changes only speed."""
    t = copy_stories(models / "slow-stories")
    cfg = json.loads((t / "config.json").read_text()) | {"head_dim": 8}
    d = write_drafter(models / "slow-stories-drafter",
                      drafter_config(cfg, block_size=8, layers=1, target_layer_ids=(1, 3), heads=8, kv_heads=4,
                                     head_dim=8, intermediate=100_000, mask_token_id=0))
    return t, d


@pytest.fixture(scope="session")
def qwen3_moe_pair(models) -> tuple[Path, Path]:
    """A tiny Qwen3-MoE (the Qwen3-Coder layout: per-expert tensors, 16 experts, top-4) and a block-8
    drafter fitted to it."""
    cfg = qwen3_moe_config()
    t = write_target(models / "qwen3-moe", cfg, seed=13)
    dcfg = drafter_config(cfg, block_size=8, layers=1, target_layer_ids=(0, 2), mask_token_id=500)
    return t, fitted("qwen3-moe", t, models / "qwen3-moe-drafter", dcfg, HYBRID_PROMPTS, steps=500)


@pytest.fixture(scope="session")
def qwen35_moe_pair(models) -> tuple[Path, Path]:
    """A tiny Qwen3.5-MoE in the 35B-A3B release layout (VL wrapper, fused experts, a shared expert)
    and a block-8 drafter fitted to it."""
    cfg = qwen35_moe_config()
    t = write_qwen35(models / "qwen35-moe", cfg, seed=17, slow_decay=True, layout="fused")
    dcfg = drafter_config(cfg["text_config"], block_size=8, layers=1, target_layer_ids=(1, 3), mask_token_id=500)
    return t, fitted("qwen35-moe", t, models / "qwen35-moe-drafter", dcfg, HYBRID_PROMPTS, steps=500)


@pytest.fixture(scope="session")
def gpt_oss_pair(models) -> tuple[Path, Path]:
    """A tiny gpt-oss (MXFP4 experts, sinks, a window of 8, YaRN, a harmony tokenizer) and a block-8
    drafter with attention biases in the released config (no rope or window keys), fitted to it."""
    from .tiny_gpt_oss import gpt_oss_config, gpt_oss_drafter_config, write_gpt_oss

    cfg = gpt_oss_config()
    t = write_gpt_oss(models / "gpt-oss", cfg, seed=19)
    dcfg = gpt_oss_drafter_config(cfg, block_size=8, layers=2, target_layer_ids=(1, 3))
    return t, fitted("gpt-oss", t, models / "gpt-oss-drafter", dcfg, HYBRID_PROMPTS, steps=500)


def _gemma4_pair(models, name: str, seed: int, **kwargs) -> tuple[Path, Path]:
    """A tiny Gemma 4 (tests/tiny_gemma4.py) and a block-8 drafter fitted to it, configured as z-lab's
    Gemma drafters are: a sliding (causal) and a full (non-causal) layer, the target's soft-cap restated."""
    from .tiny_gemma4 import gemma4_config, gemma4_drafter_config, write_gemma4

    cfg = gemma4_config(tie=False, **kwargs)
    t = write_gemma4(models / name, cfg, seed=seed)
    dcfg = gemma4_drafter_config(cfg["text_config"])
    return t, fitted(name, t, models / f"{name}-drafter", dcfg, HYBRID_PROMPTS, steps=500)


@pytest.fixture(scope="session")
def gemma4_pair(models) -> tuple[Path, Path]:
    """The 31B's layout (the gemma4 wrapper, dense) and its fitted drafter."""
    return _gemma4_pair(models, "gemma4", 23)


@pytest.fixture(scope="session")
def gemma4_moe_pair(models) -> tuple[Path, Path]:
    """The 26B-A4B's layout (routed experts beside the MLP) and its fitted drafter."""
    return _gemma4_pair(models, "gemma4-moe", 29, moe=True)


@pytest.fixture(scope="session")
def dflash2_pair(qwen35_pair, models) -> tuple[Path, Path]:
    """qwen35_pair's target and a DFlash2 drafter fitted on its own continuations, starting from the
    fitted v1 drafter (identity-initialised convs and selector, then all weights trained together)."""
    from .dflash2_fit import as_dflash2, fit_dflash2

    t, v1_dir = qwen35_pair
    cfg = as_dflash2(json.loads((v1_dir / "config.json").read_text()))
    digest = fit_cache.key(t, {"fit": "dflash2", "cfg": cfg, "prompts": HYBRID_PROMPTS, "steps": 150}, (v1_dir,))
    return t, fit_cache.cached("dflash2", models / "dflash2-drafter", digest,
                               lambda d: fit_dflash2(t, d, cfg, HYBRID_PROMPTS, steps=150, init=v1_dir))


def muse_drafter_config(target_cfg: dict) -> dict:
    """A block-8 drafter for the tiny Muse-Glimmer in the assistant's shape: every layer sliding and, as Meta's
    assistant head, non-causal in the block."""
    text = target_cfg["text_config"]
    return drafter_config(text | {"max_position_embeddings": 1024}, block_size=8, layers=2, target_layer_ids=(1, 5),
                          mask_token_id=500, layer_types=["sliding_attention"] * 2, sliding_window=16) | {
        "is_causal": False}


@pytest.fixture(scope="session")
def muse_pair(models) -> tuple[Path, Path]:
    """A tiny Muse-Glimmer in the released VL-wrapper layout (a window of 8, NoPE full layers, soft-cap) and a
    block-8 drafter fitted to it."""
    from .tiny_muse import muse_config, write_muse

    cfg = muse_config()
    t = write_muse(models / "muse", cfg, seed=23)
    return t, fitted("muse", t, models / "muse-drafter", muse_drafter_config(cfg), HYBRID_PROMPTS, steps=500)


@pytest.fixture(scope="session")
def muse_kernel_pair(models) -> tuple[Path, Path]:
    """A tiny Muse-Glimmer (4 layers) and a random block-4 drafter, for Triton's interpreter."""
    from .tiny_muse import muse_config, write_muse

    cfg = muse_config(layers=4)
    dcfg = muse_drafter_config(cfg)
    dcfg["dflash_config"] |= {"block_size": 4, "target_layer_ids": [1, 2]}
    return write_muse(models / "kernel-muse", cfg, seed=21), write_drafter(models / "kernel-muse-drafter", dcfg)


@pytest.fixture(scope="session")
def qwen3_kernel_pair(models) -> tuple[Path, Path]:
    """A Qwen3 small enough for Triton's interpreter (2 layers) and a random block-4 drafter."""
    cfg = target_config("qwen3", layers=2, tie=False, hidden=64, heads=4, kv_heads=2, head_dim=16)
    return (write_target(models / "kernel-qwen3", cfg, seed=21),
            write_drafter(models / "kernel-qwen3-drafter", drafter_config(cfg, block_size=4, target_layer_ids=(0, 1))))


@pytest.fixture(scope="session")
def qwen35_kernel_pair(models) -> tuple[Path, Path]:
    """A tiny Qwen3.5 and a random block-4 drafter, for Triton's interpreter."""
    cfg = qwen35_config()
    return (write_qwen35(models / "kernel-qwen35", cfg, seed=21, slow_decay=True),
            write_drafter(models / "kernel-qwen35-drafter", drafter_config(cfg["text_config"], block_size=4,
                                                                           target_layer_ids=(1, 3), mask_token_id=500)))


@pytest.fixture(scope="session")
def stories_model(stories_pair) -> loader.Model:
    return loader.load(*stories_pair, device="cpu")


def pytest_configure(config):
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))


# Every run records each test's time (setup, call and teardown; under pytest-xdist the controller
# receives the workers' reports) in tests/.cache/durations.tsv, slowest first, with its `slow` mark: the
# list to consult when choosing what the fast tier (-m "not slow") leaves out. A run updates the tests it
# ran and keeps the others' last times, so a targeted run does not erase a whole run's record.
_durations: dict[str, list] = {}


def pytest_runtest_logreport(report):
    entry = _durations.setdefault(report.nodeid, [0.0, "slow" in report.keywords])
    entry[0] += report.duration


def pytest_sessionfinish(session):
    if hasattr(session.config, "workerinput") or not _durations:
        return
    fit_cache.CACHE.mkdir(exist_ok=True)
    path = fit_cache.CACHE / "durations.tsv"
    kept = {}
    if path.exists():
        for line in path.read_text().splitlines():
            seconds, mark, nodeid = line.split("\t", 2)
            kept[nodeid] = [float(seconds), mark == "slow"]
    rows = sorted((kept | _durations).items(), key=lambda kv: -kv[1][0])
    lines = [f"{seconds:.2f}\t{'slow' if slow else '-'}\t{nodeid}" for nodeid, (seconds, slow) in rows]
    tmp = fit_cache.CACHE / "durations.tsv.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)
