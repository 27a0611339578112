"""`dflash train` end to end on a tiny target: the released format, resume, Ctrl-C, bad input."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from dflash_cli import loader
from dflash_cli.cli import main

from .conftest import ctrl_c_reaches_it
from .tiny import target_config, write_target

PROMPTS = ["Once upon a time", "The little dog ran", "Tom and Sue went to the park", "The sun was hot",
           "A big red ball", "Lily had a cat", "One day, a bird", "Sam found a box"]
RELEASED_TOP = {"fc.weight", "hidden_norm.weight", "norm.weight"}
RELEASED_LAYER = {"input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.weight",
                  "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
                  "self_attn.q_norm.weight", "self_attn.k_norm.weight", "mlp.gate_proj.weight",
                  "mlp.up_proj.weight", "mlp.down_proj.weight"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny random Llama with the stories tokenizer (4 layers), and a prompt file."""
    root = tmp_path_factory.mktemp("train")
    t = write_target(root / "target", target_config("llama", layers=4, tie=False), seed=2)
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    return t, prompts


def _args(t: Path, prompts: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--target", str(t), "--prompts", str(prompts), "--out", str(out), "--block-size", "4",
            "--draft-layers", "2", "--max-answer-tokens", "24", "--anchors", "8", "--batch", "3",
            "--eval-tokens", "12", "--device", "cpu", "--lr", "3e-3", *extra]


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_train_writes_a_drafter_in_the_released_format(capsys, tiny, tmp_path):
    t, prompts = tiny
    out = tmp_path / "drafter"
    assert main(_args(t, prompts, out, "--steps", "6", "--json")) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)  # stdout: the report only
    assert report["steps"] == 6 and report["data"]["prompts"] == 7 and report["data"]["held_out_prompts"] == 1
    assert report["held_out"]["tau"] >= 1 and len(report["held_out"]["accepted_at_position"]) == 3
    assert "memory plan:" in captured.err and "generating the target's answers to 7 prompts" in captured.err

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["DFlashDraftModel"] and cfg["model_type"] == "qwen3"
    assert cfg["dflash_config"] == {"block_size": 4, "mask_token_id": 0, "target_layer_ids": [1],  # <unk>; L=4
                                    "enable_thinking": False}  # the mode it was trained in: the pair's chat default
    assert (cfg["num_hidden_layers"], cfg["num_target_layers"], cfg["hidden_size"]) == (2, 4, 64)
    weights = _tensors(out / "model.safetensors")
    assert set(weights) == RELEASED_TOP | {f"layers.{i}.{n}" for i in range(2) for n in RELEASED_LAYER}
    assert weights["fc.weight"].shape == (64, 64) and weights["layers.0.self_attn.k_proj.weight"].shape == (32, 64)

    # The saved weights are the trainer's (its fp32 master copy), and load through the engine.
    master = _tensors(out / "train-state" / "optimizer.safetensors")
    for name, w in weights.items():
        assert torch.equal(w, master[f"param/{name}"]), name
    model = loader.load(t, out, device="cpu")
    assert model.drafter.cfg.block_size == 4 and model.drafter.cfg.target_layer_ids == (1,)
    assert main(["run", "--target", str(t), "--drafter", str(out), "-p", "Once", "--raw", "-n", "8",
                 "--device", "cpu", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["token_ids"]) == 8


def _wait_for(proc: subprocess.Popen, text: str, timeout: float = 120) -> str:
    seen, deadline = "", time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        seen += line
        if text in line:
            return seen
    proc.kill()
    pytest.fail(f"never saw {text!r} on stderr:\n{seen}")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dflash_cli.cli", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_ctrl_c_leaves_a_loadable_checkpoint_and_resume_finishes_the_same_run(tiny, tmp_path):
    t, prompts = tiny
    out = tmp_path / "interrupted"
    args = _args(t, prompts, out, "--steps", "30", "--checkpoint-every", "4")
    proc = subprocess.Popen([sys.executable, "-m", "dflash_cli.cli", *args], stderr=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            preexec_fn=ctrl_c_reaches_it)
    _wait_for(proc, "step 4: checkpoint saved")
    proc.send_signal(signal.SIGINT)  # a real Ctrl-C
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 130, err
    assert "interrupted at step" in err and "Traceback" not in err and proc.stdout.read() == ""
    state = json.loads((out / "train-state" / "state.json").read_text())
    assert 4 <= state["step"] < 30 and not state["finished"]
    stamp = safe_open(str(out / "model.safetensors"), framework="pt").metadata()["step"]
    assert int(stamp) == state["step"]  # the drafter on disk is the interrupted step's
    assert loader.load(t, out, device="cpu").drafter is not None

    resumed = _cli("train", "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming at step {state['step']}" in resumed.stderr
    assert json.loads((out / "train-state" / "state.json").read_text())["step"] == 30

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses (OMP_NUM_THREADS=1): the same sums in the same order
    try:
        assert main(_args(t, prompts, tmp_path / "straight", "--steps", "30", "--checkpoint-every", "4")) == 0
    finally:
        torch.set_num_threads(threads)
    a, b = _tensors(out / "model.safetensors"), _tensors(tmp_path / "straight" / "model.safetensors")
    for name in a:  # batches and anchors are keyed by the step: the very same run
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("extra, message", [
    (["--steps", "2", "--block-size", "1"], "--block-size must be at least 2"),
    (["--steps", "2", "--target-layer-ids", "1,9"], "--target-layer-ids 9 is outside the target's layers (0..3)"),
    (["--steps", "2", "--target-layer-ids", "one"], "give comma-separated layer numbers"),
    (["--steps", "2", "--mask-token-id", "512"], "--mask-token-id 512 is outside the target's vocabulary"),
    ([], "say how long to train: --steps N or --time DURATION"),
    (["--steps", "2", "--time", "1m"], "give either --steps or --time"),
    (["--time", "soon"], "--time 'soon': use a duration like 90s"),
    (["--steps", "2", "--resume"], "nothing to resume in"),
    (["--steps", "2", "--block-size", "241"], "--block-size must be ≤ 240 for this target (1024 positions), got 241"),
])
def test_bad_input_is_one_line(capsys, tiny, tmp_path, extra, message):
    t, prompts = tiny
    assert main(_args(t, prompts, tmp_path / "out", *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and err.startswith("Error: "), err
    assert not (tmp_path / "out" / "train-state" / "settings.json").exists()


def test_bad_files_are_one_line(capsys, tiny, tmp_path):
    t, prompts = tiny
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    checks = [
        (["--prompts", str(empty)], f"--prompts {empty} holds no prompts", 2),
        (["--target", str(tmp_path)], f"no config.json in {tmp_path}", 1),  # not a model: no layers to read
        (["--target", "./nowhere"], "--target ./nowhere is neither a directory nor a Hub repo id", 2),
        (["--eval-prompts", str(tmp_path / "nope.txt")], f"cannot read --eval-prompts {tmp_path / 'nope.txt'}: ", 2),
        (["--eval-prompts", str(empty)], f"--eval-prompts {empty} holds no prompts", 2),
        (["--eval-prompts", str(tmp_path / "nope.jsonl")], f"cannot read --eval-prompts {tmp_path / 'nope.jsonl'}", 2),
    ]
    for extra, message, code in checks:
        assert main(_args(t, prompts, tmp_path / "out", "--steps", "2", *extra)) == code
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    assert main(_args(t, prompts, tmp_path / "full", "--steps", "2")) == 2
    assert "is not empty" in capsys.readouterr().err


def test_resume_refuses_a_conflicting_setting_and_a_fresh_start_refuses_a_run(capsys, tiny, tmp_path):
    t, prompts = tiny
    out = tmp_path / "run"
    assert main(_args(t, prompts, out, "--steps", "2")) == 0
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "--block-size", "8"]) == 2
    assert "--block-size differs from the run being resumed" in capsys.readouterr().err
    assert main(_args(t, prompts, out, "--steps", "2")) == 2
    assert "already holds a training run: pass --resume" in capsys.readouterr().err


def test_an_unwritable_out_is_one_line_before_the_target_loads(capsys, tiny, tmp_path, monkeypatch):
    from dflash_cli import loader

    t, prompts = tiny
    monkeypatch.setattr(loader, "load", lambda *a, **k: pytest.fail("the target was loaded"))
    out = Path(f"/proc/dflash-train-{os.getpid()}")  # cannot be created, not even by root
    assert main(_args(t, prompts, out, "--steps", "2")) == 2
    err = capsys.readouterr().err
    assert err == f"Error: cannot write to --out {out}: No such file or directory\n", err
    if os.geteuid() != 0:  # permissions do not stop root
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert main(_args(t, prompts, locked / "d", "--steps", "2")) == 2
        assert capsys.readouterr().err == f"Error: cannot write to --out {locked / 'd'}: Permission denied\n"


def test_the_largest_block_leaves_half_the_context_beside_its_slack():
    from dflash_cli.engine import cache_slack
    from dflash_cli.train.command import largest_block

    assert largest_block(512) == 112  # the demo's stories260K
    for positions in (512, 1024, 40960, 262144):
        b = largest_block(positions)
        assert cache_slack(b) <= positions // 2 < cache_slack(b + 1)


class _StopAfter:
    """Ctrl-C after `steps` optimizer steps (the loop asks before each step)."""

    def __init__(self, steps: int):
        self.asked, self.steps = 0, steps

    def __call__(self):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    @property
    def stop(self) -> bool:
        self.asked += 1
        return self.asked > self.steps


def test_resume_keeps_checkpoint_every_and_the_run_options_unless_given_again(capsys, tiny, tmp_path, monkeypatch):
    from dflash_cli.train import command

    t, prompts = tiny
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(command, "_StopFlag", _StopAfter(5))
        assert main(_args(t, prompts, out, "--steps", "12", "--checkpoint-every", "4", "--eval-tokens", "6")) == 130
    err = capsys.readouterr().err
    assert "step 4: checkpoint saved" in err and "interrupted at step 5" in err
    saved = json.loads((out / "train-state" / "settings.json").read_text())
    assert (saved["checkpoint_every"], saved["eval_tokens"], saved["grad_checkpoint"]) == (4, 6, False)

    with monkeypatch.context() as m:
        m.setattr(command, "_StopFlag", _StopAfter(3))  # steps 6, 7, 8
        assert main(["train", "--out", str(out), "--resume"]) == 130
    err = capsys.readouterr().err
    assert "resuming at step 5" in err and "step 8: checkpoint saved" in err, err
    assert "step 6: checkpoint saved" not in err and "step 7: checkpoint saved" not in err  # not a tenth of the run

    assert main(["train", "--out", str(out), "--resume", "--checkpoint-every", "3", "--json"]) == 0  # given again: it wins
    captured = capsys.readouterr()
    assert "step 9: checkpoint saved" in captured.err and "step 10: checkpoint saved" not in captured.err
    report = json.loads(captured.out)
    assert report["settings"]["checkpoint_every"] == 3 and report["held_out"]["tokens"] <= 6 * report["held_out"]["prompts"]
    assert json.loads((out / "train-state" / "settings.json").read_text())["checkpoint_every"] == 3


def test_out_is_a_loadable_drafter_before_the_first_checkpoint(capsys, tiny, tmp_path, monkeypatch):
    from dflash_cli.train import command

    t, prompts = tiny
    out = tmp_path / "early"

    def interrupted(*args, **kwargs):
        assert (out / "model.safetensors").is_file()  # already there while the answers are generated
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(command, "generate_answers", interrupted)
        assert main(_args(t, prompts, out, "--steps", "2")) == 130
    assert "interrupted while generating answers" in capsys.readouterr().err
    assert not (out / "train-state" / "optimizer.safetensors").exists()
    assert safe_open(str(out / "model.safetensors"), framework="pt").metadata()["step"] == "0"
    assert not list(out.glob(".*.tmp")) and not list((out / "train-state").glob(".*"))  # written atomically
    model = loader.load(t, out, device="cpu")
    assert model.drafter is not None and model.drafter.cfg.block_size == 4
    assert main(["run", "--target", str(t), "--drafter", str(out), "-p", "Once", "--raw", "-n", "4",
                 "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume"]) == 0


def test_a_wrong_target_is_the_only_line_without_prompts(capsys, tmp_path):
    assert main(["train", "--target", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out"), "--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Error: --target") and len(err.strip().splitlines()) == 1, err
