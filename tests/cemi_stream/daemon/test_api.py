"""The control API in process: validation, authentication, limits, counted rejections.

These tests drive the real FastAPI application (real ASGI stack, real
RunOptions validation) through httpx's ASGI transport.  The supervisor behind
it is a small stand-in that records calls: what is tested here is that no
malformed request ever reaches it and none can hurt the server.  The real
supervisor behind the real HTTP server is tested in ``test_service.py``.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from cemi_stream.daemon.api import MAX_BODY_BYTES, OPTION_FIELDS, REASONS, create_app
from cemi_stream.daemon.options import RunOptions
from cemi_stream.errors import RunNotFoundError, RunStateError

TOKEN = "t" * 20 + "0123456789abcdefghijkl"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class StandInSupervisor:
    """Records what reaches it; knows one run, ``r1`` (finished)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.started: list[RunOptions] = []
        self.fail_with: Exception | None = None
        self.fail_start: Exception | None = None
        self.extra: dict[str, Any] = {}

    def _run(self, run_id: str) -> dict[str, Any]:
        if self.fail_with is not None:
            raise self.fail_with
        if run_id != "r1":
            raise RunNotFoundError(f"run {run_id!r}: no such run")
        run_dir = str(self.data_dir / "runs" / "r1")
        return {"id": "r1", "state": "finished", "run_dir": run_dir, **self.extra}

    def start(self, options: RunOptions) -> str:
        if self.fail_start is not None:
            raise self.fail_start
        self.started.append(options)
        return "r1"

    def get(self, run_id: str) -> dict[str, Any]:
        return self._run(run_id)

    def list(self) -> list[dict[str, Any]]:
        return [self._run("r1")]

    def stop(self, run_id: str) -> dict[str, Any]:
        return self._run(run_id)

    def resume(self, run_id: str) -> dict[str, Any]:
        self._run(run_id)
        raise RunStateError(f"run {run_id}: cannot resume a run that is finished")


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    (tmp_path / "runs").mkdir()
    (tmp_path / "frames").mkdir()
    return tmp_path


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def send_all(
    app: Any, requests: list[tuple[str, str, dict[str, Any]]]
) -> list[httpx.Response]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://daemon") as client:
        return [await client.request(m, url, **kw) for m, url, kw in requests]


def one(app: Any, method: str, url: str, **kw: Any) -> httpx.Response:
    return run(send_all(app, [(method, url, kw)]))[0]


def assert_rejected(resp: httpx.Response, status: int, reason: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["reason"] == reason, body
    assert isinstance(body["error"], str) and body["error"] and "\n" not in body["error"]
    return body


def test_a_valid_run_reaches_the_supervisor_with_validated_options(data_dir: Path) -> None:
    sup = StandInSupervisor(data_dir)
    app = create_app(sup, TOKEN, data_dir=data_dir, default_config=None)
    options = {"source": "frames", "pace": "max", "grid": "2x2", "name": "tiles 1"}
    resp = one(app, "POST", "/api/runs", headers=AUTH, json=options)
    assert resp.status_code == 201 and resp.json()["id"] == "r1"
    assert resp.headers["location"] == "/api/runs/r1"
    (options,) = sup.started
    # Relative paths are taken from the data directory, made absolute.
    assert options.source == str(data_dir / "frames") and options.pace == "max"
    assert options.grid == "2x2" and options.name == "tiles 1"


def test_the_daemon_config_is_given_to_runs_that_name_none(data_dir: Path) -> None:
    config = data_dir / "daemon.toml"
    config.write_text("[stitch]\nmin_band_z = 12.0\n")
    sup = StandInSupervisor(data_dir)
    app = create_app(sup, TOKEN, data_dir=data_dir, default_config=str(config))
    assert one(app, "POST", "/api/runs", headers=AUTH, json={"source": "sim:"}).status_code == 201
    assert sup.started[0].config_file == str(config)


@pytest.mark.parametrize(
    ("kwargs", "status", "reason", "fragment"),
    [
        ({}, 401, "missing_token", "Authorization: missing"),
        ({"headers": {"Authorization": "Basic dXNlcjpwYXNz"}}, 401, "bad_auth_scheme", "Bearer"),
        ({"headers": {"Authorization": "Bearer wrong"}}, 401, "bad_token", "wrong token"),
        ({"headers": {**AUTH, "Content-Type": "text/plain"}, "content": b"{}"}, 415,
         "unsupported_media_type", "application/json"),
        ({"headers": AUTH, "content": b""}, 400, "empty_body", "empty"),
        ({"headers": AUTH, "content": b"{'source': 1}"}, 400, "bad_json", "not valid JSON"),
        ({"headers": AUTH, "content": b'{"source": "sim:", "source": "x"}'}, 400, "bad_json",
         "duplicate key"),
        ({"headers": AUTH, "content": b'{"source": "sim:", "pixel_size_um": NaN}'}, 400,
         "bad_json", "NaN"),
        ({"headers": AUTH, "content": b"[" * 20000}, 400, "bad_json", "not valid JSON"),
        ({"headers": AUTH, "content": b"\xff\xfe{}"}, 400, "bad_json", "UTF-8"),
        ({"headers": AUTH, "json": ["sim:"]}, 400, "not_an_object", "list"),
        ({"headers": AUTH, "json": {"source": "sim:", "speed": 3}}, 400, "unknown_field",
         "speed: unknown option"),
        ({"headers": AUTH, "json": {"pace": "max"}}, 400, "invalid_option", "source: required"),
        ({"headers": AUTH, "json": {"source": "../../etc"}}, 400, "invalid_option", "'..'"),
        ({"headers": AUTH, "json": {"source": "/etc"}}, 400, "invalid_option",
         "outside the data directory"),
        ({"headers": AUTH, "json": {"source": "sim:?source=/etc/hostname"}}, 400,
         "invalid_option", "outside the data directory"),
        ({"headers": AUTH, "json": {"source": "sim:", "config_file": "../../etc/x.toml"}}, 400,
         "invalid_option", "config_file"),
        ({"headers": AUTH, "json": {"source": "sim:", "pace": 3}}, 400, "invalid_option", "pace"),
        ({"headers": AUTH, "json": {"source": "sim:", "serpentine": "yes"}}, 400,
         "invalid_option", "serpentine"),
        ({"headers": AUTH, "json": {"source": "sim:", "name": "../../x"}}, 400,
         "invalid_option", "name"),
        ({"headers": AUTH, "json": {"source": "nosuchscheme:x"}}, 400, "invalid_option",
         "source"),
        ({"headers": AUTH, "json": {"source": "sim:", "denoise": "gpu9"}}, 400,
         "invalid_option", "denoise"),
        ({"headers": AUTH, "content": b"x" * (MAX_BODY_BYTES + 1)}, 413, "body_too_large",
         "over the limit"),
    ],
)  # fmt: skip
def test_post_runs_rejections(
    data_dir: Path, kwargs: dict[str, Any], status: int, reason: str, fragment: str
) -> None:
    sup = StandInSupervisor(data_dir)
    app = create_app(sup, TOKEN, data_dir=data_dir)
    body = assert_rejected(one(app, "POST", "/api/runs", **kwargs), status, reason)
    assert fragment in body["error"]
    assert sup.started == []
    health = one(app, "GET", "/api/health", headers=AUTH).json()
    assert health["rejected"] == {reason: 1} and health["rejected_total"] == 1


def test_a_chunked_body_over_the_limit_is_cut_off(data_dir: Path) -> None:
    sent = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal sent
        while sent < 50 * MAX_BODY_BYTES:
            sent += 4096
            yield b" " * 4096

    sup = StandInSupervisor(data_dir)
    app = create_app(sup, TOKEN, data_dir=data_dir)
    resp = one(app, "POST", "/api/runs", headers=AUTH, content=endless())
    assert_rejected(resp, 413, "body_too_large")
    assert sup.started == []


def test_run_endpoints_not_found_conflict_and_bad_ids(data_dir: Path) -> None:
    app = create_app(StandInSupervisor(data_dir), TOKEN, data_dir=data_dir)
    assert one(app, "GET", "/api/runs/r1", headers=AUTH).json()["state"] == "finished"
    assert_rejected(one(app, "GET", "/api/runs/r2", headers=AUTH), 404, "not_found")
    assert_rejected(one(app, "POST", "/api/runs/r2/stop", headers=AUTH), 404, "not_found")
    assert_rejected(one(app, "POST", "/api/runs/r1/resume", headers=AUTH), 409, "conflict")
    assert_rejected(one(app, "GET", "/api/runs/%20x%00", headers=AUTH), 400, "bad_run_id")
    assert_rejected(one(app, "GET", "/api/runs/" + "a" * 65, headers=AUTH), 400, "bad_run_id")
    assert_rejected(one(app, "GET", "/api/runs/..%2F..%2Fetc", headers=AUTH), 404, "not_found")
    assert_rejected(one(app, "DELETE", "/api/runs/r1", headers=AUTH), 405, "method_not_allowed")
    assert_rejected(one(app, "GET", "/api/nothing", headers=AUTH), 404, "not_found")
    assert_rejected(
        one(app, "POST", "/api/runs/r1/stop", headers=AUTH, content=b"please"),
        400, "unexpected_body",
    )  # fmt: skip
    assert one(app, "POST", "/api/runs/r1/stop", headers=AUTH).status_code == 200


def test_reads_need_the_token_unless_public_read(data_dir: Path) -> None:
    private = create_app(StandInSupervisor(data_dir), TOKEN, data_dir=data_dir)
    public = create_app(StandInSupervisor(data_dir), TOKEN, data_dir=data_dir, public_read=True)
    for path in ("/api/health", "/api/runs", "/api/runs/r1", "/metrics"):
        resp = one(private, "GET", path)
        assert_rejected(resp, 401, "missing_token")
        assert resp.headers["www-authenticate"] == "Bearer"
        assert one(public, "GET", path).status_code == 200
        assert one(private, "GET", path, headers=AUTH).status_code == 200
    # Writes need it always.
    assert_rejected(one(public, "POST", "/api/runs", json={"source": "sim:"}), 401,
                    "missing_token")  # fmt: skip
    assert_rejected(one(public, "POST", "/api/runs/r1/stop"), 401, "missing_token")


def test_an_unexpected_error_is_a_logged_500_and_the_server_goes_on(
    data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sup = StandInSupervisor(data_dir)
    app = create_app(sup, TOKEN, data_dir=data_dir)
    sup.fail_with = ZeroDivisionError("division by zero")
    body = assert_rejected(one(app, "GET", "/api/runs/r1", headers=AUTH), 500, "internal_error")
    assert "ZeroDivisionError" in body["error"]
    assert "unexpected error" in caplog.text
    sup.fail_with = None
    sup.fail_start = OSError(28, "No space left on device")
    body = assert_rejected(
        one(app, "POST", "/api/runs", headers=AUTH, json={"source": "sim:"}),
        507,
        "insufficient_storage",
    )
    assert "no space left" in body["error"]
    sup.fail_start = RunStateError("the daemon is shutting down; no new runs")
    assert_rejected(
        one(app, "POST", "/api/runs", headers=AUTH, json={"source": "sim:"}), 503, "shutting_down"
    )
    # A NaN read from a statistics file is sent as null (strict JSON).
    sup.extra = {"stages": {"stitch": {"frames_per_s": float("nan")}}}
    resp = one(app, "GET", "/api/runs/r1", headers=AUTH)
    assert resp.status_code == 200 and resp.json()["stages"]["stitch"]["frames_per_s"] is None


def test_metrics_carry_the_api_counters(data_dir: Path) -> None:
    app = create_app(StandInSupervisor(data_dir), TOKEN, data_dir=data_dir)
    one(app, "GET", "/api/runs", headers={"Authorization": "Bearer nope"})
    resp = one(app, "GET", "/metrics", headers=AUTH)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    assert 'cemi_api_rejected_total{reason="bad_token"} 1.0' in resp.text
    assert 'cemi_api_requests_total{code="401"} 1.0' in resp.text
    assert "cemi_api_request_duration_seconds_bucket" in resp.text


# -- the fuzz: 10,000+ malformed requests -------------------------------------------------


def malformed_requests(seed: int, n: int) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """``n`` malformed requests of every kind, reproducibly."""
    rng = random.Random(seed)
    wrong_values: list[Any] = [None, True, 7, -1.5, 1e308, "", " ", "\x00", [], {}, ["a"],
                               {"a": 1}, "x" * 5000, "../../etc/passwd", "/etc/shadow"]  # fmt: skip
    traversal = ["../../etc", "../x", "/etc", "/", "frames/../../..", "~/x", "sim:../../a.png",
                 "sim:?source=../../etc/hostname", "sim:?source=/etc/hostname", "folder:/etc",
                 "tiff:/etc/x.tif", "video:../../v.avi", "frames/../../../etc"]  # fmt: skip
    run_paths = ["/api/runs/r2", "/api/runs/%00", "/api/runs/..%2F..", "/api/runs/" + "z" * 70,
                 "/api/runs/r1/explode", "/api/run", "/admin", "/api/runs/r1/stop/now"]  # fmt: skip
    for i in range(n):
        kind = i % 12
        headers: dict[str, str] = dict(AUTH)
        if kind == 0:  # bad JSON bytes
            body = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
            yield "POST", "/api/runs", {"headers": headers, "content": b"{" + body}
        elif kind == 1:  # truncated or almost-JSON
            text = json.dumps({"source": "sim:", "pace": "max"})
            cut = text[: rng.randrange(1, len(text) - 1)]
            yield "POST", "/api/runs", {"headers": headers, "content": cut.encode()}
        elif kind == 2:  # not an object
            value = rng.choice([[], [1], "sim:", 3, None, True, [{"source": "sim:"}]])
            yield "POST", "/api/runs", {"headers": headers, "json": value}
        elif kind == 3:  # unknown fields
            key = rng.choice(["Source", "src", "speed", "out", "run_dir", "__class__", "x" * 100,
                              "pace ", "", "sources"])  # fmt: skip
            yield "POST", "/api/runs", {"headers": headers, "json": {"source": "sim:", key: 1}}
        elif kind == 4:  # wrong types and values
            field = rng.choice([f for f in OPTION_FIELDS if f != "source"])
            value = rng.choice(wrong_values)
            if field in ("serpentine", "allow_predicted", "analyze") and value is True:
                value = "yes"
            if field == "pixel_size_um" and value in (7, 1e308):
                value = -value
            if field == "name" and isinstance(value, str) and value in ("", " "):
                value = None  # (an empty name would be the default: not malformed)
            if value is None and field not in ("pace", "denoise", "serpentine", "allow_predicted",
                                               "analyze"):  # fmt: skip
                value = {"bad": 1}
            yield "POST", "/api/runs", {"headers": headers,
                                        "json": {"source": "sim:", field: value}}  # fmt: skip
        elif kind == 5:  # traversal and outside paths
            field = rng.choice(["source", "source", "config_file", "model"])
            data: dict[str, Any] = {"source": "sim:", field: rng.choice(traversal)}
            if field == "model":
                data["denoise"] = "cpu"
                data["model"] = rng.choice(["../../m.safetensors", "/etc/m.safetensors"])
            yield "POST", "/api/runs", {"headers": headers, "json": data}
        elif kind == 6:  # missing or wrong token, on reads and writes
            method, path = rng.choice(
                [
                    ("GET", "/api/runs"),
                    ("GET", "/api/health"),
                    ("GET", "/metrics"),
                    ("POST", "/api/runs"),
                    ("POST", "/api/runs/r1/stop"),
                    ("GET", "/api/runs/r1"),
                ]
            )
            auth = rng.choice([None, "Bearer", "Bearer ", "Bearer " + TOKEN[:-1],
                               "Bearer " + TOKEN + "x", "Basic " + TOKEN, TOKEN,
                               b"Bearer \xe9\xe9\xe9", "bearer  wrong"])  # fmt: skip
            hdrs: dict[str, Any] = {} if auth is None else {"Authorization": auth}
            yield (
                method,
                path,
                {
                    "headers": hdrs,
                    "json": {"source": "sim:"}
                    if method == "POST" and path == "/api/runs"
                    else None,
                },
            )
        elif kind == 7:  # huge bodies (declared; the rest is never read)
            size = MAX_BODY_BYTES + rng.randrange(1, 10 * MAX_BODY_BYTES)
            headers["Content-Length"] = str(size)
            yield "POST", "/api/runs", {"headers": headers, "content": b"{" * 1024}
        elif kind == 8:  # bad run ids, unknown runs and routes
            yield rng.choice(["GET", "POST"]), rng.choice(run_paths), {"headers": headers}
        elif kind == 9:  # wrong methods
            yield (
                rng.choice(["PUT", "DELETE", "PATCH"]),
                rng.choice(["/api/runs", "/api/runs/r1", "/api/health", "/metrics"]),
                {"headers": headers},
            )
        elif kind == 10:  # bad content types and bodies where none belongs
            if rng.random() < 0.5:
                headers["Content-Type"] = rng.choice(
                    ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"]
                )
                yield "POST", "/api/runs", {"headers": headers, "content": b"source=sim:"}
            else:
                yield "POST", "/api/runs/r1/stop", {"headers": headers, "content": b"now!"}
        else:  # impossible transitions, bad Content-Length
            if rng.random() < 0.5:
                yield "POST", "/api/runs/r1/resume", {"headers": headers}
            else:
                headers["Content-Length"] = rng.choice(["-1", "abc", "1e9", "99999999999999999999"])
                yield "POST", "/api/runs", {"headers": headers, "content": b"{}"}


def test_fuzz_10000_malformed_requests_are_all_rejected_and_counted(data_dir: Path) -> None:
    n = 10_200
    sup = StandInSupervisor(data_dir)
    app = create_app(sup, TOKEN, data_dir=data_dir)

    async def go() -> tuple[list[tuple[int, str]], dict[str, Any], httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        seen: list[tuple[int, str]] = []
        async with httpx.AsyncClient(transport=transport, base_url="http://daemon") as client:
            for method, url, kw in malformed_requests(seed=9, n=n):
                kw = {k: v for k, v in kw.items() if v is not None}
                resp = await client.request(method, url, **kw)
                body = resp.json()
                assert set(body) == {"error", "reason"}, (method, url, kw, body)
                assert "\n" not in body["error"]
                seen.append((resp.status_code, body["reason"]))
            health = (await client.get("/api/health", headers=AUTH)).json()
            ok = await client.post("/api/runs", headers=AUTH, json={"source": "sim:"})
        return seen, health, ok

    seen, health, ok = run(go())
    statuses = Counter(status for status, _ in seen)
    assert len(seen) == n
    assert all(400 <= status < 500 for status in statuses), statuses  # no 5xx, no 2xx
    for status, reason in seen:
        assert REASONS[reason] == status or reason == "http_error", (status, reason)
    # Every rejection was counted, under the reason it was answered with.
    reasons = Counter(reason for _, reason in seen)
    assert health["rejected"] == dict(reasons) and health["rejected_total"] == n
    assert len(reasons) >= 12, reasons
    # None reached the supervisor; the server still takes a good request.
    assert sup.started[:-1] == [] and ok.status_code == 201 and len(sup.started) == 1
