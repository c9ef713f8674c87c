"""The OpenAI-compatible Ray Serve application: FastAPI ingress, limits, deployment options.

    POST /v1/completions, POST /v1/chat/completions (stream: true as server-sent events)
    GET /v1/models, GET /v1/models/{name}, GET /health (liveness, public), GET /ready (readiness, public),
    GET /stats (the engine's counters, and which replica answered)

Plain Serve, not `ray.serve.llm` (which needs vLLM; `raylm.serve.vllm` builds that one).
Serve's ingress takes no API key (Ray's token auth does not cover it), so `Guard`, an ASGI
middleware in front of every route, is the lock: the key is compared in constant time, and
the body is read up to `max_body_bytes`, within `request_timeout_s`, before any handler sees it
(nothing of it before the key is checked). The ingress is HAProxy in
front of the replica's own HTTP server on a cluster raylm starts (`raylm.pipeline.serve_ingress_env`),
else Serve's Python proxy actor; the app is the same behind either. Backpressure is Serve's
(`max_ongoing_requests` per replica, `max_queued_requests` in the proxy or, behind HAProxy, in
the replica, answered with `backpressure_status` and Retry-After); the per-request timeout and
disconnect handling are the app's own (`raylm.serve.handlers`), so a client's
`x-request-timeout-seconds: 0` or `x-request-disconnect-disabled` headers, which switch off the
proxy's, change nothing.
"""

import asyncio
import dataclasses
import hmac
import json
import logging
import os
import socket

# No `from __future__ import annotations` here: FastAPI reads the routes' annotations, and
# Serve pickles the routes by value, which drops module globals that only string annotations name.
from fastapi import Request

from raylm.config import ConfigError, ServeConfig, load_serve_config
from raylm.serve import protocol as P

API_KEY_ENV = "RAYLM_API_KEY"
PUBLIC_PATHS = frozenset({"/health", "/ready"})  # probes carry no credentials
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
APP_NAME = "raylm"
ENGINE_DIED = "the replica's engine has exited"  # until Serve's health check replaces the replica
# An engine process that is there but answers no ping for this long is hung (stopped, stuck in a
# C call): the health check fails, and Serve replaces the replica. It answers in milliseconds
# otherwise (its main thread does, whatever step the engine thread is in).
ENGINE_PING_TIMEOUT_S = 60.0

log = logging.getLogger("raylm.serve")


def resolve_api_key(cfg: ServeConfig) -> str:
    """The key clients must send: the config's, else $RAYLM_API_KEY. None at all is allowed
    only on loopback, where nothing off the machine reaches the server."""
    key = cfg.api_key or os.environ.get(API_KEY_ENV, "")
    if not key and cfg.host not in LOOPBACK:
        raise ConfigError(f"serve.host={cfg.host}: serving beyond loopback needs an API key "
                          f"(--api-key or ${API_KEY_ENV}); Serve's ingress has no other lock")
    return key


def model_name_of(run: str, cfg: ServeConfig) -> str:
    """What clients put in `model`: the configured name, else the run's directory name."""
    if cfg.model_name:
        return cfg.model_name
    parts = [p for p in run.rstrip("/").split("/") if p]
    if len(parts) > 1 and parts[-1].startswith("ckpt-"):
        return parts[-2]
    return parts[-1] if parts else "raylm"


# --------------------------------------------------------------------------- guard


async def _send_json(send, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
    raw = json.dumps(body).encode()
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    hdrs += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": raw, "more_body": False})


class _TooLarge(Exception):
    """The body went past the limit (announced or streamed)."""


class Guard:
    """ASGI middleware: the probes (`PUBLIC_PATHS`: no key, no body read) pass straight through;
    every other route: API key (constant-time), checked before any of the body is read, then
    the body read whole within `body_timeout_s` up to a limit (413 past it, whether announced
    by Content-Length or streamed in chunks) and replayed. The time limit is what keeps a slow
    body (headers, then a byte now and then) from holding one of the replica's
    `max_ongoing_requests` slots for good: Serve counts a request from its headers, and neither
    HAProxy nor Serve bounds how long its body takes; past the limit it answers 408."""

    def __init__(self, app, api_key: str, max_body_bytes: int, body_timeout_s: float):
        self.app, self.key, self.limit, self.timeout = app, api_key.encode(), max_body_bytes, body_timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        arrived = asyncio.get_running_loop().time()
        headers = dict(scope.get("headers") or [])
        path, root = scope.get("path", ""), scope.get("root_path", "")
        if root and path.startswith(root):  # under a route prefix: match the app's own paths
            path = path[len(root):]
        if path in PUBLIC_PATHS:
            # A probe reads no body, and anyone may send one: reading its body here first (up
            # to request_timeout_s) let a client without the key hold a slot with a body it
            # never sent. Its routes answer without the body, which is left unread.
            return await self.app(scope, receive, send)
        if self.key:
            auth = headers.get(b"authorization", b"")
            given = auth[7:].strip() if auth[:7].lower() == b"bearer " else b""
            # compare_digest: the time taken says nothing about how much of the key matched.
            if not hmac.compare_digest(given, self.key):
                return await _send_json(send, 401, P.error_body(
                    "missing or wrong API key: send 'Authorization: Bearer <key>'", "invalid_request_error",
                    None, "invalid_api_key"), {"www-authenticate": "Bearer"})
        length = headers.get(b"content-length")
        if length is not None:
            try:
                announced = int(length)
            except ValueError:
                return await _send_json(send, 400, P.error_body("Content-Length is not a number"))
            if announced > self.limit:
                return await self._too_large(send)
        # The request's time limit counts from its arrival: the body's reading takes its share,
        # and the handlers get what is left (request.state.raylm_deadline), not the limit again.
        scope.setdefault("state", {})["raylm_deadline"] = arrived + self.timeout
        try:
            async with asyncio.timeout(self.timeout):
                body = await self._read_body(receive)
        except _TooLarge:
            return await self._too_large(send)
        except TimeoutError:
            # connection: close, as the rest of the body may still come and is no next request.
            return await _send_json(send, 408, P.error_body(
                f"the request body did not arrive within this server's limit of {self.timeout:g} s",
                "timeout", None, "timeout"), {"connection": "close", "x-should-retry": "false"})
        if body is None:  # the client left
            return
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later: the disconnect, which handlers watch for

        return await self.app(scope, replay, send)

    async def _read_body(self, receive) -> bytes | None:
        """The whole body, None where the client disconnected first; _TooLarge past the limit."""
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return None
            body = msg.get("body", b"")
            size += len(body)
            if size > self.limit:
                raise _TooLarge()
            chunks.append(body)
            if not msg.get("more_body", False):
                return b"".join(chunks)

    async def _too_large(self, send):
        await _send_json(send, 413, P.error_body(f"request body exceeds this server's limit of {self.limit} bytes",
                                                 "invalid_request_error", None, "request_too_large"))


# --------------------------------------------------------------------------- FastAPI app


def make_fastapi(cfg: ServeConfig, api_key: str):
    """The FastAPI app with its guard and OpenAI-shaped error handlers (routes come from the
    deployment class)."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    app = FastAPI(title="raylm", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=cfg.max_body_bytes,
                       body_timeout_s=cfg.request_timeout_s)

    @app.exception_handler(P.APIError)
    async def _api_error(request: Request, e: P.APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, e: HTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(P.error_body(f"{request.method} {request.url.path}: {e.detail}", kind),
                            status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        err = e.errors()[0] if e.errors() else {}
        param = ".".join(str(p) for p in err.get("loc", ())[1:]) or None
        return JSONResponse(P.error_body(f"{param}: {err.get('msg', 'invalid')}", param=param), status_code=400)

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse(P.error_body("internal server error", "server_error"), status_code=500)

    return app


def deployment_options(cfg: ServeConfig) -> dict:
    """Serve's @serve.deployment options from the config: limits, backpressure, scaling."""
    opts = {
        "name": "RaylmServer",
        "max_ongoing_requests": cfg.max_ongoing_requests,
        "max_queued_requests": cfg.max_queued_requests,
        "backpressure_config": {"status_code": cfg.backpressure_status, "retry_after_s": cfg.retry_after_s},
        "graceful_shutdown_timeout_s": cfg.graceful_shutdown_timeout_s,
        "health_check_period_s": cfg.health_check_period_s,
        "ray_actor_options": {"num_cpus": cfg.num_cpus, "num_gpus": 1 if cfg.device.startswith("cuda") else 0},
    }
    if cfg.autoscaling_config:
        opts["autoscaling_config"] = cfg.autoscaling_config
    else:
        opts["num_replicas"] = cfg.num_replicas
    return opts


def cpu_threads(num_cpus: float) -> int:
    """torch's intra-op threads for a CPU replica: its CPUs less one, at least one. The engine
    thread's torch ops run while the replica's event loop and Serve's threads relay requests
    and streams, and Ray would give torch every CPU (OMP_NUM_THREADS = num_cpus): measured on
    2 CPU cores with 16 streams of the tiny model, 1 thread instead of 2 gave 1.25x the output
    tokens/s and a lower p95 TTFT (OpenMP workers spin and wait on barriers for a core that
    the event loop, the proxy and the clients also want)."""
    return max(1, int(num_cpus) - 1)


def build_app(run: str, cfg: ServeConfig):
    """The Serve application serving `run` (a run or checkpoint directory, local or s3://)."""
    from fastapi.responses import JSONResponse, StreamingResponse
    from ray import serve

    cfg.validate()
    api_key = resolve_api_key(cfg)
    name = model_name_of(run, cfg)
    app = make_fastapi(cfg, api_key)
    threads = None if cfg.device.startswith("cuda") else cpu_threads(cfg.num_cpus)

    async def parse(request: Request, model):
        return P.parse_request(await request.body(), model)

    def disconnected(request: Request):
        async def wait():
            while (await request.receive())["type"] != "http.disconnect":
                pass
        return wait

    def deadline(request: Request) -> float | None:
        """The event loop's time at which the request's `request_timeout_s` ends, set by the
        Guard at its arrival (None without it: the handlers count from now)."""
        return getattr(request.state, "raylm_deadline", None)

    def respond(result):
        if isinstance(result, dict):
            return JSONResponse(result)
        return StreamingResponse(result, media_type="text/event-stream",
                                 headers={"cache-control": "no-cache", "x-accel-buffering": "no"})

    @serve.deployment(**deployment_options(cfg))
    @serve.ingress(app)
    class RaylmServer:
        def __init__(self):
            from raylm.serve.handlers import OpenAIService

            kw = dict(device=cfg.device, max_batch_size=cfg.max_batch_size,
                      prefill_tokens_per_step=cfg.prefill_tokens_per_step, compile=cfg.compile)
            if cfg.engine_process:
                from raylm.serve.engine_process import EngineProcess

                engine = EngineProcess(run, threads=threads, **kw)
            else:
                import torch

                from raylm.serve.engine import Engine

                if threads:
                    torch.set_num_threads(threads)
                engine = Engine.from_run(run, **kw)
            self.service = OpenAIService(engine, cfg, name)
            self.replica = serve.get_replica_context().replica_id.unique_id  # which replica answered /stats

        @app.post("/v1/completions")
        async def completions(self, request: Request):
            req = await parse(request, P.CompletionRequest)
            return respond(await self._guarded(self.service.completions(req, disconnected(request),
                                                                        deadline(request))))

        @app.post("/v1/chat/completions")
        async def chat_completions(self, request: Request):
            req = await parse(request, P.ChatCompletionRequest)
            return respond(await self._guarded(self.service.chat(req, disconnected(request), deadline(request))))

        @app.get("/v1/models")
        async def models(self):
            return self.service.models()

        @app.get("/v1/models/{name:path}")  # a model name may hold '/' ("org/model")
        async def model(self, name: str):
            return self.service.model(name)

        @app.get("/health")
        async def health(self):
            if self._engine_died():
                return JSONResponse(P.error_body(ENGINE_DIED, "unavailable"), status_code=503)
            return {"status": "ok"}

        @app.get("/ready")
        async def ready(self):
            if not self.service.ready():
                return JSONResponse(P.error_body("shutting down", "unavailable"), status_code=503)
            if not self.service.engine.alive():  # every request would get 503 until Serve replaces it
                return JSONResponse(P.error_body(ENGINE_DIED, "unavailable"), status_code=503)
            return {"status": "ready", "model": name}

        @app.get("/stats")
        async def stats(self):
            return {**self.service.engine.stats(), "replica": self.replica}

        def check_health(self):
            # Serve replaces a replica whose engine is gone (its process died: out of memory, a crash).
            if self._engine_died():
                raise RuntimeError(ENGINE_DIED)
            # ...or hung: its process is there, and every request waits on it for ever.
            unanswered = getattr(self.service.engine, "unanswered_s", None)
            if unanswered is not None and not self.service.draining:
                waited = unanswered()
                if waited > ENGINE_PING_TIMEOUT_S:
                    # Ended here: hung, it would outlive the replica (it reads no socket), holding its memory.
                    self.service.engine.kill()
                    raise RuntimeError(f"the replica's engine process has not answered for {waited:.0f} s "
                                       f"(limit {ENGINE_PING_TIMEOUT_S:g} s): it hangs")

        def _engine_died(self) -> bool:
            """The engine ended while the replica still needed it (not closed by a graceful
            shutdown, where it ends once in-flight requests finish)."""
            return not self.service.engine.alive() and not self.service.draining

        async def _guarded(self, coro):
            from raylm.serve.handlers import ClientGone

            try:
                return await coro
            except ClientGone:  # nobody reads this; the status is for the access log
                return JSONResponse(P.error_body("client disconnected"), status_code=499)

        async def __del__(self):
            # Serve calls this once in-flight requests have drained (graceful shutdown).
            service = getattr(self, "service", None)
            if service is not None:
                await service.close()

    return RaylmServer.bind()


def app_builder(args: dict):
    """Serve's application builder (`serve run raylm.serve.app:app_builder run=...`, or a
    RayService's `import_path` with `args: {run: ..., serve: {<serve.* keys>}}`): the same
    application `raylm serve RUN` deploys. The API key comes from $RAYLM_API_KEY where the
    application is built, never from these args (Serve stores and shows them)."""
    if not isinstance(args, dict) or not isinstance(args.get("run"), str) or not args["run"]:
        raise ConfigError("serve application args: 'run' (a run or checkpoint directory, local or s3://) is required")
    unknown = set(args) - {"run", "serve"}
    if unknown:
        raise ConfigError(f"serve application args: unknown key {sorted(unknown)[0]!r} (expected run, serve)")
    cfg = load_serve_config(list((args.get("serve") or {}).items()))
    if cfg.api_key:
        raise ConfigError("serve application args: serve.api_key must not be written into Serve's config; "
                          f"set ${API_KEY_ENV} from a Secret")
    # Where the app listens is Serve's http_options, which a builder never sees (a RayService
    # says 0.0.0.0 there): serve.host's default, loopback, would let it start with no key on
    # every interface. Without a key, serve.host must say loopback itself.
    if not os.environ.get(API_KEY_ENV) and (args.get("serve") or {}).get("host") not in LOOPBACK:
        raise ConfigError(f"serve application args: set ${API_KEY_ENV} (from a Secret): Serve's http_options, "
                          "not these args, decide where the app listens; or give serve.host: 127.0.0.1 where "
                          "Serve listens on loopback only")
    return build_app(args["run"], cfg)


# --------------------------------------------------------------------------- running


def start(run: str, cfg: ServeConfig, blocking: bool = False, name: str = APP_NAME, route_prefix: str = "/",
          log_level: str = "INFO") -> str:
    """Deploy the application for `run` on the connected Ray cluster (starting Serve's HTTP
    ingress, HAProxy or the proxy actor, on cfg.host:cfg.port unless Serve runs already) and
    return its base URL: where Serve runs already, on its own host and port (Serve keeps them
    whatever it is asked; the URL named cfg's, and `raylm serve` waited there in vain).
    `log_level`: of Serve's own processes and the app's replicas (INFO keeps access logs)."""
    from ray import serve

    from raylm import storage

    if not storage.is_s3(run):  # replicas run in other processes, perhaps in another directory
        run = os.path.abspath(run)
    if cfg.engine == "raylm":  # a wrong path fails here in one line, not in a replica's retries
        from raylm.generate import resolve_checkpoint

        resolve_checkpoint(run)
    if cfg.engine == "vllm":
        from raylm.serve.vllm import build_vllm_app

        application = build_vllm_app(run, cfg, model_name_of(run, cfg))
    else:
        application = build_app(run, cfg)
    from raylm.pipeline import started_env
    from raylm.serve.local import serve_http

    running = serve_http()
    if running is not None:
        if running[0] is None:
            raise ConfigError("Serve runs on this cluster with its HTTP ingress switched off: the API would "
                              "not be reachable; start Serve with HTTP, or serve on another cluster")
        if (running[0], running[1]) != (cfg.host, cfg.port):
            logging.getLogger("ray.serve").warning("Serve runs on this cluster already, on %s:%d: serving there "
                                                   "(not %s:%d)", running[0], running[1], cfg.host, cfg.port)
    elif started_env() is not None:
        # On a cluster this process started (this machine), before Serve starts: else HAProxy
        # fails to bind in an actor, and Ray reports a traceback. Elsewhere the port is not ours.
        check_port_free(cfg)
    serve.start(http_options={"host": cfg.host, "port": cfg.port}, logging_config={"log_level": log_level})
    serve.run(application, name=name, route_prefix=route_prefix, blocking=blocking,
              logging_config={"log_level": log_level})
    if running is not None:
        cfg = dataclasses.replace(cfg, host=running[0], port=running[1])
    return base_url(cfg) + route_prefix.rstrip("/")


def check_port_free(cfg: ServeConfig) -> None:
    """ConfigError naming serve.port when nothing could listen on cfg.host:cfg.port now."""
    family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
    with socket.socket(family) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as HAProxy binds: TIME_WAIT is no conflict
        try:
            s.bind((cfg.host, cfg.port))
        except OSError as e:
            raise ConfigError(f"serve.port={cfg.port}: cannot listen on {cfg.host}:{cfg.port} ({e.strerror}); "
                              f"pick another --port, or stop what holds it") from e


def base_url(cfg: ServeConfig) -> str:
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    return f"http://{'[' + host + ']' if ':' in host else host}:{cfg.port}"
