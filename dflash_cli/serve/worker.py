"""The engine's one worker: a thread that owns the Engine (and the tokenizer) and runs one generation
at a time, fed FIFO from the asyncio side through a bounded queue.

Batch size is 1, so concurrency is queueing: a request waits its turn, a full queue is refused at
once (503 with Retry-After) rather than left hanging, and a request whose client has gone or whose
time is up is cancelled: before it starts, or at the next iteration of its generation (the step
generator is closed, which also rolls the caches back to what was committed). Each job reports to
its request through an asyncio queue: Started, Text…, then Finished or Failed.
"""
from __future__ import annotations

import asyncio
import queue
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Callable

from .. import cuda
from ..engine import Engine, Request
from ..errors import DflashError
from ..generate import Stats, stream_text
from ..harmony import ToolCall
from ..loader import Model
from ..sampling import SamplingParams
from .prompting import Prompt
from .protocol import ApiError, bad


@dataclass
class Started:
    prompt_tokens: int
    cached_tokens: int  # prompt tokens whose K/V the caches already held (the previous request's prefix)


@dataclass
class Text:
    text: str  # the answer's content
    reasoning: str = ""  # split off by the prompt's chat format (formats/)
    tool_call: ToolCall | None = None  # the call the answer ended with (harmony)


@dataclass
class Finished:
    stats: Stats
    finish: str  # "stop", "length" or "cancelled"
    block_size: int
    tree_budget: int | str = 0  # the verified tree's nodes (0: the drafter's chain), or "auto"


@dataclass
class Failed:
    error: ApiError


Event = Started | Text | Finished | Failed


class Job:
    """One request's generation, as the worker sees it. `prepare` turns the request into prompt ids
    with the tokenizer (on the worker's thread)."""

    def __init__(self, prepare: Callable[[object], Prompt], max_tokens: int | None, sampling: SamplingParams,
                 stop: tuple[str, ...] = (), loop: asyncio.AbstractEventLoop | None = None, *,
                 prompt_param: str = "messages"):
        self.prepare, self.max_tokens, self.sampling, self.stop = prepare, max_tokens, sampling, stop
        self.prompt_param = prompt_param  # the request field a too-long prompt is blamed on
        self.loop = loop or asyncio.get_running_loop()
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self._cancel = threading.Event()
        self.cancel_reason: str | None = None
        self.generated = 0  # tokens committed so far (written by the worker, read by anyone)
        self.generated_at_cancel: int | None = None
        self.done = threading.Event()

    def cancel(self, reason: str) -> None:
        if not self._cancel.is_set():
            self.cancel_reason, self.generated_at_cancel = reason, self.generated
            self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def post(self, event: Event) -> None:
        """From the worker thread to the request's coroutine."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is gone (server shutting down): nobody is listening
            self.cancel("server stopped")


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"retry after {retry_after} s")
        self.retry_after = retry_after


class EngineWorker:
    def __init__(self, model: Model, engine: Engine, max_queue: int, log: Callable[[str], None] | None = None):
        self.model, self.engine, self.max_queue = model, engine, max_queue
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._pending = 0  # submitted and not finished: the running job and those waiting behind it
        self.current: Job | None = None
        self._seconds = 1.0  # recent seconds per request (for Retry-After)
        self._log = log or (lambda line: print(line, file=sys.stderr, flush=True))

    def start(self) -> float | None:
        """Start the thread and warm the engine up on it; returns the seconds CUDA graph capture took
        (None where there are none). Graphs are captured on the thread that replays them, with the
        engine's device current there (the current CUDA device is per thread)."""
        ready: queue.Queue[float | None | BaseException] = queue.Queue()
        self._thread = threading.Thread(target=self._run_forever, args=(ready,), name="dflash-engine", daemon=True)
        self._thread.start()
        result = ready.get()
        if isinstance(result, BaseException):
            raise result
        return result

    def stop(self) -> None:
        """Cancel what runs and what waits; the thread ends after the current iteration."""
        for job in [self.current, *list(self._jobs.queue)]:
            if job is not None:
                job.cancel("server stopped")
        self._jobs.put(None)

    @property
    def waiting(self) -> int:
        """Requests waiting behind the one that runs."""
        return max(0, self._pending - (self.current is not None))

    @property
    def busy(self) -> bool:
        return self.current is not None

    def submit(self, job: Job) -> None:
        """Queue a job, or raise QueueFull when one runs and --max-queue more already wait."""
        with self._lock:
            if self._pending > self.max_queue:
                raise QueueFull(max(1, round(self._seconds * self._pending)))
            self._pending += 1
        self._jobs.put(job)

    # ---- the worker thread -----------------------------------------------------------------
    def _run_forever(self, ready: queue.Queue) -> None:
        try:
            if cuda.is_gpu(self.model.device):
                cuda.set_device(self.model.device)
            ready.put(self.engine.warm_up())
        except BaseException as e:  # handed to start(), which raises it on the main thread
            ready.put(e)
            return
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if job.cancelled:  # its client left, or its time ran out, while it waited
                self._end(job, None)
                continue
            self.current, start = job, time.perf_counter()
            try:
                event: Finished | Failed = self._run(job)
            except ApiError as e:
                event = Failed(e)
            except DflashError as e:
                event = Failed(bad(str(e)))
            except Exception as e:  # a bug: the request gets a 500, the server keeps serving
                self._log("dflash: internal error:\n" + "".join(traceback.format_exception(e)).rstrip())
                event = Failed(ApiError(500, f"internal error: {type(e).__name__}: {e}"))
            self._seconds = 0.7 * self._seconds + 0.3 * (time.perf_counter() - start)
            self._end(job, event)

    def _end(self, job: Job, event: Finished | Failed | None) -> None:
        """Free the engine's place first, then tell the request: a client that sends its next request
        as soon as it has this answer finds the place free."""
        with self._lock:
            self._pending -= 1
        self.current = None
        if event is not None:
            job.post(event)
        job.done.set()

    def _run(self, job: Job) -> Finished:
        engine, model = self.engine, self.model
        prompt = job.prepare(model.tokenizer)
        limit, n = engine.max_context, len(prompt.ids)
        if n >= limit:
            raise ApiError(400, f"the prompt is {n} tokens; this server's context limit is {limit}",
                           param=job.prompt_param, code="context_length_exceeded")
        budget = job.max_tokens if job.max_tokens is not None else limit - n
        if n + budget > limit:
            raise ApiError(400, f"the prompt ({n} tokens) plus max_tokens ({budget}) exceeds this server's context "
                                f"limit of {limit} tokens", param="max_tokens", code="context_length_exceeded")
        job.post(Started(n, engine.reusable_prefix(prompt.ids)))
        stats = Stats()
        request = Request(prompt.ids, budget, model.stop_token_ids, job.sampling, keep_prefix=prompt.keep_prefix)
        chunks = stream_text(engine, model.tokenizer, request, stats, job.stop, prompt=prompt)
        try:
            for chunk in chunks:
                job.generated = stats.generated
                if job.cancelled:  # checked after every iteration: at most one runs after cancel()
                    break
                if chunk.text or chunk.reasoning or chunk.tool_call:
                    job.post(Text(chunk.text, chunk.reasoning, chunk.tool_call))
        finally:
            chunks.close()  # ends the engine's generator: the next prefill rolls the caches back
        finish = "cancelled" if job.cancelled and stats.finish is None else (stats.finish or "stop")
        if finish == "cancelled":
            late = stats.generated - (job.generated_at_cancel or 0)
            self._log(f"dflash: generation cancelled ({job.cancel_reason}) after {stats.generated} tokens, "
                      f"{late} of them after the cancel")
        return Finished(stats, finish, engine.block_size, engine.tree_setting)
