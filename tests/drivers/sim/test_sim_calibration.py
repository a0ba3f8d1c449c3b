"""The LD/HD presets against the real KRISS fast and slow scans."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from drivers.sim.calibration import kriss_pairs, noise_stats, pair_noise_contrast, read_kriss
from drivers.sim.scanner import Scanner
from drivers.sim.specimen import ImageSpecimen

PAIRS = 4


@pytest.mark.realdata
def test_ld_preset_matches_real_fast_scans(data_dir: Path) -> None:
    pairs = kriss_pairs(data_dir, "time")[:PAIRS]
    real_single, real_pair, sim_single, sim_pair = [], [], [], []
    for k, (low_path, high_path) in enumerate(pairs):
        low, high = read_kriss(low_path), read_kriss(high_path)
        real_single.append(noise_stats(low))
        real_pair.append(pair_noise_contrast(low, high))
        # Same content as the real pair: the clean frame, smoothed, as specimen.
        specimen = ImageSpecimen(cv2.GaussianBlur(high, (0, 0), 1.5) / np.float32(255))
        rng = np.random.default_rng(k)
        ld = Scanner("ld").render(specimen, 0.0, 0.0, 510, 440, rng)
        hd = Scanner("hd").render(specimen, 0.0, 0.0, 510, 440, rng)
        sim_single.append(noise_stats(ld))
        sim_pair.append(pair_noise_contrast(ld, hd))

    def median(stats: list, key: str) -> float:
        return float(np.median([getattr(s, key) for s in stats]))

    ratio = median(sim_single, "noise_contrast") / median(real_single, "noise_contrast")
    assert abs(ratio - 1.0) < 0.25
    pair_ratio = float(np.median(sim_pair) / np.median(real_pair))
    assert abs(pair_ratio - 1.0) < 0.25
    assert abs(median(sim_single, "rho_x") / median(real_single, "rho_x") - 1.0) < 0.25
    assert (
        abs(median(sim_single, "poisson_exponent") - median(real_single, "poisson_exponent")) < 0.25
    )


@pytest.mark.realdata
def test_hd_preset_matches_real_slow_scans(data_dir: Path) -> None:
    pairs = kriss_pairs(data_dir, "time")[:PAIRS]
    real, sim = [], []
    for k, (_, high_path) in enumerate(pairs):
        high = read_kriss(high_path)
        real.append(noise_stats(high).noise_contrast)
        specimen = ImageSpecimen(cv2.GaussianBlur(high, (0, 0), 1.5) / np.float32(255))
        frame = Scanner("hd").render(specimen, 0.0, 0.0, 510, 440, np.random.default_rng(k))
        sim.append(noise_stats(frame).noise_contrast)
    assert abs(float(np.median(sim) / np.median(real)) - 1.0) < 0.25
