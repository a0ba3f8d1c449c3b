"""Live sources read through ``cv2.VideoCapture``: capture devices and streams.

Registry names:

* ``device`` - a frame grabber or camera: ``device:0``, ``device:/dev/video2``,
  a bare integer or a ``/dev/video*`` path.  Options ``width``, ``height``
  (pixels), ``fps`` (frames/s) and ``fourcc`` (four characters, e.g. ``MJPG``)
  are requested from the device, which may ignore them.
* ``url`` - network streams (``rtsp``, ``rtsps``, ``rtmp``, ``http(s)``,
  ``udp``, ``tcp``, ``srt``) through FFmpeg, with option ``timeout_ms`` for
  opening and for each read (default 5000), and ``gst:PIPELINE`` GStreamer
  pipelines ending in ``appsink`` when OpenCV was built with GStreamer.

:class:`CaptureSource` holds what every ``VideoCapture`` based driver shares
(opening with error checking, the read-and-convert loop); :mod:`drivers.video_file`
reuses it for replay of video files.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TypeVar

import cv2
import numpy as np

from cemi_stream.errors import SourceError
from cemi_stream.frame import Frame, FrameMeta, fault_frame, utc_now_ns

from .base import SourceInfo, to_gray
from .registry import SourceUri, register

log = logging.getLogger(__name__)

NETWORK_SCHEMES = ("rtsp", "rtsps", "rtmp", "http", "https", "udp", "tcp", "srt")
DEFAULT_TIMEOUT_MS = 5000
# Consecutive frames that raise in the decoder before the stream counts as ended.
MAX_BROKEN_FRAMES = 25


class _BrokenFrameError(Exception):
    """The decoder raised on one frame (internal to :class:`CaptureSource`)."""


T = TypeVar("T")


def check_options(uri: SourceUri, allowed: Mapping[str, Callable[[str], T]]) -> dict[str, T]:
    """Validate and convert a URI's driver options.

    Parameters
    ----------
    uri : SourceUri
        The parsed source string.
    allowed : mapping of str to callable
        Option name -> converter from the option text (raising ``ValueError``
        on a bad value).

    Returns
    -------
    dict
        The converted options that were given.

    Raises
    ------
    SourceError
        Naming unknown options or the first option with a bad value.
    """
    unknown = sorted(set(uri.options) - set(allowed))
    if unknown:
        known = ", ".join(sorted(allowed)) or "none"
        raise SourceError(
            f"{uri.raw}: unknown option(s) {', '.join(unknown)} (this source accepts: {known})"
        )
    converted: dict[str, T] = {}
    for key, text in uri.options.items():
        try:
            converted[key] = allowed[key](text)
        except ValueError as exc:
            raise SourceError(f"{uri.raw}: bad value {text!r} for option {key} ({exc})") from exc
    return converted


def positive_int(text: str) -> int:
    """Parse a strictly positive integer option."""
    value = int(text)
    if value <= 0:
        raise ValueError("must be > 0")
    return value


def positive_float(text: str) -> float:
    """Parse a strictly positive, finite float option."""
    value = float(text)
    if not 0 < value < float("inf"):
        raise ValueError("must be > 0")
    return value


def fourcc_code(text: str) -> int:
    """Parse a four-character code such as ``MJPG`` or ``YUYV``."""
    if len(text) != 4:
        raise ValueError("must be exactly 4 characters")
    return int(cv2.VideoWriter.fourcc(*text))


@contextlib.contextmanager
def quiet_opencv() -> Iterator[None]:
    """Silence OpenCV's own log while opening or decoding something that may fail.

    A failed open or decode makes OpenCV print several ``[ WARN ]`` and
    ``[ERROR]`` lines (one per backend or codec it tries); the
    :class:`SourceError` we raise says it in one line instead.
    """
    level = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    try:
        yield
    finally:
        cv2.utils.logging.setLogLevel(level)


@functools.cache
def has_gstreamer() -> bool:
    """True when this OpenCV build includes the GStreamer video backend."""
    for line in cv2.getBuildInformation().splitlines():
        if line.strip().startswith("GStreamer:"):
            return line.split(":", 1)[1].strip().upper().startswith("YES")
    return False


class CaptureSource:
    """Base of the sources read through ``cv2.VideoCapture``.

    Subclasses build the capture (:meth:`_create_capture`) and describe how
    failures read (:meth:`_cannot_open`, :meth:`_read_failed`); this class
    checks the open, decodes the first frame during :meth:`open` (so a file
    that opens but cannot be decoded fails there, and ``info.frame_size`` is
    known) and converts every frame with :func:`to_gray`.

    Broken data: FFmpeg conceals what it can (a damaged packet gives a frame
    with artefacts, or is dropped without a trace) and ``VideoCapture.read``
    reports nothing about it.  What is visible is handled: a frame on which
    the decoder raises becomes a fault frame (``corrupt``) and reading goes on
    (up to :data:`MAX_BROKEN_FRAMES` in a row); a file that ends before the
    frame count its container announces is logged as a warning (truncated or
    broken) when the end is reached.

    Parameters
    ----------
    uri : str
        The source string, kept for messages and :attr:`uri`.
    name : str
        What error messages call the source (a path, ``device 0`` ...).
    kind : str
        Registry name reported in :attr:`info`.
    live : bool
        True for sources that cannot be rewound.
    """

    def __init__(self, uri: str, name: str, kind: str, *, live: bool) -> None:
        self.uri = uri
        self.name = name
        self._kind = kind
        self._live = live
        self._cap: cv2.VideoCapture | None = None
        # The frame decoded by open() and its wall-clock time: on a live
        # source it was captured then, not when read() hands it out.
        self._pending: tuple[np.ndarray, int] | None = None
        self._index = 0
        self._broken_run = 0  # consecutive frames on which the decoder raised
        self._info = SourceInfo(kind=kind, live=live, video_like=True)

    @property
    def info(self) -> SourceInfo:
        """Static properties; frame size and rate are filled in by :meth:`open`."""
        return self._info

    def open(self) -> None:
        """Open the capture and decode the first frame.

        Raises
        ------
        SourceError
            When the capture does not open or its first frame cannot be decoded.
        """
        self.close()
        with quiet_opencv():
            cap = self._create_capture()
            try:
                opened = cap.isOpened()
            except cv2.error as exc:
                opened = False
                log.debug("%s: isOpened failed: %s", self.name, exc)
            if not opened:
                cap.release()
                raise self._cannot_open("the backend could not open it")
            try:
                self._configure(cap)
                first = self._decode_next(cap)
                first_time_ns = utc_now_ns()
            except _BrokenFrameError:
                first = None
            except BaseException:
                cap.release()
                raise
        if first is None:
            cap.release()
            raise self._cannot_open("no frame could be decoded")
        self._cap = cap
        self._pending = (first, first_time_ns)
        self._index = 0
        self._broken_run = 0
        height, width = first.shape[:2]
        fps = float(cap.get(cv2.CAP_PROP_FPS))
        count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        self._info = SourceInfo(
            kind=self._kind,
            frame_size=(int(width), int(height)),
            fps=fps if 0 < fps < 1e4 else None,
            frame_count=count if count > 0 and not self._live else None,
            live=self._live,
            video_like=True,
        )
        log.info(
            "%s: opened %dx%d at %s frames/s (backend %s)",
            self.name,
            width,
            height,
            self._info.fps,
            cap.getBackendName(),
        )

    def read(self) -> Frame | None:
        """Return the next frame as greyscale, a fault frame, or None at the end.

        Raises
        ------
        SourceError
            When the source is not open, or a live device stops delivering.
        """
        if self._cap is None:
            raise SourceError(f"{self.name}: read() before open()")
        if self._pending is not None:
            (image, time_ns), self._pending = self._pending, None
        else:
            try:
                decoded = self._decode_next(self._cap)
            except _BrokenFrameError as exc:
                self._broken_run += 1
                if self._broken_run > MAX_BROKEN_FRAMES:
                    log.warning("%s: %d broken frames in a row", self.name, self._broken_run - 1)
                    return self._read_failed()
                return self._fault(str(exc))
            if decoded is None:
                return self._read_failed()
            image, time_ns = decoded, utc_now_ns()
        try:
            gray = to_gray(image, name=self.name)
        except SourceError as exc:  # e.g. a 2-channel frame from an odd codec
            return self._fault(str(exc))
        self._broken_run = 0
        frame = Frame(gray, FrameMeta(src_index=self._index, capture_time_ns=time_ns))
        self._index += 1
        return frame

    def _fault(self, reason: str) -> Frame:
        log.warning("frame %d skipped: %s", self._index, reason)
        frame = fault_frame(FrameMeta(src_index=self._index, capture_time_ns=utc_now_ns()))
        self._index += 1
        return frame

    def close(self) -> None:
        """Release the capture (idempotent)."""
        if self._cap is not None:
            self._cap.release()
            self._cap = None
        self._pending = None

    def _decode_next(self, cap: cv2.VideoCapture) -> np.ndarray | None:
        """The next decoded image or None at the end; _BrokenFrameError on decoder errors."""
        try:
            ok, image = cap.read()
        except cv2.error as exc:
            reason = " ".join(str(exc).split())
            raise _BrokenFrameError(f"{self.name}: decoding failed ({reason})") from exc
        if not ok or image is None or image.size == 0:
            return None
        return np.asarray(image)

    def _create_capture(self) -> cv2.VideoCapture:
        raise NotImplementedError

    def _configure(self, cap: cv2.VideoCapture) -> None:
        """Apply driver options after a successful open (default: none)."""

    def _cannot_open(self, reason: str) -> SourceError:
        return SourceError(f"{self.name}: cannot be opened ({reason})")

    def _read_failed(self) -> Frame | None:
        """What a failed read means: the end of the stream by default."""
        announced = self._info.frame_count
        if announced is not None and self._index < announced:
            # FFmpeg stops at the first undecodable stretch of a damaged file.
            log.warning(
                "%s: ended after %d of the %d frames its container announces "
                "(truncated file or broken packets)",
                self.name, self._index, announced,
            )  # fmt: skip
        else:
            log.info("%s: end of stream after %d frames", self.name, self._index)
        return None


class DeviceSource(CaptureSource):
    """A local capture device (frame grabber, webcam) through V4L2 on Linux.

    Parameters
    ----------
    uri : SourceUri
        ``device:N``, ``device:/dev/videoN``, ``N`` or ``/dev/videoN`` with
        options ``width``/``height`` (pixels), ``fps`` (frames/s), ``fourcc``.
    """

    _OPTIONS: Mapping[str, Callable[[str], float]] = {
        "width": positive_int,
        "height": positive_int,
        "fps": positive_float,
        "fourcc": fourcc_code,
    }

    def __init__(self, uri: SourceUri) -> None:
        target = uri.target.strip()
        if not target:
            raise SourceError(f"{uri.raw}: device index or path missing (e.g. device:0)")
        self._options = check_options(uri, self._OPTIONS)
        self._device: int | str = int(target) if target.isdigit() else target
        super().__init__(uri.raw, f"device {target}", "device", live=True)

    def _create_capture(self) -> cv2.VideoCapture:
        on_linux = sys.platform.startswith("linux")
        if isinstance(self._device, str):
            if not Path(self._device).exists():
                raise SourceError(f"{self.name}: not found")
        elif on_linux and not Path(f"/dev/video{self._device}").exists():
            raise self._cannot_open(f"no /dev/video{self._device}")
        api = cv2.CAP_V4L2 if on_linux else cv2.CAP_ANY
        return cv2.VideoCapture(self._device, api)

    def _configure(self, cap: cv2.VideoCapture) -> None:
        # V4L2 applies the pixel format before the size, so set FOURCC first.
        props = (
            ("fourcc", cv2.CAP_PROP_FOURCC),
            ("width", cv2.CAP_PROP_FRAME_WIDTH),
            ("height", cv2.CAP_PROP_FRAME_HEIGHT),
            ("fps", cv2.CAP_PROP_FPS),
        )
        for key, prop in props:
            if key in self._options and not cap.set(prop, float(self._options[key])):
                log.warning("%s: device refused %s=%s", self.name, key, self._options[key])

    def _read_failed(self) -> Frame | None:
        raise SourceError(f"{self.name}: stopped delivering frames")


class StreamSource(CaptureSource):
    """A network stream (FFmpeg) or a GStreamer pipeline.

    Parameters
    ----------
    uri : SourceUri
        A URL with a network scheme (option ``timeout_ms``, milliseconds,
        applied to opening and to each read), or ``gst:PIPELINE``.
    """

    def __init__(self, uri: SourceUri) -> None:
        self._gstreamer = uri.scheme == "gst"
        if self._gstreamer:
            check_options(uri, {})
            self._target = uri.target
            self._timeout_ms = 0
        else:
            options = check_options(uri, {"timeout_ms": positive_int})
            self._timeout_ms = options.get("timeout_ms", DEFAULT_TIMEOUT_MS)
            # The registry keeps the full URL as the target (also for url:rtsp://...).
            self._target = uri.target.strip()
        if not self._target.strip():
            raise SourceError(f"{uri.raw}: empty stream address")
        name = f"gstreamer pipeline {self._target!r}" if self._gstreamer else _redact(self._target)
        super().__init__(uri.raw, name, "url", live=True)

    def _create_capture(self) -> cv2.VideoCapture:
        if self._gstreamer:
            if not has_gstreamer():
                raise SourceError(
                    f"{self.name}: this OpenCV build has no GStreamer support "
                    "(cv2.getBuildInformation() says GStreamer: NO)"
                )
            return cv2.VideoCapture(self._target, cv2.CAP_GSTREAMER)
        params = [
            cv2.CAP_PROP_OPEN_TIMEOUT_MSEC,
            self._timeout_ms,
            cv2.CAP_PROP_READ_TIMEOUT_MSEC,
            self._timeout_ms,
        ]
        return cv2.VideoCapture(self._target, cv2.CAP_FFMPEG, params)

    def _cannot_open(self, reason: str) -> SourceError:
        if self._gstreamer:
            return super()._cannot_open(reason)
        return SourceError(
            f"{self.name}: cannot be opened ({reason}; unreachable, refused or timed out "
            f"after {self._timeout_ms} ms)"
        )


def _redact(url: str) -> str:
    """Hide a password in ``scheme://user:password@host`` for messages and logs."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if sep and at and ":" in credentials:
        user = credentials.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}"
    return url


def _claims_device(uri: SourceUri) -> bool:
    if uri.scheme:
        return False
    target = uri.target.strip()
    return target.isdigit() or target.startswith("/dev/video")


def _claims_url(uri: SourceUri) -> bool:
    return uri.scheme in NETWORK_SCHEMES or uri.scheme == "gst"


@register("device", _claims_device, "capture device: device:0, /dev/video0 (options: width, ...)")
def _device_factory(uri: SourceUri) -> DeviceSource:
    return DeviceSource(uri)


@register("url", _claims_url, "network stream (rtsp://, http://, udp://, ...) or gst:PIPELINE")
def _url_factory(uri: SourceUri) -> StreamSource:
    return StreamSource(uri)
