"""Phase fraction: Bradley-Roth as the paper defines it, Otsu / multi-Otsu, ``auto``."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from cemi_stream.analysis.phase import (
    PHASE_METHODS,
    AnalysisError,
    auto_method,
    auto_settings,
    bradley_roth,
    phase_fraction,
    phase_mask,
)
from cemi_stream.errors import CemiError


def two_phase(seed: int = 0, shape: tuple[int, int] = (256, 256)) -> tuple[np.ndarray, float]:
    """Dark disks (80) on a bright matrix (160) with noise; returns (uint8 image, dark fraction)."""
    rng = np.random.default_rng(seed)
    truth = np.zeros(shape, np.uint8)
    for _ in range(220):
        y, x = rng.integers(0, shape[0]), rng.integers(0, shape[1])
        cv2.circle(truth, (int(x), int(y)), int(rng.integers(3, 8)), 1, -1)
    img = np.where(truth > 0, 80.0, 160.0) + rng.normal(0, 6, shape)
    return np.clip(img, 0, 255).astype(np.uint8), float(truth.mean())


def brute_bradley(img: np.ndarray, window: int, t: float, valid: np.ndarray) -> np.ndarray:
    """Reference: the definition, one pixel and one window at a time."""
    h, w = img.shape
    out = np.zeros((h, w), bool)
    half = window // 2
    for y in range(h):
        for x in range(w):
            ys = slice(max(0, y - half), min(h, y - half + window))
            xs = slice(max(0, x - half), min(w, x - half + window))
            win, ok = img[ys, xs].astype(np.float64), valid[ys, xs]
            n, s = int(ok.sum()), float(win[ok].sum())
            out[y, x] = bool(valid[y, x]) and n > 0 and float(img[y, x]) * n <= s * (1 - t)
    return out


def test_bradley_roth_equals_the_brute_force_definition() -> None:
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, (13, 17)).astype(np.uint8)
    valid = rng.random((13, 17)) > 0.25
    for window in (1, 2, 4, 5, 8, 40):
        for t in (0.0, 0.15, -0.1):
            for v in (np.ones_like(valid), valid):
                got = bradley_roth(img, window, t, v)
                assert np.array_equal(got, brute_bradley(img, window, t, v)), (window, t)


def test_methods_find_the_known_fraction_of_a_synthetic_two_phase_image() -> None:
    img, truth = two_phase()
    assert 0.2 < truth < 0.6
    # High contrast: the paper's settings are right here; all methods within 1.5 pp.
    for kw in ({"method": "bradley"}, {"method": "otsu"}, {"method": "auto"},
               {"method": "bradley", "window": 64, "t": 0.0}):  # fmt: skip
        frac = phase_fraction(img, **kw)
        assert abs(frac - truth) < 0.015, (kw, frac, truth)
    # Multi-Otsu takes the two darker of three classes: never less than the dark phase.
    assert phase_fraction(img, method="multiotsu") >= truth - 0.015


def test_uint16_and_float_tiles_give_the_uint8_result() -> None:
    img, _ = two_phase(1)
    for method in ("bradley", "auto"):
        ref = phase_mask(img, method=method)
        assert np.array_equal(phase_mask(img.astype(np.uint16) * 257, method=method), ref)
        assert np.array_equal(phase_mask(img.astype(np.float32) / 255, method=method), ref)
    ref_otsu = phase_fraction(img, method="otsu")
    assert abs(phase_fraction(img.astype(np.uint16) * 257, method="otsu") - ref_otsu) < 0.005


@pytest.mark.parametrize("method", ["auto", *PHASE_METHODS])
def test_invalid_pixels_are_excluded_whatever_their_value(method: str) -> None:
    img, _ = two_phase(2)
    valid = np.zeros(img.shape, bool)
    valid[:, 40:200] = True
    results = []
    for outside in (0, 255, 120):
        tile = img.copy()
        tile[~valid] = outside
        mask = phase_mask(tile, valid, method=method)
        assert not mask[~valid].any()
        results.append((mask, phase_fraction(tile, valid, method=method)))
    for mask, frac in results[1:]:
        assert np.array_equal(mask, results[0][0])
        assert frac == results[0][1]
    # The fraction is of valid pixels only, close to the fraction of the crop itself
    # (not for multi-Otsu: three classes on a two-phase image split one phase by noise).
    if method == "multiotsu":
        return
    crop = np.ascontiguousarray(img[:, 40:200])
    kw = {"method": method, "window": 32} if method == "bradley" else {"method": method}
    assert abs(phase_fraction(img, valid, **kw) - phase_fraction(crop, **kw)) < 0.02


def test_no_valid_pixel_gives_nan_and_nonfinite_pixels_are_not_valid() -> None:
    img, _ = two_phase(4)
    assert math.isnan(phase_fraction(img, np.zeros(img.shape, bool)))
    f = img.astype(np.float64)
    f[:, :100] = np.nan
    for method in PHASE_METHODS:
        mask = phase_mask(f, method=method)
        assert not mask[:, :100].any()
        if method == "multiotsu":  # ill-posed on two phases (see above)
            continue
        expect = phase_fraction(img[:, 100:].copy(), method=method, window=img.shape[1] // 8)
        got = phase_fraction(f, method=method)
        assert abs(got - expect) < 0.03, method


def test_bright_is_the_complement_of_dark_at_t_zero_and_for_otsu() -> None:
    img, _ = two_phase(5)
    valid = np.ones(img.shape, bool)
    valid[:20] = False
    for kw in ({"method": "bradley", "t": 0.0}, {"method": "otsu"}, {"method": "multiotsu"}):
        dark = phase_mask(img, valid, phase="dark", **kw)
        bright = phase_mask(img, valid, phase="bright", **kw)
        assert not (dark & bright).any() and np.array_equal(dark | bright, valid), kw
    # With t > 0 a band around the local mean is neither.
    dark = phase_mask(img, phase="dark", method="bradley")
    bright = phase_mask(img, phase="bright", method="bradley")
    assert not (dark & bright).any()


def test_auto_is_a_known_method_with_measured_settings() -> None:
    assert auto_method() in PHASE_METHODS
    method, window, t = auto_settings(512)
    assert method == auto_method() and window >= 1 and t < 1
    img, _ = two_phase(6)
    assert np.array_equal(phase_mask(img), bradley_roth(img, *auto_settings(img.shape[1])[1:]))


@pytest.mark.parametrize(
    ("call", "words"),
    [
        (lambda img: phase_mask(img, method="kmeans"), ("method", "kmeans", "unknown")),
        (lambda img: phase_mask(img, phase="grey"), ("phase", "grey", "dark or bright")),
        (lambda img: phase_mask(img, method="bradley", window=0), ("window", ">= 1")),
        (lambda img: phase_mask(img, method="bradley", window=2.5), ("window", "integer")),
        (lambda img: bradley_roth(img, 8, 1.5), ("t", "below 1")),
        (lambda img: bradley_roth(img, 8, float("nan")), ("t", "finite")),
        (lambda img: phase_mask(img[None]), ("2-D", "shape")),
        (lambda img: phase_mask(img, np.ones((3, 3), bool)), ("valid", "does not match")),
        (lambda img: phase_mask(np.full((8, 8), 7, np.uint8), method="otsu"), ("contrast",)),
        (lambda img: phase_mask(img.astype(bool)), ("dtype", "bool")),
    ],
)
def test_bad_input_raises_a_one_line_analysis_error(call: object, words: tuple[str, ...]) -> None:
    img, _ = two_phase(7, (32, 32))
    with pytest.raises(AnalysisError) as exc:
        call(img)  # type: ignore[operator]
    msg = str(exc.value)
    assert isinstance(exc.value, CemiError) and "\n" not in msg
    for w in words:
        assert w in msg, (w, msg)


# --- real data: the labelled Ni-superalloy gamma / gamma' images ----------------------------


def labelled_superalloys(data_dir: Path) -> list[tuple[str, np.ndarray, float]]:
    root = data_dir / "superalloy-gamma-prime"
    if not (root / "index.csv").is_file():
        pytest.skip(f"superalloy-gamma-prime not found under {data_dir}")
    out = []
    with open(root / "index.csv", newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            img_p, lab_p = root / row["image"], root / row["label"]
            if img_p.is_file() and lab_p.is_file():
                img = cv2.imread(str(img_p), cv2.IMREAD_UNCHANGED)
                lab = cv2.imread(str(lab_p), cv2.IMREAD_UNCHANGED)
                out.append((row["split"].split("/")[-1], img, float((lab > 0).mean())))
    if len(out) < 10:
        pytest.skip(f"only {len(out)} labelled superalloy images under {root}")
    return out


@pytest.mark.realdata
def test_auto_phase_fraction_is_within_3_pp_of_the_labels(data_dir: Path) -> None:
    items = labelled_superalloys(data_dir)
    auto = [abs(phase_fraction(img) - truth) * 100 for _, img, truth in items]
    paper = [abs(phase_fraction(img, method="bradley") - truth) * 100 for _, img, truth in items]
    test = [e for (split, _, _), e in zip(items, auto, strict=True) if split == "test"]
    assert np.mean(auto) <= 3.0, np.mean(auto)
    assert not test or np.mean(test) <= 3.0, np.mean(test)
    # The paper's defaults (window = width / 8, t = 15 %) find almost no gamma' here.
    assert np.mean(paper) > 40.0


@pytest.mark.realdata
def test_real_tile_with_an_uncovered_margin(data_dir: Path) -> None:
    _, img, _ = labelled_superalloys(data_dir)[0]
    tile = img.copy()
    tile[:, :128] = 0  # as a mosaic's uncovered area
    valid = tile > 0
    inside = np.ascontiguousarray(img[:, 128:])
    for method in ("auto", "otsu"):
        got = phase_fraction(tile, valid, method=method)
        assert abs(got - phase_fraction(inside, method=method)) < 0.03, method
        assert 0.3 < got < 0.7


def test_window_sums_equal_the_integral_image_on_a_full_tile() -> None:
    # The box filter that computes the window sums must equal the paper's integral
    # image exactly (a tie at t = 0 flips a pixel otherwise), at 16 bits too.
    from cemi_stream.analysis.phase import _window_sums

    rng = np.random.default_rng(5)
    values = rng.integers(0, 65536, (413, 508)).astype(np.float64)
    values[rng.random(values.shape) < 0.2] = 0.0
    ii = cv2.integral(values, sdepth=cv2.CV_64F)
    h, w = values.shape
    for window in (2, 63, 127, 1000):
        half = window // 2
        y0 = np.clip(np.arange(h) - half, 0, h)
        y1 = np.clip(np.arange(h) - half + window, 0, h)
        x0 = np.clip(np.arange(w) - half, 0, w)
        x1 = np.clip(np.arange(w) - half + window, 0, w)
        ref = ii[np.ix_(y1, x1)] - ii[np.ix_(y0, x1)] - ii[np.ix_(y1, x0)] + ii[np.ix_(y0, x0)]
        assert np.array_equal(_window_sums(values, window), ref), window
