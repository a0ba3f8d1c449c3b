"""The dashboard's HTTP endpoints, mounted on the daemon's API application.

Pages (contract paths): ``GET /`` (the run list and the start form) and
``GET /runs/{id}`` (one run).  Beside them:

* ``GET /login?token=T&next=PATH`` - keeps the token in an HttpOnly,
  SameSite=Strict cookie and goes to ``PATH``; the pages then need no token
  in their URLs.  A write with the cookie alone also needs the header
  ``X-CEMI-CSRF: 1`` (the pages send it; another site cannot);
* ``GET /static/FILE`` - the pages' scripts, styles and the vendored viewer;
* ``GET /runs/{id}/tiles/{level}/{tx}/{ty}.png`` - a mosaic tile
  (:mod:`~cemi_stream.dashboard.tiles`); with ``?v=`` equal to the tile's
  current version the answer may be cached for good;
* ``GET /runs/{id}/frames/{seq}/raw.png`` and ``.../denoised.png`` - a frame
  as spooled, and as denoised (``?w=PX``: a thumbnail that wide);
* ``GET /api/runs/{id}/events`` - the run's event feed as server-sent
  events (:mod:`~cemi_stream.dashboard.feed`); resumes after ``Last-Event-ID``
  (or ``?after=N``).

Same token rules as the API: reads need the token unless ``--public-read``.
Out-of-range levels, tile or frame indices, unknown runs and any path
leaving the static folder are 4xx answers.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import cv2
import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..capture.spool import SPOOL_DIR, SpoolReader
from ..daemon.stages import ANALYSIS_DIR
from ..errors import CemiError
from ..stitch.feed import DENOISED_DIR
from .feed import FeedHub
from .tiles import MAX_LEVEL, TILE_PX, BytesCache, TileError, encode_png

STATIC = Path(__file__).resolve().parent / "static"
# The token cookie set by GET /login, and the header a write made with it must
# carry (checked by the API's authorize, cemi_stream.daemon.api).
COOKIE = "cemi_token"
CSRF_HEADER = "x-cemi-csrf"
# Tiles this far outside the mosaic's written chunks are refused (they would be empty).
_TILE_MARGIN = 2
_INT = re.compile(r"^-?[0-9]{1,9}$")
_ANALYSIS_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,120}$")
_STATIC_NAME = re.compile(r"^[A-Za-z0-9._-]{1,100}(/[A-Za-z0-9._-]{1,100}){0,4}$")
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".png": "image/png", ".svg": "image/svg+xml",
          ".txt": "text/plain; charset=utf-8", ".md": "text/plain; charset=utf-8"}  # fmt: skip
# How long an SSE connection stays quiet before a comment keeps proxies from closing it, s.
_KEEPALIVE_S = 10.0

Authorize = Callable[..., None]


def _int(
    text: str, what: str, error: Callable[[str, str], Exception], reason: str = "not_found"
) -> int:
    if not _INT.match(text):
        raise error(reason, f"{what} {text[:20]!r}: not an integer")
    return int(text)


def mount_dashboard(
    app: FastAPI,
    *,
    supervisor: Any,
    authorize: Authorize,
    check_run_id: Callable[[str], str],
    error: Callable[[str, str], Exception],
    token_ok: Callable[[str], bool],
    data_dir: Path,
) -> FeedHub:
    """Add the dashboard's routes to ``app``; returns the feed hub (close it at shutdown).

    Parameters
    ----------
    app : FastAPI
        The daemon's API application.
    supervisor : Supervisor
        The runs (``get``).
    authorize : callable
        ``authorize(request, write=bool)``: raises the API's error when refused.
    check_run_id : callable
        Validates a run id (raises the API's error).
    error : callable
        ``error(reason, message)`` -> the API's error exception.
    token_ok : callable
        Whether a token is the daemon's (constant time).
    data_dir : Path
        The daemon's data directory.
    """
    # The tiles and thumbnails are small images made in the daemon, on the cores the
    # run's stages use: OpenCV's thread pool would split each resize over them and
    # spend more CPU in all than it saves in time (a 384 px thumbnail: 1.8 vs 1.1 ms).
    # The daemon itself does no other OpenCV work (the stages are other processes).
    cv2.setNumThreads(1)
    hub = FeedHub(supervisor.get, data_dir)

    def run_feed(run_id: str) -> Any:
        from ..errors import RunNotFoundError

        try:
            return hub.feed(check_run_id(run_id))
        except RunNotFoundError as exc:
            raise error("not_found", str(exc)) from None

    def page(request: Request, name: str) -> Response:
        try:
            authorize(request, write=False)
        except Exception:
            target = quote(request.url.path, safe="/")
            return HTMLResponse(
                (STATIC / "login.html").read_text(encoding="utf-8").replace("{{next}}", target),
                status_code=401,
            )
        return HTMLResponse(
            (STATIC / name).read_text(encoding="utf-8"),
            headers={"Cache-Control": "no-cache"},
        )

    @app.get("/")
    def index(request: Request) -> Response:
        return page(request, "index.html")

    @app.get("/runs/{run_id}")
    def run_page(request: Request, run_id: str) -> Response:
        response = page(request, "run.html")
        if response.status_code == 200:
            run_feed(run_id)  # 404 for an unknown run, before the page is sent
        return response

    @app.get("/login")
    def login(request: Request, token: str = "", next: str = "/") -> Response:
        if not token or not token_ok(token):
            raise error("bad_token", "login: wrong token")
        # Only paths of this server: never an open redirect.
        ok = next.startswith("/") and not next.startswith("//") and "\\" not in next
        response = RedirectResponse(next if ok else "/", status_code=303)
        response.set_cookie(COOKIE, token, httponly=True, samesite="strict", path="/")
        return response

    @app.get("/static/{name:path}")
    def static(request: Request, name: str) -> Response:
        if not _STATIC_NAME.match(name) or ".." in name.split("/"):
            raise error("not_found", f"/static/{name[:80]}: no such file")
        path = (STATIC / name).resolve()
        if STATIC not in path.parents or not path.is_file():
            raise error("not_found", f"/static/{name[:80]}: no such file")
        media = _TYPES.get(path.suffix.lower(), "application/octet-stream")
        return Response(path.read_bytes(), media_type=media,
                        headers={"Cache-Control": "public, max-age=300"})  # fmt: skip

    @app.get("/runs/{run_id}/tiles/{level}/{tx}/{ty}.png")
    async def tile(request: Request, run_id: str, level: str, tx: str, ty: str) -> Response:
        authorize(request, write=False)
        k = _int(level, "tile level", error)
        x, y = _int(tx, "tile column", error), _int(ty, "tile row", error)
        if not 0 <= k <= MAX_LEVEL:
            raise error("not_found", f"tile level {k}: outside 0..{MAX_LEVEL}")
        feed = run_feed(run_id)
        bounds = feed.chunks.bounds()
        span = TILE_PX * 2**k
        if bounds is None:
            raise error("not_found", f"run {run_id}: no mosaic tiles written yet")
        x0, y0, x1, y1 = (b // span for b in bounds)
        if not (x0 - _TILE_MARGIN <= x <= x1 + _TILE_MARGIN
                and y0 - _TILE_MARGIN <= y <= y1 + _TILE_MARGIN):  # fmt: skip
            raise error("not_found", f"tile {k}/{x}/{y}: outside the mosaic")
        # Most answers are kept already (the other pages asked first): those are sent
        # from here, without a trip through the thread pool.
        body = feed.tiles.cached_png(k, x, y)
        if body is None:
            try:
                body = await run_in_threadpool(feed.tiles.png, k, x, y)
            except TileError as exc:
                raise error("not_found", str(exc)) from None
        current = str(feed.chunks.version(k, x, y))
        cache = ("public, max-age=31536000, immutable"
                 if request.query_params.get("v") == current else "no-cache")  # fmt: skip
        return Response(body, media_type="image/png",
                        headers={"Cache-Control": cache, "ETag": f'"{current}"'})  # fmt: skip

    readers: dict[tuple[str, str], SpoolReader] = {}
    # Keyed by run, kind, frame and width; shared by all pages (they show the same
    # keyframe strip: the feed's ``keyframes`` events), each made once however many ask.
    frame_pngs = BytesCache(64)
    frames_lock = threading.Lock()

    def reader_of(run_id: str, kind: str, root: Path) -> SpoolReader:
        # One reader per spool, refreshed: re-reading a 4,000-line table per image
        # request would cost more than the image.
        with frames_lock:
            reader = readers.get((run_id, kind))
        if reader is None:
            reader = SpoolReader(root)
            with frames_lock:
                readers[(run_id, kind)] = reader
        return reader

    @app.get("/runs/{run_id}/frames/{seq}/{kind}.png")
    async def frame_image(
        request: Request, run_id: str, seq: str, kind: str, w: str | None = None
    ) -> Response:
        authorize(request, write=False)
        n = _int(seq, "frame", error)
        if kind not in ("raw", "denoised"):
            raise error("not_found", f"frame image {kind!r}: choose raw or denoised")
        width = _int(w, "w", error, "http_error") if w else 0
        if w and not 16 <= width <= 8192:
            raise error("http_error", f"w {width}: a thumbnail width in 16..8192 px")
        feed = run_feed(run_id)
        spool_root = feed.run_dir if kind == "raw" else feed.run_dir / DENOISED_DIR

        def encode() -> bytes:
            if not (spool_root / SPOOL_DIR).is_dir():
                raise error("not_found", f"run {run_id}: no {kind} frames")
            try:
                reader = reader_of(run_id, kind, spool_root)
                with frames_lock:
                    count = len(reader) if n < len(reader) else reader.refresh()
                if not 0 <= n < count:
                    raise error("not_found", f"frame {n}: outside 0..{count - 1}")
                image = np.asarray(reader.image(n))
            except CemiError as exc:
                raise error("not_found", f"run {run_id}: {exc}") from None
            if width and width < image.shape[1]:  # thumbnails for the keyframe strip
                height = max(1, round(image.shape[0] * width / image.shape[1]))
                image = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
            try:
                return encode_png(image)
            except TileError as exc:
                raise error("internal_error", f"frame {n}: {exc}") from None

        key = (run_id, kind, n, width)
        body = frame_pngs.peek(key) or await run_in_threadpool(frame_pngs.get, key, encode)
        return Response(body, media_type="image/png",
                        headers={"Cache-Control": "public, max-age=3600"})  # fmt: skip

    @app.get("/runs/{run_id}/analysis/{name}.png")
    def analysis_image(request: Request, run_id: str, name: str) -> Response:
        # A map (RUN_DIR/analysis/maps/NAME.png), the profiles or the correlation.
        authorize(request, write=False)
        if not _ANALYSIS_NAME.match(name):
            raise error("not_found", f"analysis image {name[:80]!r}: no such image")
        feed = run_feed(run_id)
        folder = feed.run_dir / ANALYSIS_DIR
        path = folder / f"{name}.png" if name in ("profiles", "correlation") else (
            folder / "maps" / f"{name}.png")  # fmt: skip
        try:
            body = path.read_bytes()
        except OSError:
            raise error("not_found", f"run {run_id}: no analysis image {name!r} (yet)") from None
        return Response(body, media_type="image/png", headers={"Cache-Control": "no-cache"})

    @app.get("/api/runs/{run_id}/events")
    async def events(request: Request, run_id: str, after: str | None = None) -> Response:
        authorize(request, write=False)
        feed = await run_in_threadpool(run_feed, run_id)
        last = request.headers.get("last-event-id") or after
        cursor = _int(last, "Last-Event-ID", error, "http_error") if last else None

        async def stream() -> AsyncIterator[str]:
            nonlocal cursor
            yield "retry: 1000\n\n"
            quiet_since = time.monotonic()
            while True:
                feed.last_wanted = time.monotonic()
                pending = None if cursor is None else feed.since(cursor)
                if pending is None:  # new, or too far behind: the whole state
                    snap = feed.snapshot()
                    cursor = snap.seq
                    yield snap.sse()
                    quiet_since = time.monotonic()
                elif pending:
                    # One write for what a poll brought (run, stats, frames, tiles...):
                    # each write is a trip through the middleware and the transport.
                    cursor = pending[-1].seq
                    yield "".join(event.sse() for event in pending)
                    quiet_since = time.monotonic()
                quiet = time.monotonic() - quiet_since
                if quiet >= _KEEPALIVE_S:
                    yield ": keep-alive\n\n"
                    quiet_since, quiet = time.monotonic(), 0.0
                if await request.is_disconnected():
                    return
                await feed.wait_newer(cursor, _KEEPALIVE_S - quiet)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache",
                                          "X-Accel-Buffering": "no"})  # fmt: skip

    return hub
