"""Tests of LD/HD pair loading, matching and registration (real KRISS pairs)."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pytest

from cemi_stream.capture.crop import detect_crop
from cemi_stream.denoise.pairs import (
    AlignedPair,
    align_pair,
    list_pairs,
    load_aligned_pairs,
    load_gray,
    pair_key,
    select_ids,
)
from cemi_stream.errors import ConfigError, DenoiseError, SourceError

KRISS_SETS = {
    "time": ("time/low", "time/high"),
    "line": ("line/noisy", "line/clean"),
}
N_PAIRS = 40


@pytest.fixture(scope="module")
def kriss_hd(kriss: Path) -> np.ndarray:
    """A real clean KRISS image with data bar and frame stripped ``(y, x)``."""
    hd = load_gray(kriss / "time/high/high_30us_005.png")
    return detect_crop(hd).rect.apply(hd)


def shifted_pair(
    base: np.ndarray, dy: int, dx: int, sigma: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(clean LD, noisy LD, HD) windows of ``base``: LD's (y, x) shows HD's (y + dy, x + dx)."""
    margin = 8
    height, width = base.shape[0] - 2 * margin, base.shape[1] - 2 * margin
    clean = base[margin : margin + height, margin : margin + width]
    hd = base[margin - dy : margin - dy + height, margin - dx : margin - dx + width]
    noise = np.random.default_rng(seed).normal(0.0, sigma, clean.shape)
    noisy = np.clip(clean + noise, 0, 255).astype(np.uint8)
    return clean, noisy, np.ascontiguousarray(hd)


def ncc(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel().astype(np.float64), b.ravel().astype(np.float64))[0, 1])


# --- registration --------------------------------------------------------------


def test_known_shift_is_recovered_under_strong_noise(kriss_hd: np.ndarray) -> None:
    clean, noisy, hd = shifted_pair(kriss_hd, 3, -2, sigma=40.0)
    pair = align_pair(noisy, hd, name="synthetic", subpixel=False)
    dy, dx = pair.shift_yx
    assert abs(dy - 3) < 0.5 and abs(dx + 2) < 0.5, pair.shift_yx
    assert pair.ld.shape == pair.hd.shape
    assert pair.ld.shape == (clean.shape[0] - 3, clean.shape[1] - 2)
    # The crop puts the same specimen pixels side by side: exact for the
    # noise-free LD window.
    assert pair.frame_crop is not None and pair.ld_rect is not None and pair.hd_rect is not None
    assert np.array_equal(pair.ld_rect.apply(pair.frame_crop.apply(clean)), pair.hd)
    assert np.array_equal(pair.ld_rect.apply(pair.frame_crop.apply(noisy)), pair.ld)
    assert pair.score > 0.8


def test_subpixel_shift_is_estimated(kriss_hd: np.ndarray) -> None:
    base = kriss_hd.astype(np.float32)
    true_dy, true_dx = 1.4, -2.6
    # HD(y + dy, x + dx) = base(y, x): warp the base by the translation.
    matrix = np.array([[1, 0, true_dx], [0, 1, true_dy]], dtype=np.float32)
    size = (base.shape[1], base.shape[0])
    hd = cv2.warpAffine(base, matrix, size, flags=cv2.INTER_CUBIC)
    noisy = base + np.random.default_rng(1).normal(0.0, 20.0, base.shape)
    pair = align_pair(np.clip(noisy, 0, 255).astype(np.uint8), np.clip(hd, 0, 255).astype(np.uint8))
    assert pair.shift_yx[0] == pytest.approx(true_dy, abs=0.2)
    assert pair.shift_yx[1] == pytest.approx(true_dx, abs=0.2)


def test_shift_above_the_limit_is_rejected_naming_the_pair(kriss_hd: np.ndarray) -> None:
    _, noisy, hd = shifted_pair(kriss_hd, 3, -2, sigma=10.0)
    with pytest.raises(DenoiseError, match=r"pair 042: .*exceeds 2 px"):
        align_pair(noisy, hd, name="042", max_shift_px=2)


def test_unrelated_images_are_rejected_or_score_low(kriss: Path, kriss_hd: np.ndarray) -> None:
    other = load_gray(kriss / "line/clean/line50x_020.png")
    other = detect_crop(other).rect.apply(other)
    with pytest.raises(DenoiseError, match=r"mixed: .* may not show the same field"):
        align_pair(other, kriss_hd, name="mixed")
    # Allowed any shift, the best match of two different fields still scores low.
    assert align_pair(other, kriss_hd, name="mixed", max_shift_px=400).score < 0.5


def test_bad_inputs_are_rejected() -> None:
    image = np.zeros((64, 64), np.uint8)
    with pytest.raises(DenoiseError, match="differ in size"):
        align_pair(image, np.zeros((64, 60), np.uint8), name="p1")
    with pytest.raises(DenoiseError, match="2-D uint8"):
        align_pair(image.astype(np.float32), image, name="p1")


@pytest.mark.parametrize("which", sorted(KRISS_SETS))
def test_real_kriss_pairs_all_align(kriss: Path, which: str) -> None:
    ld_dir, hd_dir = (kriss / d for d in KRISS_SETS[which])
    pairs = load_aligned_pairs(ld_dir, hd_dir)
    assert [p.name for p in pairs] == [f"{i:03d}" for i in range(1, N_PAIRS + 1)]
    paths = {name: (ld, hd) for name, ld, hd in list_pairs(ld_dir, hd_dir)}
    improved = 0
    for pair in pairs:
        dy, dx = pair.shift_yx
        assert abs(dy) <= 6 and abs(dx) <= 6, (pair.name, pair.shift_yx)
        assert pair.score > 0.5, (pair.name, pair.score)
        assert pair.ld.shape == pair.hd.shape and pair.ld.dtype == np.uint8
        # Data bar (29 rows) and frame gone; at most the drift and the
        # 3-px resampling margin on each side cut off.
        assert 424 <= pair.ld.shape[0] <= 433 and 494 <= pair.ld.shape[1] <= 503
        if max(abs(dy), abs(dx)) >= 2:
            # Registration matters: the unshifted stripped frames agree less.
            assert pair.frame_crop is not None
            ld_full, hd_full = (load_gray(p) for p in paths[pair.name])
            blur = cv2.GaussianBlur(pair.frame_crop.apply(ld_full), (0, 0), 1.5)
            assert ncc(blur, pair.frame_crop.apply(hd_full)) < pair.score - 0.005, pair.name
            improved += 1
    assert improved >= 5


def test_load_aligned_pairs_selects_names(kriss: Path) -> None:
    ld_dir, hd_dir = (kriss / d for d in KRISS_SETS["time"])
    pairs = load_aligned_pairs(ld_dir, hd_dir, names=select_ids("2-3,7"))
    assert [p.name for p in pairs] == ["002", "003", "007"]
    assert all(isinstance(p, AlignedPair) for p in pairs)
    with pytest.raises(DenoiseError, match="none of the selected"):
        load_aligned_pairs(ld_dir, hd_dir, names={"999"})


# --- loading -------------------------------------------------------------------


def test_load_gray_reads_real_png(kriss: Path) -> None:
    image = load_gray(kriss / "time/low/low_100ns_001.png")
    assert image.dtype == np.uint8 and image.shape == (471, 512)


def test_load_gray_rejects_text_and_missing_files(tmp_path: Path) -> None:
    fake = tmp_path / "fake.png"
    fake.write_text("this is not an image\n")
    with pytest.raises(SourceError, match=r"fake\.png: not a readable image"):
        load_gray(fake)
    with pytest.raises(SourceError, match="no such image file"):
        load_gray(tmp_path / "missing.png")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(SourceError, match="not a readable image"):
        load_gray(empty)


def test_load_gray_converts_colour_and_16_bit(tmp_path: Path) -> None:
    grey = np.random.default_rng(0).integers(0, 256, (20, 30), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "rgb.png"), np.dstack([grey, grey, grey]))
    assert np.array_equal(load_gray(tmp_path / "rgb.png"), grey)
    colour = np.dstack([grey, np.zeros_like(grey), np.full_like(grey, 255)])
    cv2.imwrite(str(tmp_path / "colour.png"), colour)
    expected = cv2.cvtColor(colour, cv2.COLOR_BGR2GRAY)
    assert np.array_equal(load_gray(tmp_path / "colour.png"), expected)
    cv2.imwrite(str(tmp_path / "deep.png"), grey.astype(np.uint16) * 257)
    assert np.array_equal(load_gray(tmp_path / "deep.png"), grey)


# --- names and matching --------------------------------------------------------


def test_pair_key_and_select_ids() -> None:
    assert pair_key("time/low/low_100ns_007.png") == "007"
    assert pair_key(Path("line50x_040.png")) == "040"
    assert pair_key("sample.tif") == "sample"
    assert select_ids("1-3") == {"001", "002", "003"}
    assert select_ids("1-5,7") == {"001", "002", "003", "004", "005", "007"}
    assert select_ids(" 12 ") == {"012"}
    assert len(select_ids("1-32")) == 32
    for bad in ("", "a-3", "5-1", "1,,2", "1-2-3"):
        with pytest.raises(ConfigError):
            select_ids(bad)


def write_images(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        cv2.imwrite(str(folder / name), np.zeros((8, 8), np.uint8))


def test_list_pairs_matches_names_then_numbers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ld, hd = tmp_path / "ld", tmp_path / "hd"
    write_images(ld, ["a.png", "low_001.png", "low_002.png", "low_009.png"])
    write_images(hd, ["a.png", "high_001.png", "high_002.png", "high_010.png"])
    (ld / "notes.txt").write_text("ignored\n")
    with caplog.at_level(logging.WARNING, logger="cemi_stream.denoise.pairs"):
        pairs = list_pairs(ld, hd)
    assert [(n, p.name, q.name) for n, p, q in pairs] == [
        ("001", "low_001.png", "high_001.png"),
        ("002", "low_002.png", "high_002.png"),
        ("a", "a.png", "a.png"),
    ]
    assert "low_009.png" in caplog.text and "high_010.png" in caplog.text
    assert "notes.txt" not in caplog.text


def test_list_pairs_errors(tmp_path: Path) -> None:
    ld, hd = tmp_path / "ld", tmp_path / "hd"
    write_images(ld, ["low_001.png"])
    with pytest.raises(DenoiseError, match="HD folder does not exist"):
        list_pairs(ld, hd)
    write_images(hd, ["high_002.png"])
    with pytest.raises(DenoiseError, match="no LD/HD pairs"):
        list_pairs(ld, hd)
    with pytest.raises(DenoiseError, match="LD folder does not exist"):
        load_aligned_pairs(tmp_path / "nope", hd)


def test_subpixel_alignment_resamples_hd_onto_the_ld_grid(kriss_hd: np.ndarray) -> None:
    # LD sees the specimen shifted by a fractional (dy, dx); the whole-pixel
    # crop leaves up to half a pixel, the sub-pixel resampling (nearly) none.
    clean = kriss_hd.astype(np.float32)
    dy, dx = 2.5, -1.5
    warp = np.float32([[1, 0, dx], [0, 1, dy]])
    size = (clean.shape[1], clean.shape[0])
    flags = cv2.INTER_CUBIC | cv2.WARP_INVERSE_MAP
    ld_clean = cv2.warpAffine(clean, warp, size, flags=flags, borderMode=cv2.BORDER_REFLECT)
    rng = np.random.default_rng(3)
    ld = np.clip(ld_clean + rng.normal(0, 30, clean.shape), 0, 255).astype(np.uint8)
    hd = kriss_hd
    errors = {}
    for subpixel in (False, True):
        pair = align_pair(ld, hd, name="frac", subpixel=subpixel)
        assert pair.ld.shape == pair.hd.shape
        assert pair.ld_rect is not None and pair.frame_crop is not None
        truth = pair.ld_rect.apply(pair.frame_crop.apply(ld_clean))
        errors[subpixel] = float(np.abs(truth - pair.hd.astype(np.float32)).mean())
    assert errors[True] < 0.5 * errors[False], errors
