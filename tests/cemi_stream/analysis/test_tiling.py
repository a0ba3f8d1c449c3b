"""Sources of ``analyze`` and the tile grid."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from cemi_stream.analysis.tiling import (
    AnalysisError,
    open_images,
    parse_pair,
    tile_grid,
    tile_size_px,
)


def test_the_paper_grid_keeps_a_last_tile_of_at_least_half() -> None:
    grid = tile_grid((413 * 2 + 300, 508 * 3 + 100), 508, 413)
    assert max(g.row for g in grid) == 2 and max(g.col for g in grid) == 2  # 100 px col dropped
    last = grid[-1]
    assert (last.row, last.col, last.x0, last.y0, last.w, last.h) == (2, 2, 1016, 826, 508, 300)
    (one,) = tile_grid((100, 150), 508, 413)  # smaller than half a tile: the whole image
    assert (one.w, one.h) == (150, 100)


def test_tile_sizes_and_pairs() -> None:
    assert tile_size_px(None, None, None) == (508, 413)
    assert tile_size_px((100, 80), None, None) == (100, 80)
    assert tile_size_px(None, (50.0, 40.0), 0.25) == (200, 160)
    with pytest.raises(AnalysisError, match="pixel size is not known"):
        tile_size_px(None, (50.0, 40.0), None)
    with pytest.raises(AnalysisError, match="give one of them"):
        tile_size_px((10, 10), (5.0, 5.0), 1.0)
    with pytest.raises(AnalysisError, match="at least 16"):
        tile_size_px((8, 100), None, None)
    assert parse_pair("508x413", "--tile", int) == (508, 413)
    with pytest.raises(AnalysisError, match="--tile '5x'"):
        parse_pair("5x", "--tile", int)
    with pytest.raises(AnalysisError, match="positive"):
        parse_pair("0,3", "--tile-um", float)


def test_images_folders_and_bad_sources(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    cv2.imwrite(str(folder / "a.png"), np.full((60, 80), 7, np.uint8))
    cv2.imwrite(str(folder / "b.tif"), np.full((40, 50, 3), 9, np.uint8))
    (folder / "notes.txt").write_text("not an image")
    images = open_images(folder, pixel_size_um=0.5)
    assert [im.name for im in images] == ["a.png", "b.tif"]
    assert images[1].array.shape == (40, 50) and images[1].pixel_size_um == 0.5
    assert not images[0].zero_is_outside
    with pytest.raises(AnalysisError, match="no such file"):
        open_images(tmp_path / "nope")
    with pytest.raises(AnalysisError, match="not an image file"):
        open_images(folder / "notes.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AnalysisError, match="no images"):
        open_images(tmp_path / "empty")
    with pytest.raises(AnalysisError, match="only a mosaic has pyramid levels"):
        open_images(folder, level=1)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG broken")
    with pytest.raises(AnalysisError, match="cannot be read"):
        open_images(bad)
