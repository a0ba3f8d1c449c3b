"""The mosaic canvas: blending, growth, flushing, re-opening, pyramid, preview, reading."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import zarr

from cemi_stream.errors import CemiError
from cemi_stream.stitch.mosaic import (
    MosaicCanvas,
    MosaicError,
    downsample_mean,
    open_mosaic,
    shift_subpixel,
)

H, W = 48, 64  # small frames: sizes do not matter for these properties
FEATHER = 8.0


def ramp(n: int, frac: float) -> np.ndarray:
    """Independent feather: 0.5/F at the border pixel, 1 at F inside; n+1 samples."""
    u = np.arange(n + 1) - frac
    return np.clip((np.minimum(u, n - 1 - u) + 0.5) / FEATHER, 0, 1)


def reference(frames: list[np.ndarray], positions: list[tuple[float, float]]):
    """Straightforward in-memory composite: returns (uint8 image, (x0, y0) mosaic origin)."""
    x0 = min(math.floor(x) for x, _ in positions)
    y0 = min(math.floor(y) for _, y in positions)
    x1 = max(math.floor(x) for x, _ in positions) + W + 1
    y1 = max(math.floor(y) for _, y in positions) + H + 1
    total = np.zeros((y1 - y0, x1 - x0))
    weight = np.zeros_like(total)
    for img, (x, y) in zip(frames, positions, strict=True):
        ix, iy = math.floor(x), math.floor(y)
        fx, fy = x - ix, y - iy
        m = np.float32([[1, 0, fx], [0, 1, fy]])
        shifted = cv2.warpAffine(
            img.astype(np.float32), m, (W + 1, H + 1),
            flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE,
        )  # fmt: skip
        wgt = np.outer(ramp(H, fy), ramp(W, fx))
        sl = np.s_[iy - y0 : iy - y0 + H + 1, ix - x0 : ix - x0 + W + 1]
        total[sl] += shifted * wgt
        weight[sl] += wgt
    out = np.divide(total, weight, out=np.zeros_like(total), where=weight > 0)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8), (x0, y0)


def textured(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(10, 246, (H, W), dtype=np.uint8)


def traversal(rows: int, per_row: int, seed: int = 0) -> list[tuple[float, float]]:
    """Raster positions with jitter; fractions are multiples of 1/32 (warpAffine's grid)."""
    rng = np.random.default_rng(seed)
    out = []
    for r in range(rows):
        for i in range(per_row):
            jx, jy = rng.integers(-64, 64, 2) / 32
            out.append((i * 30.0 + jx - 40.0, r * 22.0 + jy - 10.0))
    return out


def canvas(tmp_path: Path, name: str = "m.ome.zarr", **kw) -> MosaicCanvas:
    kw.setdefault("chunk", 64)
    kw.setdefault("feather_px", FEATHER)
    return MosaicCanvas(tmp_path / name, (H, W), **kw)


def stored(path: Path) -> tuple[np.ndarray, tuple[int, int]]:
    view = open_mosaic(path)
    return np.asarray(view.array[...]), view.origin_xy


def crop(image: np.ndarray, origin: tuple[int, int], x0: int, y0: int, h: int, w: int):
    """Mosaic rectangle of a stored level-0 image, zero outside it."""
    out = np.zeros((h, w), np.uint8)
    ys, xs = y0 - origin[1], x0 - origin[0]
    part = image[max(ys, 0) : ys + h, max(xs, 0) : xs + w]
    out[max(-ys, 0) : max(-ys, 0) + part.shape[0], max(-xs, 0) : max(-xs, 0) + part.shape[1]] = part
    return out


def test_different_brightness_blends_without_step(tmp_path):
    c = canvas(tmp_path)
    c.add(np.full((H, W), 50, np.uint8), 0.0, 0.0)
    c.add(np.full((H, W), 150, np.uint8), 32.0, 0.0)
    info = c.finalize()
    image, origin = stored(info.path)
    row = crop(image, origin, 0, H // 2, 1, 32 + W)[0].astype(int)
    assert row[0] == 50 and row[-1] == 150
    steps = np.diff(row)
    assert (steps >= 0).all(), "the blend must be monotonic"
    assert steps.max() <= 100 / FEATHER + 1, f"a seam: step of {steps.max()} grey levels"
    assert (row == 100).sum() > 10, "the fully overlapped middle is the mean"


def test_integer_position_is_copied_exactly(tmp_path):
    rng = np.random.default_rng(1)
    img = textured(rng)
    c = canvas(tmp_path)
    c.add(img, -37.0, 5.0)
    info = c.finalize()
    image, origin = stored(info.path)
    assert np.array_equal(crop(image, origin, -37, 5, H, W), img)
    assert info.origin_xy == (-64, 0) and info.shape == (5 + H, -37 + W + 64)


def test_subpixel_position_matches_bilinear_shift(tmp_path):
    rng = np.random.default_rng(2)
    img = textured(rng)
    c = canvas(tmp_path)
    c.add(img, 10.25, 4.625)
    info = c.finalize()
    image, origin = stored(info.path)
    ref, (rx, ry) = reference([img], [(10.25, 4.625)])
    got = crop(image, origin, rx, ry, *ref.shape)
    diff = np.abs(got.astype(int) - ref)
    assert diff.max() <= 1
    # and it really is shifted: not the unshifted copy
    assert not np.array_equal(crop(image, origin, 10, 4, H, W), img)


@pytest.mark.parametrize("interpolation", ["linear", "cubic"])
def test_shift_reproduces_a_linear_ramp(interpolation):
    img = np.tile(np.arange(W, dtype=np.uint8) * 3, (H, 1))
    out = shift_subpixel(img, 0.25, 0.5, interpolation)
    assert out.shape == (H + 1, W + 1) and out.dtype == np.float32
    # away from the replicated borders the shifted ramp is the ramp at x - 0.25
    expected = (np.arange(W + 1) - 0.25) * 3
    np.testing.assert_allclose(out[5, 3 : W - 3], expected[3 : W - 3], atol=1e-3)


def test_full_coverage_has_no_holes(tmp_path):
    rng = np.random.default_rng(3)
    positions = traversal(3, 6, seed=3)
    c = canvas(tmp_path)
    for x, y in positions:
        c.add(textured(rng), x, y)
    info = c.finalize()
    image, origin = stored(info.path)
    # the interior of the union of frames (every pixel inside some frame)
    covered = np.zeros_like(image, bool)
    for x, y in positions:
        cx, cy = math.ceil(x) - origin[0], math.ceil(y) - origin[1]
        covered[cy : cy + H - 1, cx : cx + W - 1] = True
    assert covered.sum() > 0.5 * covered.size
    assert (image[covered] > 0).all(), "a covered pixel came out empty"


def test_grows_in_negative_directions(tmp_path):
    rng = np.random.default_rng(4)
    frames = [textured(rng) for _ in range(3)]
    positions = [(0.0, 0.0), (-300.0, -130.0), (200.0, -500.0)]
    c = canvas(tmp_path)
    for img, (x, y) in zip(frames, positions, strict=True):
        c.add(img, x, y)
        c.flush([])  # written at once: each frame is alone
    info = c.finalize()
    assert info.origin_xy == (-320, -512)
    assert info.shape == (0 + H + 512, 200 + W + 320)
    image, origin = stored(info.path)
    for img, (x, y) in zip(frames, positions, strict=True):
        assert np.array_equal(crop(image, origin, int(x), int(y), H, W), img)


def _run(c: MosaicCanvas, frames, positions, policy: str, per_row: int) -> list[int]:
    """Feed a raster traversal, flushing with a keep policy; returns tiles held after each."""
    held = []
    for k, (img, (x, y)) in enumerate(zip(frames, positions, strict=True)):
        c.add(img, x, y)
        rest = positions[k + 1 :]
        if policy == "settled":
            # everything from (just above) the current row down may still change
            keep = [(-math.inf, positions[k][1] - 4.0, math.inf, math.inf)] if rest else []
        else:  # the stitch stage's: only the rest of this row; later rows re-open
            row_end = (k // per_row + 1) * per_row
            row_rest = positions[k + 1 : row_end]
            keep = (
                [
                    (
                        min(p[0] for p in row_rest),
                        min(p[1] for p in row_rest),
                        max(p[0] for p in row_rest) + W,
                        max(p[1] for p in row_rest) + H,
                    )
                ]
                if row_rest
                else []
            )
        c.flush(keep)
        held.append(c.tiles_held)
    return held


@pytest.mark.parametrize("policy", ["settled", "row"])
def test_matches_reference_composite(tmp_path, policy):
    rng = np.random.default_rng(5)
    positions = traversal(3, 6, seed=5)
    frames = [textured(rng) for _ in positions]
    c = canvas(tmp_path)
    _run(c, frames, positions, policy, per_row=6)
    info = c.finalize()
    if policy == "row":
        assert info.units_reopened > 0  # the case this policy exercises
    else:
        assert info.units_reopened == 0
    image, origin = stored(info.path)
    ref, (rx, ry) = reference(frames, positions)
    got = crop(image, origin, rx, ry, *ref.shape)
    diff = np.abs(got.astype(int) - ref)
    # re-opening starts from the stored uint8: within one grey level of the reference
    assert diff.max() <= 1, diff.max()
    assert diff.mean() < (0.2 if policy == "row" else 0.01)
    # nothing outside the reference box
    assert image.sum() == got.astype(np.int64).sum()


def test_memory_stays_bounded_on_a_long_traversal(tmp_path):
    rng = np.random.default_rng(6)
    frame = textured(rng)
    peaks = {}
    for rows in (2, 8):
        positions = traversal(rows, 10, seed=6)
        c = canvas(tmp_path, f"m{rows}.ome.zarr")
        held = _run(c, [frame] * len(positions), positions, "settled", per_row=10)
        peaks[rows] = max(held)
        assert c.tiles_held == held[-1]
    assert peaks[8] <= peaks[2] + 1, peaks
    # and with the stage's per-row policy RAM holds about one frame's tiles
    c = canvas(tmp_path, "row.ome.zarr")
    positions = traversal(8, 10, seed=6)
    held = _run(c, [frame] * len(positions), positions, "row", per_row=10)
    assert max(held) <= 6


def test_pyramid_levels_are_2x_means(tmp_path):
    rng = np.random.default_rng(7)
    c = canvas(tmp_path, pyramid_max_side=40, pixel_size_um=0.5)
    for x, y in traversal(3, 8, seed=7):
        c.add(textured(rng), x, y)
    info = c.finalize()
    assert info.levels >= 3
    group = zarr.open_group(str(info.path), mode="r")
    previous = np.asarray(group["0"][...])
    assert previous.shape == info.shape
    for k in range(1, info.levels):
        level = np.asarray(group[str(k)][...])
        p = previous.astype(np.int64)
        if p.shape[0] % 2:
            p = np.vstack([p, p[-1:]])
        if p.shape[1] % 2:
            p = np.hstack([p, p[:, -1:]])
        expected = (p[0::2, 0::2] + p[1::2, 0::2] + p[0::2, 1::2] + p[1::2, 1::2] + 2) // 4
        assert level.shape == info.level_shapes[k] == expected.shape
        assert np.array_equal(level, expected), f"level {k}"
        previous = level
    assert max(info.level_shapes[-1]) <= 40 < max(info.level_shapes[-2])


def test_downsample_mean_odd_edges():
    block = np.array([[0, 2, 4], [2, 4, 6], [9, 9, 1]], np.uint8)
    assert downsample_mean(block).tolist() == [[2, 5], [9, 1]]


def test_readable_while_growing(tmp_path):
    rng = np.random.default_rng(8)
    positions = traversal(1, 6, seed=8)
    frames = [textured(rng) for _ in positions]
    c = canvas(tmp_path)
    for img, (x, y) in zip(frames, positions, strict=True):
        c.add(img, x, y)
    assert c.flush([]) > 0
    c.sync()  # flush queues the writes on a background thread
    view = open_mosaic(c.path)  # another handle, while the canvas is live
    assert view.live and view.array.shape[0] >= 2**21
    ref, (rx, ry) = reference(frames, positions)
    got = view.region(rx, ry, rx + ref.shape[1], ry + ref.shape[0])
    assert np.abs(got.astype(int) - ref).max() <= 1
    # plain zarr works too
    assert zarr.open_array(str(c.path / "0"), mode="r").dtype == np.uint8
    c.add(frames[0], positions[-1][0] + 500, 0.0)  # it keeps growing
    info = c.finalize()
    final = open_mosaic(info.path)
    assert not final.live and final.array.shape == info.shape
    assert np.array_equal(final.region(rx, ry, rx + ref.shape[1], ry + ref.shape[0]), got)


def test_preview_shape(tmp_path):
    rng = np.random.default_rng(9)
    c = canvas(tmp_path, pyramid_max_side=50)
    for x, y in traversal(2, 12, seed=9):
        c.add(textured(rng), x, y)
    with pytest.raises(MosaicError):
        c.preview()
    info = c.finalize()
    h, w = info.shape
    full = c.preview(max_side=10_000)
    assert full.shape == info.shape and full.dtype == np.uint8
    small = c.preview(max_side=60)
    assert max(small.shape) <= 60
    assert abs(small.shape[1] / small.shape[0] - w / h) < 0.2
    tiny = c.preview(max_side=20)
    assert max(tiny.shape) == 20


def test_reopen_disabled_raises(tmp_path):
    img = np.full((H, W), 100, np.uint8)
    c = canvas(tmp_path, reopen=False)
    c.add(img, 0.0, 0.0)
    c.flush([])
    with pytest.raises(MosaicError, match="already written"):
        c.add(img, 10.0, 0.0)


@pytest.mark.parametrize(("shard", "compression"), [(None, "zstd"), (None, "none"), (128, "none")])
def test_layouts_give_the_same_mosaic(tmp_path, shard, compression):
    rng = np.random.default_rng(10)
    positions = traversal(2, 5, seed=10)
    frames = [textured(rng) for _ in positions]
    results = []
    for name, kw in (("a", {}), ("b", {"shard": shard, "compression": compression})):
        c = canvas(tmp_path, f"{name}.ome.zarr", pyramid_max_side=32, **kw)
        _run(c, frames, positions, "settled", per_row=5)
        info = c.finalize()
        results.append(open_mosaic(info.path).region(-100, -100, 200, 100))
        if kw.get("shard"):  # units of 128 px: the origin sits on a 128 px corner
            assert all(v % shard == 0 for v in info.origin_xy)
    assert results[0].any() and np.array_equal(*results)


def test_errors(tmp_path):
    c = canvas(tmp_path)
    with pytest.raises(MosaicError, match="canvas takes"):
        c.add(np.zeros((H, W + 1), np.uint8), 0, 0)
    with pytest.raises(MosaicError, match="finite"):
        c.add(np.zeros((H, W), np.uint8), math.nan, 0)
    with pytest.raises(MosaicError, match="extent"):
        c.add(np.zeros((H, W), np.uint8), 1e9, 0)
    with pytest.raises(MosaicError, match="keep"):
        c.flush([(0, 0, -1, 5)])
    with pytest.raises(MosaicError, match="no frame"):
        c.finalize()
    assert issubclass(MosaicError, CemiError)
    # an existing mosaic is only replaced on request; other directories never
    with pytest.raises(MosaicError, match="exists"):
        canvas(tmp_path)
    canvas(tmp_path, overwrite=True)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(MosaicError, match="not a zarr group"):
        MosaicCanvas(other, (H, W), overwrite=True)
    assert (other / "keep.txt").exists()


def test_a_failed_chunk_write_is_raised_not_swallowed(tmp_path):
    rng = np.random.default_rng(10)
    c = canvas(tmp_path)
    # A plain file where the chunk directory must go: every write fails (even as root).
    chunks = c.path / "0" / "c"
    if chunks.exists():
        shutil.rmtree(chunks)
    chunks.write_text("not a directory")
    for x, y in traversal(1, 3, seed=10):
        c.add(textured(rng), x, y)
    c.flush([])
    with pytest.raises(MosaicError, match="cannot write unit"):
        c.sync()
