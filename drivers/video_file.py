"""Replay of a recorded video file (registry name ``video``).

The catch-all driver: it claims every existing regular file that no narrower
driver took, and ``video:PATH`` forces it.  Decoding goes through
``cv2.VideoCapture`` (FFmpeg), via the shared :class:`~drivers.opencv_stream.CaptureSource`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import cv2

from cemi_stream.errors import SourceError

from .opencv_stream import CaptureSource, check_options
from .registry import SourceUri, register

log = logging.getLogger(__name__)


class VideoFileSource(CaptureSource):
    """Frames of a video file, decoded in order.

    ``info.fps`` comes from the container (None when it does not say),
    ``info.frame_count`` from the container when it gives one; the source is
    not live, so it can be replayed (closed and opened again).

    Parameters
    ----------
    path : str or Path
        The video file.
    uri : str or None
        Source string for :attr:`uri` (default: the path).
    """

    def __init__(self, path: str | Path, uri: str | None = None) -> None:
        self.path = Path(path).expanduser()
        super().__init__(uri if uri is not None else str(path), str(self.path), "video", live=False)

    def _create_capture(self) -> cv2.VideoCapture:
        if self.path.is_dir():
            raise SourceError(f"{self.path}: is a directory, not a video file")
        if not self.path.is_file():
            raise SourceError(f"{self.path}: no such file")
        # FFmpeg explicitly: it is the backend that decodes files, and letting
        # OpenCV try every backend in turn only adds time and log noise.
        return cv2.VideoCapture(str(self.path), cv2.CAP_FFMPEG)

    def _cannot_open(self, reason: str) -> SourceError:
        return SourceError(f"{self.path}: cannot decode as video ({reason})")


def _claims_file(uri: SourceUri) -> bool:
    return not uri.scheme and Path(uri.target).expanduser().is_file()


@register("video", _claims_file, "video file replay (AVI, MP4, MKV ... anything FFmpeg decodes)")
def _video_factory(uri: SourceUri) -> VideoFileSource:
    check_options(uri, {})
    return VideoFileSource(uri.target, uri.raw)
