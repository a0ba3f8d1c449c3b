"""Single- and multi-page TIFF files (registry name ``tiff``).

Pages are decoded one at a time as they are read, so a stack of thousands of
frames never sits in memory.  Pixel size and stage position come from each
page's FEI/Zeiss tags (:mod:`drivers.metadata`).  Pages keep their depth
(16-bit, float); the capture maps them to 8 bits.

A page that cannot be decoded is a fault frame (reason ``corrupt``, logged)
and reading goes on with the next page; a page of another size than the first
is handed out as it is (the front end rejects it as ``size_changed``).  Only a
file that is not a TIFF, or has no decodable page, fails to open.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from cemi_stream.errors import SourceError
from cemi_stream.frame import Frame, FrameMeta, fault_frame, utc_now_ns

from .base import SourceInfo, to_gray
from .bitdepth import tiff_significant_bits
from .metadata import (
    TiffCalibration,
    calibration_from_tags,
    is_tiff,
    one_line,
    open_tiff,
    page_image,
)
from .opencv_stream import check_options
from .registry import SourceUri, register

log = logging.getLogger(__name__)

TIFF_SUFFIXES = (".tif", ".tiff")


class TiffStackSource:
    """Every page of a TIFF file as one frame, in file order.

    ``info.video_like`` is False (a stack holds separate fields), ``fps`` is
    None and ``frame_count`` is the number of pages.

    Parameters
    ----------
    path : str or Path
        The TIFF file.
    uri : str or None
        Source string for :attr:`uri` (default: the path).
    """

    def __init__(self, path: str | Path, uri: str | None = None) -> None:
        self.path = Path(path).expanduser()
        self.uri = uri if uri is not None else str(path)
        self._tif: Any = None
        self._count = 0
        self._index = 0
        self._size: tuple[int, int] | None = None
        # The first decodable page is decoded by open() to check the file;
        # read() hands it out (earlier pages become corrupt frames).
        self._pending: tuple[np.ndarray, TiffCalibration, int | None] | None = None
        self._first = 0
        self._info = SourceInfo(kind="tiff", video_like=False)

    @property
    def info(self) -> SourceInfo:
        """Static properties (frame size, pixel size, page count after :meth:`open`)."""
        return self._info

    def open(self) -> None:
        """Open the file, count its pages and check that the first one decodes.

        Raises
        ------
        SourceError
            When the file is missing, not a TIFF, or has no decodable page.
        """
        self.close()
        if self.path.is_dir():
            raise SourceError(f"{self.path}: is a directory, not a TIFF file")
        if not self.path.is_file():
            raise SourceError(f"{self.path}: no such file")
        if not is_tiff(self.path):
            raise SourceError(f"{self.path}: not a TIFF file (no TIFF signature)")
        tif = open_tiff(self.path)
        try:
            count = len(tif.pages)
            if count == 0:
                raise SourceError(f"{self.path}: corrupt TIFF, no readable page")
            first_error: SourceError | None = None
            for index in range(count):
                try:
                    decoded = self._decode(tif, index)
                    break
                except SourceError as exc:
                    first_error = first_error or exc
            else:
                if count == 1 and first_error is not None:
                    raise first_error
                raise SourceError(
                    f"{self.path}: none of the {count} pages can be decoded (first: {first_error})"
                )
        except BaseException:
            tif.close()
            raise
        first, calibration, bits = decoded
        self._tif = tif
        self._count = count
        self._index = 0
        self._first = index
        self._pending = decoded
        height, width = first.shape[:2]
        self._size = (width, height)
        self._info = SourceInfo(
            kind="tiff",
            frame_size=(width, height),
            pixel_size_nm=calibration.pixel_size_nm,
            frame_count=count,
            live=False,
            video_like=False,
            significant_bits=bits,
        )
        log.info(
            "%s: %d page(s) of %dx%d, pixel size %s nm",
            self.path,
            count,
            width,
            height,
            calibration.pixel_size_nm,
        )

    def read(self) -> Frame | None:
        """Decode and return the next page, or None after the last one.

        A page that cannot be decoded gives a fault frame (reason
        ``corrupt``, logged as a warning naming the page and the reason).

        Raises
        ------
        SourceError
            When called before :meth:`open`.
        """
        if self._tif is None:
            raise SourceError(f"{self.path}: read() before open()")
        if self._index >= self._count:
            return None
        index = self._index
        self._index += 1
        try:
            if self._pending is not None and index == self._first:
                (image, calibration, _), self._pending = self._pending, None
            else:
                image, calibration, _ = self._decode(self._tif, index)
        except SourceError as exc:
            log.warning("frame %d skipped: %s", index, exc)
            return fault_frame(FrameMeta(src_index=index, capture_time_ns=utc_now_ns()))
        height, width = image.shape
        if (width, height) != self._size:
            log.info(
                "%s: page %d is %dx%d, the first page is %dx%d",
                self.path, index, width, height, *(self._size or (0, 0)),
            )  # fmt: skip
        stage = calibration.stage_um
        return Frame(
            image,
            FrameMeta(
                src_index=index,
                capture_time_ns=utc_now_ns(),
                pixel_size_nm=calibration.pixel_size_nm,
                stage_x_um=None if stage is None else stage[0],
                stage_y_um=None if stage is None else stage[1],
            ),
        )

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self._tif is not None:
            self._tif.close()
            self._tif = None
        self._pending = None

    def _decode(self, tif: Any, index: int) -> tuple[np.ndarray, TiffCalibration, int | None]:
        """Page ``index`` as greyscale ``(y, x)`` in its own depth, its calibration and bits."""
        try:
            page = tif.pages[index]
        except Exception as exc:  # a broken IFD chain raises assorted errors
            raise SourceError(
                f"{self.path}: corrupt TIFF, page {index} unreadable ({one_line(exc)})"
            ) from exc
        image = page_image(page, index, self.path)
        name = f"{self.path} page {index}"
        try:
            tags = calibration_from_tags(page.tags), tiff_significant_bits(page)
        except Exception as exc:  # a broken tag raises assorted errors
            raise SourceError(f"{name}: corrupt TIFF tags ({one_line(exc)})") from exc
        return to_gray(image, name=name), *tags


def _claims_tiff(uri: SourceUri) -> bool:
    if uri.scheme:
        return False
    path = Path(uri.target).expanduser()
    return path.suffix.lower() in TIFF_SUFFIXES and path.is_file()


@register("tiff", _claims_tiff, "TIFF file, one frame per page (FEI/Zeiss pixel size)")
def _tiff_factory(uri: SourceUri) -> TiffStackSource:
    check_options(uri, {})
    return TiffStackSource(uri.target, uri.raw)
