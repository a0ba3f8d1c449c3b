"""The daemon's control API: FastAPI over a :class:`~cemi_stream.daemon.supervisor.Supervisor`.

Endpoints (JSON; errors are ``{"error": "<one line>", "reason": "<code>"}``):

* ``GET /api/health`` (read): status, version, pid, uptime, request and
  rejection counts;
* ``GET /api/runs`` (read): ``{"runs": [run, ...]}``, oldest first;
* ``POST /api/runs`` (write): start a run from a JSON object of run options
  (the fields of :class:`~cemi_stream.daemon.options.RunOptions`); 201 with
  the run object;
* ``GET /api/runs/{id}`` (read): the run object (``id``, ``state``,
  ``run_dir``, ``stages``, ``counts``, ``mosaic_shape`` ...; see
  :meth:`~cemi_stream.daemon.supervisor.Supervisor.get`);
* ``POST /api/runs/{id}/stop`` (write): ask the run to stop cleanly; the run object;
* ``POST /api/runs/{id}/resume`` (write): complete an ``interrupted`` or
  ``failed`` run; the run object;
* ``GET /metrics`` (read): Prometheus text
  (:func:`~cemi_stream.daemon.metrics.render_metrics`, plus the API's own counters).

Authentication: every *write* needs ``Authorization: Bearer <token>`` (compared
in constant time); every *read* needs it too unless the app was made with
``public_read=True``.  Missing or wrong credentials give 401.

Validation and limits: a request body larger than ``max_body_bytes`` is
refused with 413 as soon as its ``Content-Length`` (or, for a chunked body,
the bytes received so far) exceeds the limit, without reading the rest; the
body of ``POST /api/runs`` must be a JSON object (no duplicate keys, no
``NaN``), every key a known option (400 naming it), and every value valid
(:meth:`RunOptions.from_mapping`: types, values, the source, paths inside the
data directory; 400 with its message).  An unknown run is 404, an impossible
transition 409, too many active runs 429.  Any unexpected exception becomes
a logged 500 JSON answer: no request can stop the server.

Every rejected request (any 4xx or 5xx answer) is counted by its reason code
(:data:`REASONS`); the counts are in ``GET /api/health`` (``rejected``) and
in ``GET /metrics`` as ``cemi_api_rejected_total{reason=...}``, next to
``cemi_api_requests_total{code=...}`` and the request-time histogram
``cemi_api_request_duration_seconds``.
"""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
import errno
import hmac
import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..dashboard.routes import COOKIE as DASHBOARD_COOKIE
from ..dashboard.routes import CSRF_HEADER, mount_dashboard
from ..errors import CemiError, ConfigError, RunNotFoundError, RunStateError
from .options import RunOptions

log = logging.getLogger(__name__)


#: Largest accepted request body, bytes (run options are a few hundred bytes).
MAX_BODY_BYTES = 64 * 1024
#: Most runs active (starting, running, stopping) at once.
MAX_ACTIVE_RUNS = 8
#: Longest error message returned, characters.
MAX_MESSAGE = 500
#: The fields ``POST /api/runs`` accepts: those of :class:`RunOptions`.
OPTION_FIELDS = tuple(f.name for f in dataclasses.fields(RunOptions))
ACTIVE_STATES = ("starting", "running", "stopping")
# A run id as the supervisor makes them (UTC time and hex digits); never used as a path.
_RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

#: Reason codes of rejected requests, with their HTTP status.
REASONS: dict[str, int] = {
    "missing_token": 401,
    "bad_auth_scheme": 401,
    "bad_token": 401,
    "bad_content_length": 400,
    "body_too_large": 413,
    "unsupported_media_type": 415,
    "empty_body": 400,
    "bad_json": 400,
    "not_an_object": 400,
    "unknown_field": 400,
    "invalid_option": 400,
    "bad_run_id": 400,
    "unexpected_body": 400,
    "invalid_request": 422,
    "not_found": 404,
    "method_not_allowed": 405,
    "conflict": 409,
    "too_many_runs": 429,
    "shutting_down": 503,
    "insufficient_storage": 507,
    "internal_error": 500,
    "http_error": 400,
}

# Request-time histogram bounds, seconds.
_DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class SupervisorLike(Protocol):
    """What the API needs of a :class:`~cemi_stream.daemon.supervisor.Supervisor`."""

    def start(self, options: RunOptions) -> str: ...

    def get(self, run_id: str) -> dict[str, Any]: ...

    def list(self) -> list[dict[str, Any]]: ...

    def stop(self, run_id: str) -> dict[str, Any]: ...

    def resume(self, run_id: str) -> dict[str, Any]: ...


class ApiError(Exception):
    """A request refused on purpose: HTTP status, reason code, one-line message."""

    def __init__(self, reason: str, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.status = status if status is not None else REASONS.get(reason, 400)
        self.message = message


class _BodyTooLargeError(Exception):
    """Raised by the size-limited ``receive`` once the body exceeds the limit."""


def one_line(text: object) -> str:
    """``text`` as a single line of at most :data:`MAX_MESSAGE` characters."""
    line = " ".join(str(text).split())
    return line if len(line) <= MAX_MESSAGE else line[: MAX_MESSAGE - 3] + "..."


class ApiCounters:
    """Thread-safe counts of the API's requests (by status code) and rejections (by reason)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[str, int] = {}
        self.rejected: dict[str, int] = {}
        self.duration_counts = [0] * (len(_DURATION_BUCKETS) + 1)
        self.duration_sum = 0.0

    def request(self, status: int, seconds: float) -> None:
        """Count one answered request."""
        with self._lock:
            key = str(status)
            self.requests[key] = self.requests.get(key, 0) + 1
            self.duration_counts[bisect.bisect_left(_DURATION_BUCKETS, seconds)] += 1
            self.duration_sum += seconds

    def reject(self, reason: str) -> None:
        """Count one rejected request."""
        with self._lock:
            self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        """Copies of the counts."""
        with self._lock:
            return {
                "requests": dict(self.requests),
                "rejected": dict(self.rejected),
                "duration_counts": list(self.duration_counts),
                "duration_sum": self.duration_sum,
            }


class ApiCollector(Collector):
    """The API's own counters as Prometheus metric families."""

    def __init__(self, counters: ApiCounters) -> None:
        self.counters = counters

    def collect(self) -> Iterator[Metric]:
        """``cemi_api_requests_total``, ``cemi_api_rejected_total``, request durations."""
        snap = self.counters.snapshot()
        requests = CounterMetricFamily(
            "cemi_api_requests", "Requests answered by the control API.", labels=["code"]
        )
        for code, n in sorted(snap["requests"].items()):
            requests.add_metric([code], float(n))
        rejected = CounterMetricFamily(
            "cemi_api_rejected", "Requests the control API rejected.", labels=["reason"]
        )
        for reason, n in sorted(snap["rejected"].items()):
            rejected.add_metric([reason], float(n))
        duration = HistogramMetricFamily(
            "cemi_api_request_duration_seconds", "Time to answer a control API request."
        )
        buckets, running = [], 0.0
        for edge, n in zip(
            (*_DURATION_BUCKETS, float("inf")), snap["duration_counts"], strict=True
        ):
            running += n
            buckets.append((floatToGoString(edge), running))
        duration.add_metric([], buckets, snap["duration_sum"])
        yield from (requests, rejected, duration)


Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def _error_body(reason: str, message: str) -> bytes:
    return json.dumps({"error": one_line(message), "reason": reason}).encode()


class _Guard:
    """Outermost ASGI layer: body-size limit, request counting, and the last-resort 500.

    A ``Content-Length`` over the limit is answered 413 before the
    application sees the request; a chunked body is cut off (413) once the
    bytes received exceed it.  Any exception that escapes the application
    is logged and answered 500, so the server never sees one.
    """

    def __init__(self, app: ASGIApp, counters: ApiCounters, max_body_bytes: int) -> None:
        self.app = app
        self.counters = counters
        self.max_body_bytes = max_body_bytes

    async def _refuse(self, send: Send, reason: str, message: str) -> int:
        status = REASONS[reason]
        self.counters.reject(reason)
        body = _error_body(reason, message)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
        return status

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await self.app(scope, receive, send)
            return  # websockets are not served
        t0 = time.perf_counter()
        status = 0
        started = False

        async def send_counted(message: Message) -> None:
            nonlocal started, status
            if message["type"] == "http.response.start":
                started = True
                status = int(message["status"])
            await send(message)

        try:
            length = self._content_length(scope)
            if length is not None and length > self.max_body_bytes:
                status = await self._refuse(
                    send, "body_too_large",
                    f"request body: {length} bytes is over the limit of {self.max_body_bytes}",
                )  # fmt: skip
                return
            received = 0

            async def limited_receive() -> Message:
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > self.max_body_bytes:
                        raise _BodyTooLargeError
                return message

            await self.app(scope, limited_receive, send_counted)
        except ApiError as exc:
            if not started:
                status = await self._refuse(send, exc.reason, exc.message)
        except _BodyTooLargeError:
            if not started:
                status = await self._refuse(
                    send, "body_too_large",
                    f"request body: over the limit of {self.max_body_bytes} bytes",
                )  # fmt: skip
        except Exception as exc:
            log.exception("API: unexpected error on %s %s", scope.get("method"), scope.get("path"))
            if not started:
                status = await self._refuse(
                    send,
                    "internal_error",
                    f"internal error ({type(exc).__name__}); see the daemon's log",
                )
        finally:
            self.counters.request(status, time.perf_counter() - t0)

    def _content_length(self, scope: Scope) -> int | None:
        values = [v for k, v in scope.get("headers", []) if k.lower() == b"content-length"]
        if not values:
            return None
        text = values[0].decode("latin-1").strip()
        if len(values) > 1 or not text.isdigit() or len(text) > 18:
            raise ApiError("bad_content_length", f"Content-Length: {text[:40]!r} is not valid")
        return int(text)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def parse_json_object(body: bytes) -> dict[str, Any]:
    """A request body as a JSON object, strictly.

    Raises
    ------
    ApiError
        ``empty_body``, ``bad_json`` (not UTF-8, not JSON, duplicate keys,
        NaN/Infinity, nested too deeply) or ``not_an_object``.
    """
    if not body.strip():
        raise ApiError("empty_body", "request body: empty; expected a JSON object of run options")
    try:
        data = json.loads(
            body.decode("utf-8"),
            object_pairs_hook=_no_duplicates,
            parse_constant=_reject_constant,
        )
    except UnicodeDecodeError:
        raise ApiError("bad_json", "request body: not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise ApiError(
            "bad_json", f"request body: not valid JSON ({exc.msg} at line {exc.lineno} "
            f"column {exc.colno})",
        ) from None  # fmt: skip
    except (ValueError, RecursionError) as exc:
        raise ApiError("bad_json", f"request body: not valid JSON ({one_line(exc)})") from None
    if not isinstance(data, dict):
        raise ApiError(
            "not_an_object", f"request body: expected a JSON object, got {type(data).__name__}"
        )
    return data


def _finite(value: Any) -> Any:
    """``value`` with every NaN/Infinity replaced by None (they are not JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def json_response(
    content: Any, status_code: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    """A JSON answer, encoded once (no re-validation of plain dicts), strict JSON."""
    try:
        body = json.dumps(content, separators=(",", ":"), allow_nan=False)
    except ValueError:  # a NaN read from a statistics file
        body = json.dumps(_finite(content), separators=(",", ":"), allow_nan=False)
    return Response(body, status_code=status_code, headers=headers, media_type="application/json")


def check_run_id(run_id: str) -> str:
    """``run_id`` if it looks like a run id (it is never used as a path).

    Raises
    ------
    ApiError
        ``bad_run_id``.
    """
    if not _RUN_ID_RE.match(run_id):
        raise ApiError("bad_run_id", f"run id {run_id[:80]!r}: not a run id")
    return run_id


def create_app(
    supervisor: SupervisorLike,
    token: str,
    *,
    public_read: bool = False,
    data_dir: Path | None = None,
    default_config: str | None = None,
    roots: Sequence[Path] = (),
    max_body_bytes: int = MAX_BODY_BYTES,
    max_active_runs: int = MAX_ACTIVE_RUNS,
    counters: ApiCounters | None = None,
) -> FastAPI:
    """The control API application.

    Parameters
    ----------
    supervisor : Supervisor
        The runs (any object with the :class:`SupervisorLike` methods).
    token : str
        The API token (``Authorization: Bearer <token>``); must not be empty.
    public_read : bool
        Reads (``GET``) need no token.
    data_dir : Path or None
        The daemon's data directory: run options' relative paths are taken
        from it and no path may lead outside it; None: the supervisor's
        ``data_dir``.
    default_config : str or None
        TOML configuration file given to runs that name none (the daemon's
        ``--config``), absolute.
    roots : sequence of Path
        Further folders sources, models and configuration files may come from.
    max_body_bytes : int
        Largest accepted request body, bytes.
    max_active_runs : int
        Most runs active at once (429 beyond).
    counters : ApiCounters or None
        Where requests and rejections are counted (a new one when None).

    Returns
    -------
    FastAPI
        The application, wrapped in the size/exception guard (``app.state``
        holds ``counters``).

    Raises
    ------
    ConfigError
        An empty token, or no data directory.
    """
    if not token:
        raise ConfigError("API token: empty")
    base = data_dir if data_dir is not None else getattr(supervisor, "data_dir", None)
    if base is None:
        raise ConfigError("API: no data directory given")
    data_path = Path(base).resolve()
    expected = token.encode("utf-8")
    counts = counters if counters is not None else ApiCounters()
    started = time.time()
    start_lock = asyncio.Lock()

    app = FastAPI(
        title="cemi-stream daemon",
        version=__version__,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.counters = counts

    def token_ok(given: str) -> bool:
        return hmac.compare_digest(given.strip().encode("latin-1", "replace"), expected)

    def authorize(request: Request, *, write: bool) -> None:
        if public_read and not write:
            return
        header = request.headers.get("authorization")
        if header is None and DASHBOARD_COOKIE in request.cookies:
            # The dashboard's pages: the token kept by GET /login.  A write also
            # needs a header that only a script of this origin can add.
            if write and request.headers.get(CSRF_HEADER) != "1":
                raise ApiError(
                    "missing_token",
                    f"a write with the {DASHBOARD_COOKIE} cookie needs the header "
                    f"{CSRF_HEADER}: 1 (or send 'Authorization: Bearer <token>')",
                )
            if not token_ok(request.cookies[DASHBOARD_COOKIE]):
                raise ApiError("bad_token", f"cookie {DASHBOARD_COOKIE}: wrong token")
            return
        if header is None:
            raise ApiError(
                "missing_token",
                "Authorization: missing; send 'Authorization: Bearer <token>' "
                "(the token is in DATA_DIR/token)",
            )
        scheme, _, credentials = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not credentials.strip():
            raise ApiError("bad_auth_scheme", "Authorization: expected 'Bearer <token>'")
        given = credentials.strip().encode("latin-1", "replace")
        if not hmac.compare_digest(given, expected):
            raise ApiError("bad_token", "Authorization: wrong token")

    async def no_body(request: Request) -> None:
        body = await request.body()
        if body.strip() not in (b"", b"{}", b"null"):
            raise ApiError("unexpected_body", f"{request.url.path}: takes no request body")

    def refused(exc: ApiError) -> JSONResponse:
        counts.reject(exc.reason)
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(
            {"error": one_line(exc.message), "reason": exc.reason},
            status_code=exc.status,
            headers=headers,
        )

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return refused(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        reason = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        message = (
            f"{request.method} {request.url.path}: no such endpoint"
            if exc.status_code == 404
            else f"{request.method} {request.url.path}: {exc.detail}"
        )
        return refused(ApiError(reason, message, exc.status_code))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return refused(ApiError("invalid_request", f"request: {one_line(exc.errors())}"))

    def lookup(call: Callable[[str], dict[str, Any]], run_id: str) -> dict[str, Any]:
        try:
            return call(check_run_id(run_id))
        except RunNotFoundError as exc:
            raise ApiError("not_found", str(exc)) from None
        except RunStateError as exc:
            raise ApiError("conflict", str(exc)) from None

    @app.get("/api/health")
    def health(request: Request) -> Response:
        authorize(request, write=False)
        snap = counts.snapshot()
        return json_response({
            "status": "ok",
            "version": __version__,
            "pid": os.getpid(),
            "uptime_s": round(time.time() - started, 3),
            "public_read": public_read,
            "requests": sum(snap["requests"].values()),
            "rejected": snap["rejected"],
            "rejected_total": sum(snap["rejected"].values()),
        })  # fmt: skip

    @app.get("/api/runs")
    def list_runs(request: Request) -> Response:
        authorize(request, write=False)
        return json_response({"runs": supervisor.list()})

    async def start(options: RunOptions) -> str:
        try:
            return await run_in_threadpool(supervisor.start, options)
        except RunStateError as exc:
            raise ApiError("shutting_down", str(exc)) from None
        except CemiError as exc:
            raise ApiError("invalid_option", str(exc)) from None
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                why = exc.strerror if exc.strerror and "MiB" in exc.strerror else "no space left"
                raise ApiError(
                    "insufficient_storage", f"{data_path}: {why} to create a run"
                ) from None
            raise ApiError(
                "internal_error", f"cannot create the run: {exc.strerror or exc}"
            ) from None

    @app.post("/api/runs", status_code=201)
    async def create_run(request: Request) -> Response:
        authorize(request, write=True)
        ctype = request.headers.get("content-type")
        if ctype is not None and ctype.split(";")[0].strip().lower() != "application/json":
            raise ApiError(
                "unsupported_media_type",
                f"Content-Type: {ctype[:60]!r}; send the run options as application/json",
            )
        data = parse_json_object(await request.body())
        unknown = [k for k in data if k not in OPTION_FIELDS]
        if unknown:
            raise ApiError(
                "unknown_field",
                f"{unknown[0][:60]}: unknown option (known: {', '.join(OPTION_FIELDS)})",
            )
        try:
            options = await run_in_threadpool(
                RunOptions.from_mapping, data, data_path, roots=tuple(roots)
            )
            if options.config_file is None and default_config is not None:
                options = dataclasses.replace(options, config_file=default_config)
        except CemiError as exc:
            raise ApiError("invalid_option", str(exc)) from None
        async with start_lock:  # the count and the start, together
            runs = await run_in_threadpool(supervisor.list)
            active = sum(1 for r in runs if r.get("state") in ACTIVE_STATES)
            if active >= max_active_runs:
                raise ApiError(
                    "too_many_runs",
                    f"{active} runs are active (at most {max_active_runs}); stop one",
                )
            run_id = await start(options)
        run = await run_in_threadpool(supervisor.get, run_id)
        log.info("API: run %s started (%s)", run_id, options.source)
        return json_response(run, 201, headers={"Location": f"/api/runs/{run_id}"})

    @app.get("/api/runs/{run_id}")
    def get_run(request: Request, run_id: str) -> Response:
        authorize(request, write=False)
        return json_response(lookup(supervisor.get, run_id))

    @app.post("/api/runs/{run_id}/stop")
    async def stop_run(request: Request, run_id: str) -> Response:
        authorize(request, write=True)
        await no_body(request)
        run = await run_in_threadpool(lookup, supervisor.stop, run_id)
        log.info("API: stop requested for run %s", run_id)
        return json_response(run)

    @app.post("/api/runs/{run_id}/resume")
    async def resume_run(request: Request, run_id: str) -> Response:
        authorize(request, write=True)
        await no_body(request)
        run = await run_in_threadpool(lookup, supervisor.resume, run_id)
        log.info("API: run %s resumed", run_id)
        return json_response(run)

    @app.get("/metrics")
    def metrics(request: Request) -> Response:
        authorize(request, write=False)
        from .metrics import CONTENT_TYPE, render_metrics
        from .stats import read_stats

        runs = supervisor.list()
        stats: dict[str, dict[str, dict[str, Any]]] = {}
        for run in runs:
            run_dir = run.get("run_dir")
            if isinstance(run_dir, str):
                try:
                    stats[str(run.get("id"))] = read_stats(Path(run_dir))
                except (OSError, ValueError, CemiError) as exc:
                    log.warning("metrics: run %s: cannot read its statistics (%s)",
                                run.get("id"), exc)  # fmt: skip
        body = render_metrics(runs, stats, extra=[ApiCollector(counts)])
        return Response(body, media_type=CONTENT_TYPE)

    app.state.dashboard = mount_dashboard(
        app,
        supervisor=supervisor,
        authorize=authorize,
        check_run_id=check_run_id,
        error=ApiError,
        token_ok=token_ok,
        data_dir=data_path,
    )

    # Outermost of the user middleware: it sees every request and every escaped exception.
    app.add_middleware(_Guard, counters=counts, max_body_bytes=max_body_bytes)
    return app
