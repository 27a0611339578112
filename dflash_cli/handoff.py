"""`dflash serve --engine sglang|vllm`: hand a pair to SGLang or vLLM, which run DFlash with tensor
parallelism, rather than grow a distributed runtime here.

The command is built from the registry (kind, suggested GPU count) and the drafter's block size,
checked against the installed engine, then exec'd: the user gets that engine's own OpenAI-compatible
server on the same host and port, under the same model name as `dflash serve` would use.

Flags, and where they come from:
- vLLM: `vllm serve TARGET --speculative-config '{"method": "dflash", "model": DRAFTER,
  "num_speculative_tokens": B-1}' --attention-backend flash_attn --max-num-batched-tokens 32768`
  (z-lab/dflash README, "Quick Start: vLLM"); `--tensor-parallel-size`, `--max-model-len`,
  `--served-model-name`, `--host`, `--port`, `--api-key` (vLLM's `vllm serve` options).
- SGLang: `python -m sglang.launch_server --model-path TARGET --speculative-algorithm DFLASH
  --speculative-draft-model-path DRAFTER --speculative-num-draft-tokens B`, with
  `SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN=1` (the drafters' configs declare a shorter context than
  their targets) and `--mamba-scheduler-strategy extra_buffer` for hybrid (linear-attention) targets
  (z-lab README, "Quick Start: SGLang"); `--tp-size`, `--context-length`, `--served-model-name`,
  `--host`, `--port`, `--api-key` (SGLang server arguments). The README's Blackwell-only attention
  backends (trtllm_mha, fa4) are left to the engine's defaults, which fit every GPU.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from . import hub, registry
from .errors import DflashError, UsageError

ENGINES = ("sglang", "vllm")
NAMES = {"sglang": "SGLang", "vllm": "vLLM"}
# A file each engine has only from the version that knows DFlash on (its DFlash worker / proposer).
_MARKERS = {"sglang": "srt/speculative/dflash_worker.py", "vllm": "v1/spec_decode/dflash.py"}
_INSTALL = {"sglang": "pip install -U sglang", "vllm": "pip install -U vllm"}
# Targets whose tokenizer or model is custom code in the checkpoint: the engine must be allowed to run
# it (dflash itself never does). Kimi K2.5 ships tokenization_kimi.py (tiktoken-based).
_REMOTE_CODE = frozenset({"moonshotai/Kimi-K2.5"})
_HYBRID = frozenset({"hybrid", "hybrid-moe"})
# Gemma 4's global layers have 512-dim heads, which FlashAttention does not take: vLLM picks its own
# backends for target and drafter (vllm#42068/#42069: a forced one breaks the non-causal drafter), SGLang
# runs the target on Triton (as its Gemma 4 DFlash users launch it).
_OWN_ATTENTION = ("google/gemma-4-",)


@dataclass(frozen=True)
class Pair:
    """What the hand-off needs to know about a pair: from the registry, or from --target/--drafter."""

    name: str  # the model name clients use (the alias, as with `dflash serve`)
    target: str  # Hub id or local directory
    drafter: str
    block_size: int
    kind: str = "dense"
    gpus: int = 1


@dataclass
class Launch:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)  # added to the inherited environment
    secret: str | None = None  # printed as "$DFLASH_API_KEY", never as itself

    def shell(self) -> str:
        """The command as one line a user can paste (the API key left to the environment)."""
        argv = list(self.argv)
        if argv and argv[0] == sys.executable and _python_on_path_is(sys.executable):
            argv[0] = "python"  # the active environment's python: say it the way people type it
        words = [f"{k}={shlex.quote(v)}" for k, v in self.env.items()]
        words += ['"$DFLASH_API_KEY"' if self.secret and a == self.secret else shlex.quote(a) for a in argv]
        return " ".join(words)


def _python_on_path_is(executable: str) -> bool:
    found = shutil.which("python")
    return found is not None and os.path.realpath(found) == os.path.realpath(executable)


def drafter_block_size(drafter: str, fallback: int) -> int:
    """The block size in the drafter's config.json when it is on disk (a directory or the HF cache);
    the registry's value otherwise. Never touches the network."""
    directory = hub.local_path(drafter)
    if directory is None:
        return fallback
    try:
        cfg = json.loads((Path(directory) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return fallback
    size = cfg.get("block_size") or (cfg.get("dflash_config") or {}).get("block_size")
    return int(size) if isinstance(size, int) and size > 1 else fallback


def resolve_pair(model: str | None, target: str | None, drafter: str | None, block_size: int | None = None) -> Pair:
    """The pair to hand over; `block_size` (--block-size) spares reading the drafter's config."""
    if target is None:
        if model is None:
            raise UsageError("name a model (see `dflash models`), or give --target and --drafter")
        p = registry.resolve(model)
        drafter = drafter or p.drafter
        block = block_size or drafter_block_size(drafter, p.block_size)
        return Pair(p.alias, p.target, drafter, block, p.kind, p.gpus)
    if model is not None:
        raise UsageError(f"give either a model name ('{model}') or --target, not both")
    if drafter is None:
        raise UsageError("--engine needs a drafter: give --drafter with --target")
    block = block_size or drafter_block_size(drafter, 0)
    if not block:
        raise UsageError(f"cannot read the block size of {drafter} (not downloaded, or no block_size in its "
                         "config.json): give --block-size")
    path = Path(target).expanduser()
    name = path.name if path.is_dir() else target
    return Pair(name, target, drafter, block)


def launch_command(engine: str, pair: Pair, *, tp: int | None = None, host: str = "127.0.0.1", port: int = 8000,
                   block_size: int | None = None, max_context: int | None = None,
                   api_key: str | None = None) -> Launch:
    """The exact command that serves `pair` with DFlash on `engine`."""
    if engine not in ENGINES:
        raise UsageError(f"unknown engine '{engine}' (choose from {', '.join(ENGINES)})")
    block = block_size or pair.block_size
    if block < 2:
        raise UsageError(f"--block-size must be at least 2 for DFlash, got {block}")
    tp = tp or pair.gpus
    remote = pair.target in _REMOTE_CODE
    if engine == "vllm":
        spec = {"method": "dflash", "model": pair.drafter, "num_speculative_tokens": block - 1}
        own = pair.target.startswith(_OWN_ATTENTION)
        argv = ["vllm", "serve", pair.target, "--speculative-config", json.dumps(spec),
                *([] if own else ["--attention-backend", "flash_attn"]), "--max-num-batched-tokens", "32768",
                "--tensor-parallel-size", str(tp)]
        argv += ["--max-model-len", str(max_context)] if max_context else []
        env: dict[str, str] = {}
    else:
        argv = [sys.executable, "-m", "sglang.launch_server", "--model-path", pair.target,
                "--speculative-algorithm", "DFLASH", "--speculative-draft-model-path", pair.drafter,
                "--speculative-num-draft-tokens", str(block), "--tp-size", str(tp)]
        argv += ["--mamba-scheduler-strategy", "extra_buffer"] if pair.kind in _HYBRID else []
        argv += ["--attention-backend", "triton"] if pair.target.startswith(_OWN_ATTENTION) else []
        argv += ["--context-length", str(max_context)] if max_context else []
        env = {"SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN": "1"}
    argv += ["--trust-remote-code"] if remote else []
    argv += ["--served-model-name", pair.name, "--host", host, "--port", str(port)]
    argv += ["--api-key", api_key] if api_key else []
    return Launch(argv, env, api_key)


def engine_python(engine: str) -> str | None:
    """The interpreter the engine runs under: ours for SGLang (`python -m`); for vLLM the one named
    by the `vllm` command's first line (it may live in its own virtual environment)."""
    if engine == "sglang":
        return sys.executable
    script = shutil.which("vllm")
    if script is None:
        return None
    try:
        with open(script, "rb") as f:
            first = f.readline().decode("utf-8", "replace").strip()
    except OSError:
        return sys.executable
    if first.startswith("#!"):
        words = first[2:].split()
        if words and os.path.basename(words[0]) == "env" and len(words) > 1:
            found = shutil.which(words[1])
            return found or sys.executable
        if words and os.path.isfile(words[0]):
            return words[0]
    return sys.executable


# Run in the engine's interpreter: finds the package without importing it (importing vLLM takes seconds).
_PROBE = """
import importlib.metadata, importlib.util, json, os, sys
name, marker = sys.argv[1], sys.argv[2]
spec = importlib.util.find_spec(name)
if spec is None or not spec.submodule_search_locations:
    print("null")
else:
    try:
        version = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        version = "(unknown version)"
    roots = list(spec.submodule_search_locations)
    print(json.dumps({"version": version, "dflash": any(os.path.isfile(os.path.join(r, marker)) for r in roots)}))
"""


def check_engine(engine: str) -> str:
    """The installed engine's version; a one-line error that says what to install otherwise."""
    name, install = NAMES[engine], _INSTALL[engine]
    python = engine_python(engine)
    if python is None:
        raise DflashError(f"{name} is not installed (no `{engine}` command on PATH): install it with `{install}` "
                          "on the GPU machine")
    try:
        probe = subprocess.run([python, "-c", _PROBE, engine, _MARKERS[engine]], capture_output=True, text=True,
                               timeout=60)
        found = json.loads(probe.stdout.strip().splitlines()[-1]) if probe.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired, json.JSONDecodeError, IndexError):
        found = None
    if found is None:
        raise DflashError(f"{name} is not installed for {python}: install it with `{install}` on the GPU machine")
    if not found.get("dflash"):
        raise DflashError(f"{name} {found.get('version')} does not know DFlash yet: upgrade it with `{install}`")
    return str(found.get("version"))


def hand_off(engine: str, launch: Launch, *, dry_run: bool = False) -> None:
    """Print the command (--dry-run: on stdout, and stop), or check the engine and become it."""
    if dry_run:
        print(launch.shell())
        return
    version = check_engine(engine)
    print(f"dflash: handing over to {NAMES[engine]} {version}: {launch.shell()}", file=sys.stderr, flush=True)
    env = dict(os.environ, **launch.env)
    try:
        os.execvpe(launch.argv[0], launch.argv, env)
    except OSError as e:
        raise DflashError(f"cannot start {launch.argv[0]}: {e.strerror or e}") from None
