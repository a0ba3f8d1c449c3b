"""Keyframe selection on simulated video with known stage motion."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from cemi_stream.capture.keyframes import (
    KeyframeSelector,
    PhaseCorrelator,
    overlap_fraction,
)
from cemi_stream.config import KeyframeConfig
from cemi_stream.frame import Frame, FrameMeta
from drivers.sim import SimConfig, SimSource

W, H = 512, 384


def _run(config: SimConfig, kf: KeyframeConfig, keep_all: bool = False) -> tuple[list, SimSource]:
    source = SimSource(config)
    source.open()
    selector = KeyframeSelector(kf, keep_all=keep_all)
    decisions = []
    while (frame := source.read()) is not None:
        decisions += selector.push(frame)
    decisions += selector.flush()
    source.close()
    return decisions, source


@pytest.fixture(scope="module")
def video_run() -> tuple[list, SimSource]:
    config = SimConfig(
        rows=2, frames_per_row=6, frame_width=W, frame_height=H, video=True, noise="ld", seed=11
    )
    return _run(config, KeyframeConfig())


def test_every_input_frame_gets_one_decision_in_order(video_run: tuple[list, SimSource]) -> None:
    decisions, source = video_run
    assert [d.frame.meta.src_index for d in decisions] == list(range(len(source.truth)))


def test_kept_frames_overlap_inside_30_to_60_percent(video_run: tuple[list, SimSource]) -> None:
    decisions, source = video_run
    kept = [d for d in decisions if d.kept]
    overlaps = []
    for prev, cur in itertools.pairwise(kept):
        a = source.truth_for(prev.frame.meta.src_index)
        b = source.truth_for(cur.frame.meta.src_index)
        if a.row != b.row:
            assert cur.reason == "new_segment"  # the row return is detected
            continue
        true = overlap_fraction(b.x_px - a.x_px, b.y_px - a.y_px, W, H)
        if cur.reason != "overlap":
            # Extra frames that cover a row's end overlap more, never less.
            assert cur.reason in ("row_end", "last") and true >= 0.5, (cur.reason, true)
        else:
            overlaps.append(true)
            assert 0.30 <= true <= 0.60, (cur.frame.meta.src_index, true)
        # The estimated displacement is the true one to within a few pixels.
        assert cur.dx_px == pytest.approx(b.x_px - a.x_px, abs=3)
        assert cur.dy_px == pytest.approx(b.y_px - a.y_px, abs=3)
    assert len(overlaps) >= 6
    assert abs(float(np.median(overlaps)) - 0.5) < 0.03


def test_each_row_is_covered_to_its_end(video_run: tuple[list, SimSource]) -> None:
    decisions, source = video_run
    kept_rows = [source.truth_for(d.frame.meta.src_index).row for d in decisions if d.kept]
    assert sorted(set(kept_rows)) == [0, 1]
    last_of_row0 = max(r.src_index for r in source.truth if r.row == 0)
    last_kept_row0 = max(
        d.frame.meta.src_index
        for d in decisions
        if d.kept and source.truth_for(d.frame.meta.src_index).row == 0
    )
    row0_end = source.truth_for(last_of_row0)
    kept_end = source.truth_for(last_kept_row0)
    # The last keyframe of the row reaches within half a frame of the row's end.
    assert row0_end.x_px - kept_end.x_px < W / 2


def test_other_target_overlap() -> None:
    config = SimConfig(
        rows=1, frames_per_row=5, frame_width=W, frame_height=H, video=True, noise="ld", seed=5
    )
    decisions, source = _run(config, KeyframeConfig(overlap=0.35))
    kept = [source.truth_for(d.frame.meta.src_index) for d in decisions if d.kept]
    trues = [
        overlap_fraction(b.x_px - a.x_px, b.y_px - a.y_px, W, H)
        for a, b in itertools.pairwise(kept)
    ]
    # Within half a video step (2.5 %) of the target; the last one closes the row.
    assert all(0.32 <= t <= 0.38 for t in trues[:-1]), trues


def test_keep_all_mode_keeps_every_frame_with_displacements() -> None:
    config = SimConfig(rows=1, frames_per_row=4, frame_width=W, frame_height=H, noise="ld", seed=2)
    decisions, source = _run(config, KeyframeConfig(), keep_all=True)
    assert all(d.kept for d in decisions) and len(decisions) == len(source.truth)
    for prev, cur in zip(source.truth, source.truth[1:], strict=False):
        d = decisions[cur.src_index]
        assert d.dx_px == pytest.approx(cur.x_px - prev.x_px, abs=3)


def _textured(seed: int = 0, size: tuple[int, int] = (1200, 2400)) -> np.ndarray:
    import cv2

    rng = np.random.default_rng(seed)
    big = cv2.GaussianBlur(rng.random(size).astype(np.float32), (0, 0), 3)
    big += 2 * cv2.GaussianBlur(rng.random(size).astype(np.float32), (0, 0), 15)
    return ((big - big.min()) / (big.max() - big.min()) * 200 + 20).astype(np.float32)


def _crop(big: np.ndarray, x: int, y: int, noise: float, rng: np.random.Generator) -> Frame:
    image = big[y : y + H, x : x + W] + rng.normal(0, noise, (H, W))
    return Frame(np.clip(image, 0, 255).astype(np.uint8), FrameMeta(0, 0))


@pytest.mark.parametrize(("dx", "dy"), [(37, -5), (-120, 40), (300, 10), (-330, -20), (5, 250)])
def test_phase_correlation_sign_and_accuracy(dx: int, dy: int) -> None:
    big = _textured()
    rng = np.random.default_rng(1)
    pc = PhaseCorrelator(downsample=4, min_score=0.2)
    ref = pc.prepare(_crop(big, 600, 400, 20, rng))
    cur = pc.prepare(_crop(big, 600 + dx, 400 + dy, 20, rng))
    est = pc.estimate(ref, cur)
    assert est.reliable
    assert est.dx == pytest.approx(dx, abs=2) and est.dy == pytest.approx(dy, abs=2)


def test_no_overlap_is_unreliable() -> None:
    big = _textured()
    rng = np.random.default_rng(1)
    pc = PhaseCorrelator()
    est = pc.estimate(
        pc.prepare(_crop(big, 0, 0, 5, rng)), pc.prepare(_crop(big, 1500, 600, 5, rng))
    )
    assert not est.reliable


def test_stationary_stage_keeps_only_the_first_frame() -> None:
    big = _textured()
    rng = np.random.default_rng(4)
    selector = KeyframeSelector(KeyframeConfig())
    decisions = []
    for i in range(10):
        f = _crop(big, 100, 100, 15, rng)
        decisions += selector.push(Frame(f.image, FrameMeta(i, 0)))
    decisions += selector.flush()
    assert [d.kept for d in decisions] == [True] + [False] * 9
    assert {d.reason for d in decisions[1:]} == {"redundant"}


def test_rejections_stay_in_input_order_behind_a_held_frame() -> None:
    big = _textured()
    rng = np.random.default_rng(4)
    selector = KeyframeSelector(KeyframeConfig())
    out = []
    for i, x in enumerate([0, 60, 120]):
        f = _crop(big, x, 0, 5, rng)
        out += selector.push(Frame(f.image, FrameMeta(i, 0)))
    out += selector.reject(Frame(np.zeros((H, W), np.uint8), FrameMeta(3, 0)), "blank")
    f = _crop(big, 180, 0, 5, rng)
    out += selector.push(Frame(f.image, FrameMeta(4, 0)))
    out += selector.flush()
    assert [d.frame.meta.src_index for d in out] == [0, 1, 2, 3, 4]
    assert out[3].reason == "blank" and not out[3].kept
