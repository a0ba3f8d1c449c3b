"""Single- and multi-page TIFF files (registry name ``tiff``).

Pages are decoded one at a time as they are read, so a stack of thousands of
frames never sits in memory.  Pixel size and stage position come from each
page's FEI/Zeiss tags (:mod:`drivers.metadata`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from cemi_stream.errors import SourceError
from cemi_stream.frame import Frame, FrameMeta, utc_now_ns

from .base import SourceInfo, to_gray8
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
        # Page 0 is decoded by open() to check the file; read() hands it out.
        self._pending: tuple[np.ndarray, TiffCalibration] | None = None
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
            When the file is missing, not a TIFF, corrupt or has no pages.
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
            first, calibration = self._decode(tif, 0)
        except BaseException:
            tif.close()
            raise
        self._tif = tif
        self._count = count
        self._index = 0
        self._pending = (first, calibration)
        height, width = first.shape[:2]
        self._size = (width, height)
        self._info = SourceInfo(
            kind="tiff",
            frame_size=(width, height),
            pixel_size_nm=calibration.pixel_size_nm,
            frame_count=count,
            live=False,
            video_like=False,
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

        Raises
        ------
        SourceError
            When a page cannot be decoded or differs in size from the first.
        """
        if self._tif is None:
            raise SourceError(f"{self.path}: read() before open()")
        if self._index >= self._count:
            return None
        index = self._index
        if self._pending is not None:
            (image, calibration), self._pending = self._pending, None
        else:
            image, calibration = self._decode(self._tif, index)
        height, width = image.shape
        if (width, height) != self._size:
            first_w, first_h = self._size or (0, 0)
            raise SourceError(
                f"{self.path}: page {index} is {width}x{height}, "
                f"the first page is {first_w}x{first_h}"
            )
        self._index += 1
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

    def _decode(self, tif: Any, index: int) -> tuple[np.ndarray, TiffCalibration]:
        """Page ``index`` as 8-bit greyscale ``(y, x)`` plus its calibration."""
        try:
            page = tif.pages[index]
        except Exception as exc:  # a broken IFD chain raises assorted errors
            raise SourceError(
                f"{self.path}: corrupt TIFF, page {index} unreadable ({one_line(exc)})"
            ) from exc
        image = page_image(page, index, self.path)
        name = f"{self.path} page {index}"
        return to_gray8(image, name=name), calibration_from_tags(page.tags)


def _claims_tiff(uri: SourceUri) -> bool:
    if uri.scheme:
        return False
    path = Path(uri.target).expanduser()
    return path.suffix.lower() in TIFF_SUFFIXES and path.is_file()


@register("tiff", _claims_tiff, "TIFF file, one frame per page (FEI/Zeiss pixel size)")
def _tiff_factory(uri: SourceUri) -> TiffStackSource:
    check_options(uri, {})
    return TiffStackSource(uri.target, uri.raw)
