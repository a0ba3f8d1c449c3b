"""The denoise stage: raw frames in, denoised frames out, in order, nothing dropped.

A process of its own (``run_daemon.py denoise-stage --run-dir RUN_DIR``)
between the capture and the stitcher::

    capture  --(pipe denoise)-->  denoise-stage  --(pipe stitch)-->  stitch --frames-dir
    RUN_DIR                       RUN_DIR/denoised                   RUN_DIR/denoised

It takes the capture's frames in sequence order (bus pipe ``denoise``, gaps
and everything after the capture's end from the raw spool; see
:class:`~cemi_stream.stitch.feed.FrameFeed`), groups them in batches of up to
``denoise.batch`` frames - a partial batch is denoised once its first frame
has waited ``denoise.batch_wait_s``, so a slow trickle is never held back -
and denoises each batch with :class:`~cemi_stream.denoise.infer.Denoiser`.
Each denoised frame keeps its sequence number and metadata; like the capture,
the stage appends it to its own spool (the commit record) and only then
publishes it on its own bus.

``RUN_DIR/denoised/`` (a *frames folder*, read by the stitcher like the run
directory of a capture) holds ``frames.zarr`` (the denoised spool),
``bus.json`` (the stage's endpoints), ``denoise.log`` and, once every frame
is denoised, ``denoise.json`` (summary; the completion marker).  The raw
spool is only read, never written.  Restarted on a run whose denoised spool
already holds frames, the stage resumes after the last committed one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from .. import __version__
from ..bus.auth import CurveAuth, local_client, server_auth
from ..bus.transport import MONITOR, FrameLog, PipeSender, make_endpoints, write_endpoints
from ..capture.spool import SPOOL_DIR, FrameSpool, SpoolFallback, SpoolReader
from ..capture.stage import new_run_id
from ..config import BusConfig, Config, to_dict
from ..daemon.lifecycle import arm_parent_guard
from ..daemon.stats import StatsWriter
from ..errors import BusError, CemiError, DenoiseError, SpoolError
from ..frame import Frame
from ..progress import Progress
from ..stitch.feed import DENOISE_SUMMARY, DENOISED_DIR, FrameFeed
from .infer import Denoiser
from .workers import DenoisePool

log = logging.getLogger(__name__)

INPUT_PIPE = "denoise"
LOG_FILE = "denoise.log"
# The stage's bus takes the tcp ports from port_base + this on, clear of the capture's.
TCP_PORT_OFFSET = 16
# How long an empty poll waits before looking at the stop flag again, seconds.
_IDLE_POLL_S = 0.2


def denoised_dir(run_dir: Path) -> Path:
    """The denoise stage's frames folder of a run: ``RUN_DIR/denoised``."""
    return Path(run_dir) / DENOISED_DIR


@dataclass(slots=True)
class DenoiseSummary:
    """What the denoise stage did (also ``denoise.json``).

    Attributes
    ----------
    run_id : str
        This process's id on the stage's bus.
    frames : int
        Frames in the denoised spool at the end (all of the run's).
    denoised : int
        Frames denoised by this process (``frames - resumed_from``).
    resumed_from : int
        Frames already in the denoised spool when this process started.
    backend, model, model_name, model_sha256 : str
        Resolved inference backend; weights file, its card's name and hash.
    batch : int
        Largest batch; ``batches`` calls were made.
    seconds : float
        Wall time of the process (model load included).
    frames_per_s : float
        ``denoised / seconds``.
    load_s : float
        Time to load the model and set up the backend, seconds.
    ms_per_frame : dict
        ``denoise`` (inference) and ``write`` (spool and publish) per frame.
    pipes : dict
        Per pipe of the stage's bus: frames sent, undelivered, ended.
    stopped_by : str
        ``end_of_stream``, ``stop_request`` or ``already_complete``.
    workers : dict
        Frames denoised per worker when a :class:`~cemi_stream.denoise.workers.DenoisePool`
        did the work (``denoise.workers > 1`` or ``denoise.listen``); empty otherwise.
    """

    run_id: str
    frames: int = 0
    denoised: int = 0
    resumed_from: int = 0
    backend: str = ""
    model: str = ""
    model_name: str = ""
    model_sha256: str = ""
    batch: int = 0
    batches: int = 0
    seconds: float = 0.0
    frames_per_s: float = 0.0
    load_s: float = 0.0
    ms_per_frame: dict[str, float] = field(default_factory=dict)
    pipes: dict[str, dict[str, Any]] = field(default_factory=dict)
    stopped_by: str = "end_of_stream"
    workers: dict[str, int] = field(default_factory=dict)


def stage_bus_config(config: Config) -> BusConfig:
    """The bus settings of the stage's own bus (``RUN_DIR/denoised/bus.json``).

    Same transport and limits as the capture's bus; the pipes of
    ``denoise.pipes``; tcp ports from ``port_base + TCP_PORT_OFFSET`` on and
    ipc sockets in their own folder, so that both buses can be bound at once.
    """
    bus = config.bus
    return dataclasses.replace(
        bus,
        pipes=list(config.denoise.pipes),
        port_base=bus.port_base + TCP_PORT_OFFSET,
        ipc_dir=None if bus.ipc_dir is None else str(Path(bus.ipc_dir) / DENOISED_DIR),
    )


def run_denoise_stage(
    run_dir: Path,
    config: Config,
    *,
    pipe: str = INPUT_PIPE,
    stop: threading.Event | None = None,
    progress: bool = True,
    wait_s: float = 60.0,
) -> DenoiseSummary:
    """Denoise the frames of the capture in ``run_dir`` until its last frame.

    Parameters
    ----------
    run_dir : Path
        Run directory of the capture (its frames folder); the output goes to
        ``run_dir/denoised``.
    config : Config
        ``denoise`` (backend, model, batch), ``spool`` and ``bus`` sections.
    pipe : str
        The capture's pipe to consume.
    stop : threading.Event or None
        Set it to stop after the current batch.  A stopped stage writes no
        ``denoise.json`` and sends no end of stream: the run is not over, and
        a restarted stage carries on where this one stopped.
    progress : bool
        Show a progress counter on stderr.
    wait_s : float
        How long to wait for the capture to appear or send anything.

    Returns
    -------
    DenoiseSummary
        Counts and timings (also in ``run_dir/denoised/denoise.json``).

    Raises
    ------
    CemiError
        A missing or corrupt model (:class:`ModelError`), an unavailable
        backend (:class:`DenoiseError`), bus or spool failures - after every
        frame already denoised has been committed to the denoised spool.
    """
    # First: a stage spawned by replay or the daemon stops when its parent dies.
    stage_process = arm_parent_guard()
    run_dir = Path(run_dir)
    out = denoised_dir(run_dir)
    started = time.monotonic()
    stop = stop or threading.Event()
    if (out / DENOISE_SUMMARY).is_file():
        return _already_complete(out)
    cfg = config.denoise
    denoiser = Denoiser(cfg.model, cfg.backend, tile_px=cfg.tile_px)
    if stage_process and denoiser.backend in ("cpu", "onnx") and cfg.cpu_nice:
        # Only in a stage process of a run (never in a program that called this
        # function); local workers started below inherit it (DenoiseConfig.cpu_nice).
        os.nice(cfg.cpu_nice)
    summary = DenoiseSummary(
        run_id=new_run_id(),
        backend=denoiser.backend,
        model=str(denoiser.model_path),
        model_name=denoiser.card.name,
        model_sha256=_model_hash(denoiser.model_path),
        batch=cfg.batch,
        load_s=time.monotonic() - started,
    )
    out.mkdir(parents=True, exist_ok=True)
    pool: DenoisePool | None = None
    if cfg.workers > 1 or cfg.listen is not None:
        # Several workers (local processes, remote hosts): this process collects.
        pool = DenoisePool(
            run_dir, config, denoiser.model_path, denoiser.backend, summary.run_id, wait_s=wait_s
        )
        try:
            pool.wait_ready(wait_s)
        except BaseException:
            pool.close()
            raise
        summary.load_s = time.monotonic() - started  # the workers' model loading included
    log_handler = logging.FileHandler(out / LOG_FILE, encoding="utf-8")
    log_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(log_handler)
    spool: FrameSpool | None = None
    frames = FrameLog(config.spool.memory_frames)
    context: zmq.Context[Any] = zmq.Context()
    senders: list[PipeSender] = []
    auth: CurveAuth | None = None
    timings = {"denoise": 0.0, "write": 0.0}
    completed = False
    # Live statistics (RUN_DIR/stats/denoise.json), counted over the whole run
    # like denoise.json's "frames" (a resumed stage starts at resumed_from);
    # queue depth: denoised frames the slowest consumer has not taken yet.
    stats = StatsWriter(run_dir, "denoise")
    stats.set_extra(run_id=summary.run_id, backend=summary.backend, model=summary.model_name)
    stats.queue_depth_from(
        lambda: max((frames.count - s.stats.sent for s in senders if s.durable), default=0)
    )
    try:
        if (out / SPOOL_DIR).exists():
            spool = FrameSpool.open_append(out, config.spool)
            summary.resumed_from = spool.count
        stats.set_counts(frames_in=summary.resumed_from, frames_out=summary.resumed_from)
        stats.set_extra(resumed_from=summary.resumed_from)
        stats.start()
        frames = FrameLog(config.spool.memory_frames, SpoolFallback(out), summary.resumed_from)
        bus = stage_bus_config(config)
        endpoints = make_endpoints(bus, out)
        auth = server_auth(context, bus.transport, bus.curve_dir)
        if auth is not None:  # tcp sockets as CURVE servers (bus.curve_dir)
            endpoints = dataclasses.replace(endpoints, server_key=auth.server.public.decode())
        for name, url in endpoints.pipes.items():
            senders.append(PipeSender(name, url, frames, summary.run_id, bus, context, auth=auth))
        if endpoints.monitor:
            senders.append(
                PipeSender(
                    MONITOR, endpoints.monitor, frames, summary.run_id, bus, context, False, auth
                )
            )
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.wait_bound()
        write_endpoints(out, endpoints)
        log.info(
            "denoise %s: backend %s, model %s (%s), batch %d, pipes %s%s",
            summary.run_id, summary.backend, summary.model_name, summary.model, cfg.batch,
            ", ".join(endpoints.pipes) or "none",
            f", resuming after frame {summary.resumed_from - 1}" if summary.resumed_from else "",
        )  # fmt: skip
        bar = Progress("denoise", enabled=progress)

        def commit(batch: list[tuple[int, Frame]]) -> None:
            nonlocal spool
            t0 = time.perf_counter()
            if pool is not None:
                images = pool.denoise_frames(batch)
                stats.set_extra(workers=dict(pool.frames_by_worker))
            else:
                images = denoiser.denoise_batch([frame.image for _, frame in batch])
            t1 = time.perf_counter()
            if len(images) != len(batch):
                raise DenoiseError(
                    f"denoiser returned {len(images)} images for a batch of {len(batch)}"
                )
            for (seq, frame), image in zip(batch, images, strict=True):
                if image.shape != frame.image.shape or image.dtype != np.uint8:
                    raise DenoiseError(
                        f"frame {seq}: denoiser returned {image.shape} {image.dtype} "
                        f"for {frame.image.shape} uint8"
                    )
                if spool is None:
                    spool = FrameSpool.create(
                        out, frame.shape, config.spool, _attrs(run_dir, summary)
                    )
                if spool.count != seq:
                    raise DenoiseError(
                        f"{out / SPOOL_DIR}: frame {seq} arrived with {spool.count} frames stored"
                    )
                denoised = Frame(image, frame.meta)
                spool.append(denoised)
                frames.append(denoised)  # published only once on disk
            t2 = time.perf_counter()
            timings["denoise"] += t1 - t0
            timings["write"] += t2 - t1
            stats.frame_out(len(batch), nbytes=sum(image.nbytes for image in images))
            stats.observe_ms((t2 - t0) * 1000.0 / len(batch), len(batch))
            summary.batches += 1
            summary.denoised += len(batch)
            bar.update(frames.count, summary.backend)

        curve = local_client(config.bus.curve_dir)
        with FrameFeed(run_dir, summary.resumed_from, pipe, wait_s, curve) as feed:
            batch: list[tuple[int, Frame]] = []
            flush_at = 0.0
            while not feed.done:
                _raise_sender_error(senders)
                if stop.is_set():
                    summary.stopped_by = "stop_request"
                    break
                timeout = max(flush_at - time.monotonic(), 0.0) if batch else _IDLE_POLL_S
                item = feed.poll(timeout)
                if item is not None:
                    stats.frame_in()
                    if not batch:
                        flush_at = time.monotonic() + cfg.batch_wait_s
                    batch.append(item)
                    if len(batch) < cfg.batch:
                        continue
                elif not batch:
                    continue
                # Full, or the first frame has waited long enough, or the stream ended.
                commit(batch)
                batch = []
            if batch:  # frames already received are denoised and kept, also on a stop
                commit(batch)
        bar.close()
        completed = summary.stopped_by == "end_of_stream"
    finally:
        try:
            if spool is not None:
                spool.close()
        finally:
            if completed:
                frames.finish()  # the senders send the end of stream after the last frame
            else:
                for sender in senders:
                    sender.abort()
            for sender in senders:
                sender.join()
            if auth is not None:
                auth.stop()
            if pool is not None:
                pool.close()
                summary.workers = dict(pool.frames_by_worker)
            context.term()
            summary.frames = frames.count
            summary.seconds = time.monotonic() - started
            summary.frames_per_s = summary.denoised / summary.seconds if summary.seconds else 0.0
            n = max(summary.denoised, 1)
            summary.ms_per_frame = {k: round(v * 1000 / n, 3) for k, v in timings.items()}
            summary.pipes = {
                s.pipe: {
                    "sent": s.stats.sent,
                    "undelivered": s.stats.undelivered,
                    "ended": s.stats.ended,
                }
                for s in senders
            }
            log.info(
                "denoise %s %s: %d frames (%d resumed), %.1f frames/s, %.1f ms/frame inference",
                summary.run_id,
                "finished" if completed else "stopped",
                summary.frames, summary.resumed_from, summary.frames_per_s,
                summary.ms_per_frame["denoise"],
            )  # fmt: skip
            logging.getLogger().removeHandler(log_handler)
            log_handler.close()
            stats.set_counts(frames_out=summary.frames)
            stats.set_extra(denoised=summary.denoised, stopped_by=summary.stopped_by)
            exc = sys.exc_info()[1]
            stats.close(None if exc is None else f"{type(exc).__name__}: {exc}")
    _raise_sender_error(senders)
    if completed:
        _write_summary(out, summary, config)
    return summary


def _model_hash(path: Path) -> str:
    from models.weights import model_hash

    return model_hash(path)


def _attrs(run_dir: Path, summary: DenoiseSummary) -> dict[str, Any]:
    """Attributes of a new denoised spool: the raw spool's, plus what denoised it."""
    try:
        attrs = SpoolReader(run_dir).attrs
    except SpoolError:
        attrs = {}
    attrs.pop("complete", None)
    attrs["cemi_stream"] = __version__
    attrs["denoise"] = {
        "backend": summary.backend,
        "model": summary.model,
        "model_name": summary.model_name,
        "model_sha256": summary.model_sha256,
    }
    return attrs


def _raise_sender_error(senders: list[PipeSender]) -> None:
    for sender in senders:
        if sender.error is not None:
            err = sender.error
            raise err if isinstance(err, CemiError) else BusError(f"pipe {sender.pipe}: {err}")


def _write_summary(out: Path, summary: DenoiseSummary, config: Config) -> None:
    """Write ``denoise.json`` atomically: the stage's completion marker."""
    data = {"cemi_stream": __version__, "summary": asdict(summary), "config": to_dict(config)}
    tmp = out / (DENOISE_SUMMARY + ".tmp")
    tmp.write_text(json.dumps(data, indent=2), encoding="utf-8")
    tmp.replace(out / DENOISE_SUMMARY)


def read_summary(run_dir: Path) -> dict[str, Any]:
    """The ``summary`` of ``RUN_DIR/denoised/denoise.json``.

    Raises
    ------
    DenoiseError
        When the stage has not finished (no file) or the file is unreadable.
    """
    path = denoised_dir(run_dir) / DENOISE_SUMMARY
    try:
        data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))["summary"]
    except FileNotFoundError:
        raise DenoiseError(f"{path}: missing (the denoise stage has not finished)") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DenoiseError(f"{path}: unreadable denoise summary ({exc})") from None
    return data


def _already_complete(out: Path) -> DenoiseSummary:
    """The summary of a stage that already finished on this run (nothing to do)."""
    data = read_summary(out.parent)
    known = {f.name for f in dataclasses.fields(DenoiseSummary)}
    summary = DenoiseSummary(**{k: v for k, v in data.items() if k in known})
    summary.stopped_by = "already_complete"
    summary.denoised = 0
    summary.resumed_from = summary.frames
    log.info("%s: the denoise stage already finished (%d frames)", out, summary.frames)
    return summary
