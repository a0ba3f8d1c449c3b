"""Burned-in data bar like the ones FEI/Thermo and Zeiss SEMs print on frames.

The bar replaces the bottom rows of the frame (the frame size is unchanged):
a black band, two lines of white instrument text and a scale bar.  Real
frames carry one (see ``shared/data/fei-teneo-databar``), so the pipeline's
border/data-bar detector needs frames that do too.
"""

from __future__ import annotations

import math
from functools import lru_cache

import cv2
import numpy as np

_BAR_FRACTION = 0.08
_DISPLAY_WIDTH_M = 0.127  # FEI's magnification reference: a 127 mm wide display
_FONT = cv2.FONT_HERSHEY_SIMPLEX


def databar_height(frame_height: int) -> int:
    """Rows taken by the data bar for a frame ``frame_height`` pixels tall."""
    return max(6, round(_BAR_FRACTION * frame_height))


def _group_thousands(value: float) -> str:
    """``5000 -> '5 000'`` as SEM software prints magnifications."""
    return f"{round(value):,}".replace(",", " ")


def _nice_length_um(target_um: float) -> float:
    """Largest 1-2-5 series length not above ``target_um`` (micrometres)."""
    exponent = math.floor(math.log10(target_um))
    best = 10.0**exponent
    for mantissa in (1.0, 2.0, 5.0):
        candidate = mantissa * 10.0**exponent
        if candidate <= target_um:
            best = candidate
    return best


def _format_um(length_um: float) -> str:
    if length_um >= 1.0:
        return f"{length_um:g} um"
    return f"{length_um * 1000.0:g} nm"


@lru_cache(maxsize=8)
def render_databar(width: int, height: int, pixel_size_nm: float, dwell: str) -> np.ndarray:
    """Render the data bar for a frame geometry.

    Parameters
    ----------
    width : int
        Frame width in pixels.
    height : int
        Frame height in pixels (the bar is ``databar_height(height)`` rows).
    pixel_size_nm : float
        Pixel size in nanometres; sets the magnification, the horizontal field
        width and the scale bar.
    dwell : str
        Dwell time text, e.g. ``"100 ns"``.

    Returns
    -------
    ndarray of uint8
        ``(y, x)`` read-only bar image of shape ``(databar_height(height), width)``.
    """
    bar_h = databar_height(height)
    bar = np.zeros((bar_h, width), dtype=np.uint8)
    hfw_um = width * pixel_size_nm * 1e-3
    mag = _DISPLAY_WIDTH_M / (hfw_um * 1e-6)
    line1 = f"HV 10.00 kV  mag {_group_thousands(mag)} x  WD 10.0 mm  det BSD"
    line2 = f"HFW {hfw_um:.3g} um  dwell {dwell}  cemi-sim"

    # Text height ~30 % of the bar, Hershey glyphs are ~22 px tall at scale 1.
    scale = max(0.2, 0.30 * bar_h / 22.0)
    thickness = 1 if bar_h < 60 else 2
    text_w = max(1, int(width * 0.62))
    (w1, _), _ = cv2.getTextSize(line1, _FONT, scale, thickness)
    if w1 > text_w:
        scale *= text_w / w1
    margin = max(2, bar_h // 8)
    y1 = int(bar_h * 0.42)
    y2 = int(bar_h * 0.85)
    cv2.putText(bar, line1, (margin, y1), _FONT, scale, 255, thickness, cv2.LINE_AA)
    cv2.putText(bar, line2, (margin, y2), _FONT, scale, 255, thickness, cv2.LINE_AA)

    # Scale bar on the right: a 1-2-5 length of about a fifth of the field.
    length_um = _nice_length_um(hfw_um / 5.0)
    length_px = max(2, round(length_um * 1000.0 / pixel_size_nm))
    x_end = width - margin - 1
    x_start = max(text_w, x_end - length_px)
    y_bar = int(bar_h * 0.70)
    tick = max(1, bar_h // 8)
    cv2.line(bar, (x_start, y_bar), (x_end, y_bar), 255, max(1, thickness))
    cv2.line(bar, (x_start, y_bar - tick), (x_start, y_bar + tick), 255, 1)
    cv2.line(bar, (x_end, y_bar - tick), (x_end, y_bar + tick), 255, 1)
    label = _format_um(length_um)
    (lw, _), _ = cv2.getTextSize(label, _FONT, scale, thickness)
    x_label = max(x_start, (x_start + x_end - lw) // 2)
    cv2.putText(bar, label, (x_label, y1), _FONT, scale, 255, thickness, cv2.LINE_AA)
    bar.setflags(write=False)
    return bar


def burn_databar(frame: np.ndarray, pixel_size_nm: float, dwell: str) -> None:
    """Overwrite the bottom rows of ``frame`` (uint8, ``(y, x)``) with the data bar."""
    height, width = frame.shape
    bar = render_databar(width, height, float(pixel_size_nm), dwell)
    frame[height - bar.shape[0] :, :] = bar
