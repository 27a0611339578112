"""The HTTP side of `dflash serve`: Starlette routes on uvicorn, in OpenAI's shapes.

POST /v1/chat/completions and /v1/completions (streamed as server-sent events, or whole), GET
/v1/models and /health. Requests are parsed and checked here, queued to the one engine worker, and
their answers relayed as the worker produces them. A client that goes away, or a request whose
--timeout passes, cancels its generation; a bad request gets its 4xx and nothing else happens.
"""
from __future__ import annotations

import asyncio
import json
import socket
import sys
import time
import traceback
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, AsyncIterator, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..errors import DflashError
from .answer import ChatAnswer, CompletionAnswer
from .auth import HostPolicy, bearer_ok
from .prompting import chat_prompt, completion_prompt
from .protocol import ApiError, check_strings, now, parse_chat, parse_completion
from .worker import EngineWorker, Failed, Finished, Job, QueueFull

Log = Callable[[str], None]


def stderr_log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()
    max_queue: int = 16
    timeout: float = 600.0  # seconds a request may take, queueing included
    max_body: int = 8 * 2**20  # bytes
    default_think: bool = False  # thinking when a request does not say
    default_effort: str | None = None  # harmony's reasoning_effort when a request does not say
    allow_hosts: tuple[str, ...] = ()  # --allow-host: Host names besides loopback and the bound address
    bound: str | None = None  # the address the socket listens on (run_server fills it in)


class Disconnected(Exception):
    pass


class TimedOut(Exception):
    pass


class EventStream(StreamingResponse):
    """Server-sent events whose generator is always closed when the response ends, however it ends
    (Starlette leaves a generator interrupted by a failed send to the garbage collector)."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


def sse(payload: Any) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def printable(text: str) -> str:
    """A log line's worth of text: a client's newlines and control characters escaped, so that what it
    sends cannot forge log lines."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _json_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")  # Python's json accepts NaN and Infinity; JSON does not


class HostCheck:
    """Pure ASGI middleware, outermost: a request whose Host header does not name this server is
    refused (403) before anything else sees it; see auth.HostPolicy (DNS rebinding)."""

    def __init__(self, app, policy: HostPolicy, log: Log):
        self.app, self.policy, self.log = app, policy, log

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            host = dict(scope["headers"]).get(b"host")
            value = host.decode("latin-1") if host is not None else None
            if not self.policy.allows(value):
                shown = "no Host header" if value is None else f"Host {printable(value)[:100]!r}"
                self.log(f"dflash: {scope['method']} {printable(scope['path'])[:200]} 403 · {shown} is not this server")
                e = ApiError(403, f"{shown} does not name this server: use http://localhost or its address, or "
                                  "start it with --allow-host NAME (a proxy's name)", code="host_not_allowed")
                await error_response(e)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BearerAuth:
    """Pure ASGI middleware: /v1/* needs `Authorization: Bearer KEY` (/health stays open)."""

    def __init__(self, app, api_key: str, log: Log):
        self.app, self.api_key, self.log = app, api_key, log

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            header = dict(scope["headers"]).get(b"authorization")
            if not bearer_ok(header.decode("latin-1") if header else None, self.api_key):
                self.log(f"dflash: {scope['method']} {scope['path']} 401 · missing or wrong API key")
                e = ApiError(401, "missing or wrong API key (send Authorization: Bearer KEY)", code="invalid_api_key",
                             headers={"WWW-Authenticate": "Bearer"})
                await error_response(e)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class Server:
    def __init__(self, worker: EngineWorker, model_id: str, options: ServeOptions, log: Log = stderr_log):
        self.worker, self.model_id, self.opts, self.log = worker, model_id, options, log
        self.created = now()

    def app(self) -> Starlette:
        routes = [
            Route("/health", self.health, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{name:path}", self.model, methods=["GET"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
        ]
        bound = (self.opts.host,) + ((self.opts.bound,) if self.opts.bound else ())
        middleware = [Middleware(HostCheck, policy=HostPolicy(bound, self.opts.allow_hosts), log=self.log)]
        if self.opts.cors_origins:  # before auth, so that browser preflights are answered without a key
            # Any request header, as llama-server allows: the origin is trusted, and the official JS SDK
            # sends x-stainless-* (and openai-beta, …) on every request. A page on a public origin
            # calling this loopback server needs the private-network grant too (Chrome asks for it).
            middleware.append(Middleware(CORSMiddleware, allow_origins=list(self.opts.cors_origins),
                                         allow_methods=["GET", "POST", "OPTIONS"], allow_headers=["*"],
                                         allow_private_network=True))
        if self.opts.api_key:
            middleware.append(Middleware(BearerAuth, api_key=self.opts.api_key, log=self.log))
        return Starlette(routes=routes, middleware=middleware,
                         exception_handlers={HTTPException: self._http_error})

    # ---- small routes ----------------------------------------------------------------------
    async def _http_error(self, request: Request, exc: HTTPException) -> Response:
        message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        e = ApiError(exc.status_code, message.get(exc.status_code, str(exc.detail)), headers=exc.headers)
        return error_response(e)

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "generating": self.worker.busy, "queued": self.worker.waiting})

    def _model_card(self) -> dict:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "dflash"}

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name != self.model_id:
            return error_response(ApiError(404, f"the model '{name}' does not exist: this server serves "
                                                f"'{self.model_id}'", param="model", code="model_not_found"))
        return JSONResponse(self._model_card())

    # ---- generation ------------------------------------------------------------------------
    async def chat(self, request: Request) -> Response:
        return await self._generate(request, chat=True)

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, chat=False)

    async def _read_json(self, request: Request) -> Any:
        limit = self.opts.max_body
        too_big = ApiError(413, f"the request body is over the limit of {limit} bytes (--max-body-mb)",
                           code="request_too_large")
        kind = request.headers.get("content-type")
        if kind is None or kind.partition(";")[0].strip().lower() != "application/json":
            # A body of another type is a "simple" request a web page may send cross-origin without a
            # preflight: refused, so that no page can make this server generate (blind CSRF).
            shown = "none" if kind is None else repr(printable(kind)[:100])
            raise ApiError(415, f"Content-Type must be application/json, got {shown} (with curl: -H 'Content-Type: "
                                "application/json')", code="unsupported_media_type")
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise too_big
        raw, size = [], 0
        try:
            async for piece in request.stream():
                size += len(piece)
                if size > limit:
                    raise too_big
                raw.append(piece)
        except ClientDisconnect:  # the client left before its body was complete: nobody to answer
            raise Disconnected from None
        try:
            body = json.loads(b"".join(raw), parse_constant=_json_constant)
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError both are (and over-long integers)
            raise ApiError(400, f"the request body is not valid JSON: {printable(str(e))[:200]}") from None
        except RecursionError:
            raise ApiError(400, "the request body is nested too deeply") from None
        check_strings(body)
        return body

    async def _generate(self, request: Request, chat: bool) -> Response:
        start, where = time.perf_counter(), f"POST {request.url.path}"
        watch: asyncio.Task | None = None
        job: Job | None = None
        try:
            body = await self._read_json(request)
            if chat:
                req = parse_chat(body, self.model_id, default_think=self.opts.default_think,
                                 default_effort=self.opts.default_effort)
                prepare = partial(chat_prompt, messages=req.messages, tools=req.tools,
                                  enable_thinking=req.enable_thinking, template_kwargs=req.template_kwargs,
                                  format=self.worker.model.format)
            else:
                req = parse_completion(body, self.model_id)
                prepare = partial(completion_prompt, prompt=req.prompt)
            job = Job(prepare, req.max_tokens, req.sampling, req.stop, prompt_param="messages" if chat else "prompt")
            try:
                self.worker.submit(job)
            except QueueFull as full:
                raise ApiError(503, f"the server is busy: {self.worker.waiting} requests are waiting (--max-queue "
                                    f"{self.opts.max_queue}); retry later", code="queue_full",
                               headers={"Retry-After": str(full.retry_after)}) from None
            deadline = asyncio.get_running_loop().time() + self.opts.timeout
            # Until the response starts, a client that leaves is noticed here (later, by the stream).
            watch = asyncio.ensure_future(_disconnect(request))
            first = await _next_event(job, deadline, watch)
            if isinstance(first, Failed):
                raise first.error
            answer = ChatAnswer(req, first, self.model_id) if chat else CompletionAnswer(req, first, self.model_id)
            if req.stream:
                return EventStream(self._stream(job, answer, deadline, start, where), media_type="text/event-stream",
                                   headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            return await self._whole(job, answer, deadline, watch, start, where)
        except ApiError as e:
            if job is not None:
                job.cancel("error")
            self.log(f"dflash: {where} {e.status} · {printable(e.message)}")
            return error_response(e)
        except TimedOut:
            return error_response(self._timed_out(job, where))
        except Disconnected:
            if job is not None:
                job.cancel("client disconnected")
            self.log(f"dflash: {where} · client disconnected after {time.perf_counter() - start:.2f} s")
            return Response(status_code=499)  # nobody reads it; nginx's code for "client closed request"
        except Exception as e:  # a bug: say so in the log, answer 500, keep serving
            if job is not None:
                job.cancel("internal error")
            self.log(f"dflash: {where} 500 · internal error\n" + "".join(traceback.format_exception(e)).rstrip())
            return error_response(ApiError(500, f"internal error: {type(e).__name__}"))
        finally:
            if watch is not None:
                watch.cancel()

    def _timed_out(self, job: Job | None, where: str) -> ApiError:
        if job is not None:
            job.cancel("timeout")
        e = ApiError(504, f"the request took longer than --timeout {self.opts.timeout:g} s", code="timeout")
        self.log(f"dflash: {where} 504 · {e.message}" + (f" ({job.generated} tokens)" if job else ""))
        return e

    async def _whole(self, job: Job, answer: ChatAnswer | CompletionAnswer, deadline: float, watch: asyncio.Task,
                     start: float, where: str) -> Response:
        while True:
            event = await _next_event(job, deadline, watch)
            if isinstance(event, Failed):
                raise event.error
            if isinstance(event, Finished):
                break
            answer.feed(event.text, event.reasoning, event.tool_call)
            if answer.done:
                job.cancel("parallel_tool_calls is false and a tool call is complete")
        response = answer.whole(event)
        self._log_done(where, answer, event, start)
        return JSONResponse(response)

    async def _stream(self, job: Job, answer: ChatAnswer | CompletionAnswer, deadline: float, start: float,
                      where: str) -> AsyncIterator[str]:
        over = False  # False while the client may still be reading: if the generator is closed then, it left
        try:
            for chunk in answer.opening():
                yield sse(chunk)
            while True:
                event = await _next_event(job, deadline)
                if isinstance(event, Failed):
                    over = True
                    self.log(f"dflash: {where} {event.error.status} · {printable(event.error.message)}")
                    yield sse(event.error.body())
                    return
                if isinstance(event, Finished):
                    break
                for chunk in answer.feed(event.text, event.reasoning, event.tool_call):
                    yield sse(chunk)
                if answer.done:
                    job.cancel("parallel_tool_calls is false and a tool call is complete")
            over = True
            for chunk in answer.closing(event):
                yield sse(chunk)
            yield "data: [DONE]\n\n"
            self._log_done(where, answer, event, start)
        except TimedOut:
            over = True
            yield sse(self._timed_out(job, where).body())  # the status line went out already: an error event
        finally:
            if not over:
                job.cancel("client disconnected")
                self.log(f"dflash: {where} · client disconnected after {job.generated} tokens")

    def _log_done(self, where: str, answer: ChatAnswer | CompletionAnswer, fin: Finished, start: float) -> None:
        s, first = fin.stats, answer.first
        self.log(f"dflash: {where} 200 · {first.prompt_tokens} prompt tokens ({first.cached_tokens} cached) + "
                 f"{s.generated} generated · {s.tokens_per_second:.1f} tok/s · τ {s.mean_acceptance:.2f} · "
                 f"{time.perf_counter() - start:.2f} s · {answer.finish_reason(fin)}")


async def _disconnect(request: Request) -> None:
    """Returns when the client has gone (uvicorn reports http.disconnect once the body is read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _next_event(job: Job, deadline: float, watch: asyncio.Task | None = None):
    """The job's next event; TimedOut past the deadline, Disconnected when `watch` ends first."""
    loop = asyncio.get_running_loop()
    remaining = deadline - loop.time()
    if remaining <= 0:
        raise TimedOut
    get = asyncio.ensure_future(job.events.get())
    waiters = {get} if watch is None else {get, watch}
    done, _ = await asyncio.wait(waiters, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
    if get in done:
        return get.result()
    get.cancel()
    raise Disconnected if watch is not None and watch in done else TimedOut


# ---- start-up ------------------------------------------------------------------------------------

def bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port before the model loads, so that a port in use is an error at once
    (and port 0 picks a free port that the URL names); it listens from run_server on."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM,
                                                            flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise DflashError(f"cannot use --host {host}: {e.strerror}") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise DflashError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def run_server(sock: socket.socket, worker: EngineWorker, model_id: str, options: ServeOptions, describe: str,
               log: Log = stderr_log) -> None:
    """Serve on a bound socket until Ctrl-C (or SIGTERM), with the worker already started."""
    import uvicorn

    sock.listen(2048)  # from here on the URL printed below accepts connections
    options = replace(options, bound=sock.getsockname()[0])
    app = Server(worker, model_id, options, log).app()
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                            timeout_graceful_shutdown=2)
    log(f"dflash: serving {model_id} at {url_of(sock)}/v1 ({describe}) · Ctrl-C stops")
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])
    finally:
        worker.stop()
        sock.close()
    if server.should_exit:
        # Stopped by Ctrl-C (or SIGTERM). uvicorn raises the signal again once it has shut down, which
        # ends here as KeyboardInterrupt; but where SIGINT was inherited ignored (a background job in a
        # script) that does nothing, and the exit would be 0: the documented exit is 130.
        raise KeyboardInterrupt
