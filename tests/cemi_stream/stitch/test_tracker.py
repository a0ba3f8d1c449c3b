"""Online position finding on simulated traversals with exact ground truth."""

from __future__ import annotations

import numpy as np
import pytest

from cemi_stream.stitch.register import RegisterConfig, Registrar
from cemi_stream.stitch.solve import Constraint, solve_positions
from cemi_stream.stitch.tracker import PathTracker, Placement, final_statuses
from drivers.sim import SimConfig, SimSource


def _track(
    config: SimConfig, use_rows: bool = False
) -> tuple[list[Placement], SimSource, PathTracker]:
    source = SimSource(config)
    source.open()
    tracker: PathTracker | None = None
    out = []
    seq = 0
    while (frame := source.read()) is not None:
        if tracker is None:
            tracker = PathTracker(Registrar(RegisterConfig()), frame.shape)
        row = frame.meta.row if use_rows else None
        out.append(tracker.add(seq, frame.meta.src_index, frame.image, row))
        seq += 1
    assert tracker is not None
    return out, source, tracker


def _errors(placements: list[Placement], source: SimSource, solved: bool) -> np.ndarray:
    if solved:
        cons = [c for p in placements for c in p.constraints]
        sol = solve_positions([p.seq for p in placements], cons, {}, {0: (0.0, 0.0)})
        est = np.array([sol.positions[p.seq] for p in placements])
    else:
        est = np.array([(p.x, p.y) for p in placements])
    truth = np.array([(r.x_px, r.y_px) for r in source.truth])
    diff = est - truth
    diff -= np.median(diff, axis=0)  # the mosaic frame is defined up to a translation
    return np.hypot(diff[:, 0], diff[:, 1])


@pytest.mark.parametrize("serpentine", [False, True])
def test_flat_folder_path_is_found_from_the_images(serpentine: bool) -> None:
    """No rows, no positions: row changes are recognised from the images alone."""
    config = SimConfig(
        rows=3, frames_per_row=6, frame_width=512, frame_height=384, noise="ld", seed=3,
        serpentine=serpentine, report_stage=False,
    )  # fmt: skip
    placements, source, tracker = _track(config)
    assert [p.row for p in placements] == [r.row for r in source.truth]
    assert tracker.layout == ("serpentine" if serpentine else "raster")
    assert all(p.status == "placed" for p in placements)
    err = _errors(placements, source, solved=True)
    assert float(np.median(err)) < 0.3 and float(err.max()) < 1.0


def test_row_field_from_the_header_is_used() -> None:
    config = SimConfig(rows=2, frames_per_row=5, frame_width=512, frame_height=384, seed=9)
    placements, source, _ = _track(config, use_rows=True)
    assert [p.row for p in placements] == [r.row for r in source.truth]
    row_links = [c for p in placements if p.row == 1 for c in p.constraints if c.kind == "row"]
    assert len(row_links) >= 5  # every frame of row 1 is tied to row 0


def test_blank_frame_is_predicted_not_misplaced() -> None:
    config = SimConfig(rows=1, frames_per_row=6, frame_width=512, frame_height=384, seed=2)
    source = SimSource(config)
    source.open()
    frames = []
    while (f := source.read()) is not None:
        frames.append(f)
    tracker = PathTracker(Registrar(RegisterConfig()), frames[0].shape)
    out = []
    for seq, f in enumerate(frames):
        image = np.full_like(f.image, 90) if seq == 3 else f.image
        out.append(tracker.add(seq, f.meta.src_index, image, None))
    assert out[3].status == "predicted" and out[3].score == 0.0
    truth = source.truth
    # Predicted by the velocity: within a few tens of pixels of the truth.
    est = out[3].x - out[2].x
    assert abs(est - (truth[3].x_px - truth[2].x_px)) < 40
    # At 50 % overlap the next frame only overlaps the blank one: predicted too,
    # and the chain resumes after it (the next row's links would pin them).
    assert out[4].status == "predicted"
    assert out[5].status == "placed"
    assert all(p.row == 0 for p in out)


def _frames(config: SimConfig) -> tuple[list, SimSource]:  # type: ignore[type-arg]
    source = SimSource(config)
    source.open()
    frames = []
    while (f := source.read()) is not None:
        frames.append(f)
    return frames, source


def _solved_errors(placements: list[Placement], source: SimSource) -> np.ndarray:
    provisional = {p.seq: (p.x, p.y) for p in placements}
    cons = [c for p in placements for c in p.constraints]
    sol = solve_positions([p.seq for p in placements], cons, {}, provisional)
    est = np.array([sol.positions[p.seq] for p in placements])
    truth = np.array([(r.x_px, r.y_px) for r in source.truth])
    diff = est - truth
    diff -= diff[0]
    return np.hypot(diff[:, 0], diff[:, 1])


def test_unregistrable_first_pair_is_held_then_placed_by_later_frames() -> None:
    """No motion known, no stage: a frame that misses its predecessor is held, not put on an
    invented path, and the next row's links place it (and the frames behind it)."""
    config = SimConfig(
        rows=2, frames_per_row=6, frame_width=512, frame_height=384, overlap=0.5, noise="ld",
        seed=4, report_stage=False, jitter_px=0.0,
    )  # fmt: skip
    frames, source = _frames(config)
    keep = [k for k in range(len(frames)) if k != 1]  # a stage jump: frames 0 and 2 only touch
    tracker = PathTracker(Registrar(RegisterConfig()), frames[0].shape)
    out = [
        tracker.add(seq, frames[k].meta.src_index, frames[k].image, None)
        for seq, k in enumerate(keep)
    ]
    assert out[1].status == "predicted" and out[1].reason.startswith("held")
    assert [p.row for p in out] == [source.truth[k].row for k in keep]
    final = final_statuses(out)
    assert all(status == "placed" for status, _ in final.values()), final
    provisional = {p.seq: (p.x, p.y) for p in out}
    cons = [c for p in out for c in p.constraints]
    sol = solve_positions([p.seq for p in out], cons, {}, provisional)
    est = np.array([sol.positions[p.seq] for p in out])
    truth = np.array([(source.truth[k].x_px, source.truth[k].y_px) for k in keep])
    diff = est - truth
    err = np.hypot(*(diff - np.median(diff, axis=0)).T)
    # The island is tied through row links only: a little less precise.
    assert float(err.max()) < 1.5, err


def test_broken_chain_is_reanchored_on_the_frame_before() -> None:
    config = SimConfig(
        rows=1, frames_per_row=7, frame_width=512, frame_height=384, overlap=0.6, noise="ld",
        seed=6, report_stage=False,
    )  # fmt: skip
    frames, source = _frames(config)
    tracker = PathTracker(Registrar(RegisterConfig()), frames[0].shape)
    rng = np.random.default_rng(0)
    out = []
    for seq, f in enumerate(frames):
        image = rng.integers(0, 256, f.image.shape, dtype=np.uint8) if seq == 3 else f.image
        out.append(tracker.add(seq, f.meta.src_index, image, None))
    assert out[3].status == "predicted" and out[3].reason.startswith("motion")
    links = [c for c in out[4].constraints if c.kind == "link"]
    assert out[4].status == "placed" and links and links[0].i == 2
    final = final_statuses(out)
    assert final[3][0] == "predicted" and all(final[s][0] == "placed" for s in (0, 1, 2, 4, 5, 6))
    err = _solved_errors(out, source)
    assert float(np.delete(err, 3).max()) < 1.0, err


def test_final_statuses_name_islands() -> None:
    c = Constraint
    placements = [
        Placement(0, 0, 0, 0.0, 0.0, 1.0, "placed"),
        Placement(1, 1, 0, 100.0, 0.0, 0.9, "placed", [c(0, 1, 100.0, 0.0, 0.9, "frame")]),
        Placement(
            2,
            2,
            0,
            200.0,
            0.0,
            0.0,
            "predicted",
            [c(1, 2, 100.0, 0.0, 1e-3, "motion")],
            "motion: noise",
        ),
        Placement(3, 3, 0, 300.0, 0.0, 0.9, "placed", [c(2, 3, 100.0, 0.0, 0.9, "frame")]),
    ]
    final = final_statuses(placements)
    assert final[0] == final[1] == ("placed", "")
    assert final[2] == ("predicted", "motion: noise")
    assert final[3][0] == "predicted" and final[3][1].startswith("island")


def test_missed_row_change_at_the_row_length_is_placed_by_the_row_step() -> None:
    """A frame at the length of the previous row that matches neither its predecessor nor a
    row end starts the next row (placed by the last row step), not one more frame along the
    row: predicted along the row it would put the whole next row a row's length off."""
    config = SimConfig(
        rows=3, frames_per_row=5, frame_width=512, frame_height=384, overlap=0.4, noise="ld",
        seed=11, report_stage=False,
    )  # fmt: skip
    frames, source = _frames(config)
    tracker = PathTracker(Registrar(RegisterConfig()), frames[0].shape)
    rng = np.random.default_rng(0)
    out = []
    for seq, f in enumerate(frames):
        image = f.image
        if seq == 10:  # the first frame of row 2: pure noise, registers against nothing
            image = rng.integers(60, 200, size=image.shape).astype(np.uint8)
        out.append(tracker.add(seq, f.meta.src_index, image, None))
    assert out[10].row == 2 and out[10].status == "predicted"
    assert out[10].reason.startswith("row_step"), out[10].reason
    # Within a stage jitter of the truth, not a row's length off.
    truth = source.truth
    est = (out[10].x - out[5].x, out[10].y - out[5].y)
    true = (truth[10].x_px - truth[5].x_px, truth[10].y_px - truth[5].y_px)
    assert np.hypot(est[0] - true[0], est[1] - true[1]) < 40
    # The rest of row 2 is on its own row, placed (tied by row links), and where it belongs.
    assert [p.row for p in out[11:]] == [2] * 4
    err = _solved_errors(out, source)
    assert float(err[11:].max()) < 2.0, err
