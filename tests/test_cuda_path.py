"""The GPU branches, run on the CPU: load, capture, lookahead, measure, the serve worker, bench
--synthetic, train and doctor, under the checked stand-in for torch.cuda (tests/fake_cuda.py).

Code that only a GPU runs is untested code: the first GPU run would have died at load, on a line
no CPU test reached. Here every such line runs, and the stand-in refuses what the CUDA runtime
refuses (a device without an index, a host read inside a capture, an event timed before it
completed, a CUDA call from another thread while one captures). docs/cuda-path.md lists the lines
and the tests that run them. Then the real backend (dflash_cli.cuda.TorchCuda) is run against
torch.cuda functions that check their arguments as the real ones do.
"""
from __future__ import annotations

import asyncio
import json
import re
import threading

import pytest
import torch

from dflash_cli import cuda, loader
from dflash_cli.cli import main
from dflash_cli.engine import Engine, Request
from dflash_cli.errors import DflashError, UsageError
from dflash_cli.graphs import StepGraphs
from dflash_cli.sampling import SamplingParams
from dflash_cli.serve.prompting import Prompt
from dflash_cli.serve.worker import EngineWorker, Finished, Job

from .conftest import STORY_PROMPTS
from .fake_cuda import CaptureError, FakeCuda, stand_in

SAMPLINGS = [SamplingParams(), SamplingParams(temperature=0.8, top_k=40, top_p=0.95, seed=5)]
IDS = ["greedy", "sampled"]


def _tokens(engine: Engine, prompt: list[int], sampling: SamplingParams, n: int = 48) -> list[int]:
    return [t for s in engine.generate(Request(prompt, n, sampling=sampling)) for t in s.tokens]


# ---- devices (F1) ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["auto", "cuda", "cuda:0", "cuda:1"])
def test_every_gpu_resolve_device_gives_names_its_index(name):
    """F1: `resolve_device` gave `cuda` without an index, and `set_device` refuses that: every
    CUDA command died at load."""
    with stand_in(count=2) as gpu:
        device = loader.resolve_device(name)
        assert device.index == (1 if name == "cuda:1" else 0) and cuda.is_gpu(device)
        cuda.set_device(device)  # what load does first; the stand-in checks as torch does
        assert gpu.set_device_calls[-1] == ("MainThread", device.index)


def test_the_stand_in_refuses_a_gpu_without_an_index_as_torch_does():
    with stand_in() as gpu, pytest.raises(ValueError, match="specified index"):
        cuda.set_device(torch.device(gpu.type))  # the device F1's resolve_device returned


def test_a_gpu_that_is_not_there_is_one_line():
    with stand_in(count=1), pytest.raises(UsageError, match=r"--device cuda:3: there is no such GPU; torch sees 1 "
                                                            r"\(use cuda:0; see `nvidia-smi`\)"):
        loader.resolve_device("cuda:3")
    with pytest.raises(DflashError, match="torch sees no CUDA GPU"):  # this machine: a CPU build of torch
        loader.resolve_device("cuda")


def test_load_on_the_gpu_sets_its_device_and_plans_from_free_memory(stories_pair):
    from dflash_cli.config import DrafterConfig
    from dflash_cli.engine import cache_slack
    from dflash_cli.memory import needs_for
    from dflash_cli.models import target_config

    with stand_in() as gpu:
        model = loader.load(*stories_pair, device="auto")
    assert gpu.set_device_calls == [("MainThread", 0)] and model.device == torch.device("cpu", 0)
    assert model.target.dtype == torch.bfloat16  # auto on a GPU
    family, cfg = target_config(stories_pair[0])
    needs = needs_for(family, cfg, DrafterConfig.from_dir(stories_pair[1]), torch.float32, 8, cache_slack(8))
    with stand_in(free=needs.total(300)):  # room for 300 tokens of context beside everything else
        assert loader.load(*stories_pair, device="cuda", dtype="float32").max_context == 300
    with stand_in(free=needs.total(200)), pytest.raises(DflashError, match="not enough GPU memory"):
        loader.load(*stories_pair, device="cuda", dtype="float32")  # under 256 tokens: not worth running


# ---- the engine: captured steps, lookahead, measured costs ----------------------------------------------------
@pytest.mark.parametrize("sampling", SAMPLINGS, ids=IDS)
def test_the_engine_on_the_gpu_captures_replays_and_measures_and_writes_the_cpu_tokens(stories_pair, sampling):
    """The GPU branch of the whole loop: one graph per block size an adaptive engine may use and one for
    the drafter's catch-up, captured by warm_up (on one side stream, into one pool: F9), replayed with
    lookahead (iteration i+1 queued before iteration i is read), costs timed with events."""
    cpu = loader.load(*stories_pair, device="cpu")
    prompts = [cpu.tokenizer.encode(p) for p in STORY_PROMPTS[:3]]
    want = [_tokens(Engine(cpu.target), p, sampling) for p in prompts]
    with stand_in() as gpu:
        model = loader.load(*stories_pair, device="cuda", dtype="float32")
        engine = Engine(model.target, model.drafter, adaptive=True)
        assert engine.lookahead and engine.graphs.enabled
        assert engine.warm_up(sampling) is not None
        captured = gpu.captures
        assert captured == len(engine.policy.sizes) + 1  # b = 1, 2, 4, 8 and the catch-up
        got = [_tokens(engine, p, sampling) for p in prompts]
        assert gpu.captures == captured  # no capture inside an answer
    assert got == want
    assert gpu.replays >= sum(map(len, want)) // 8
    assert gpu.streams_made == 1 and gpu.pools_made == 1  # F9: not a stream (and a cuBLAS workspace) per graph
    assert engine.costs.table and gpu.unrecorded_waits == 0


@pytest.mark.parametrize("pair_name", ["qwen3_pair", "qwen3_moe_pair", "qwen35_pair", "qwen35_moe_pair",
                                       "gpt_oss_pair"])
def test_every_family_on_the_gpu_is_captured_and_writes_the_cpu_tokens(pair_name, request):
    """Each family's step (dense, MoE, hybrid, hybrid MoE, gpt-oss with sinks, windows and MXFP4
    experts) is capturable (no host read or upload inside it), and its replays with lookahead write the
    tokens of plain decoding on the CPU (the block size pinned: the adaptive glue is the same for every
    family, and the test above runs it). tests/test_dflash2.py does the same for a DFlash2 drafter."""
    from .conftest import HYBRID_PROMPTS

    target_dir, drafter_dir = request.getfixturevalue(pair_name)
    cpu = loader.load(target_dir, drafter_dir, device="cpu")
    prompt = HYBRID_PROMPTS[0]
    want = _tokens(Engine(cpu.target), prompt, SamplingParams(), 32)
    with stand_in() as gpu:
        # a short context: the stand-in's attention reads every cache slot, masked
        model = loader.load(target_dir, drafter_dir, device="cuda", dtype="float32", max_context=256)
        engine = Engine(model.target, model.drafter)
        got = _tokens(engine, prompt, SamplingParams(), 32)
    assert got == want
    assert engine.graphs.enabled and gpu.captures == 1 and gpu.replays >= 32 // engine.block_size


def test_a_step_that_reads_the_host_cannot_be_captured_and_the_engine_falls_back(stories_pair, monkeypatch, capsys):
    """What a GPU does with a host read inside a capture, and what the engine does then: one line, and
    the same tokens eagerly."""
    from dflash_cli import ops

    cpu = loader.load(*stories_pair, device="cpu")
    prompt = cpu.tokenizer.encode(STORY_PROMPTS[0])
    want = _tokens(Engine(cpu.target), prompt, SamplingParams())
    with stand_in():
        real = ops.verdict  # the engine's accept step

        def reads_back(logits, block, length, **kw):
            int(length)  # a host read: fine eagerly, frozen (and refused) in a capture
            return real(logits, block, length, **kw)

        monkeypatch.setattr(ops, "verdict", reads_back)
        model = loader.load(*stories_pair, device="cuda", dtype="float32")
        engine = Engine(model.target, model.drafter)
        assert _tokens(engine, prompt, SamplingParams()) == want
    assert not engine.graphs.enabled
    assert "CUDA graph capture failed (CaptureError: Tensor.__int__ inside a CUDA graph capture" in capsys.readouterr().err


def test_one_side_stream_and_pool_serve_every_capture(stories_pair):
    """F9 at the source: a StepGraphs makes its stream and pool once, at its first capture."""
    with stand_in() as gpu:
        model = loader.load(*stories_pair, device="cuda", dtype="float32")
        engine = Engine(model.target, model.drafter, block_size=4)
        graphs = StepGraphs(model.device, engine.caches)
        bonus = torch.zeros(1, dtype=torch.int64)
        mode = SamplingParams().mode
        for b in (1, 2, 4):
            graphs.get((mode, b), lambda b=b: engine._device_step(mode, b), bonus)
    assert gpu.captures == 3 and gpu.streams_made == 1 and gpu.pools_made == 1


# ---- serve: the worker thread owns the device ------------------------------------------------------------------
def test_the_serve_worker_sets_the_device_and_captures_on_its_own_thread(stories_pair):
    cpu = loader.load(*stories_pair, device="cpu")
    ids = cpu.tokenizer.encode(STORY_PROMPTS[4])
    want = _tokens(Engine(cpu.target), ids, SamplingParams(), 24)
    with stand_in() as gpu:
        model = loader.load(*stories_pair, device="cuda", dtype="float32")
        worker = EngineWorker(model, Engine(model.target, model.drafter, adaptive=True), max_queue=2,
                              log=lambda line: None)
        seconds = worker.start()  # warm-up: captures on the worker's thread
        assert seconds is not None and gpu.captures > 0
        assert ("dflash-engine", 0) in gpu.set_device_calls  # the current device is per thread

        async def answer() -> list[int]:
            job = Job(lambda tokenizer: Prompt(ids), 24, SamplingParams())
            worker.submit(job)
            while not isinstance(event := await asyncio.wait_for(job.events.get(), 60), Finished):
                pass
            return event.stats.token_ids

        try:
            assert asyncio.run(answer()) == want
        finally:
            worker.stop()
            worker._thread.join(10)


def test_a_cuda_call_from_another_thread_while_one_captures_is_refused():
    """torch.cuda.graph's default capture mode ("global"): why the server keeps every CUDA call on the
    worker's thread."""
    gpu = FakeCuda()
    graph, errors = gpu.CUDAGraph(), []
    with gpu.graph(graph):
        t = threading.Thread(target=lambda: errors.append(pytest.raises(CaptureError, gpu.Stream)))
        t.start()
        t.join()
    assert errors and graph.ops == []


# ---- the stand-in keeps the runtime's rules ------------------------------------------------------------------------
def test_a_replay_runs_the_recorded_work_on_new_inputs_into_the_same_outputs():
    gpu = FakeCuda()
    x, w = torch.ones(3), torch.arange(3.0)
    graph = gpu.CUDAGraph()
    with gpu.graph(graph):
        y = (x * w).sum(0, keepdim=True) + 1  # outputs made inside the capture are the graph's
    x.copy_(torch.full((3,), 2.0))
    graph.replay()
    assert y.tolist() == [7.0] and graph.replays == 1


@pytest.mark.parametrize("read", [lambda t: t.item(), lambda t: t.tolist(), lambda t: bool(t[0] > 0),
                                  lambda t: t[t > 0], lambda t: torch.tensor([1.0]) + t],
                         ids=["item", "tolist", "bool", "mask", "upload"])
def test_host_reads_and_uploads_inside_a_capture_are_refused(read):
    gpu = FakeCuda()
    t = torch.ones(1)
    with pytest.raises(CaptureError), gpu.graph(gpu.CUDAGraph()):
        read(t)
    read(t)  # fine outside


def test_events_are_timed_only_once_recorded_and_completed():
    gpu = FakeCuda()
    start, end = gpu.Event(enable_timing=True), gpu.Event(enable_timing=True)
    with pytest.raises(RuntimeError, match="must be recorded"):
        start.elapsed_time(end)
    start.record()
    end.record()
    with pytest.raises(RuntimeError, match="not ready"):
        start.elapsed_time(end)
    end.synchronize()
    assert start.elapsed_time(end) >= 0
    untimed = gpu.Event()
    untimed.record()
    untimed.synchronize()
    with pytest.raises(RuntimeError, match="enable_timing"):
        untimed.elapsed_time(end)


def test_a_pool_must_come_from_graph_pool_handle_and_captures_do_not_nest():
    gpu = FakeCuda()
    with pytest.raises(TypeError, match="graph_pool_handle"), gpu.graph(gpu.CUDAGraph(), pool=("pool", 7)):
        pass
    with gpu.graph(gpu.CUDAGraph(), pool=gpu.graph_pool_handle()):
        with pytest.raises(CaptureError, match="nest"), gpu.graph(gpu.CUDAGraph()):
            pass
        with pytest.raises(CaptureError, match="synchronize"):
            gpu.synchronize()


# ---- bench --synthetic, train, doctor -----------------------------------------------------------------------------
def test_bench_synthetic_on_the_gpu_times_every_phase_with_events(capsys):
    with stand_in() as gpu:
        assert main(["bench", "tiny", "--synthetic", "--device", "cuda", "--context", "64", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["device"] == "cpu:0" and report["dtype"] == "bfloat16"
    for key in ("decode_s", "verify_s", "draft_s", "accept_s", "commit_s", "iteration_s", "step_device_s",
                "decode_device_s", "copy_bytes_per_s"):
        assert report[key] > 0, key
    assert set(report["iteration_by_block"]) == {"1", "2", "4", "8"}
    assert gpu.captures >= 4 and gpu.unrecorded_waits == 0


@pytest.mark.slow
def test_train_on_the_gpu_autocasts_and_exports_bfloat16(tmp_path, capsys):
    out = tmp_path / "drafter"
    with stand_in():
        code = main(["train", "--target", "demo", "--out", str(out), "--steps", "3", "-b", "4", "--draft-layers", "1",
                     "--max-answer-tokens", "16", "--anchors", "4", "--batch", "2", "--device", "cuda", "--yes",
                     "--json"])
    assert code == 0, capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"
    with stand_in():
        model = loader.load(registry_demo_target(), out, device="cuda", dtype="float32")  # it loads and drafts
        engine = Engine(model.target, model.drafter)
        assert len(_tokens(engine, model.tokenizer.encode("Once"), SamplingParams(), 8)) == 8


def registry_demo_target():
    from dflash_cli import registry

    return registry.demo_dirs()[0]


def test_doctor_on_the_gpu_names_the_card_and_checks_fla():
    from dflash_cli.doctor import run_checks

    with stand_in():
        checks = {c.name: c for c in run_checks()}
    assert checks["cuda"].status == "ok" and "Fake GPU (the CPU)" in checks["cuda"].detail
    assert checks["fla-core"].status == "ok" and checks["fla-core"].detail.startswith("0.6")
    assert "fla-core" not in {c.name for c in run_checks()}  # only CUDA needs it
    with stand_in(free=8 << 30):  # qwen3-8b's pair needs ~19 GiB in bf16 at 4K context
        pair = run_checks("qwen3-8b")[-1]
    assert pair.status == "fail" and re.search(r"needs ~\d+\.\d GiB of GPU memory, 8\.0 GiB free", pair.detail)
    with stand_in(free=80 << 30):
        pair = run_checks("qwen3-8b")[-1]
    assert pair.status in ("ok", "warn") and re.search(r"GiB needed, 80\.0 GiB free", pair.detail)


# ---- the real backend: torch.cuda, called as torch checks it ------------------------------------------------------
def test_the_real_backend_calls_torch_cuda_with_what_torch_accepts(monkeypatch):
    """The one layer the stand-in replaces, run against torch.cuda functions that check their
    arguments the way the real ones do (device indices through torch's own `_get_device_index`)."""
    seen = []

    def needs_index(name):
        def call(device=None, *args, **kwargs):
            seen.append((name, torch.cuda._utils._get_device_index(device, optional=False)))
            return (3 << 30, 4 << 30) if name == "mem_get_info" else f"{name}-result"
        return call

    def records(name, result=None):
        def call(*args, **kwargs):
            seen.append((name, args, kwargs))
            return result if result is not None else f"{name}-result"
        return call

    for name in ("set_device", "mem_get_info", "synchronize", "get_device_name"):
        monkeypatch.setattr(torch.cuda, name, needs_index(name))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    for name in ("Event", "Stream", "stream", "current_stream", "CUDAGraph", "graph", "graph_pool_handle"):
        monkeypatch.setattr(torch.cuda, name, records(name))
    real = cuda.TorchCuda()
    with cuda.use(real):
        device = loader.resolve_device("auto")
        assert device == torch.device("cuda", 1)  # the current GPU, by index
        assert loader.resolve_device("cuda:0") == torch.device("cuda", 0)
        with pytest.raises(UsageError, match="torch sees 2 \\(use cuda:0 … cuda:1"):
            loader.resolve_device("cuda:2")
        cuda.set_device(device)
        assert cuda.mem_get_info(device) == (3 << 30, 4 << 30)
        cuda.synchronize(device)
        assert cuda.device_name(device) == "get_device_name-result"
        assert cuda.event(timing=True) == "Event-result" and cuda.side_stream() == "Stream-result"
        assert cuda.on_stream("s") == "stream-result" and cuda.current_stream() == "current_stream-result"
        assert cuda.new_graph() == "CUDAGraph-result" and cuda.graph_pool() == "graph_pool_handle-result"
        assert cuda.capturing("g", pool="p", stream="s") == "graph-result"
        assert cuda.version() == torch.version.cuda
        monkeypatch.setattr(torch, "autocast", records("autocast"))
        assert cuda.autocast(device, torch.bfloat16) == "autocast-result"
        assert cuda.is_gpu(device) and not cuda.is_gpu(torch.device("cpu"))
    assert seen[:4] == [("set_device", 1), ("mem_get_info", 1), ("synchronize", 1), ("get_device_name", 1)]
    assert ("autocast", ("cuda",), {"dtype": torch.bfloat16}) in seen
    assert ("Event", (), {"enable_timing": True}) in seen and ("graph", ("g",), {"pool": "p", "stream": "s"}) in seen
    monkeypatch.setattr(torch, "empty", records("empty", torch.zeros(1)))
    assert cuda.TorchCuda().pinned_empty((2,), torch.int64) is not None and seen[-1][2]["pin_memory"] is True


def test_warm_up_takes_the_long_prompt_prefill_paths(qwen35_pair, monkeypatch):
    """F8: the hybrid's chunked Gated DeltaNet (chunks over 64 tokens) and the attention of a long
    prefill chunk (over ops.MAX_KERNEL_Q_LEN) compile and autotune in warm_up, not inside the user's
    first long prompt."""
    from dflash_cli import ops

    lengths = {"gdn_rule_norm": [], "attention": []}  # gdn_rule_norm: fla's chunked rule past 64 rows
    for name in lengths:
        real = getattr(ops, name)

        def seen(*args, _real=real, _name=name, **kwargs):
            lengths[_name].append(args[0].shape[0])
            return _real(*args, **kwargs)
        monkeypatch.setattr(ops, name, seen)
    model = loader.load(*qwen35_pair, device="cpu")
    Engine(model.target, model.drafter, adaptive=True).warm_up()
    assert max(lengths["gdn_rule_norm"]) > 64 and max(lengths["attention"]) > ops.MAX_KERNEL_Q_LEN
