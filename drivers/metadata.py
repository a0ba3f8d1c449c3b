"""TIFF helpers shared by the folder and TIFF-stack drivers.

SEM vendors store the calibration in private TIFF tags:

* FEI/Thermo Fisher (tags 34682 ``FEI_HELIOS`` and 34680 ``FEI_SFEG``): INI-like
  text whose ``[Scan] PixelWidth`` is in metres and ``[Stage] StageX/StageY``
  in metres;
* Zeiss (tag 34118 ``CZ_SEM``): ``AP_IMAGE_PIXEL_SIZE`` / ``AP_STAGE_AT_X`` ...
  entries with a value and a unit (``nm``, ``µm``, ``mm``).

:mod:`tifffile` already splits both into dictionaries; this module turns them
into nanometres and micrometres.  It also decodes one page into OpenCV's
channel order, falling back to OpenCV when :mod:`tifffile` lacks a codec (LZW
and JPEG need the optional ``imagecodecs`` package, and OpenCV writes LZW by
default).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import tifffile

from cemi_stream.errors import SourceError

from .opencv_stream import quiet_opencv

log = logging.getLogger(__name__)

TAG_FEI_SFEG = 34680
TAG_FEI_HELIOS = 34682
TAG_CZ_SEM = 34118

# Signatures of TIFF and BigTIFF, little- and big-endian.
TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")

# Length units seen in Zeiss tags, as nanometres per unit.  The micro sign comes
# as U+00B5, U+03BC or, from files decoded with the wrong code page, "Âµ".
_NM_PER_UNIT = {"m": 1e9, "mm": 1e6, "um": 1e3, "nm": 1.0, "pm": 1e-3}


@dataclass(frozen=True, slots=True)
class TiffCalibration:
    """Calibration found in a TIFF page's vendor tags.

    Attributes
    ----------
    pixel_size_nm : float or None
        Width of one pixel in nanometres.
    stage_um : (float, float) or None
        Stage ``(x, y)`` in micrometres, in the microscope's stage frame as
        stored by the vendor (FEI and Zeiss store the stage position of the
        field of view; the sign of y follows the stage, not the image rows).
    """

    pixel_size_nm: float | None = None
    stage_um: tuple[float, float] | None = None


def is_tiff(path: Path) -> bool:
    """True when the file starts with a (Big)TIFF signature.

    Raises
    ------
    SourceError
        When the file cannot be read.
    """
    try:
        with path.open("rb") as fh:
            head = fh.read(4)
    except OSError as exc:
        raise SourceError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    return head in TIFF_MAGICS


def calibration_from_tags(tags: Any) -> TiffCalibration:
    """Extract pixel size and stage position from one page's tags.

    Parameters
    ----------
    tags : tifffile.TiffTags
        ``page.tags`` of a :class:`tifffile.TiffPage`.

    Returns
    -------
    TiffCalibration
        Empty fields when no vendor tag (or no usable value) is present.
    """
    for code in (TAG_FEI_HELIOS, TAG_FEI_SFEG):
        tag = tags.get(code)
        if tag is not None:
            calibration = _fei_calibration(tag.value)
            if calibration.pixel_size_nm is not None or calibration.stage_um is not None:
                return calibration
    tag = tags.get(TAG_CZ_SEM)
    if tag is not None and isinstance(tag.value, Mapping):
        return _zeiss_calibration(tag.value)
    return TiffCalibration()


def read_calibration(path: str | Path) -> TiffCalibration:
    """Calibration of the first page of a TIFF file.

    Parameters
    ----------
    path : str or Path
        Any file; files that are not TIFF give an empty calibration.

    Raises
    ------
    SourceError
        When the file is missing, unreadable or a corrupt TIFF.
    """
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"{path}: no such file")
    if not is_tiff(path):
        return TiffCalibration()
    with open_tiff(path) as tif:
        try:
            return calibration_from_tags(tif.pages.first.tags)
        except Exception as exc:  # tifffile raises many types for a broken IFD
            raise SourceError(f"{path}: corrupt TIFF ({one_line(exc)})") from exc


def open_tiff(path: Path) -> Any:
    """Open a TIFF file with :mod:`tifffile`, turning its errors into one line.

    Returns
    -------
    tifffile.TiffFile
        The open file; the caller closes it (it is a context manager).

    Raises
    ------
    SourceError
        When the file is missing, not a TIFF or corrupt.
    """
    if not path.is_file():
        raise SourceError(f"{path}: no such file")
    try:
        return tifffile.TiffFile(path)
    except Exception as exc:  # TiffFileError, struct.error, ValueError ... on bad headers
        raise SourceError(f"{path}: corrupt or unsupported TIFF ({one_line(exc)})") from exc


def read_pixel_size_nm(path: str | Path) -> float | None:
    """Pixel size in nanometres from FEI or Zeiss TIFF tags, or None when absent.

    Raises
    ------
    SourceError
        When the file is missing or a corrupt TIFF.
    """
    return read_calibration(path).pixel_size_nm


def read_stage_position_um(path: str | Path) -> tuple[float, float] | None:
    """Stage ``(x, y)`` in micrometres from FEI or Zeiss TIFF tags, or None.

    Raises
    ------
    SourceError
        When the file is missing or a corrupt TIFF.
    """
    return read_calibration(path).stage_um


def page_image(page: Any, index: int, path: Path) -> np.ndarray:
    """Decode one TIFF page as OpenCV would.

    Parameters
    ----------
    page : tifffile.TiffPage
        The page, from an open :class:`tifffile.TiffFile`.
    index : int
        0-based page index (for the OpenCV fallback and for messages).
    path : Path
        The file's path (for the OpenCV fallback and for messages).

    Returns
    -------
    ndarray
        ``(y, x)`` or ``(y, x, c)`` with colour channels in BGR(A) order, in
        the page's own dtype (``uint8``, ``uint16``, float ...).

    Raises
    ------
    SourceError
        When neither tifffile nor OpenCV can decode the page.
    """
    try:
        data = page.asarray()
    except Exception as exc:  # tifffile raises many types for bad or unsupported data
        # OpenCV's libtiff has every common codec built in; tifffile needs
        # imagecodecs for LZW/JPEG, so a failure here is often just that.  Only
        # then is OpenCV asked: on data its codec cannot decode, it logs an
        # error and returns a black page as if it had succeeded.
        missing_codec = isinstance(exc, NotImplementedError) or "imagecodecs" in str(exc)
        if not missing_codec:
            raise SourceError(f"{path}: cannot decode TIFF page {index} ({one_line(exc)})") from exc
        with quiet_opencv():
            found, images = cv2.imreadmulti(
                str(path), start=index, count=1, flags=cv2.IMREAD_UNCHANGED
            )
        if found and images:
            return np.asarray(images[0])
        raise SourceError(f"{path}: cannot decode TIFF page {index} ({one_line(exc)})") from exc
    return _to_opencv_layout(page, data)


def _to_opencv_layout(page: Any, data: np.ndarray) -> np.ndarray:
    """Reorder a tifffile array to ``(y, x[, c])`` with BGR(A) channels."""
    photometric = int(page.photometric)
    samples = int(page.samplesperpixel)
    if samples > 1 and int(page.planarconfig) == int(tifffile.PLANARCONFIG.SEPARATE):
        data = np.moveaxis(data, -3, -1)
    if photometric == int(tifffile.PHOTOMETRIC.PALETTE) and page.colormap is not None:
        # The colour map is (3, 2**bits), RGB, usually 16-bit.
        data = np.moveaxis(np.asarray(page.colormap)[:, data], 0, -1)
    elif photometric == int(tifffile.PHOTOMETRIC.MINISWHITE) and data.dtype.kind in "ui":
        data = np.iinfo(data.dtype).max - data
    if data.ndim == 3 and data.shape[2] == 3:
        data = data[:, :, ::-1]
    elif data.ndim == 3 and data.shape[2] == 4:
        data = data[:, :, [2, 1, 0, 3]]
    return np.ascontiguousarray(data)


def _fei_calibration(value: Any) -> TiffCalibration:
    sections = value if isinstance(value, Mapping) else _parse_ini(value)
    pixel_m = None
    for name in ("Scan", "EScan"):
        section = sections.get(name)
        if isinstance(section, Mapping):
            pixel_m = _positive(section.get("PixelWidth"))
            if pixel_m is not None:
                break
    stage = sections.get("Stage")
    stage_um = None
    if isinstance(stage, Mapping):
        x_m, y_m = _finite(stage.get("StageX")), _finite(stage.get("StageY"))
        if x_m is not None and y_m is not None:
            stage_um = (x_m * 1e6, y_m * 1e6)
    return TiffCalibration(None if pixel_m is None else pixel_m * 1e9, stage_um)


def _zeiss_calibration(entries: Mapping[str, Any]) -> TiffCalibration:
    pixel_nm = _zeiss_length_nm(entries.get("ap_image_pixel_size"))
    if pixel_nm is None:
        pixel_nm = _zeiss_length_nm(entries.get("ap_pixel_size"))
    x_nm = _zeiss_length_nm(entries.get("ap_stage_at_x"), positive=False)
    y_nm = _zeiss_length_nm(entries.get("ap_stage_at_y"), positive=False)
    stage = None if x_nm is None or y_nm is None else (x_nm / 1e3, y_nm / 1e3)
    return TiffCalibration(pixel_nm, stage)


def _zeiss_length_nm(entry: Any, *, positive: bool = True) -> float | None:
    """``(name, value, unit)`` or ``(name, "value unit")`` -> nanometres."""
    if not isinstance(entry, tuple) or len(entry) < 2:
        return None
    if len(entry) >= 3:
        number, unit = entry[1], str(entry[2])
    else:
        parts = str(entry[1]).split()
        if len(parts) != 2:
            return None
        number, unit = parts
    unit = unit.strip().replace("Âµ", "u").replace("\u00b5", "u").replace("\u03bc", "u")
    scale = _NM_PER_UNIT.get(unit)
    value = _positive(number) if positive else _finite(number)
    if scale is None or value is None:
        return None
    return value * scale


def _parse_ini(value: Any) -> dict[str, dict[str, str]]:
    """Parse FEI's ``[Section]`` / ``key=value`` text when tifffile left it raw."""
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if not isinstance(value, str):
        return {}
    sections: dict[str, dict[str, str]] = {}
    current: dict[str, str] = {}
    for line in value.splitlines():
        line = line.strip()
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
        elif "=" in line:
            key, _, text = line.partition("=")
            current[key.strip()] = text.strip()
    return sections


def _finite(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _positive(value: Any) -> float | None:
    number = _finite(value)
    return number if number is not None and number > 0 else None


def one_line(exc: BaseException) -> str:
    """An exception's message squeezed onto one line (for :class:`SourceError`)."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__
