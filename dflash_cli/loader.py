"""Load a target, its drafter and the tokenizer from local Hugging Face layout directories.

Configs are read and the pair is checked before a single weight is loaded. Tokenizers load through
transformers without remote code. Stop tokens come from generation_config.json and the tokenizer.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from . import cuda
from .config import DrafterConfig
from .drafter import Drafter
from .engine import cache_slack
from .errors import DflashError, UsageError
from .formats import PLAIN, ChatFormat, detect, thinking_default
from .harmony import HarmonyTokens
from .memory import free_device_memory, needs_for, plan_context, verified_tree_nodes
from .models import load_target, target_config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Model:
    tokenizer: object  # a transformers PreTrainedTokenizerFast
    target: object  # a models.base.Decoder
    drafter: Drafter | None
    stop_token_ids: frozenset[int]
    max_context: int
    target_dir: Path
    drafter_dir: Path | None
    thinking: bool = False  # the thinking mode the drafter was trained with: the default (formats.thinking_default)
    format: ChatFormat = PLAIN  # how prompts render and answers read (formats.detect, once at load)
    device: torch.device = torch.device("cpu")  # where it runs, as resolve_device gave it (a GPU's with its index)


def resolve_device(name: str = "auto") -> torch.device:
    """The device `--device NAME` means. A GPU always comes with its index (`cuda:0` for `cuda` and
    `auto`: the current one), since `set_device` and every per-device call refuse one without."""
    if name == "auto":
        return cuda.device() if cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device '{name}' (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":  # mps, meta, xpu…: the engine runs on neither
        raise UsageError(f"--device {name} is not supported: dflash runs on cpu or cuda (cuda:N)")
    if not cuda.is_available():
        raise DflashError("--device cuda was asked for, but torch sees no CUDA GPU (see `dflash doctor`)")
    count = cuda.device_count()
    if device.index is not None and device.index >= count:
        raise UsageError(f"--device {name}: there is no such GPU; torch sees {count} "
                         f"(use {'cuda:0' if count == 1 else f'cuda:0 … cuda:{count - 1}'}; see `nvidia-smi`)")
    return cuda.device(device.index)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if cuda.is_gpu(device) else torch.float32
    if name not in DTYPES:
        raise UsageError(f"unknown dtype '{name}' (use auto, bfloat16 or float32)")
    if name == "float16":
        raise UsageError("float16 is not supported: the drafter's feature fusion overflows in fp16; use bfloat16")
    return DTYPES[name]


# A file that holds a vocabulary (transformers' fast, sentencepiece, BPE and WordPiece tokenizers). Without
# one, transformers 5 builds an empty tokenizer for some model types (qwen3: one token), and every prompt
# would encode to nothing.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model", "tekken.json")


def load_tokenizer(directory: Path):
    from transformers import AutoTokenizer

    if not any((Path(directory) / name).is_file() for name in TOKENIZER_FILES):
        raise DflashError(f"{directory} has no tokenizer (no {', '.join(TOKENIZER_FILES[:3])}): copy the tokenizer "
                          "files of the model it was made from into it")
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # it reads config.json too, and logs its opinions of it (dflash checks its own)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False)
    except Exception as e:  # transformers raises many types here; all mean "no usable tokenizer"
        raise DflashError(f"cannot load a tokenizer from {directory}: {str(e).splitlines()[0]}") from None
    finally:
        hf_logging.set_verbosity(verbosity)


def stop_token_ids(directory: Path, tokenizer) -> frozenset[int]:
    """generation_config.json's eos ids and the tokenizer's; for a harmony tokenizer (gpt-oss) also
    <|return|>, <|call|> and <|endoftext|>, and never <|end|>, which ends one message of an answer."""
    ids: set[int] = set()
    path = Path(directory) / "generation_config.json"
    if path.is_file():
        try:
            eos = json.loads(path.read_text()).get("eos_token_id")
        except json.JSONDecodeError as e:
            raise DflashError(f"{path} is not valid JSON: {e}") from None
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    harmony = HarmonyTokens.of(tokenizer)
    if harmony is not None:
        ids = (ids | harmony.stops) - {harmony.end}
    return frozenset(int(i) for i in ids)


def target_weight_bytes(target_dir: Path, family, cfg, dtype: torch.dtype) -> int | None:
    """A quantized target's bytes as loaded (packed, from its safetensors headers); None for a plain one,
    whose weight table in `dtype` is what it loads."""
    from .checkpoint import weight_bytes, weight_files
    from .config import read_config
    from .quant.plan import target_plan

    plan = target_plan(read_config(target_dir))
    if plan is None:
        return None
    layout = family.layout_of(weight_files(target_dir))
    return weight_bytes(target_dir, family.weight_table(cfg, layout), dtype, plan)


SMALL_MODEL_BYTES = 256 << 20


def cpu_threads(weight_bytes: int) -> None:
    """One torch thread for a small model on a CPU, unless OMP_NUM_THREADS says otherwise: its steps are
    a few hundred tiny ops, which threads only slow down, and under contention (another job on the
    cores) several threads collapse (a tiny model measured 618 tok/s on one thread, 16 on two)."""
    if "OMP_NUM_THREADS" not in os.environ and weight_bytes < SMALL_MODEL_BYTES:
        torch.set_num_threads(1)


def load(target_dir: Path, drafter_dir: Path | None, *, device: str = "auto", dtype: str = "auto",
         max_context: int | None = None, tree_budget: int | str = 0) -> Model:
    """tree_budget: the --tree-budget the engine will verify with (N nodes, or "auto"): its verify buffers are
    in the memory plan, and the caches' slack is a tree's (engine.cache_slack)."""
    target_dir = Path(target_dir)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if cuda.is_gpu(dev):  # Triton launches, graph captures and events follow the current device
        cuda.set_device(dev)
    family, target_cfg = target_config(target_dir)
    drafter_cfg = None
    if drafter_dir is not None:
        drafter_dir = Path(drafter_dir)
        drafter_cfg = DrafterConfig.from_dir(drafter_dir)
        drafter_cfg.check_against(target_cfg, drafter_dir)
    if max_context is not None and max_context < 2:
        raise UsageError(f"--max-context must be at least 2, got {max_context}")
    block = drafter_cfg.block_size if drafter_cfg else 1
    slack = cache_slack(max(block, verified_tree_nodes(drafter_cfg, block, tree_budget)))  # a tree's rows
    needs = needs_for(family, target_cfg, drafter_cfg, dt, block, slack, target_weight_bytes(target_dir, family,
                                                                                          target_cfg, dt),
                      tree_budget=tree_budget)
    context = plan_context(needs, target_cfg.max_position_embeddings, max_context, free_device_memory(dev))
    positions = context + slack  # rope rows the caches can reach
    if not cuda.is_gpu(dev):
        cpu_threads(needs.weights)
    tokenizer = load_tokenizer(target_dir)
    target = load_target(target_dir, dt, dev, positions, family, target_cfg)
    drafter = None
    if drafter_cfg is not None:
        drafter = Drafter.load(drafter_dir, drafter_cfg.for_target(target.embed_scale, target_cfg.logit_softcap),
                               target.embed, target.lm_head, positions)
    return Model(tokenizer, target, drafter, stop_token_ids(target_dir, tokenizer), context, target_dir, drafter_dir,
                 thinking_default(target_dir, drafter_dir), detect(tokenizer), dev)
