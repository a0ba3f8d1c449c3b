"""Stage traversals: overlaps, order, backlash, drift, video rows, determinism."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from drivers.sim.config import SimConfig
from drivers.sim.traversal import plan_traversal

SMALL = SimConfig(rows=3, frames_per_row=6, frame_width=256, frame_height=192)
PERFECT = dataclasses.replace(SMALL, jitter_px=0.0, backlash_px=0.0, drift_px_per_frame=0.0)


def test_image_mode_counts_rows_and_overlap() -> None:
    plan = plan_traversal(SMALL)
    assert len(plan) == 18
    assert list(plan.row) == [r for r in range(3) for _ in range(6)]
    dx = np.diff(plan.x)[np.diff(plan.row) == 0]
    overlap = 1.0 - np.abs(dx) / 256
    # Jitter (+-10 px each) and backlash move the overlap by < 0.1.
    assert np.all(np.abs(overlap - 0.5) < 0.1)
    assert abs(overlap.mean() - 0.5) < 0.04
    # Rows are (1 - overlap) * height apart.
    row_y = [plan.y[plan.row == r].mean() for r in range(3)]
    np.testing.assert_allclose(np.diff(row_y), 96.0, atol=8.0)


def test_perfect_stage_is_exact_and_commanded_is_jitter_free() -> None:
    plan = plan_traversal(dataclasses.replace(PERFECT, overlap=0.3))
    np.testing.assert_allclose(plan.x - plan.stage_x, 0.0, atol=1e-9)
    np.testing.assert_allclose(plan.y - plan.stage_y, 0.0, atol=1e-9)
    noisy = plan_traversal(dataclasses.replace(SMALL, overlap=0.3))
    step = np.diff(noisy.stage_x)[np.diff(noisy.row) == 0]
    np.testing.assert_allclose(step, 0.7 * 256)
    assert np.abs(noisy.x - noisy.stage_x).max() > 1.0


def test_positions_never_negative() -> None:
    for config in (
        SMALL,
        dataclasses.replace(SMALL, serpentine=True, jitter_px=60.0, drift_px_per_frame=5.0),
        dataclasses.replace(SMALL, video=True, serpentine=True, drift_px_per_frame=2.0),
    ):
        plan = plan_traversal(config)
        assert plan.x.min() >= 0
        assert plan.y.min() >= 0
        assert plan.stage_x.min() >= 0
        assert plan.stage_y.min() >= 0


def test_raster_and_serpentine_order() -> None:
    raster = plan_traversal(PERFECT)
    serp = plan_traversal(dataclasses.replace(PERFECT, serpentine=True))
    for r in range(3):
        rx = raster.stage_x[raster.row == r]
        sx = serp.stage_x[serp.row == r]
        assert np.all(np.diff(rx) > 0)
        assert rx[0] == raster.stage_x[0]
        if r % 2 == 0:
            assert np.all(np.diff(sx) > 0)
        else:
            assert np.all(np.diff(sx) < 0)
            assert sx[0] == serp.stage_x[serp.row == r - 1][-1]


def test_backlash_at_row_starts_and_reversals() -> None:
    config = dataclasses.replace(PERFECT, backlash_px=4.0)
    raster = plan_traversal(config)
    error = raster.x - raster.stage_x
    first = np.r_[True, np.diff(raster.row) != 0]
    # After each return the carriage sits on the far side of the play.
    np.testing.assert_allclose(error[first], 2.0)
    np.testing.assert_allclose(error[~first], -2.0)
    serp = plan_traversal(dataclasses.replace(config, serpentine=True))
    error = serp.x - serp.stage_x
    forward = serp.row % 2 == 0
    # Moving +x the carriage lags by -2, moving -x by +2 (except at turns).
    assert np.median(error[forward]) == pytest.approx(-2.0)
    assert np.median(error[~forward]) == pytest.approx(2.0)


def test_drift_is_slow_and_bounded() -> None:
    config = dataclasses.replace(PERFECT, drift_px_per_frame=0.5)
    plan = plan_traversal(config)
    offset = np.hypot(plan.x - plan.stage_x, plan.y - plan.stage_y)
    assert offset.max() <= 0.5 * (len(plan) - 1) + 1e-6
    assert offset[-1] > 0.5  # it does drift
    step = np.hypot(np.diff(plan.x - plan.stage_x), np.diff(plan.y - plan.stage_y))
    np.testing.assert_allclose(step, 0.5, atol=1e-9)


def test_video_mode_overlap_and_row_jumps() -> None:
    config = dataclasses.replace(SMALL, video=True)
    plan = plan_traversal(config)
    span = 5 * 128.0
    per_row = int(span / (0.05 * 256)) + 1
    assert len(plan) == 3 * per_row
    dx = np.diff(plan.x)
    same_row = np.diff(plan.row) == 0
    overlap = 1.0 - np.abs(dx[same_row]) / 256
    assert abs(np.median(overlap) - 0.95) < 0.005
    assert np.all(np.abs(overlap - 0.95) < 0.03)
    # Each row change is an abrupt return to the row start and a step in y.
    jumps = np.flatnonzero(~same_row)
    assert len(jumps) == 2
    assert np.all(dx[jumps] < -0.8 * span)
    assert np.all(np.diff(plan.y)[jumps] > 80)
    # Vibration is small: no frame strays more than 2 px from its row line.
    for r in range(3):
        y = plan.y[plan.row == r]
        assert np.ptp(y) < 4.0


def test_video_serpentine_reverses() -> None:
    plan = plan_traversal(dataclasses.replace(SMALL, video=True, serpentine=True, rows=2))
    assert np.all(np.diff(plan.x[plan.row == 0]) > 0)
    assert np.all(np.diff(plan.x[plan.row == 1]) < 0)


def test_deterministic_by_seed() -> None:
    a = plan_traversal(SMALL)
    b = plan_traversal(SMALL)
    c = plan_traversal(dataclasses.replace(SMALL, seed=1))
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.y, b.y)
    assert np.abs(a.x - c.x).max() > 0.5
    step = a[4]
    assert (step.index, step.row) == (4, 0)
    assert step.x_px == a.x[4]
    assert step.stage_y_px == a.stage_y[4]
    assert len(list(a)) == len(a)
    with pytest.raises(IndexError):
        a[len(a)]
