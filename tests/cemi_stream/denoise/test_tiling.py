"""Padding, tile layout and feathered blending (numpy only, no model)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from cemi_stream.denoise.tiling import TileBlender, TileBox, pad_to_multiple, tile_boxes
from cemi_stream.errors import ConfigError


def test_pad_to_multiple_reflects_and_returns_original_size() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (250, 330), dtype=np.uint8)
    padded, (h, w) = pad_to_multiple(image, 4)
    assert (h, w) == (250, 330)
    assert padded.shape == (252, 332)
    assert padded.dtype == np.uint8
    np.testing.assert_array_equal(padded[:h, :w], image)
    # Mirror without repeating the edge: row 250 is row 248, column 330 is 328.
    np.testing.assert_array_equal(padded[250, :w], image[248])
    np.testing.assert_array_equal(padded[251, :w], image[247])
    np.testing.assert_array_equal(padded[:h, 330], image[:, 328])
    np.testing.assert_array_equal(padded[:h, 331], image[:, 327])


def test_pad_to_multiple_leaves_aligned_and_leading_axes_alone() -> None:
    image = np.zeros((2, 1, 8, 12), np.float32)
    padded, size = pad_to_multiple(image, 4)
    assert padded is image and size == (8, 12)
    tiny = np.array([[7]], np.uint8)
    padded, size = pad_to_multiple(tiny, 4)
    assert padded.shape == (4, 4) and size == (1, 1) and np.all(padded == 7)


def test_pad_to_multiple_rejects_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="multiple"):
        pad_to_multiple(np.zeros((4, 4)), 0)
    with pytest.raises(ConfigError, match=r"\(\.\.\., y, x\)"):
        pad_to_multiple(np.zeros((0, 4)), 4)


def test_tile_boxes_cover_the_frame_with_equal_aligned_tiles() -> None:
    boxes = tile_boxes((256, 320), 128, 32, align=4)
    assert {(b.y1 - b.y0, b.x1 - b.x0) for b in boxes} == {(128, 128)}
    covered = np.zeros((256, 320), int)
    for b in boxes:
        assert b.y0 % 4 == 0 and b.x0 % 4 == 0
        covered[b.slices] += 1
    assert covered.min() >= 1
    ys = sorted({b.y0 for b in boxes})
    xs = sorted({b.x0 for b in boxes})
    assert ys == [0, 96, 128]  # the last row of tiles moves back to end at 256
    assert xs == [0, 96, 192]
    # Neighbours overlap by at least the requested 32 px.
    assert all(b - a <= 128 - 32 for a, b in itertools.pairwise(xs))


def test_tile_boxes_small_frame_is_one_tile_and_errors() -> None:
    assert tile_boxes((64, 96), 128, 32, align=4) == [TileBox(0, 64, 0, 96)]
    with pytest.raises(ConfigError, match="multiple of 4"):
        tile_boxes((64, 96), 126, 32, align=4)
    with pytest.raises(ConfigError, match="overlap"):
        tile_boxes((64, 96), 64, 64)
    with pytest.raises(ConfigError, match="multiples of 4"):
        tile_boxes((66, 96), 64, 16, align=4)


def test_blender_reassembles_an_image_exactly() -> None:
    # With an identity "model" every tile equals its part of the image, so any
    # weight that does not normalise to 1 would show as a difference.
    rng = np.random.default_rng(1)
    image = rng.random((200, 260)).astype(np.float32)
    blender = TileBlender(image.shape, 24)
    for box in tile_boxes(image.shape, 96, 24, align=4):
        blender.add(box, image[box.slices])
    np.testing.assert_allclose(blender.result(), image, atol=1e-6)


def test_blender_feathers_across_the_overlap() -> None:
    # Two tiles of constant 0 and 1 overlapping by 32 columns.  Over the first
    # and last quarter of the overlap only the tile whose interior it is
    # counts (the other's edge pixels are unreliable); over the middle half
    # the blend ramps linearly from 0 to 1 instead of jumping.
    blender = TileBlender((16, 96), 32)
    blender.add(TileBox(0, 16, 0, 64), np.zeros((16, 64)))
    blender.add(TileBox(0, 16, 32, 96), np.ones((16, 64)))
    row = blender.result()[0]
    assert np.all(row[:40] == 0) and np.all(row[56:] == 1)
    ramp = row[40:56]
    np.testing.assert_allclose(ramp, (np.arange(16) + 0.5) / 16, atol=1e-6)


def test_blender_rejects_gaps_and_wrong_tiles() -> None:
    blender = TileBlender((16, 16), 4)
    blender.add(TileBox(0, 8, 0, 16), np.zeros((8, 16)))
    with pytest.raises(ConfigError, match="not covered"):
        blender.result()
    with pytest.raises(ConfigError, match="expected shape"):
        blender.add(TileBox(0, 8, 0, 8), np.zeros((8, 16)))
    with pytest.raises(ConfigError, match="outside"):
        blender.add(TileBox(8, 24, 0, 16), np.zeros((16, 16)))
