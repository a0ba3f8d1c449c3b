"""Keyframe selection from overlapping video frames.

In video mode consecutive frames overlap ~95 %; the stitcher wants frames
that overlap their predecessor by a target fraction (default 50 %, the
paper's 30-60 % band).  For every frame the selector estimates its
displacement from the last kept keyframe with a fast phase correlation at
reduced resolution and keeps the frame whose overlap is closest to the
target.  Because that is only known once the next frame is seen, one frame
is held back (decisions are emitted with a one-frame delay, always in input
order).

Displacements are the motion of the field of view in full-resolution pixels:
``(dx, dy) = position(frame) - position(keyframe)``, so a stage moving the
view to the right gives ``dx > 0``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from ..config import KeyframeConfig
from ..frame import Frame

# Reasons written to keyframes.csv.
FIRST = "first"
OVERLAP = "overlap"
ROW_END = "row_end"
NEW_SEGMENT = "new_segment"
LAST = "last"
KEEP_ALL = "keep_all"
REDUNDANT = "redundant"

OVERLAP_BAND = (0.30, 0.60)  # the paper's stitchable overlap range
_PEAKS = 3  # correlation peaks checked by NCC (periodic lamellae make false peaks)
_MIN_OVERLAP = 0.08  # candidates overlapping less than this are not trusted


@dataclass(frozen=True, slots=True)
class Decision:
    """What happened to one input frame.

    Attributes
    ----------
    frame : Frame
        The (cropped) frame.
    kept : bool
        True when it is a keyframe (or every frame is kept).
    reason : str
        Why it was kept or dropped (see the module constants; fault reasons
        such as ``blank`` come from the capture stage).
    dx_px, dy_px : float or None
        Displacement from the previous keyframe in full-resolution pixels,
        None when it could not be estimated.
    overlap : float or None
        Overlap area fraction with the previous keyframe, None when unknown.
    score : float or None
        Normalised cross-correlation of the chosen displacement.
    """

    frame: Frame
    kept: bool
    reason: str
    dx_px: float | None = None
    dy_px: float | None = None
    overlap: float | None = None
    score: float | None = None


@dataclass(slots=True)
class _LowRes:
    """A frame at reduced resolution, ready for correlation."""

    frame: Frame
    small: np.ndarray  # float32 (y, x), zero mean
    spectrum: np.ndarray  # rfft2 of the windowed small image


@dataclass(frozen=True, slots=True)
class Estimate:
    """A displacement estimate in full-resolution pixels."""

    dx: float
    dy: float
    score: float
    reliable: bool


@dataclass(slots=True)
class _Pending:
    low: _LowRes
    est: Estimate
    overlap: float


def _prefer_first(first: float, second: float, target: float) -> bool:
    """Whether overlap ``first`` (above the target) beats ``second`` (below it)."""
    lo, hi = OVERLAP_BAND
    pick_first = abs(first - target) <= abs(second - target)
    if lo <= target <= hi:
        chosen, other = (first, second) if pick_first else (second, first)
        if not lo <= chosen <= hi and lo <= other <= hi:
            pick_first = not pick_first
    return pick_first


def format_decision(d: Decision) -> str:
    """``src_index,kept,reason,dx_px,dy_px`` of one decision (no newline)."""
    dx = "" if d.dx_px is None else f"{d.dx_px:.2f}"
    dy = "" if d.dy_px is None else f"{d.dy_px:.2f}"
    return f"{d.frame.meta.src_index},{int(d.kept)},{d.reason},{dx},{dy}"


def overlap_fraction(dx: float, dy: float, width: int, height: int) -> float:
    """Area fraction shared by two ``width`` x ``height`` frames offset by ``(dx, dy)`` px."""
    ox = max(width - abs(dx), 0.0)
    oy = max(height - abs(dy), 0.0)
    return float(ox * oy / (width * height))


class PhaseCorrelator:
    """Fast translation estimate between two frames at reduced resolution.

    Parameters
    ----------
    downsample : int
        Resolution divisor (4 turns 1024 x 768 into 256 x 192).
    min_score : float
        NCC below which an estimate is flagged unreliable.
    """

    def __init__(self, downsample: int = 4, min_score: float = 0.2) -> None:
        self.downsample = downsample
        self.min_score = min_score
        self._shape: tuple[int, int] = (0, 0)
        self._window: np.ndarray = np.zeros((0, 0), np.float32)
        self._lowpass: np.ndarray = np.zeros((0, 0), np.float32)

    def prepare(self, frame: Frame) -> _LowRes:
        """Reduce a frame and compute its windowed spectrum (done once per frame)."""
        h, w = frame.shape
        f = self.downsample
        small = cv2.resize(
            frame.image, (max(w // f, 8), max(h // f, 8)), interpolation=cv2.INTER_AREA
        ).astype(np.float32)
        small -= float(small.mean())
        window = self._window if self._shape == small.shape else self._setup(small.shape)
        spectrum = np.fft.rfft2(small * window)
        return _LowRes(frame, small, spectrum)

    def _setup(self, shape: tuple[int, int]) -> np.ndarray:
        sh, sw = shape
        self._shape = (sh, sw)
        self._window = cv2.createHanningWindow((sw, sh), cv2.CV_32F)
        # A Gaussian low-pass on the whitened spectrum keeps shot noise out of the peak.
        fy = np.fft.fftfreq(sh)[:, None]
        fx = np.fft.rfftfreq(sw)[None, :]
        self._lowpass = np.exp(-(fx**2 + fy**2) / (2 * 0.2**2)).astype(np.float32)
        return self._window

    def estimate(
        self, ref: _LowRes, cur: _LowRes, predicted: tuple[float, float] | None = None
    ) -> Estimate:
        """Displacement of ``cur``'s field of view relative to ``ref``'s.

        Parameters
        ----------
        ref, cur : prepared frames (same shape)
        predicted : (dx, dy) or None
            Expected displacement in full-resolution pixels; breaks ties
            between equally good peaks (periodic lamellae) and resolves the
            wrap-around ambiguity of the discrete correlation.
        """
        if ref.small.shape != cur.small.shape or cur.small.shape != self._shape:
            return Estimate(0.0, 0.0, 0.0, False)
        sh, sw = ref.small.shape
        cross = ref.spectrum * np.conj(cur.spectrum)
        cross /= np.abs(cross) + 1e-6
        cross *= self._lowpass
        surface = np.fft.irfft2(cross, s=(sh, sw))
        flat = surface.ravel()
        top = np.argpartition(flat, -16)[-16:]
        top = top[np.argsort(flat[top])[::-1]]
        peaks: list[tuple[int, int]] = []
        for idx in top:
            py, px = divmod(int(idx), sw)
            if all(
                min(abs(py - qy), sh - abs(py - qy)) > 2 or min(abs(px - qx), sw - abs(px - qx)) > 2
                for qy, qx in peaks
            ):
                peaks.append((py, px))
            if len(peaks) == _PEAKS:
                break
        f = self.downsample
        best: tuple[float, float, float, float] | None = None  # (rank, dx, dy, ncc)
        diag = math.hypot(sw, sh)
        for py, px in peaks:
            sub_y, sub_x = _subpixel(surface, py, px)
            for dy in (py, py - sh):
                for dx in (px, px - sw):
                    if overlap_fraction(dx, dy, sw, sh) < _MIN_OVERLAP:
                        continue
                    ncc = _overlap_ncc(ref.small, cur.small, dx, dy)
                    rank = ncc
                    if predicted is not None:
                        dist = math.hypot(dx - predicted[0] / f, dy - predicted[1] / f)
                        rank -= 0.5 * min(dist / (0.25 * diag), 1.0)
                    if best is None or rank > best[0]:
                        best = (rank, (dx + sub_x) * f, (dy + sub_y) * f, ncc)
        if best is None:
            return Estimate(0.0, 0.0, 0.0, False)
        _, dx_full, dy_full, ncc = best
        return Estimate(dx_full, dy_full, ncc, ncc >= self.min_score)


def _subpixel(surface: np.ndarray, py: int, px: int) -> tuple[float, float]:
    """Parabolic sub-pixel offset of a correlation peak (wrap-around neighbours)."""
    sh, sw = surface.shape
    c = surface[py, px]

    def vertex(m: float, p: float) -> float:
        denom = m - 2 * c + p
        return float(np.clip(0.5 * (m - p) / denom, -0.5, 0.5)) if denom < 0 else 0.0

    oy = vertex(surface[(py - 1) % sh, px], surface[(py + 1) % sh, px])
    ox = vertex(surface[py, (px - 1) % sw], surface[py, (px + 1) % sw])
    return oy, ox


def _overlap_ncc(ref: np.ndarray, cur: np.ndarray, dx: int, dy: int) -> float:
    """Zero-mean NCC of ``ref`` and ``cur`` on their overlap for shift ``(dx, dy)``.

    ``cur`` at ``(y, x)`` shows what ``ref`` shows at ``(y + dy, x + dx)``.
    """
    h, w = ref.shape
    a = ref[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)]
    b = cur[max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)]
    if a.size < 16:
        return 0.0
    # Three OpenCV reductions on the views instead of centred numpy copies
    # (the same value): mean(a b) = (mean(a^2) + mean(b^2) - mean((a - b)^2)) / 2.
    ma, sa = (float(v[0, 0]) for v in cv2.meanStdDev(a))
    mb, sb = (float(v[0, 0]) for v in cv2.meanStdDev(b))
    if sa * sb <= 0:
        return 0.0
    mean_ab = 0.5 * (
        sa * sa + ma * ma + sb * sb + mb * mb - cv2.norm(a, b, cv2.NORM_L2SQR) / a.size
    )
    return float(np.clip((mean_ab - ma * mb) / (sa * sb), -1.0, 1.0))


class KeyframeSelector:
    """Chooses keyframes from a stream of frames (see module docstring).

    Parameters
    ----------
    config : KeyframeConfig
        Target overlap, resolution divisor, trust threshold.
    keep_all : bool
        Keep every frame (image folders), still estimating displacements.
    """

    def __init__(self, config: KeyframeConfig, keep_all: bool = False) -> None:
        self.config = config
        self.keep_all = keep_all
        self.correlator = PhaseCorrelator(config.downsample, config.min_score)
        self._key: _LowRes | None = None
        self._pending: _Pending | None = None
        self._held: list[Decision] = []  # decisions queued behind the pending frame
        self._last: Estimate | None = None  # previous frame's displacement from the key
        self._velocity: tuple[float, float] | None = None  # px per input frame

    def reject(self, frame: Frame, reason: str) -> list[Decision]:
        """Record a frame rejected before selection (a fault) in input order."""
        decision = Decision(frame, False, reason)
        if self._pending is not None:
            self._held.append(decision)
            return []
        return [decision]

    def push(self, frame: Frame) -> list[Decision]:
        """Feed one frame; returns the decisions that became final, in input order."""
        cur = self.correlator.prepare(frame)
        out: list[Decision] = []
        if self._key is None or self._key.small.shape != cur.small.shape:
            self._resolve_pending(out, keep=False, reason=REDUNDANT)
            self._set_key(cur)
            out.append(Decision(frame, True, FIRST, 0.0, 0.0, 1.0, 1.0))
            return out
        if self.keep_all:
            est = self.correlator.estimate(self._key, cur, self._predict())
            self._track(est)
            out.append(self._decide(cur, est, True, KEEP_ALL))
            self._set_key(cur)
            return out
        self._select(cur, out)
        return out

    def flush(self) -> list[Decision]:
        """End of stream: decide the held-back frame."""
        out: list[Decision] = []
        if self._pending is not None:
            keep = self._pending.overlap < self.config.end_overlap
            self._resolve_pending(out, keep=keep, reason=LAST if keep else REDUNDANT)
        return out

    # -- internals ---------------------------------------------------------

    def _select(self, cur: _LowRes, out: list[Decision]) -> None:
        key = self._key
        if key is None:  # pragma: no cover - push() sets the key first
            raise RuntimeError("selector has no keyframe")
        est = self.correlator.estimate(key, cur, self._predict())
        if not est.reliable:
            # Lost the keyframe: a row return, a scene cut, or a jump too big.
            pending = self._pending
            if pending is not None and pending.overlap < self.config.end_overlap:
                self._resolve_pending(out, keep=True, reason=ROW_END)
                est = self.correlator.estimate(pending.low, cur, self._velocity)
                if est.reliable:
                    self._after_new_key(cur, est, out)
                    return
            else:
                self._resolve_pending(out, keep=False, reason=REDUNDANT)
            self._velocity = None
            out.append(self._decide(cur, est, True, NEW_SEGMENT, known=False))
            self._set_key(cur)
            return
        self._track(est)
        self._place(cur, est, out)

    def _place(self, cur: _LowRes, est: Estimate, out: list[Decision]) -> None:
        """Keep, hold or drop ``cur`` given its reliable displacement from the key.

        Once the overlap drops below the target, the keyframe is whichever of
        the held frame (last one above the target) and ``cur`` (first one
        below) is closer to it, so the chosen overlaps straddle the target by
        at most half a video step.  When the target lies inside the paper's
        30-60 % band, a choice outside the band is swapped for the other
        candidate if that one is inside.
        """
        w, h = cur.frame.shape[1], cur.frame.shape[0]
        overlap = overlap_fraction(est.dx, est.dy, w, h)
        target = self.config.overlap
        if overlap >= target:
            self._resolve_pending(out, keep=False, reason=REDUNDANT)
            self._pending = _Pending(cur, est, overlap)
            return
        pending = self._pending
        if pending is None or not _prefer_first(pending.overlap, overlap, target):
            self._resolve_pending(out, keep=False, reason=REDUNDANT)
            out.append(self._decide(cur, est, True, OVERLAP))
            self._set_key(cur)
            return
        self._resolve_pending(out, keep=True, reason=OVERLAP)
        est2 = self.correlator.estimate(pending.low, cur, self._velocity)
        if not est2.reliable:
            # Fall back on the difference of the two estimates against the old key.
            est2 = Estimate(est.dx - pending.est.dx, est.dy - pending.est.dy, est.score, True)
        self._after_new_key(cur, est2, out)

    def _after_new_key(self, cur: _LowRes, est: Estimate, out: list[Decision]) -> None:
        """Place ``cur`` against a keyframe that was just promoted from pending."""
        self._last = est
        self._place(cur, est, out)

    def _predict(self) -> tuple[float, float] | None:
        if self._last is None or self._velocity is None:
            return None
        return self._last.dx + self._velocity[0], self._last.dy + self._velocity[1]

    def _track(self, est: Estimate) -> None:
        if self._last is not None:
            self._velocity = (est.dx - self._last.dx, est.dy - self._last.dy)
        self._last = est

    def _decide(
        self, cur: _LowRes, est: Estimate, kept: bool, reason: str, known: bool = True
    ) -> Decision:
        w, h = cur.frame.shape[1], cur.frame.shape[0]
        if not known or not est.reliable:
            return Decision(cur.frame, kept, reason, None, None, None, est.score)
        return Decision(
            cur.frame,
            kept,
            reason,
            est.dx,
            est.dy,
            overlap_fraction(est.dx, est.dy, w, h),
            est.score,
        )

    def _set_key(self, cur: _LowRes) -> None:
        self._key = cur
        self._last = Estimate(0.0, 0.0, 1.0, True)

    def _resolve_pending(self, out: list[Decision], keep: bool, reason: str) -> None:
        """Emit the held-back frame's decision (and the faults queued behind it)."""
        pending = self._pending
        if pending is None:
            return
        self._pending = None
        out.append(self._decide(pending.low, pending.est, keep, reason))
        out.extend(self._held)
        self._held.clear()
        if keep:
            self._key = pending.low
            self._last = Estimate(0.0, 0.0, 1.0, True)
