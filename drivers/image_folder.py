"""A folder of still images, or of videos, as one source (registry name ``folder``).

Images (PNG, TIFF, JPEG, BMP; extensions in any case) are read one per frame
in natural order (``img2`` before ``img10``), in their own depth (16-bit and
float images stay so; the capture maps them to 8 bits).  TIFF files
contribute their FEI/Zeiss pixel size and stage position, 16-bit PNG and TIFF
files their declared significant bits (:mod:`drivers.bitdepth`).

An image that cannot be read or decoded (truncated, corrupt, vanished) is a
fault frame (reason ``corrupt``, logged), and reading goes on with the next
one; an image of another size than the first is handed out as it is, for the
front end to reject as ``size_changed``.  Only a folder with no decodable
image at all fails to open.

A folder holding only videos is played video after video, each video being
one traversal row (``FrameMeta.row`` = index of the video in natural order).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import cv2
import numpy as np

from cemi_stream.errors import SourceError
from cemi_stream.frame import Frame, FrameMeta, fault_frame, utc_now_ns

from .base import FrameSource, SourceInfo, to_gray
from .bitdepth import png_significant_bits, tiff_significant_bits
from .metadata import (
    TIFF_MAGICS,
    TiffCalibration,
    calibration_from_tags,
    one_line,
    open_tiff,
    page_image,
)
from .opencv_stream import check_options, quiet_opencv
from .registry import SourceUri, register

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp"})
VIDEO_SUFFIXES = frozenset(
    {".avi", ".mp4", ".m4v", ".mov", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv", ".ts", ".mts"}
)
_TIFF_SUFFIXES = frozenset({".tif", ".tiff"})
_DIGITS = re.compile(r"(\d+)")


def natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key ordering embedded numbers by value (``img2`` < ``img10``).

    Text parts compare case-insensitively; each part is tagged so numbers and
    text never get compared with each other.
    """
    parts = _DIGITS.split(name)
    return tuple((1, int(part)) if i % 2 else (0, part.casefold()) for i, part in enumerate(parts))


def list_media(folder: Path) -> tuple[list[Path], list[Path]]:
    """Images and videos directly inside ``folder``, each in natural order.

    Hidden files (``.name``, including macOS ``._name`` resource forks that
    carry an image extension) and subfolders are skipped.

    Raises
    ------
    SourceError
        When the folder is missing or cannot be listed.
    """
    if not folder.is_dir():
        reason = "not a folder" if folder.exists() else "no such folder"
        raise SourceError(f"{folder}: {reason}")
    try:
        entries = [p for p in folder.iterdir() if not p.name.startswith(".") and p.is_file()]
    except OSError as exc:
        raise SourceError(f"{folder}: cannot list folder ({exc.strerror or exc})") from exc
    entries.sort(key=lambda p: natural_key(p.name))
    images = [p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES]
    videos = [p for p in entries if p.suffix.lower() in VIDEO_SUFFIXES]
    return images, videos


def read_image(path: Path) -> tuple[np.ndarray, TiffCalibration, int | None]:
    """Decode one image file to greyscale in its own depth, with its metadata.

    Returns
    -------
    (ndarray, TiffCalibration, int or None)
        Image ``(y, x)`` (``uint8``, ``uint16``, ``float32`` ...); the TIFF
        calibration (empty for other files); the significant bits the file
        declares when fewer than its pixel type (:mod:`drivers.bitdepth`).

    Raises
    ------
    SourceError
        Naming the file when it cannot be read or decoded.
    """
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise SourceError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    calibration = TiffCalibration()
    bits: int | None = None
    image: np.ndarray | None = None
    if path.suffix.lower() in _TIFF_SUFFIXES and bytes(data[:4]) in TIFF_MAGICS:
        # tifffile first: it reports damaged data, where OpenCV's libtiff logs
        # an error and returns a black image (page_image falls back to OpenCV
        # only for codecs tifffile lacks).
        with open_tiff(path) as tif:
            try:
                page = tif.pages.first
                calibration = calibration_from_tags(page.tags)
                bits = tiff_significant_bits(page)
                image = page_image(page, 0, path)
            except SourceError:
                raise
            except Exception as exc:  # a broken IFD raises assorted errors
                raise SourceError(f"{path}: corrupt TIFF ({one_line(exc)})") from exc
    else:
        # imdecode on the bytes rather than imread(path): same decoder, but it
        # also copes with non-ASCII paths on Windows.
        with quiet_opencv():
            try:
                image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
            except cv2.error:  # some malformed headers raise instead of returning None
                image = None
        if path.suffix.lower() == ".png":
            bits = png_significant_bits(data[:65536])
    if image is None:
        raise SourceError(f"{path}: cannot decode image (corrupt or unsupported format)")
    return to_gray(image, name=str(path)), calibration, bits


class ImageFolderSource:
    """The images of a folder, one frame each, in natural order.

    ``info.video_like`` is False (each image is its own field), ``fps`` is
    None, ``frame_count`` the number of images; ``frame_size``,
    ``pixel_size_nm`` and ``significant_bits`` are those of the first image
    that decodes.

    Parameters
    ----------
    folder : str or Path
        The folder.
    uri : str or None
        Source string for :attr:`uri` (default: the folder path).
    """

    def __init__(self, folder: str | Path, uri: str | None = None) -> None:
        self.folder = Path(folder).expanduser()
        self.uri = uri if uri is not None else str(folder)
        self._files: list[Path] = []
        self._index = 0
        self._size: tuple[int, int] | None = None
        self._pending: tuple[np.ndarray, TiffCalibration, int | None] | None = None
        self._first = 0  # index of the first decodable image (earlier ones are corrupt)
        self._opened = False
        self._info = SourceInfo(kind="folder", video_like=False)

    @property
    def info(self) -> SourceInfo:
        """Static properties (frame size, count, pixel size after :meth:`open`)."""
        return self._info

    @property
    def files(self) -> list[Path]:
        """The image files in reading order (frame ``src_index`` = position here)."""
        return list(self._files)

    def open(self) -> None:
        """List the folder and decode the first image.

        Raises
        ------
        SourceError
            When the folder is missing, holds no images, or none of them
            can be decoded.
        """
        self.close()
        images, videos = list_media(self.folder)
        if not images:
            kinds = ", ".join(sorted(IMAGE_SUFFIXES))
            raise SourceError(f"{self.folder}: no images in folder (looked for {kinds})")
        if videos:
            log.warning(
                "%s: %d video file(s) ignored in a folder of images", self.folder, len(videos)
            )
        # The first image that decodes describes the folder; undecodable ones
        # before it become corrupt frames when read() reaches them.
        first_error: SourceError | None = None
        for index in range(len(images)):
            try:
                decoded = read_image(images[index])
                break
            except SourceError as exc:
                first_error = first_error or exc
        else:
            if len(images) == 1 and first_error is not None:
                raise first_error
            raise SourceError(
                f"{self.folder}: none of the {len(images)} images can be decoded "
                f"(first: {first_error})"
            )
        first, calibration, bits = decoded
        height, width = first.shape
        self._files = images
        self._index = 0
        self._first = index
        self._size = (width, height)
        self._pending = decoded
        self._opened = True
        self._info = SourceInfo(
            kind="folder",
            frame_size=(width, height),
            pixel_size_nm=calibration.pixel_size_nm,
            frame_count=len(images),
            live=False,
            video_like=False,
            significant_bits=bits,
        )
        log.info("%s: %d images of %dx%d", self.folder, len(images), width, height)

    def read(self) -> Frame | None:
        """Decode and return the next image, or None after the last one.

        An image that cannot be decoded gives a fault frame (reason
        ``corrupt``, logged as a warning naming the file and the reason).

        Raises
        ------
        SourceError
            When called before :meth:`open`.
        """
        if not self._opened:
            raise SourceError(f"{self.folder}: read() before open()")
        if self._index >= len(self._files):
            return None
        path = self._files[self._index]
        try:
            # Images before self._first failed in open(): read again, they get
            # their reason logged here, in order.
            if self._pending is not None and self._index == self._first:
                (image, calibration, _), self._pending = self._pending, None
            else:
                image, calibration, _ = read_image(path)
        except SourceError as exc:
            log.warning("frame %d skipped: %s", self._index, exc)
            frame = fault_frame(FrameMeta(src_index=self._index, capture_time_ns=utc_now_ns()))
            self._index += 1
            return frame
        height, width = image.shape
        if (width, height) != self._size:
            log.info(
                "%s: image is %dx%d, the folder's first is %dx%d",
                path, width, height, *(self._size or (0, 0)),
            )  # fmt: skip
        stage = calibration.stage_um
        frame = Frame(
            image,
            FrameMeta(
                src_index=self._index,
                capture_time_ns=utc_now_ns(),
                pixel_size_nm=calibration.pixel_size_nm,
                stage_x_um=None if stage is None else stage[0],
                stage_y_um=None if stage is None else stage[1],
            ),
        )
        self._index += 1
        return frame

    def close(self) -> None:
        """Forget the listing (idempotent; no file stays open between reads)."""
        self._opened = False
        self._pending = None


class VideoFolderSource:
    """The videos of a folder played one after the other, one row per video.

    ``src_index`` keeps counting across videos; ``row`` is the index of the
    video in natural order.  All videos must have the frame size of the first.

    Parameters
    ----------
    folder : str or Path
        The folder.
    uri : str or None
        Source string for :attr:`uri` (default: the folder path).
    """

    def __init__(self, folder: str | Path, uri: str | None = None) -> None:
        self.folder = Path(folder).expanduser()
        self.uri = uri if uri is not None else str(folder)
        self._videos: list[Path] = []
        self._current: FrameSource | None = None
        self._row = 0
        self._offset = 0
        self._last_index = -1
        self._opened = False
        self._info = SourceInfo(kind="folder", video_like=True)

    @property
    def info(self) -> SourceInfo:
        """Static properties; size and rate are the first video's."""
        return self._info

    def open(self) -> None:
        """List the folder and open its first video.

        Raises
        ------
        SourceError
            When the folder holds no videos or the first cannot be decoded.
        """
        self.close()
        _, videos = list_media(self.folder)
        if not videos:
            raise SourceError(f"{self.folder}: no videos in folder")
        self._videos = videos
        self._row = 0
        self._offset = 0
        self._last_index = -1
        self._current = self._open_video(0)
        first = self._current.info
        self._info = SourceInfo(
            kind="folder",
            frame_size=first.frame_size,
            fps=first.fps,
            live=False,
            video_like=True,
        )
        self._opened = True
        log.info("%s: %d videos, one row each", self.folder, len(videos))

    def read(self) -> Frame | None:
        """Next frame of the current video, moving on to the next video at its end.

        Raises
        ------
        SourceError
            When a video cannot be decoded or differs in size from the first.
        """
        if not self._opened:
            raise SourceError(f"{self.folder}: read() before open()")
        while self._current is not None:
            frame = self._current.read()
            if frame is not None:
                self._last_index = self._offset + frame.meta.src_index
                frame.meta = frame.meta.with_updates(src_index=self._last_index, row=self._row)
                return frame
            self._current.close()
            self._current = None
            if self._row + 1 < len(self._videos):
                self._row += 1
                self._offset = self._last_index + 1
                self._current = self._open_video(self._row)
        return None

    def close(self) -> None:
        """Close the current video (idempotent)."""
        if self._current is not None:
            self._current.close()
            self._current = None
        self._opened = False

    def _open_video(self, row: int) -> FrameSource:
        # Imported here, not at the top: importing drivers.video_file registers
        # the catch-all "video" driver, and registration order is claim order.
        from .video_file import VideoFileSource

        path = self._videos[row]
        source = VideoFileSource(path)
        source.open()
        size, expected = source.info.frame_size, self._info.frame_size
        if row > 0 and size != expected:
            source.close()
            raise SourceError(
                f"{path}: video frames are {_size_text(size)} but {self._videos[0].name} has "
                f"{_size_text(expected)} (all videos of a folder must have one size)"
            )
        return source


def _size_text(size: tuple[int, int] | None) -> str:
    return "?" if size is None else f"{size[0]}x{size[1]}"


def _claims_folder(uri: SourceUri) -> bool:
    return not uri.scheme and Path(uri.target).expanduser().is_dir()


@register("folder", _claims_folder, "folder of images (PNG, TIFF, JPEG, BMP) or of videos")
def _folder_factory(uri: SourceUri) -> ImageFolderSource | VideoFolderSource:
    check_options(uri, {})
    folder = Path(uri.target).expanduser()
    images, videos = list_media(folder)
    if videos and not images:
        return VideoFolderSource(folder, uri.raw)
    return ImageFolderSource(folder, uri.raw)
