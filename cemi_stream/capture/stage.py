"""The capture process: source -> front end -> spool -> bus.

One thread reads the source, preprocesses each frame, appends every kept
frame to the spool and only then hands it to the :class:`~cemi_stream.bus.transport.FrameLog`.
Each pipe (and the monitor stream) is served by its own sender thread, so a
slow or absent consumer never stalls the capture: frames it has not taken
yet wait in RAM (a bounded number) or in the spool.

``RUN_DIR`` afterwards holds ``frames.zarr`` (the spool), ``capture.csv``
(one line per input frame: ``src_index,kept,reason,dx_px,dy_px,seq``),
``capture.json`` (summary), ``capture.log`` and ``bus.json`` (endpoints).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import zmq

import drivers

from .. import __version__
from ..bus.auth import CurveAuth, server_auth
from ..bus.transport import MONITOR, FrameLog, PipeSender, make_endpoints, write_endpoints
from ..config import Config, to_dict
from ..daemon.lifecycle import arm_parent_guard
from ..daemon.stats import StatsWriter
from ..errors import BusError, CemiError, SourceError, SpoolError
from ..progress import Progress
from .frontend import FrontEnd
from .keyframes import Decision, format_decision
from .spool import SPOOL_DIR, FrameSpool, SpoolFallback, SpoolReader

log = logging.getLogger(__name__)

DECISIONS_HEADER = "src_index,kept,reason,dx_px,dy_px,seq\n"
# Reasons of the frames of a live device the capture never got: lost in the
# device's buffer while the capture was behind, or left out to keep to --pace.
OVERRUN = "overrun"
DECIMATED = "decimated"


def new_run_id() -> str:
    """A sortable, unique run id: UTC time plus 6 random hex digits."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


@dataclass(slots=True)
class CaptureSummary:
    """What a capture run did (also written to ``capture.json``)."""

    run_id: str
    source: str
    frames_in: int = 0
    kept: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    input_fps: float = 0.0
    pipes: dict[str, dict[str, Any]] = field(default_factory=dict)
    crop: dict[str, Any] = field(default_factory=dict)
    levels: dict[str, Any] = field(default_factory=dict)
    stopped_by: str = "end_of_source"
    error: str | None = None


def run_capture(
    source_uri: str,
    run_dir: Path,
    config: Config,
    *,
    pace: str | None = None,
    loop: bool | None = None,
    stop: threading.Event | None = None,
    progress: bool = True,
    resume: bool = False,
) -> CaptureSummary:
    """Run the capture process until the source ends or ``stop`` is set.

    Parameters
    ----------
    source_uri : str
        Frame source (see :mod:`drivers.registry`).
    run_dir : Path
        Run directory; must not already hold a spool.
    config : Config
        Daemon configuration (bus, capture, spool sections are used).
    pace, loop : optional
        Pacing and looping for replay sources (see :func:`drivers.open_source`).
    stop : threading.Event or None
        Set it (e.g. from a SIGINT handler) to end the capture cleanly.
    progress : bool
        Show a progress counter on stderr.
    resume : bool
        Continue the spool already in ``run_dir`` (a capture restarted by the
        supervisor after it died).  A recorded source is read again from its
        start through the same front end, so the kept frames come out in the
        same order: those already spooled are checked (same source index) and
        neither written nor published again; frame numbering, ``capture.csv``
        and the summary continue as if the capture had never stopped.  A live
        source has no start to go back to: its new frames are appended.

    Returns
    -------
    CaptureSummary
        Counts and timings; the same data is in ``run_dir/capture.json``.

    Raises
    ------
    CemiError
        Source, spool or bus failures, after everything already spooled has
        been closed properly (and delivered, where consumers are listening).
    """
    # First: a stage spawned by replay or the daemon stops when its parent dies.
    arm_parent_guard()
    run_dir = Path(run_dir)
    resumed: SpoolReader | None = None
    if (run_dir / SPOOL_DIR).exists():
        if not resume:
            raise SpoolError(
                f"{run_dir / SPOOL_DIR}: a spool already exists; use a new run directory"
            )
        resumed = SpoolReader(run_dir)
    stop = stop or threading.Event()
    source = drivers.open_source(source_uri, pace=pace, loop=loop)
    run_id = new_run_id()
    done = 0  # frames already in the spool (a resumed capture)
    if resumed is not None:
        run_id = str(resumed.attrs.get("run_id") or run_id)
        done = len(resumed)
        fast_forward = getattr(source, "fast_forward", None)
        if done and callable(fast_forward):
            # The recorded frames up to the last spooled one are read again only
            # to be skipped: no reason to wait for their pace slots.
            fast_forward(resumed.meta(done - 1).src_index + 1)
    summary = CaptureSummary(run_id=run_id, source=source_uri)
    context: zmq.Context[Any] = zmq.Context()
    senders: list[PipeSender] = []
    spool: FrameSpool | None = None
    frames = FrameLog(config.spool.memory_frames, reader=SpoolFallback(run_dir), start=done)
    started = time.monotonic()
    log_handler: logging.Handler | None = None
    auth: CurveAuth | None = None
    # Live statistics (RUN_DIR/stats/capture.json); queue depth: the slowest
    # durable pipe's frames not yet taken by its consumer.
    stats = StatsWriter(run_dir, "capture")
    stats.set_extra(run_id=run_id)
    stats.queue_depth_from(
        lambda: max((frames.count - s.stats.sent for s in senders if s.durable), default=0)
    )
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        stats.start()
        # The run directory only comes into being once the source has opened.
        log_handler = logging.FileHandler(run_dir / "capture.log", encoding="utf-8")
        log_handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        )
        logging.getLogger().addHandler(log_handler)
        info = source.info
        stats.set_extra(frames_total=info.frame_count)  # progress and ETA of file sources
        front = FrontEnd(
            config.capture, video_like=info.video_like, significant_bits=info.significant_bits
        )
        endpoints = make_endpoints(config.bus, run_dir)
        auth = server_auth(context, config.bus.transport, config.bus.curve_dir)
        if auth is not None:  # tcp sockets as CURVE servers (bus.curve_dir)
            endpoints = replace(endpoints, server_key=auth.server.public.decode("ascii"))
        for name, url in endpoints.pipes.items():
            senders.append(PipeSender(name, url, frames, run_id, config.bus, context, auth=auth))
        if endpoints.monitor:
            senders.append(
                PipeSender(
                    MONITOR, endpoints.monitor, frames, run_id, config.bus, context, False, auth
                )
            )
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.wait_bound()
        write_endpoints(run_dir, endpoints)
        log.info(
            "capture %s: source %s (%s), keyframes %s, pipes %s",
            run_id, source_uri, info.kind,
            "selected" if front.select_keyframes else "every frame",
            ", ".join(endpoints.pipes) or "none",
        )  # fmt: skip
        bar = Progress("capture", info.frame_count, enabled=progress)
        with open(run_dir / "capture.csv", "w", encoding="utf-8") as decisions_csv:
            decisions_csv.write(DECISIONS_HEADER)

            # A recorded source read again: its first ``done`` kept frames are
            # the spool's (live sources go on from where they are).
            replayed = 0 if resumed is not None and info.frame_count is not None else done
            if resumed is not None:
                spool = FrameSpool.open_append(run_dir, config.spool)
                log.info("capture %s: resuming after %d spooled frames", run_id, done)

            def commit(decisions: list[Decision]) -> None:
                nonlocal spool, replayed
                for d in decisions:
                    seq: int | None = None
                    if d.kept and resumed is not None and replayed < done:
                        spooled = resumed.meta(replayed).src_index
                        if spooled != d.frame.meta.src_index:
                            raise SpoolError(
                                f"{run_dir / SPOOL_DIR}: cannot resume: spooled frame {replayed} "
                                f"is source frame {spooled}, the source now gives "
                                f"{d.frame.meta.src_index} (not the same source?)"
                            )
                        seq, replayed = replayed, replayed + 1
                    elif d.kept:
                        if spool is None:
                            spool = FrameSpool.create(
                                run_dir,
                                d.frame.shape,
                                config.spool,
                                {
                                    "run_id": run_id,
                                    "source": source_uri,
                                    "frame_shape": list(d.frame.shape),
                                    "crop": front.crop_info,
                                    "cemi_stream": __version__,
                                },
                            )
                        seq = spool.append(d.frame)
                        frames.append(d.frame)  # published only once on disk
                        stats.frame_out(nbytes=d.frame.image.nbytes)
                    else:
                        stats.drop(d.reason)
                    decisions_csv.write(format_decision(d) + f",{'' if seq is None else seq}\n")
                decisions_csv.flush()  # progress readers (replay, dashboards) follow this file

            last_src: int | None = None
            last_decimated = 0
            while not stop.is_set():
                _raise_sender_error(senders)
                frame = source.read()
                if frame is None:
                    if info.live and last_src is not None:  # left out after the last one read
                        for i in range(int(getattr(source, "decimated", 0)) - last_decimated):
                            decisions_csv.write(f"{last_src + 1 + i},0,{DECIMATED},,,\n")
                            front.stats.reasons[DECIMATED] += 1
                            stats.drop(DECIMATED)
                    break
                if info.live:
                    # A live device's frame counter skips the frames the capture never
                    # got: left out to keep to --pace, or lost in the device's buffer
                    # while the capture was behind.  Each is counted, one row each.
                    index = frame.meta.src_index
                    decimated = int(getattr(source, "decimated", 0))
                    if last_src is not None and index > last_src + 1:
                        paced = min(decimated - last_decimated, index - last_src - 1)
                        for i in range(last_src + 1, index):
                            reason = DECIMATED if i - last_src <= paced else OVERRUN
                            decisions_csv.write(f"{i},0,{reason},,,\n")
                            front.stats.reasons[reason] += 1
                            stats.drop(reason)
                    last_src, last_decimated = index, decimated
                t0 = time.perf_counter()
                commit(front.process(frame))
                stats.observe_ms((time.perf_counter() - t0) * 1000.0)
                stats.set_counts(frames_in=front.stats.frames_in)
                bar.update(front.stats.frames_in, f"{front.stats.kept} kept")
            else:
                summary.stopped_by = "stop_request"
            commit(front.finish())
            bar.close()
        summary.frames_in = front.stats.frames_in
        summary.kept = front.stats.kept
        summary.reasons = dict(front.stats.reasons)
        summary.crop = dict(front.crop_info)
        summary.levels = front.levels.describe()
        failure = front.failure()
        if failure is not None and summary.stopped_by == "end_of_source":
            raise SourceError(f"{source_uri}: {failure}")  # nothing kept, nothing lost
        if failure is not None:
            log.warning("%s", failure)
    except CemiError as exc:
        summary.error = str(exc)
        raise
    finally:
        source.close()
        try:
            if spool is not None:
                spool.close()
        finally:
            frames.finish()
            for sender in senders:
                sender.join()
            if auth is not None:
                auth.stop()
            context.term()
            summary.seconds = time.monotonic() - started
            summary.input_fps = summary.frames_in / summary.seconds if summary.seconds else 0.0
            summary.pipes = {
                s.pipe: {
                    "sent": s.stats.sent,
                    "skipped": s.stats.skipped,
                    "undelivered": s.stats.undelivered,
                    "ended": s.stats.ended,
                }
                for s in senders
            }
            if run_dir.is_dir():
                _write_summary(run_dir, summary, config)
                stats.set_counts(frames_in=summary.frames_in, frames_out=summary.kept)
                stats.close(summary.error)
            log.info(
                "capture %s finished: %d frames in, %d kept, %.1f s (%s)",
                run_id, summary.frames_in, summary.kept, summary.seconds,
                ", ".join(f"{k} {v}" for k, v in sorted(summary.reasons.items())),
            )  # fmt: skip
            if log_handler is not None:
                logging.getLogger().removeHandler(log_handler)
                log_handler.close()
    _raise_sender_error(senders)
    return summary


def _raise_sender_error(senders: list[PipeSender]) -> None:
    for sender in senders:
        if sender.error is not None:
            err = sender.error
            raise err if isinstance(err, CemiError) else BusError(f"pipe {sender.pipe}: {err}")


def _write_summary(run_dir: Path, summary: CaptureSummary, config: Config) -> None:
    data = {
        "cemi_stream": __version__,
        "summary": {k: getattr(summary, k) for k in CaptureSummary.__slots__},
        "config": to_dict(config),
    }
    tmp = run_dir / "capture.json.tmp"
    tmp.write_text(json.dumps(data, indent=2), encoding="utf-8")
    tmp.replace(run_dir / "capture.json")
