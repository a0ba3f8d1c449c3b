"""The live event feed of a run: numbered events for dashboards, built from what is on disk.

A :class:`RunFeed` looks at a run about every :data:`POLL_S` seconds - the
stages' statistics files, the stitcher's journal (``stitch.journal``, then
``positions.csv`` once finalised), the mosaic's chunk files
(:class:`~cemi_stream.dashboard.tiles.ChunkIndex`); its object from the
supervisor every :data:`RUN_POLL_S`, the free disk space every few seconds -
and turns what changed into events:

``run``     the run object (state, stages, counts) when it changed;
``stats``   one sample per poll while the run is active: per stage frames/s,
            queue depth and mean processing time since the last sample (ms);
``frames``  frames placed since the last poll: ``[seq, x, y, status, score]``
            (mosaic pixels, top-left corner; provisional positions while the
            run is live, the refined ones - ``replace: true`` - once finalised);
``tiles``   mosaic chunks written or rewritten: ``[cx, cy, version]``;
``keyframes`` the pages' keyframe strip: the newest placed frame, taken at
            most once per :data:`KEYFRAMES_S` while the run is active, after
            the ones taken before (:data:`KEYFRAMES` in all; the newest frames
            when the feed starts).  Every page shows the same frames, so each
            thumbnail is made once, and a page fetches one new one per update;
``alert``   something a person should see at once: ``kind`` (``predicted``,
            ``dropped``, ``restart``, ``disk``, ``denoise_behind``,
            ``failed``) and a one-line ``message``.

Every event has a sequence number, one counter per run, and the feed keeps
the last :data:`RING_EVENTS` of them.  A client that reconnects says the last
number it saw and gets everything after it; one that fell further behind (or
a new one) gets a ``snapshot`` - the whole current state, with the number it
is valid at - and goes on from there.  So nothing is missed, no queue grows
for a slow client (the ring is the only buffer: lossy for whoever is too
slow, never blocking for the run), and the stages are never asked anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import json
import logging
import os
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from ..daemon.stages import ANALYSIS_DIR
from ..stitch.stage import CANVAS_MARGIN_PX
from .tiles import MOSAIC_DIR, ChunkIndex, TileRenderer

log = logging.getLogger(__name__)

POLL_S = 0.25
#: How often the run object is asked for, s.  It is what the counts, the stage table
#: and the restart / drop alerts come from, none of which needs the tiles' pace, and
#: making it reads the stages' statistics and the whole positions table: on the
#: paper-sized run, 40 % of the feed's time when asked for at every poll.
RUN_POLL_S = 1.0
RING_EVENTS = 4096
#: Samples of the stage charts kept for a snapshot (at POLL_S: the last ~2 minutes).
HISTORY_SAMPLES = 480
#: How often the analysis's folder (its maps and numbers) is looked at, seconds.
ANALYSIS_POLL_S = 2.0
#: Placed frames the keyframe strip shows, and how often at most it moves on while
#: the run is active, s.  One strip for all pages: at the paper run's ~45 frames/s,
#: pages choosing "the newest three" on timers of their own would each want other
#: frames, three new ones per update, each a thumbnail encoding (~5 ms) and a
#: ~90 kB answer.
KEYFRAMES = 3
KEYFRAMES_S = 1.0
#: Alerts kept for a snapshot.
ALERTS_KEPT = 200
#: Free space on the data directory below which the ``disk`` alert is raised, bytes.
LOW_DISK_BYTES = 2 * 2**30
#: Frames the denoiser may lag behind the capture before ``denoise_behind`` is raised.
DENOISE_LAG_FRAMES = 16
# Drop reasons that are the keyframe selection doing its job, not losses.
_SELECTION_REASONS = frozenset({"redundant", "overlap", "first", "keep_all"})
_ACTIVE = ("starting", "running", "stopping")


@dataclass(frozen=True, slots=True)
class Event:
    """One numbered event: ``seq``, ``kind`` and its JSON ``data``."""

    seq: int
    kind: str
    data: str

    def sse(self) -> str:
        """The event in ``text/event-stream`` form."""
        return f"id: {self.seq}\nevent: {self.kind}\ndata: {self.data}\n\n"


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _mean_ms(prev: dict[str, Any] | None, cur: dict[str, Any]) -> float | None:
    """Mean processing time between two samples of a stage's ``timings_ms``."""
    t1 = cur.get("timings_ms") or {}
    t0 = (prev or {}).get("timings_ms") or {}
    try:
        n = float(t1.get("count", 0)) - float(t0.get("count", 0))
        s = float(t1.get("sum", 0.0)) - float(t0.get("sum", 0.0))
    except (TypeError, ValueError):
        return None
    return round(s / n, 3) if n > 0 else None


class RunFeed:
    """The numbered events of one run (see the module docstring).

    Parameters
    ----------
    run_id : str
        The run.
    get_run : callable
        ``run_id -> run object`` (:meth:`Supervisor.get`).
    run_dir : Path
        The run directory.
    data_dir : Path
        The daemon's data directory (for the free-space check).
    """

    def __init__(
        self,
        run_id: str,
        get_run: Callable[[str], dict[str, Any]],
        run_dir: Path,
        data_dir: Path,
    ) -> None:
        self.run_id = run_id
        self._get_run = get_run
        self.run_dir = Path(run_dir)
        self.data_dir = Path(data_dir)
        self.chunks = ChunkIndex(self.run_dir / MOSAIC_DIR)
        self.tiles = TileRenderer(self.chunks)
        self._lock = threading.Lock()
        self._ring: deque[Event] = deque(maxlen=RING_EVENTS)
        # Streams waiting for events (wait_newer): woken once per poll that emitted any.
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = set()
        self._seq = 0
        self._run: dict[str, Any] = {}
        self._run_json = ""
        self._frames: dict[int, list[Any]] = {}
        self._keyframes: list[int] = []
        self._keyframes_t = -KEYFRAMES_S
        self._keyframes_due = False
        self._journal_pos = 0
        self._journal_ino = -1
        self._positions_final = False
        self._history: deque[dict[str, Any]] = deque(maxlen=HISTORY_SAMPLES)
        self._alerts: deque[dict[str, Any]] = deque(maxlen=ALERTS_KEPT)
        self._prev_stats: deque[dict[str, dict[str, Any]]] = deque(maxlen=8)
        self._seen_dropped: dict[str, int] = {}
        self._seen_restarts: dict[str, int] = {}
        self._disk_low = False
        self._denoise_behind = False
        self._failed_alerted = False
        self._last_disk_check = 0.0
        self._analysis: dict[str, Any] = {}
        self._analysis_key = ""
        self._last_analysis_check = 0.0
        self.last_poll = 0.0
        self._last_run_poll = -RUN_POLL_S
        self._last_run: dict[str, Any] | None = None
        self.last_wanted = time.monotonic()

    # -- events -----------------------------------------------------------------

    @property
    def seq(self) -> int:
        """Number of the newest event."""
        with self._lock:
            return self._seq

    def _emit(self, kind: str, data: Any) -> None:
        with self._lock:
            self._seq += 1
            self._ring.append(Event(self._seq, kind, json.dumps(data, separators=(",", ":"))))

    def since(self, after: int) -> list[Event] | None:
        """Events numbered above ``after``; None when some of them are no longer kept."""
        with self._lock:
            if after >= self._seq:
                return []
            if not self._ring or self._ring[0].seq > after + 1:
                return None
            start = after + 1 - self._ring[0].seq
            return list(islice(self._ring, start, None))

    async def wait_newer(self, after: int, timeout: float) -> None:
        """Return once an event numbered above ``after`` exists, or after ``timeout`` seconds.

        For the event streams: they sleep until a poll has something for them,
        instead of looking at the ring on a timer of their own (each look is
        a wake-up of the event loop per open page), and send it at once.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        waiter = (loop, future)
        with self._lock:
            if self._seq > after:
                return
            self._waiters.add(waiter)
        timer = loop.call_later(timeout, _resolve, future)
        try:
            await future
        finally:
            timer.cancel()
            with self._lock:
                self._waiters.discard(waiter)

    def _wake(self) -> None:
        with self._lock:
            waiters, self._waiters = self._waiters, set()
        for loop, future in waiters:
            # A closed loop raises RuntimeError: nobody is waiting there any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_resolve, future)

    def snapshot(self) -> Event:
        """The whole current state as one ``snapshot`` event, numbered as the newest event."""
        with self._lock:
            data = {
                "run": self._run,
                "frames": sorted(self._frames.values()),
                "frame_shape": self.chunks.mosaic.frame_shape,
                "pixel_size_um": self.chunks.mosaic.pixel_size_um,
                "mosaic": self.chunks.snapshot(),
                "history": list(self._history),
                "alerts": list(self._alerts),
                "keyframes": self._keyframes,
                "analysis": self._analysis,
            }
            return Event(self._seq, "snapshot", json.dumps(data, separators=(",", ":")))

    # -- polling ----------------------------------------------------------------

    def poll(self) -> None:
        """Look at the run once and emit what changed (called by :class:`FeedHub`)."""
        before = self._seq
        try:
            self._poll()
        finally:
            if self._seq != before:
                self._wake()

    def _poll(self) -> None:
        now = time.monotonic()
        self.last_poll = now
        run = self._last_run
        fresh = run is None or now - self._last_run_poll >= RUN_POLL_S
        if run is None or fresh:
            try:
                run = self._get_run(self.run_id)
            except Exception as exc:  # a run that vanished: nothing more to tell
                log.debug("feed %s: %s", self.run_id, exc)
                return
            self._last_run, self._last_run_poll = run, now
        changed = self.chunks.scan()  # first: the refined positions need the final origin
        if fresh:
            self._poll_run(run)
        if self._poll_frames(run):
            self._keyframes_due = True
        if self._keyframes_due and (
            now - self._keyframes_t >= KEYFRAMES_S or run.get("state") not in _ACTIVE
        ):
            self._poll_keyframes(now)
        if changed:
            rows = [[cx, cy, v] for (cx, cy), v in sorted(changed.items())]
            m = self.chunks.mosaic
            self._emit("tiles", {"unit_px": m.unit_px, "state": m.state, "chunks": rows,
                                 "frame_shape": m.frame_shape,
                                 "pixel_size_um": m.pixel_size_um})  # fmt: skip
        if run.get("state") in _ACTIVE:
            self._poll_stats(run)
        if now - self._last_disk_check > 5.0:
            self._last_disk_check = now
            self._poll_disk()
        if now - self._last_analysis_check > ANALYSIS_POLL_S:
            self._last_analysis_check = now
            self._poll_analysis()

    def _poll_analysis(self) -> None:
        """The analysis's images (maps, profiles, correlation) and numbers, when they change."""
        folder = self.run_dir / ANALYSIS_DIR
        images: list[dict[str, Any]] = []
        for path in [*sorted((folder / "maps").glob("*.png")),
                     folder / "profiles.png", folder / "correlation.png"]:  # fmt: skip
            try:
                version = path.stat().st_mtime_ns
            except OSError:
                continue
            images.append({"name": path.stem, "v": version})
        try:  # the numbers are written after the images: both make a change
            numbers = (folder / "analysis.json").stat().st_mtime_ns
        except OSError:
            numbers = 0
        key = json.dumps([images, numbers])
        if not images or key == self._analysis_key:
            return
        self._analysis_key = key
        summary: dict[str, Any] = {}
        try:
            data = json.loads((folder / "analysis.json").read_text(encoding="utf-8"))
            first = (data.get("images") or [{}])[0]
            # the stage's last write (on the final mosaic) is the one with "live" counts
            summary = {"tiles": data.get("tiles"), "final": "live" in data,
                       **{k: v for k, v in first.items() if k.startswith("mean_")}}  # fmt: skip
        except (OSError, ValueError, AttributeError, IndexError):
            pass  # being rewritten: the next poll reads it
        analysis = {"images": images, "summary": summary}
        with self._lock:
            self._analysis = analysis
        self._emit("analysis", analysis)

    def _poll_run(self, run: dict[str, Any]) -> None:
        stable = {
            **run,
            "stages": {
                name: {k: v for k, v in st.items() if k != "heartbeat_age_s"}
                for name, st in (run.get("stages") or {}).items()
            },
        }
        text = json.dumps(stable, sort_keys=True, default=str)
        if text != self._run_json:
            self._run_json = text
            with self._lock:
                self._run = stable
            self._emit("run", stable)
        for name, st in (run.get("stages") or {}).items():
            restarts = int(st.get("restarts") or 0)
            if restarts > self._seen_restarts.get(name, 0):
                self._alert("restart", f"{name} restarted ({restarts} so far): "
                                       f"{st.get('last_error') or 'no error output'}")  # fmt: skip
            self._seen_restarts[name] = restarts
            for reason, n in (st.get("dropped") or {}).items():
                if reason in _SELECTION_REASONS or not isinstance(n, int):
                    continue
                key = f"{name}:{reason}"
                if n > self._seen_dropped.get(key, 0):
                    self._alert("dropped", f"{name}: {n} frames dropped ({reason})")
                    self._seen_dropped[key] = n
        if run.get("state") == "failed" and not self._failed_alerted:
            self._failed_alerted = True
            self._alert("failed", f"run failed: {run.get('reason')}")
        capture, denoise = (
            (run.get("stages") or {}).get("capture"),
            (run.get("stages") or {}).get("denoise"),
        )
        if capture and denoise and run.get("state") in _ACTIVE:
            lag = int(capture.get("frames_out") or 0) - int(denoise.get("frames_out") or 0)
            behind = lag > DENOISE_LAG_FRAMES
            if behind and not self._denoise_behind:
                self._alert("denoise_behind", f"the denoiser is {lag} frames behind the capture")
            self._denoise_behind = behind

    def _poll_frames(self, run: dict[str, Any]) -> bool:
        """Emit the frames placed (or refined) since the last poll; True when there were some."""
        new: list[list[Any]] = []
        final_positions = self.run_dir / "positions.csv"
        if self._positions_final:
            return False  # the refined positions are all there is to tell
        if run.get("state") == "finished":
            # Finalised: the refined positions (level-0 array pixels + the origin).
            if self.chunks.mosaic.state == "final" and final_positions.is_file():
                ox, oy = self.chunks.mosaic.origin_xy
                refined: dict[int, list[Any]] = {}
                try:
                    with open(final_positions, encoding="utf-8") as f:
                        next(f, None)
                        for line in f:
                            parts = line.rstrip("\n").split(",")
                            if len(parts) < 6 or not parts[0] or not parts[2]:
                                continue
                            seq = int(parts[0])
                            refined[seq] = [seq, round(float(parts[2]) + ox, 2),
                                            round(float(parts[3]) + oy, 2), parts[5],
                                            round(float(parts[4]), 4)]  # fmt: skip
                except (OSError, ValueError):
                    refined = {}
                if refined:
                    self._positions_final = True
                    with self._lock:
                        self._frames = refined
                    self._emit("frames", {"replace": True, "frames": sorted(refined.values())})
                    return True
            return False
        try:
            with open(self.run_dir / "stitch.journal", "rb") as f:
                st = os.fstat(f.fileno())
                if st.st_ino != self._journal_ino or st.st_size < self._journal_pos:
                    # A restarted stitcher rewrote its journal: read it from the top
                    # (its records are the same; the equal ones are not sent again).
                    self._journal_ino, self._journal_pos = st.st_ino, 0
                f.seek(self._journal_pos)
                chunk = f.read()
        except OSError:
            return False
        end = chunk.rfind(b"\n")
        if end < 0:
            return False
        self._journal_pos += end + 1
        for raw in chunk[: end + 1].splitlines():
            try:
                r = json.loads(raw)
                # Journal positions are the tracker's; the canvas adds its margin.
                x, y = float(r["x"]) + CANVAS_MARGIN_PX, float(r["y"]) + CANVAS_MARGIN_PX
                row: list[Any] = [int(r["seq"]), round(x, 2), round(y, 2),
                       str(r["status"]), round(float(r["score"]), 4)]  # fmt: skip
            except (ValueError, KeyError, TypeError):
                continue
            if row[0] in self._frames and self._frames[row[0]] == row:
                continue  # a restarted stitcher's journal replay
            new.append(row)
            if row[3] == "predicted":
                self._alert("predicted", f"frame {row[0]} predicted (no trusted registration)")
        if new:
            with self._lock:
                for row in new:
                    self._frames[row[0]] = row
            self._emit("frames", {"replace": False, "frames": new})
        return bool(new)

    def _poll_keyframes(self, now: float) -> None:
        """Move the keyframe strip on to the newest placed frame (see the module docstring)."""
        self._keyframes_due = False
        self._keyframes_t = now
        with self._lock:
            if not self._frames:
                return
            newest = max(self._frames)
            if self._keyframes and newest <= self._keyframes[-1]:
                return
            if self._keyframes:
                strip = [*self._keyframes, newest][-KEYFRAMES:]
            else:
                strip = sorted(heapq.nlargest(KEYFRAMES, self._frames))
            self._keyframes = strip
        self._emit("keyframes", {"frames": strip})

    def _poll_stats(self, run: dict[str, Any]) -> None:
        from ..daemon.stats import read_stats

        try:
            stats = read_stats(self.run_dir)
        except Exception:  # statistics are best effort; the run object has the rest
            return
        sample: dict[str, Any] = {"t": round(time.time(), 3), "stages": {}}
        # Mean processing time over the last ~2 s (a slow stage may have no frame
        # in one poll interval).
        before = self._prev_stats[0] if self._prev_stats else {}
        for name, cur in stats.items():
            sample["stages"][name] = {
                "fps": cur.get("frames_per_s"),
                "queue": cur.get("queue_depth"),
                "ms": _mean_ms(before.get(name), cur),
                "in": cur.get("frames_in"),
                "out": cur.get("frames_out"),
                "total": cur.get("frames_total"),
            }
        self._prev_stats.append(stats)
        with self._lock:
            self._history.append(sample)
        self._emit("stats", sample)

    def _poll_disk(self) -> None:
        try:
            free = shutil.disk_usage(self.data_dir).free
        except OSError:
            return
        low = free < LOW_DISK_BYTES
        if low and not self._disk_low:
            self._alert("disk", f"low disk space: {free / 2**30:.2f} GiB free on {self.data_dir}")
        self._disk_low = low

    def _alert(self, kind: str, message: str) -> None:
        alert = {"t": round(time.time(), 3), "kind": kind, "message": message}
        with self._lock:
            self._alerts.append(alert)
        self._emit("alert", alert)


class FeedHub:
    """The feeds of all runs a dashboard looks at, polled by one background thread.

    A feed is polled while its run is active or a client asked for it in the
    last :attr:`idle_s` seconds; feeds of runs nobody watches cost nothing.

    Parameters
    ----------
    get_run : callable
        ``run_id -> run object``.
    data_dir : Path
        The daemon's data directory.
    """

    def __init__(self, get_run: Callable[[str], dict[str, Any]], data_dir: Path) -> None:
        self._get_run = get_run
        self.data_dir = Path(data_dir)
        self._feeds: dict[str, RunFeed] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.idle_s = 60.0

    def feed(self, run_id: str) -> RunFeed:
        """The run's feed (made, and polled once, on first use).

        Raises
        ------
        RunNotFoundError
            No such run.
        """
        with self._lock:
            feed = self._feeds.get(run_id)
        if feed is None:
            run = self._get_run(run_id)  # raises for an unknown run
            feed = RunFeed(run_id, self._get_run, Path(run["run_dir"]), self.data_dir)
            feed.poll()
            with self._lock:
                feed = self._feeds.setdefault(run_id, feed)
        feed.last_wanted = time.monotonic()
        self._ensure_thread()
        return feed

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(target=self._loop, name="dashboard-feeds",
                                                daemon=True)  # fmt: skip
                self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(POLL_S):
            now = time.monotonic()
            with self._lock:
                feeds = list(self._feeds.values())
            for feed in feeds:
                active = feed._run.get("state") in _ACTIVE
                if active or now - feed.last_wanted < self.idle_s:
                    try:
                        feed.poll()
                    except Exception:  # one bad run must not stop the others' feeds
                        log.exception("dashboard feed of run %s", feed.run_id)

    def close(self) -> None:
        """Stop polling."""
        self._stop.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout=5.0)
