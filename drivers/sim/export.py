"""Writing a simulated acquisition to disk with its ground truth.

Image mode writes ``frames/000000.png ...``; video mode writes one
``video.avi`` holding every row.  Both write ``ground_truth.csv`` with the
columns ``src_index,row,x_px,y_px`` (true top-left positions in specimen
pixels).  Video uses lossless FFV1 when this OpenCV build can both write and
read it back, otherwise Motion-JPEG at quality 100.
"""

from __future__ import annotations

import csv
import logging
import tempfile
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path

import cv2
import numpy as np

from cemi_stream.errors import SourceError

from .config import SimConfig
from .source import SimSource

log = logging.getLogger(__name__)

_CODECS = ("FFV1", "MJPG")


def _fourcc(code: str) -> int:
    return int(cv2.VideoWriter.fourcc(*code))


@cache
def video_codec() -> str:
    """The best codec usable for ``video.avi``: ``"FFV1"`` or ``"MJPG"``.

    FFV1 is chosen only if a two-frame probe written with it reads back
    bit-exact through :class:`cv2.VideoCapture` (in a temporary directory).
    """
    probe = (np.arange(64 * 48, dtype=np.uint32).reshape(48, 64) * 7 % 251).astype(np.uint8)
    with tempfile.TemporaryDirectory(prefix="cemi-sim-codec-") as tmp:
        path = Path(tmp) / "probe.avi"
        writer = cv2.VideoWriter(str(path), _fourcc("FFV1"), 25.0, (64, 48), False)
        if writer.isOpened():
            writer.write(probe)
            writer.write(probe[::-1].copy())
            writer.release()
            capture = cv2.VideoCapture(str(path))
            ok, back = capture.read()
            capture.release()
            if ok and back is not None:
                gray = back[:, :, 0] if back.ndim == 3 else back
                if np.array_equal(gray, probe):
                    return "FFV1"
        else:
            writer.release()
    log.info("FFV1 not usable in this OpenCV build; writing MJPG video")
    return "MJPG"


def _open_writer(path: Path, fps: float, size: tuple[int, int]) -> tuple[cv2.VideoWriter, str]:
    preferred = video_codec()
    for code in (preferred, *[c for c in _CODECS if c != preferred]):
        writer = cv2.VideoWriter(str(path), _fourcc(code), fps, size, False)
        if writer.isOpened():
            if code == "MJPG":
                writer.set(cv2.VIDEOWRITER_PROP_QUALITY, 100)
            return writer, code
        writer.release()
    raise SourceError(f"{path}: no video codec available (tried {', '.join(_CODECS)})")


def write_simulation(
    config: SimConfig,
    out_dir: Path,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, object]:
    """Run the virtual SEM and write its frames and ground truth.

    Parameters
    ----------
    config : SimConfig
        What to simulate (``config.video`` selects video or image output).
    out_dir : Path
        Output folder (created if missing).
    progress : callable or None
        Called as ``progress(done, total)`` after each frame.

    Returns
    -------
    dict
        ``frames`` (int), ``rows`` (int), ``path`` (str, the frames folder or
        the video file), ``ground_truth`` (str), ``codec`` (str or None),
        ``seconds`` (float, wall time).

    Raises
    ------
    SourceError
        When a frame or the video cannot be written.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    source = SimSource(config, uri=f"sim-export:{out_dir}")
    source.open()
    total = len(source.traversal)
    writer: cv2.VideoWriter | None = None
    codec: str | None = None
    if config.video:
        target = out_dir / "video.avi"
        writer, codec = _open_writer(target, config.fps, config.frame_size)
    else:
        target = out_dir / "frames"
        target.mkdir(exist_ok=True)
    try:
        while (frame := source.read()) is not None:
            index = frame.meta.src_index
            if writer is not None:
                writer.write(frame.image)
            else:
                path = target / f"{index:06d}.png"
                if not cv2.imwrite(str(path), frame.image):
                    raise SourceError(f"{path}: cannot write frame")
            if progress is not None:
                progress(index + 1, total)
    finally:
        if writer is not None:
            writer.release()
        source.close()

    truth_path = out_dir / "ground_truth.csv"
    with truth_path.open("w", newline="") as handle:
        table = csv.writer(handle)
        table.writerow(["src_index", "row", "x_px", "y_px"])
        for rec in source.truth:
            table.writerow([rec.src_index, rec.row, f"{rec.x_px:.3f}", f"{rec.y_px:.3f}"])
    seconds = time.perf_counter() - started
    log.info("wrote %d frames to %s in %.1f s", len(source.truth), target, seconds)
    return {
        "frames": len(source.truth),
        "rows": config.rows,
        "path": str(target),
        "ground_truth": str(truth_path),
        "codec": codec,
        "seconds": seconds,
    }
