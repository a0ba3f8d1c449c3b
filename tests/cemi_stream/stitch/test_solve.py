"""Global least-squares refinement with outlier rejection."""

from __future__ import annotations

import numpy as np
import pytest

from cemi_stream.errors import CemiError
from cemi_stream.stitch.solve import MOTION, Constraint, solve_positions


def _grid(
    rows: int, cols: int, step: tuple[float, float] = (500.0, 380.0)
) -> dict[int, tuple[float, float]]:
    rng = np.random.default_rng(0)
    return {
        r * cols + c: (c * step[0] + rng.normal(0, 5), r * step[1] + rng.normal(0, 5))
        for r in range(rows)
        for c in range(cols)
    }


def _constraints(
    truth: dict[int, tuple[float, float]], cols: int, noise: float
) -> list[Constraint]:
    rng = np.random.default_rng(1)
    out = []
    for seq in truth:
        c = seq % cols
        for other, kind in ((seq + 1, "frame"), (seq + cols, "row")):
            if other in truth and (kind == "row" or c + 1 < cols):
                d = np.subtract(truth[other], truth[seq]) + rng.normal(0, noise, 2)
                out.append(Constraint(seq, other, float(d[0]), float(d[1]), 0.9, kind))
    return out


def test_recovers_a_grid_from_noisy_pairs() -> None:
    truth = _grid(3, 10)
    cons = _constraints(truth, 10, noise=0.2)
    sol = solve_positions(list(truth), cons, {}, {0: truth[0]})
    err = [np.hypot(*np.subtract(sol.positions[s], truth[s])) for s in truth]
    assert max(err) < 1.0  # 0.2 px noise per pair, accumulated along rows
    stats = sol.stats()
    assert stats["rejected"] == 0 and stats["rms_px"] < 0.5


def test_outlier_is_rejected() -> None:
    truth = _grid(3, 10)
    cons = _constraints(truth, 10, noise=0.1)
    bad = cons[5]
    cons[5] = Constraint(bad.i, bad.j, bad.dx + 40.0, bad.dy - 25.0, bad.weight, bad.kind)
    sol = solve_positions(list(truth), cons, {}, {0: truth[0]})
    assert sol.rejected == [5]
    err = [np.hypot(*np.subtract(sol.positions[s], truth[s])) for s in truth]
    assert max(err) < 0.5


def test_fixed_frames_anchor_the_free_ones() -> None:
    truth = _grid(2, 5)
    cons = _constraints(truth, 5, noise=0.0)
    fixed = {s: truth[s] for s in range(5)}
    sol = solve_positions(list(range(5, 10)), cons, fixed)
    assert set(sol.positions) == set(range(5, 10))
    for s in range(5, 10):
        assert sol.positions[s] == pytest.approx(truth[s], abs=1e-6)


def test_motion_prior_holds_an_unregistered_frame() -> None:
    cons = [
        Constraint(0, 1, 100.0, 0.0, 0.9, "frame"),
        Constraint(1, 2, 98.0, 1.0, 1e-3, MOTION),  # frame 2 failed to register
    ]
    sol = solve_positions([0, 1, 2], cons, {}, {0: (0.0, 0.0)})
    assert sol.positions[2] == pytest.approx((198.0, 1.0), abs=1e-3)


def test_unconnected_frame_without_initial_position_is_an_error() -> None:
    with pytest.raises(CemiError, match="unconnected"):
        solve_positions([0, 1], [], {}, {0: (0.0, 0.0)})
