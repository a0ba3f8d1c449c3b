"""A folder of still images, or of videos, as one source (registry name ``folder``).

Images (PNG, TIFF, JPEG, BMP; extensions in any case) are read one per frame
in natural order (``img2`` before ``img10``), all of the size of the first.
TIFF files contribute their FEI/Zeiss pixel size and stage position.

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
from cemi_stream.frame import Frame, FrameMeta, utc_now_ns

from .base import FrameSource, SourceInfo, to_gray8
from .metadata import TiffCalibration, calibration_from_tags, one_line, open_tiff, page_image
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


def read_image(path: Path) -> tuple[np.ndarray, TiffCalibration]:
    """Decode one image file to 8-bit greyscale, with its TIFF calibration.

    Returns
    -------
    (ndarray, TiffCalibration)
        ``uint8`` image ``(y, x)``; the calibration is empty for non-TIFF files.

    Raises
    ------
    SourceError
        Naming the file when it cannot be read or decoded.
    """
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise SourceError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    # imdecode on the bytes rather than imread(path): same decoder, but it also
    # copes with non-ASCII paths on Windows.
    with quiet_opencv():
        image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    calibration = TiffCalibration()
    if path.suffix.lower() in _TIFF_SUFFIXES:
        with open_tiff(path) as tif:
            try:
                page = tif.pages.first
                calibration = calibration_from_tags(page.tags)
                if image is None:
                    image = page_image(page, 0, path)
            except SourceError:
                raise
            except Exception as exc:  # a broken IFD raises assorted errors
                raise SourceError(f"{path}: corrupt TIFF ({one_line(exc)})") from exc
    if image is None:
        raise SourceError(f"{path}: cannot decode image (corrupt or unsupported format)")
    return to_gray8(image, name=str(path)), calibration


class ImageFolderSource:
    """The images of a folder, one frame each, in natural order.

    ``info.video_like`` is False (each image is its own field), ``fps`` is
    None, ``frame_count`` the number of images; ``pixel_size_nm`` is the first
    image's when it is a calibrated TIFF.

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
        self._pending: tuple[np.ndarray, TiffCalibration] | None = None
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
            When the folder is missing, holds no images, or the first image
            cannot be decoded.
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
        first, calibration = read_image(images[0])
        height, width = first.shape
        self._files = images
        self._index = 0
        self._size = (width, height)
        self._pending = (first, calibration)
        self._opened = True
        self._info = SourceInfo(
            kind="folder",
            frame_size=(width, height),
            pixel_size_nm=calibration.pixel_size_nm,
            frame_count=len(images),
            live=False,
            video_like=False,
        )
        log.info("%s: %d images of %dx%d", self.folder, len(images), width, height)

    def read(self) -> Frame | None:
        """Decode and return the next image, or None after the last one.

        Raises
        ------
        SourceError
            When an image cannot be decoded or differs in size from the first.
        """
        if not self._opened:
            raise SourceError(f"{self.folder}: read() before open()")
        if self._index >= len(self._files):
            return None
        path = self._files[self._index]
        if self._pending is not None:
            (image, calibration), self._pending = self._pending, None
        else:
            image, calibration = read_image(path)
        height, width = image.shape
        if (width, height) != self._size:
            first_w, first_h = self._size or (0, 0)
            raise SourceError(
                f"{path}: image is {width}x{height} but {self._files[0].name} is "
                f"{first_w}x{first_h} (all images of a folder must have one size)"
            )
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
