"""Simulated segmenter training data: deterministic, exact masks, both classes, all kinds."""

from __future__ import annotations

import numpy as np
import pytest

from cemi_stream.analysis.lamellae import local_period
from cemi_stream.analysis.simlabels import sim_sample, sim_samples
from cemi_stream.errors import AnalysisError


@pytest.fixture(scope="module")
def series() -> list:
    return sim_samples(30, seed=0, size=96)


def test_deterministic_by_seed_and_index() -> None:
    a, b = sim_sample(3, 0, 64), sim_sample(3, 0, 64)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.mask, b.mask)
    assert a.info == b.info
    assert not np.array_equal(sim_sample(4, 0, 64).image, a.image)
    assert not np.array_equal(sim_sample(3, 1, 64).image, a.image)


def test_frames_masks_and_variety(series: list) -> None:
    for s in series:
        assert s.image.shape == (96, 96) and s.image.dtype == np.uint8
        assert s.mask.shape == (96, 96) and s.mask.dtype == bool
        assert s.info["lamellar_fraction"] == pytest.approx(s.mask.mean(), abs=1e-4)
        assert s.image.std() > 2  # never blank
    fractions = [s.mask.mean() for s in series]
    assert min(fractions) == 0.0 and max(fractions) == 1.0
    assert sum(0.05 < f < 0.95 for f in fractions) >= 10
    kinds = {s.info.get("lamellae") for s in series} - {None}
    assert kinds == {"eutectic", "straight"}
    backgrounds = {b for s in series for b in s.info["background"]}
    assert {"blobs", "particles", "grains", "network", "smooth"} <= backgrounds
    assert len({s.info["dose"] for s in series}) >= 4


def test_lamellae_are_where_the_mask_says() -> None:
    # On straight lamellae filling the frame the classical spectrum finds the stated period.
    s = next(
        s
        for i in range(200)
        if (s := sim_sample(i, 0, 128)).info["region"] == "all"
        and s.info["lamellae"] == "straight"
        and s.info["dose"] in ("nonex1", "hdx1")
    )
    lp = local_period(s.image.astype(np.float32), 64, step_px=64)
    period = float(np.median(lp.period_px))
    assert period == pytest.approx(s.info["period_px"], rel=0.2)


def test_bad_arguments() -> None:
    with pytest.raises(AnalysisError, match="size"):
        sim_sample(0, 0, 16)
    with pytest.raises(AnalysisError, match="index"):
        sim_sample(-1)
    with pytest.raises(AnalysisError, match="--sim"):
        sim_samples(-2)
