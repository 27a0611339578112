"""What `dflash train` does, in order: check the request, load the target, generate (or reload) the
target's answers, train with checkpoints, measure τ with the engine, report.

OUT ends up a drafter directory in the released format (config.json, model.safetensors) plus
OUT/train-state/ (settings, prompts, answers, optimizer state), which `--resume` reads.
"""
from __future__ import annotations

import json
import math
import os
import re
import signal
import tempfile
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch

from .. import cuda
from ..api import ModelOptions, open_session
from ..config import DrafterConfig, default_target_layer_ids
from ..models import target_config
from ..drafter import DEFERRED
from ..engine import cache_slack
from ..errors import DflashError, UsageError
from ..memory import free_device_memory
from .data import AnswerStore, Generation, encode_prompt, generate_answers, read_prompts, trainable
from .evaluate import Acceptance, attach_drafter, measure
from .loop import MiB, STATE_DIR, Schedule, Trainer, TrainOptions, has_checkpoint, memory_plan
from .model import DraftNet, default_mask_token_id, drafter_config, new_drafter, save_weights, write_atomic
from .objective import loss_gamma

SETTINGS = "settings.json"
PROMPTS = "prompts.json"
ANSWERS = "answers.jsonl"
STATE = "state.json"


class Interrupted(DflashError):
    """Ctrl-C: what was done is saved; the message says how to continue."""

    exit_code = 130


@dataclass
class Settings:
    """What a run was started with; `--resume` reuses it (and refuses flags that contradict it)."""

    target: str
    block_size: int = 16
    draft_layers: int = 5
    target_layer_ids: list[int] | None = None
    mask_token_id: int | None = None
    think: bool = False
    temperature: float = 0.0
    max_answer_tokens: int = 1024
    lr: float = 6e-4
    anchors: int = 512
    batch: int = 4
    steps: int | None = None
    seconds: float | None = None
    seed: int = 0
    # How the run is checkpointed, measured and placed (RUN_OPTIONS), not what it learns: a resumed run
    # keeps them unless the command line gives them again.
    checkpoint_every: int | None = None
    eval_tokens: int = 128
    grad_checkpoint: bool = False
    device: str = "auto"


RUN_OPTIONS = ("checkpoint_every", "eval_tokens", "grad_checkpoint", "device")


@dataclass
class TrainRequest:
    """The command line, as given: None means "not given" (the default, or the resumed run's)."""

    target: str | None
    out: Path
    prompts: Path | None = None
    eval_prompts: Path | None = None
    block_size: int | None = None
    draft_layers: int | None = None
    target_layer_ids: list[int] | None = None
    mask_token_id: int | None = None
    think: bool | None = None
    temperature: float | None = None
    max_answer_tokens: int | None = None
    lr: float | None = None
    anchors: int | None = None
    batch: int | None = None
    steps: int | None = None
    time: str | None = None
    seed: int | None = None
    resume: bool = False
    checkpoint_every: int | None = None
    eval_tokens: int | None = None
    grad_checkpoint: bool | None = None
    device: str | None = None  # None or "auto": the resumed run's device, else auto
    yes: bool = False


def parse_duration(text: str) -> float:
    """'90s', '15m', '1h30m', '2h' or plain seconds → seconds."""
    t = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", t):
        return float(t)
    parts = re.findall(r"(\d+(?:\.\d+)?)([hms])", t)
    if not parts or "".join(n + u for n, u in parts) != t:
        raise UsageError(f"--time {text!r}: use a duration like 90s, 15m or 1h30m")
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)


def _resolve_target(name: str, yes: bool) -> Path:
    from ..registry import DEMO, demo_dirs
    from ..resolve import locate

    if name.strip().lower() == DEMO:
        return demo_dirs()[0]
    return locate(name, yes=yes, flag="--target")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DflashError(f"{path} is unreadable ({e}): the training state is damaged; start again in a new --out") from None


def _write_json(path: Path, obj) -> None:
    write_atomic(path, lambda p: p.write_text(json.dumps(obj) + "\n"))


def _settings(req: TrainRequest, state_dir: Path) -> Settings:
    """Fresh: the flags over the defaults. Resumed: the saved settings, checked against the flags."""
    given = {f.name: getattr(req, f.name) for f in fields(Settings) if hasattr(req, f.name)}
    given["seconds"] = parse_duration(req.time) if req.time is not None else None
    if given["device"] == "auto":  # the shared --device option's default: not a choice to hold a resume to
        given["device"] = None
    if req.steps is not None and req.time is not None:
        raise UsageError("give either --steps or --time, not both")
    if not req.resume:
        s = Settings(**{k: v for k, v in given.items() if v is not None})
        if s.steps is None and s.seconds is None:
            raise UsageError("say how long to train: --steps N or --time DURATION (e.g. --time 15m)")
        return s
    path = state_dir / SETTINGS
    try:
        saved = Settings(**_read_json(path))
    except TypeError:
        raise DflashError(f"{path} does not describe a run of this version: start again in a new --out") from None
    for key, value in given.items():
        if value is None or key == "target":
            continue
        if key in RUN_OPTIONS:
            setattr(saved, key, value)
            continue
        if value != getattr(saved, key):
            flag = "--time" if key == "seconds" else "--" + key.replace("_", "-")
            raise UsageError(f"{flag} differs from the run being resumed in {req.out} "
                             f"({getattr(saved, key)!r}): drop it, or start a new --out")
    return saved


def _check(s: Settings, req: TrainRequest) -> None:
    if s.block_size < 2:
        raise UsageError(f"--block-size must be at least 2 (a block is the bonus token and its drafts), got {s.block_size}")
    for name in ("draft_layers", "anchors", "batch", "max_answer_tokens"):
        if getattr(s, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(s, name)}")
    if s.steps is not None and s.steps < 1:
        raise UsageError(f"--steps must be at least 1, got {s.steps}")
    if s.seconds is not None and s.seconds <= 0:
        raise UsageError("--time must be positive")
    if not s.lr > 0:
        raise UsageError(f"--lr must be positive, got {s.lr}")
    if s.temperature < 0:
        raise UsageError(f"--temperature must be >= 0, got {s.temperature}")
    if s.checkpoint_every is not None and s.checkpoint_every < 1:
        raise UsageError(f"--checkpoint-every must be at least 1, got {s.checkpoint_every}")
    if s.eval_tokens < 1:
        raise UsageError(f"--eval-tokens must be at least 1, got {s.eval_tokens}")


def largest_block(positions: int) -> int:
    """The largest --block-size a target of `positions` rope positions takes: the engine keeps
    cache_slack(B) = 2·B + DEFERRED positions past the context, and the context keeps at least half."""
    return (positions // 2 - DEFERRED) // 2


def _check_block_fits(s: Settings, tcfg) -> None:
    """Before any weight is loaded: a block the held-out measurement (and `dflash run`) has no room for."""
    positions = tcfg.max_position_embeddings
    most = largest_block(positions)
    if s.block_size > most:
        raise UsageError(f"--block-size must be ≤ {most} for this target ({positions} positions), got {s.block_size}"
                         if most >= 2 else f"this target's context ({positions} positions) is too short to train a "
                         "drafter for")


def _writable_out(out: Path) -> None:
    """Create --out and its state folder now, before any weight is loaded, and write a file there:
    an unwritable place is one line naming it, not a traceback at the first save."""
    state_dir = out / STATE_DIR
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=state_dir, prefix=".probe.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UsageError(f"cannot write to --out {out}: {e.strerror or e}") from None


OURS = {"config.json", "model.safetensors", STATE_DIR}


def _check_out(req: TrainRequest) -> None:
    """A new run needs an empty (or new) --out; --resume needs one that holds a run."""
    out = req.out
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file")
    started = (out / STATE_DIR / SETTINGS).is_file()
    if req.resume:
        if not started:
            raise UsageError(f"nothing to resume in {out} (no {STATE_DIR}/{SETTINGS}); drop --resume to start")
        return
    if started:
        raise UsageError(f"{out} already holds a training run: pass --resume to continue it, or choose another --out")
    if out.exists() and any(p.name not in OURS for p in out.iterdir()):
        raise UsageError(f"--out {out} is not empty: choose a new directory for the drafter")


def _check_against_target(s: Settings, target, tokenizer, target_dir: Path, err=None) -> None:
    """Fill in the target-dependent defaults and refuse what the target cannot provide."""
    if s.target_layer_ids is None:
        # The reference's spread over the depth (layers 1 .. L-3), one feature layer per draft
        # layer: the released drafters' choice ([1, 9, 17, 25, 33] for 36-layer Qwen3).
        s.target_layer_ids = sorted(set(default_target_layer_ids(target.num_layers, s.draft_layers)))
    bad = [i for i in s.target_layer_ids if not 0 <= i < target.num_layers]
    if bad:
        raise UsageError(f"--target-layer-ids {bad[0]} is outside the target's layers (0..{target.num_layers - 1})")
    if len(set(s.target_layer_ids)) != len(s.target_layer_ids) or not s.target_layer_ids:
        raise UsageError(f"--target-layer-ids must be distinct layers, got {s.target_layer_ids}")
    if target.num_layers - 1 in s.target_layer_ids and err is not None:
        # dflash hands the drafter every layer's output before the final norm; Hugging Face's
        # hidden_states[L] (what other engines may pass for the last layer) is after it.
        err.print(f"[yellow]note: layer {target.num_layers - 1} is the target's last; a drafter reading it may not "
                  "carry over to SGLang/vLLM (the released drafters stop at L-3)[/yellow]")
    if s.mask_token_id is None:
        try:
            s.mask_token_id = default_mask_token_id(tokenizer, target.vocab_size)
        except ValueError:
            raise UsageError(f"{target_dir}: no spare token id for the mask: give --mask-token-id") from None
    if not 0 <= s.mask_token_id < target.vocab_size:
        raise UsageError(f"--mask-token-id {s.mask_token_id} is outside the target's vocabulary (0..{target.vocab_size - 1})")


def _read_prompt_files(req: TrainRequest, err) -> tuple[list, list | None]:
    train = read_prompts(req.prompts)
    held = read_prompts(req.eval_prompts, "--eval-prompts") if req.eval_prompts is not None else None
    if held is None and len(train) < 2:
        raise UsageError("one prompt cannot be split into training and held-out prompts: give more, or --eval-prompts")
    return train, held


def _encode_prompts(model, train: list, held: list | None, s: Settings, err) -> dict:
    """Training and held-out prompts as token ids. Held out: --eval-prompts, or the last tenth of
    the prompts (at most 8), never trained on."""
    if held is None:
        cut = max(1, min(8, len(train) // 10))
        train, held = train[:-cut], train[-cut:]
    # Room for an answer: in the plain engine that writes the answers, and in the speculative one that
    # measures τ (its block's slack comes out of the same rope positions).
    limits = {"train": model.max_context - 16,
              "eval": min(model.max_context, model.target.max_positions - cache_slack(s.block_size)) - 16}
    enc = {name: [encode_prompt(model.tokenizer, p, s.think) for p in prompts]
           for name, prompts in (("train", train), ("eval", held))}
    kept = {name: [ids for ids in rows if 0 < len(ids) < limits[name]] for name, rows in enc.items()}
    skipped = sum(len(enc[n]) - len(kept[n]) for n in enc)
    if skipped:
        err.print(f"[yellow]skipped {skipped} empty prompt(s) or prompt(s) over {limits['train']} tokens "
                  f"({limits['eval']} held out)[/yellow]")
    if not kept["train"] or not kept["eval"]:
        raise UsageError("no usable prompts (all empty or longer than the context)")
    return kept


class _StopFlag:
    """Ctrl-C during training: finish the step, save, leave. A second Ctrl-C changes nothing."""

    def __init__(self):
        self.stop = False
        self._old = None

    def __enter__(self):
        self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        self.stop = True

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self._old)
        return False


def _progress(err, time_mode: bool):
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    counter = "{task.fields[step]} steps" if time_mode else "step {task.completed:.0f}/{task.total:.0f}"
    return Progress(
        TextColumn("[bold]train"), BarColumn(), TextColumn(counter),
        TextColumn("loss {task.fields[loss]:.3f} · acc {task.fields[acc]:.2f} · τ≈{task.fields[tau]:.2f} · "
                   "{task.fields[tps]:,.0f} tok/s"),
        TimeRemainingColumn(), console=err, transient=False, disable=not err.is_terminal,
    )


def run_train(req: TrainRequest, err) -> dict:
    """Run `dflash train`; returns the final report. Progress and notes go to `err` (a rich console)."""
    if req.target is None and not req.resume:
        raise UsageError("give the target to train for: --target ID|DIR (or `demo`)")
    _check_out(req)
    state_dir = req.out / STATE_DIR
    s = _settings(req, state_dir)
    _check(s, req)
    raw_prompts = None if req.resume else _read_prompt_files(req, err)  # before any weight is loaded
    _writable_out(req.out)
    if not req.resume:
        s.target = str(_resolve_target(req.target, req.yes))
        if req.prompts is None:  # after the target: a wrong --target is the one line printed
            err.print("[yellow]no --prompts: using the small built-in prompt set; a useful drafter needs "
                      "thousands of prompts like the ones it will serve[/yellow]")
    elif req.target is not None and str(_resolve_target(req.target, req.yes)) != s.target:
        raise UsageError(f"--target {req.target} is not the target of the run being resumed ({s.target}): drop it")
    target_dir = Path(s.target)
    if not target_dir.is_dir():
        raise DflashError(f"the target {target_dir} of this run is gone")
    tcfg = target_config(target_dir)[1]
    _check_block_fits(s, tcfg)
    pair = open_session(ModelOptions(target=str(target_dir), device=s.device), (target_dir, None))
    model = pair.model
    _check_against_target(s, tcfg, model.tokenizer, target_dir, None if req.resume else err)
    export = torch.bfloat16 if cuda.is_gpu(model.target.device) else torch.float32
    if not req.resume:
        prompts = _encode_prompts(model, *raw_prompts, s, err)
        config = drafter_config(tcfg, block_size=s.block_size, num_layers=s.draft_layers,
                                target_layer_ids=s.target_layer_ids, mask_token_id=s.mask_token_id,
                                dtype="bfloat16" if cuda.is_gpu(model.target.device) else "float32",
                                enable_thinking=s.think)
        state_dir.mkdir(parents=True, exist_ok=True)
        (state_dir / ANSWERS).unlink(missing_ok=True)  # from a start that never got as far as its settings
        _write_json(state_dir / PROMPTS, prompts)
        # OUT is a loadable drafter from here on (README): the step-0 initialisation the run starts from.
        save_weights(req.out, new_drafter(req.out, config, s.seed), export, {"step": "0"})
        _write_json(state_dir / SETTINGS, asdict(s))  # last: its presence means "resumable"
    elif any(getattr(req, k) is not None for k in RUN_OPTIONS):
        _write_json(state_dir / SETTINGS, asdict(s))  # the options given again hold for later resumes too
    prompts = _read_json(state_dir / PROMPTS)
    config = _read_json(req.out / "config.json")

    # ---- data: the target's own answers ----------------------------------------------------------
    gen = Generation(min(s.max_answer_tokens, model.max_context - 1), s.temperature, s.seed)
    store = AnswerStore(state_dir / ANSWERS)
    started = time.perf_counter()
    todo = len(prompts["train"]) - len(store.load())
    if todo:
        err.print(f"generating the target's answers to {todo} prompts (kept in {state_dir / ANSWERS})")
    longest = max(len(p) for p in prompts["train"]) + gen.max_new_tokens
    engine = pair.new_engine(max_context=longest)
    from rich.progress import Progress

    try:
        with Progress(console=err, transient=True, disable=not err.is_terminal or not todo) as bar:
            task = bar.add_task("answers", total=todo)
            answers = generate_answers(engine, prompts["train"], model.stop_token_ids, gen, store,
                                       on_answer=lambda i, seq: bar.advance(task))
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted while generating answers ({len(store.load())} kept in {state_dir / ANSWERS}); "
                          f"continue with `dflash train --out {req.out} --resume`") from None
    del engine
    generation_s = time.perf_counter() - started
    seqs = trainable(answers)
    if not seqs:
        raise DflashError("the target's answers are too short to train on (each needs 2 tokens or more)")

    # ---- the drafter and its trainer -------------------------------------------------------------
    resuming = req.resume and has_checkpoint(req.out)
    net = DraftNet(DrafterConfig.from_dir(req.out)) if resuming else new_drafter(req.out, config, s.seed)
    net.to(model.target.device)
    opts = TrainOptions(Schedule(s.steps, s.seconds, s.lr), batch=s.batch, anchors=s.anchors,
                        gamma=loss_gamma(s.block_size), seed=s.seed, grad_checkpoint=s.grad_checkpoint)
    trainer = Trainer(net, model.target, seqs, opts)
    if resuming:
        trainer.load(req.out)
        err.print(f"resuming at step {trainer.progress.step} ({trainer.progress.elapsed:.0f} s trained)")
    trainer.opts = _fit_memory(trainer, seqs, err)
    held = prompts["eval"]
    saved = _read_json(state_dir / STATE) if (state_dir / STATE).is_file() else {}
    evaluations: list[dict] = saved.get("evaluations", [])

    def save_state(final: bool) -> None:
        p = trainer.progress
        _write_json(state_dir / STATE, {"step": p.step, "elapsed": p.elapsed, "loss": p.loss, "accuracy": p.accuracy,
                                        "train_tau": p.tau, "evaluations": evaluations, "finished": final})

    def checkpoint(final: bool = False) -> Acceptance:
        trainer.save(req.out, export)
        acc = measure(model.target, attach_drafter(model.target, req.out), held, block_size=s.block_size,
                      max_new_tokens=s.eval_tokens, stop_token_ids=model.stop_token_ids)
        evaluations.append({"step": trainer.progress.step, "tau": round(acc.tau, 4)})
        save_state(final)
        return acc

    finished = _train(trainer, s, req, err, checkpoint, save_state, export)
    if not finished:
        raise Interrupted(f"interrupted at step {trainer.progress.step}: the drafter in {req.out} is usable; "
                          f"continue with `dflash train --out {req.out} --resume`")
    acc = checkpoint(final=True)
    p = trainer.progress
    return {
        "out": str(req.out), "target": s.target, "steps": p.step, "train_seconds": round(p.elapsed, 1),
        "data": {"prompts": len(prompts["train"]), "held_out_prompts": len(held), "sequences": len(seqs),
                 "tokens": sum(len(q.ids) for q in seqs), "generation_seconds": round(generation_s, 1)},
        "loss": p.loss, "accuracy": p.accuracy, "train_tau": p.tau, "tokens_per_second": p.tokens_per_second,
        "settings": asdict(s), "evaluations": evaluations, "held_out": acc.to_json(),
    }


def _train(trainer: Trainer, s: Settings, req: TrainRequest, err, checkpoint, save_state, export) -> bool:
    """The loop under a progress bar and a Ctrl-C flag; True when the schedule ran to its end. An
    interrupted run saves a checkpoint of the last finished step before returning False."""
    time_mode = s.steps is None
    if s.checkpoint_every:
        def due(p) -> bool:
            return p.step % s.checkpoint_every == 0
    elif time_mode:
        next_at = [trainer.progress.elapsed + s.seconds / 10]

        def due(p) -> bool:
            if p.elapsed < next_at[0]:
                return False
            next_at[0] = p.elapsed + s.seconds / 10
            return True
    else:
        every = max(1, s.steps // 10)

        def due(p) -> bool:
            return p.step % every == 0
    last_log = [time.perf_counter()]
    total = s.seconds if time_mode else s.steps
    with _StopFlag() as flag, _progress(err, time_mode) as bar:
        p = trainer.progress
        task = bar.add_task("train", total=total, completed=p.elapsed if time_mode else p.step,
                            step=p.step, loss=math.nan, acc=math.nan, tau=math.nan, tps=0.0)

        def on_step(p) -> None:
            bar.update(task, completed=p.elapsed if time_mode else p.step, step=p.step, loss=p.loss,
                       acc=p.accuracy, tau=p.tau, tps=p.tokens_per_second)
            if not err.is_terminal and time.perf_counter() - last_log[0] > 30:  # a log, not a live bar
                last_log[0] = time.perf_counter()
                err.print(f"step {p.step} · loss {p.loss:.3f} · acc {p.accuracy:.2f} · τ≈{p.tau:.2f} · "
                          f"{p.tokens_per_second:,.0f} tok/s")

        def on_checkpoint(p) -> None:
            acc = checkpoint()
            bar.console.print(f"step {p.step}: checkpoint saved · held-out τ {acc.tau:.2f}")

        err.print(f"training from step {p.step}" + (f" for {s.seconds:.0f} s" if time_mode else f" to {s.steps}"))
        finished = trainer.run(lambda: flag.stop, on_step, due, on_checkpoint)
        if not finished:
            trainer.save(req.out, export)  # still under the flag: a second Ctrl-C cannot cut it short
            save_state(False)
    return finished


def _fit_memory(trainer: Trainer, seqs, err) -> TrainOptions:
    """Print the memory plan; on a GPU, turn on gradient checkpointing and then halve the anchors
    until one step fits in free memory."""
    opts, target = trainer.opts, trainer.target
    longest = max(len(q.ids) for q in seqs)
    gpu = cuda.is_gpu(target.device)
    dtype_bytes = 2 if gpu else 4
    free = free_device_memory(target.device)
    plan = memory_plan(trainer.net, target.cfg.vocab_size, longest, opts, dtype_bytes, gpu)
    changed = []
    while free is not None and sum(plan.values()) > 0.8 * free:
        if not opts.grad_checkpoint:
            opts = replace(opts, grad_checkpoint=True)
            changed.append("gradient checkpointing on")
        elif opts.anchors > 16:
            opts = replace(opts, anchors=opts.anchors // 2)
            changed.append(f"{opts.anchors} anchors per sequence")
        else:
            raise DflashError(f"one training step needs ≈ {sum(plan.values()) / MiB:,.0f} MiB and "
                              f"{free / MiB:,.0f} MiB is free: use --batch 1 or shorter --max-answer-tokens")
        plan = memory_plan(trainer.net, target.cfg.vocab_size, longest, opts, dtype_bytes, gpu)
    c = trainer.net.cfg
    line = (f"memory plan: drafter {plan['weights'] / MiB:.1f} MiB + AdamW {plan['optimizer'] / MiB:.1f} MiB + "
            f"activations ≈ {plan['activations'] / MiB:,.0f} MiB per step ({opts.batch} sequences of ≤ {longest} "
            f"tokens, ≤ {min(opts.anchors, longest)} anchors each, block {c.block_size})")
    err.print(line + (f"; {free / MiB:,.0f} MiB free" if free is not None else ""))
    if changed:
        err.print(f"to fit in memory: {', '.join(changed)}")
    return opts


def render(report: dict, console) -> None:
    """The final report for a terminal: τ on held-out prompts and acceptance per draft position."""
    from rich.table import Table

    h = report["held_out"]
    console.print(f"dflash train · {report['out']} · {report['steps']} steps in {report['train_seconds'] / 60:.1f} min "
                  f"· {report['data']['sequences']} answers ({report['data']['tokens']:,} tokens)")
    console.print(f"held-out τ {h['tau']:.2f} at T=0, block {h['block_size']} "
                  f"({h['prompts']} prompts, {h['tokens']} tokens, {h['iterations']} iterations)")
    table = Table(title="share of iterations accepting draft position k", title_justify="left")
    for k in range(1, h["block_size"]):
        table.add_column(str(k), justify="right")
    table.add_row(*(f"{a:.2f}" for a in h["accepted_at_position"]))
    console.print(table)
    console.print(f"use it: dflash run --target {report['target']} --drafter {report['out']}")
