"""The dashboard's endpoints on the real daemon: token rules, cookie login, 4xx answers, SSE.

One ``run_daemon.py serve`` process with one finished ``sim:`` run; every request
goes over real HTTP.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest

from cemi_stream.daemon.client import wait_until_serving
from cemi_stream.stitch.mosaic import open_mosaic

REPO = Path(__file__).resolve().parents[3]
SOURCE = "sim:?rows=2&frames_per_row=5&frame_size=320x240&seed=3"

pytestmark = pytest.mark.e2e


class Served:
    def __init__(self, data: Path, *extra: str) -> None:
        self.log = open(data.parent / f"{data.name}.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "run_daemon.py", "serve", "--port", "0", "--data-dir", str(data),
             *extra],
            cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.client = wait_until_serving(data, timeout_s=60, pid=self.proc.pid)
        self.url = json.loads((data / "daemon.json").read_text())["url"]
        self.token = (data / "token").read_text().strip()
        self.http = httpx.Client(base_url=self.url, timeout=30, trust_env=False)
        self.auth = {"Authorization": f"Bearer {self.token}"}

    def close(self) -> None:
        self.http.close()
        self.proc.terminate()
        self.proc.wait(60)
        self.log.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Served, str]]:
    s = Served(tmp_path_factory.mktemp("routes") / "data")
    try:
        run_id = s.client.start({"source": SOURCE, "pace": "max", "analyze": True})["id"]
        deadline = time.monotonic() + 120
        while s.client.run(run_id)["state"] != "finished" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert s.client.run(run_id)["state"] == "finished"
        yield s, run_id
    finally:
        s.close()


def test_pages_need_the_token_and_login_keeps_it_in_a_cookie(served: tuple[Served, str]) -> None:
    s, run_id = served
    page = s.http.get("/")
    assert page.status_code == 401 and 'action="/login"' in page.text
    assert s.http.get(f"/runs/{run_id}").status_code == 401
    assert s.http.get("/login", params={"token": "wrong" * 9}).status_code == 401
    with httpx.Client(base_url=s.url, timeout=30, trust_env=False) as browser:
        login = browser.get("/login", params={"token": s.token, "next": f"/runs/{run_id}"},
                            follow_redirects=False)  # fmt: skip
        assert login.status_code == 303 and login.headers["location"] == f"/runs/{run_id}"
        cookie = login.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie
        assert browser.get(f"/runs/{run_id}").status_code == 200
        assert browser.get("/api/runs").status_code == 200  # the API reads the cookie too
        # A write with the cookie alone is refused: another site's form could send it.
        refused = browser.post("/api/runs", json={"source": SOURCE})
        assert refused.status_code == 401 and "x-cemi-csrf" in refused.json()["error"]
        stop = browser.post(f"/api/runs/{run_id}/stop", headers={"X-CEMI-CSRF": "1"})
        assert stop.status_code == 200
        # Never an open redirect.
        away = browser.get("/login", params={"token": s.token, "next": "//evil.example/"},
                           follow_redirects=False)  # fmt: skip
        assert away.headers["location"] == "/"
    assert s.http.get("/runs/20261202T000000Z-abcdef", headers=s.auth).status_code == 404
    assert s.http.get("/runs/..%2f..%2ftoken", headers=s.auth).status_code in (400, 404)


def test_static_files_and_traversal(served: tuple[Served, str]) -> None:
    s, _ = served
    js = s.http.get("/static/vendor/openseadragon/openseadragon.min.js")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    assert "Redistribution and use" in s.http.get("/static/vendor/openseadragon/LICENSE.txt").text
    for bad in ("../daemon.json", "..%2f..%2fdaemon.json", "vendor/../../routes.py",
                "%2e%2e/%2e%2e/token", "nope.js", "a" * 300):  # fmt: skip
        r = s.http.get(f"/static/{bad}")
        assert r.status_code == 404, (bad, r.status_code)


def test_tiles_frames_and_their_4xx(served: tuple[Served, str]) -> None:
    s, run_id = served
    run_dir = Path(s.client.run(run_id)["run_dir"])
    view = open_mosaic(run_dir / "mosaic.ome.zarr")
    tile = s.http.get(f"/runs/{run_id}/tiles/0/0/0.png", headers=s.auth)
    assert tile.status_code == 200 and tile.headers["content-type"] == "image/png"
    image = cv2.imdecode(np.frombuffer(tile.content, np.uint8), cv2.IMREAD_GRAYSCALE)
    assert np.array_equal(image, view.region(0, 0, 512, 512))
    version = tile.headers["etag"].strip('"')
    cached = s.http.get(f"/runs/{run_id}/tiles/0/0/0.png?v={version}", headers=s.auth)
    assert "immutable" in cached.headers["cache-control"]
    assert "immutable" not in tile.headers["cache-control"]
    for bad in ("21/0/0", "-1/0/0", "0/99999/0", "0/0/-99999", "x/0/0", "0/1.5/0",
                "0/0/0/0", "0/%2e%2e/0"):  # fmt: skip
        r = s.http.get(f"/runs/{run_id}/tiles/{bad}.png", headers=s.auth)
        assert 400 <= r.status_code < 500, (bad, r.status_code)
    assert s.http.get(f"/runs/{run_id}/tiles/0/0/0.png").status_code == 401
    raw = s.http.get(f"/runs/{run_id}/frames/3/raw.png", headers=s.auth)
    frame = cv2.imdecode(np.frombuffer(raw.content, np.uint8), cv2.IMREAD_GRAYSCALE)
    assert frame.shape == (240, 320)
    thumb = s.http.get(f"/runs/{run_id}/frames/3/raw.png?w=160", headers=s.auth)
    small = cv2.imdecode(np.frombuffer(thumb.content, np.uint8), cv2.IMREAD_GRAYSCALE)
    assert frame is not None and small is not None
    expect = cv2.resize(frame, (160, 120), interpolation=cv2.INTER_AREA)
    assert np.array_equal(small, expect)
    again = s.http.get(f"/runs/{run_id}/frames/3/raw.png?w=160", headers=s.auth)
    assert again.content == thumb.content
    for bad in ("10/raw", "-1/raw", "3/denoised", "3/other", "abc/raw"):
        r = s.http.get(f"/runs/{run_id}/frames/{bad}.png", headers=s.auth)
        assert r.status_code == 404, (bad, r.status_code)


def read_events(s: Served, run_id: str, headers: dict[str, str], n: int) -> list[dict]:
    events: list[dict] = []
    with s.http.stream("GET", f"/api/runs/{run_id}/events", headers={**s.auth, **headers},
                       timeout=10) as response:  # fmt: skip
        assert response.headers["content-type"].startswith("text/event-stream")
        event: dict = {}
        for line in response.iter_lines():
            if line.startswith("id: "):
                event["id"] = int(line[4:])
            elif line.startswith("event: "):
                event["event"] = line[7:]
            elif line.startswith("data: "):
                event["data"] = json.loads(line[6:])
            elif line == "" and "event" in event:
                events.append(event)
                event = {}
                if len(events) >= n:
                    break
    return events


def test_the_event_feed_starts_with_a_snapshot_and_resumes(served: tuple[Served, str]) -> None:
    s, run_id = served
    (snap,) = read_events(s, run_id, {}, 1)
    assert snap["event"] == "snapshot"
    data = snap["data"]
    assert data["run"]["id"] == run_id and len(data["frames"]) == 10
    assert data["mosaic"]["chunks"] and data["frame_shape"] == [240, 320]
    assert data["keyframes"] == [7, 8, 9]  # the strip every page shows: the newest three
    # Resuming from an event still kept gives what came after it, not a snapshot.
    assert snap["id"] >= 2
    after = read_events(s, run_id, {"Last-Event-ID": str(snap["id"] - 1)}, 1)
    assert after[0]["event"] != "snapshot" and after[0]["id"] == snap["id"]
    bad = s.http.get(f"/api/runs/{run_id}/events", headers={**s.auth, "Last-Event-ID": "x"})
    assert bad.status_code == 400 and "Last-Event-ID" in bad.json()["error"]


def test_analysis_maps_are_served_and_announced(served: tuple[Served, str]) -> None:
    s, run_id = served
    run = s.client.run(run_id)
    assert "analyze" in run["stages"], run["stages"]
    maps = s.http.get(f"/runs/{run_id}/analysis/mosaic_phase_fraction.png", headers=s.auth)
    assert maps.status_code == 200 and maps.content[:8] == b"\x89PNG\r\n\x1a\n"
    profiles = s.http.get(f"/runs/{run_id}/analysis/profiles.png", headers=s.auth)
    assert profiles.status_code == 200
    assert s.http.get(f"/runs/{run_id}/analysis/profiles.png").status_code == 401
    for bad in ("nope", "..", ".hidden", "a%2F..%2Fb", "x" * 200):
        r = s.http.get(f"/runs/{run_id}/analysis/{bad}.png", headers=s.auth)
        assert r.status_code == 404 and "\n" not in r.json()["error"], bad
    # The feed's snapshot lists the images with their versions and the numbers.
    with s.http.stream("GET", f"/api/runs/{run_id}/events", headers=s.auth) as resp:
        for line in resp.iter_lines():
            if line.startswith("data:"):
                snapshot = json.loads(line[5:])
                break
    names = {im["name"] for im in snapshot["analysis"]["images"]}
    assert {"mosaic_phase_fraction", "profiles"} <= names
    assert snapshot["analysis"]["summary"]["final"] is True
