"""The imaging model: ground truth, noise presets, data bar, determinism."""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest

from drivers.sim.calibration import noise_stats, pair_noise_contrast
from drivers.sim.config import SimConfig
from drivers.sim.databar import databar_height
from drivers.sim.scanner import PRESETS, Scanner, bandwidth_kernel, standard_normal
from drivers.sim.source import SimSource
from drivers.sim.specimen import ImageSpecimen, ProceduralSpecimen

W, H = 256, 192


def _frames(config: SimConfig) -> tuple[SimSource, list[np.ndarray]]:
    source = SimSource(config)
    source.open()
    frames = []
    while (frame := source.read()) is not None:
        frames.append(frame.image)
    return source, frames


def _expected(source: SimSource, x: float, y: float) -> np.ndarray:
    """Noise-free frame rebuilt independently: crop, blur, grey map, round."""
    m = 6
    patch = source.specimen.region(x - m, y - m, W + 2 * m, H + 2 * m)
    blurred = cv2.GaussianBlur(patch, (0, 0), PRESETS["none"].blur_sigma_px)[m:-m, m:-m]
    p = PRESETS["none"]
    grey = p.white_grey * (p.base_yield + (1 - p.base_yield) * blurred)
    return np.clip(grey + 0.5, 0, 255).astype(np.uint8)


def test_noise_free_frames_are_the_specimen_at_the_truth() -> None:
    config = SimConfig(rows=2, frames_per_row=3, frame_width=W, frame_height=H, noise="none")
    source, frames = _frames(config)
    assert len(source.truth) == len(frames) == 6
    for image, rec in zip(frames, source.truth, strict=True):
        expected = _expected(source, rec.x_px, rec.y_px)
        diff = np.abs(image.astype(int) - expected.astype(int))
        assert diff.mean() < 0.6
        assert diff.max() <= 6
        # One pixel off the truth is clearly worse: the check has teeth.
        wrong = _expected(source, rec.x_px + 1.0, rec.y_px)
        assert np.abs(image.astype(int) - wrong.astype(int)).mean() > 5 * diff.mean() + 1


def test_integer_truth_gives_exact_crop() -> None:
    config = SimConfig(
        rows=1,
        frames_per_row=3,
        frame_width=W,
        frame_height=H,
        noise="none",
        jitter_px=0.0,
        backlash_px=0.0,
        drift_px_per_frame=0.0,
    )
    source, frames = _frames(config)
    for image, rec in zip(frames, source.truth, strict=True):
        assert rec.x_px == int(rec.x_px)
        assert rec.y_px == int(rec.y_px)
        np.testing.assert_array_equal(image, _expected(source, rec.x_px, rec.y_px))


def test_phase_correlation_matches_truth_in_video() -> None:
    config = SimConfig(
        rows=2, frames_per_row=2, frame_width=W, frame_height=H, noise="none", video=True, seed=1
    )
    source, frames = _frames(config)
    errors = []
    for k in range(len(frames) - 1):
        a, b = source.truth[k], source.truth[k + 1]
        if a.row != b.row:
            continue
        (dx, dy), _ = cv2.phaseCorrelate(
            frames[k].astype(np.float32), frames[k + 1].astype(np.float32)
        )
        # Frame k+1 shows the specimen moved by -(truth difference).
        errors.append(max(abs(-dx - (b.x_px - a.x_px)), abs(-dy - (b.y_px - a.y_px))))
    assert len(errors) >= 20
    assert max(errors) < 0.5


def test_phase_correlation_matches_truth_in_image_mode() -> None:
    config = SimConfig(
        rows=2, frames_per_row=4, frame_width=W, frame_height=H, noise="none", overlap=0.7
    )
    source, frames = _frames(config)
    window = cv2.createHanningWindow((W, H), cv2.CV_32F)
    for k in range(len(frames) - 1):
        a, b = source.truth[k], source.truth[k + 1]
        if a.row != b.row:
            continue
        (dx, dy), _ = cv2.phaseCorrelate(
            frames[k].astype(np.float32), frames[k + 1].astype(np.float32), window
        )
        assert abs(-dx - (b.x_px - a.x_px)) < 0.5
        assert abs(-dy - (b.y_px - a.y_px)) < 0.5


def test_ld_is_noisier_than_hd() -> None:
    spec = ProceduralSpecimen(seed=0, tile_size=128)
    clean = Scanner("none").render(spec, 400.3, 300.7, W, H, np.random.default_rng(0))
    residual = {}
    for name in ("ld", "hd"):
        frame = Scanner(name).render(spec, 400.3, 300.7, W, H, np.random.default_rng(1))
        residual[name] = float((frame.astype(np.float32) - clean).std())
    assert residual["ld"] > 6 * residual["hd"]
    assert 8.0 < residual["ld"] < 40.0
    assert residual["hd"] < 5.0


def test_noise_statistics_of_presets_on_a_flat_wedge() -> None:
    # Eight flat bands of increasing yield: the estimators are exact there.
    wedge = np.repeat(np.linspace(0.1, 0.9, 8), 64)[None, :].repeat(256, axis=0)
    spec = ImageSpecimen((wedge * 255).astype(np.uint8))
    stats = {}
    for name in ("ld", "hd"):
        frame = Scanner(name).render(spec, 0.0, 0.0, 512, 256, np.random.default_rng(2))
        stats[name] = noise_stats(frame)
    ld, hd = stats["ld"], stats["hd"]
    assert 0.9 < ld.poisson_exponent < 1.15  # shot noise
    assert 0.25 < hd.poisson_exponent < 0.8  # shot + detector noise
    assert 0.4 < ld.rho_x < 0.6  # detector bandwidth, as on real fast scans
    assert 0.1 < hd.rho_x < 0.3
    assert 0.08 < ld.noise_contrast < 0.16
    assert 0.005 < hd.noise_contrast < 0.02


def test_pair_noise_of_ld_on_procedural_specimen_in_range() -> None:
    spec = ProceduralSpecimen(seed=0, tile_size=128)
    ratios = []
    for k in range(3):
        x, y = 300.0 + 700 * k, 200.0 + 300 * k
        noisy = Scanner("ld").render(spec, x, y, 384, 320, np.random.default_rng(k))
        clean = Scanner("hd").render(spec, x, y, 384, 320, np.random.default_rng(k + 10))
        ratios.append(pair_noise_contrast(noisy, clean))
    assert 0.07 < float(np.median(ratios)) < 0.16


def test_databar_replaces_bottom_rows() -> None:
    base = SimConfig(rows=1, frames_per_row=1, frame_width=W, frame_height=H, noise="hd")
    _, (plain,) = _frames(base)
    _, (barred,) = _frames(dataclasses.replace(base, databar=True))
    assert barred.shape == (H, W)
    bar_h = databar_height(H)
    assert 0.07 * H <= bar_h <= 0.09 * H + 1
    bar = barred[H - bar_h :]
    assert (bar == 0).mean() > 0.6  # black band
    assert (bar > 200).sum() > 40  # white text and scale bar
    # Only the bar differs, the image above is untouched.
    np.testing.assert_array_equal(barred[: H - bar_h], plain[: H - bar_h])
    assert (plain[H - bar_h :] == 0).mean() < 0.2


def test_frames_are_deterministic_by_seed() -> None:
    config = SimConfig(rows=1, frames_per_row=2, frame_width=W, frame_height=H)
    _, a = _frames(config)
    _, b = _frames(config)
    _, c = _frames(dataclasses.replace(config, seed=7))
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])
    # Any frame can be re-rendered on its own: independent of read order.
    source = SimSource(config)
    source.open()
    np.testing.assert_array_equal(source.render(1), a[1])


def test_fast_normals_and_bandwidth_kernel() -> None:
    z = standard_normal(np.random.default_rng(0), (512, 512))
    assert z.dtype == np.float32
    assert abs(float(z.mean())) < 0.01
    assert abs(float(z.var()) - 1.0) < 0.01
    assert abs(float(np.mean(z**4)) - 3.0) < 0.1  # Gaussian kurtosis (sd 0.02)
    kernel, lag = bandwidth_kernel(0.5)
    assert kernel.sum() == pytest.approx(1.0, abs=1e-6)
    assert lag == pytest.approx(1.0, abs=0.02)  # a / (1 - a)
    assert kernel[0, kernel.shape[1] // 2 + 1 :].sum() == 0.0  # causal
    flat, none_lag = bandwidth_kernel(0.0)
    assert flat.shape == (1, 1)
    assert none_lag == 0.0
