"""Our labelme reader: every shape type rasterised as labelme's mask export does, images
embedded or beside the JSON, label selection, and one-line errors."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from cemi_stream.analysis.labelme import (
    LINE_WIDTH,
    POINT_RADIUS,
    Shape,
    encode_image,
    read_labelme,
    read_labelme_dir,
    shape_mask,
)
from cemi_stream.errors import AnalysisError

H, W = 60, 80


def shape(label: str, kind: str, points: list[list[float]], **extra: Any) -> dict[str, Any]:
    return {
        "label": label,
        "points": points,
        "group_id": None,
        "shape_type": kind,
        "flags": {},
        "description": "",
        **extra,
    }


def write(
    path: Path,
    shapes: list[dict[str, Any]],
    image: np.ndarray | None = None,
    embed: bool = True,
    **extra: Any,
) -> Path:
    image = np.full((H, W), 100, np.uint8) if image is None else image
    data: dict[str, Any] = {
        "version": "5.4.1",
        "flags": {},
        "shapes": shapes,
        "imagePath": "img.png",
        "imageData": None,
        "imageHeight": image.shape[0],
        "imageWidth": image.shape[1],
    }
    if embed:
        data["imageData"] = encode_image(image)
    else:
        cv2.imwrite(str(path.parent / "img.png"), image)
    data.update(extra)
    path.write_text(json.dumps(data))
    return path


def raster(kind: str, points: list[list[float]], size: tuple[int, int] = (H, W)) -> np.ndarray:
    return shape_mask(Shape("x", kind, np.asarray(points, float)), size)


def test_rectangle_is_inclusive_and_corner_order_free() -> None:
    m = raster("rectangle", [[30, 20], [10, 5]])
    expected = np.zeros((H, W), bool)
    expected[5:21, 10:31] = True
    np.testing.assert_array_equal(m, expected)


def test_polygon_fill_and_outline() -> None:
    square = raster("polygon", [[10, 10], [40, 10], [40, 30], [10, 30]])
    expected = np.zeros((H, W), bool)
    expected[10:31, 10:41] = True  # outline included, as PIL draws it
    np.testing.assert_array_equal(square, expected)
    tri = raster("polygon", [[0, 0], [59, 0], [0, 59]])
    assert abs(int(tri.sum()) - 60 * 61 / 2) < 60  # area of the right triangle, edges included
    assert tri[5, 5] and not tri[50, 50]


def test_circle_point_and_lines() -> None:
    circle = raster("circle", [[40, 30], [40, 18]])  # radius 12
    assert abs(int(circle.sum()) - math.pi * 12**2) < 2 * math.pi * 12
    assert circle[30, 40] and circle[30, 52] and not circle[30, 54]
    point = raster("point", [[20, 20]])
    assert abs(int(point.sum()) - math.pi * POINT_RADIUS**2) < 2 * math.pi * POINT_RADIUS + 4
    line = raster("line", [[10, 30], [70, 30]])
    rows = np.flatnonzero(line[:, 40])
    assert abs(len(rows) - LINE_WIDTH) <= 1 and rows.min() <= 30 <= rows.max()
    strip = raster("linestrip", [[10, 10], [70, 10], [70, 50]])
    assert strip[10, 40] and strip[30, 70] and not strip[30, 40]


def test_embedded_image_and_shapes_painted_in_order(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (H, W), dtype=np.uint8)
    bitmap = np.zeros((10, 12), np.uint8)
    bitmap[2:8, 3:9] = 255
    shapes = [
        shape("lamellar", "rectangle", [[0, 0], [39, 59]]),
        shape("background", "rectangle", [[0, 0], [9, 9]]),
        shape("pearlite", "mask", [[50, 40], [61, 49]], mask=encode_image(bitmap)),
        shape("grain", "circle", [[70, 10], [70, 14]]),
    ]
    path = write(tmp_path / "a.json", shapes, img)
    s = read_labelme(path)
    np.testing.assert_array_equal(s.image, img)
    assert s.labels == ["lamellar", "background", "pearlite", "grain"]
    expected = np.zeros((H, W), bool)
    expected[:, :40] = True
    expected[:10, :10] = False
    expected[40:50, 50:62] = bitmap > 0
    only = read_labelme(path, labels=["Lamellar", "pearlite"])
    np.testing.assert_array_equal(only.mask, expected)
    assert read_labelme(path).mask[10, 70]  # every non-background label by default


def test_image_path_beside_the_json_and_folders(tmp_path: Path) -> None:
    img = np.full((H, W), 7, np.uint8)
    img[:, 40:] = 200
    write(
        tmp_path / "b.json",
        [shape("l", "polygon", [[1, 1], [20, 1], [20, 20]])],
        img,
        embed=False,
        imagePath="sub\\..\\img.png",
    )
    write(tmp_path / "c.json", [], img)
    samples = read_labelme_dir(tmp_path)
    assert [s.path.name for s in samples] == ["b.json", "c.json"]
    np.testing.assert_array_equal(samples[0].image, img)
    assert samples[0].mask.sum() > 150 and not samples[1].mask.any()
    colour = cv2.merge([img, img, img])
    s = read_labelme(write(tmp_path / "d.json", [], colour))
    assert s.image.shape == (H, W)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not a readable JSON file"),
        ('{"shapes": 3}', "no 'shapes' list"),
        (
            '{"shapes": [{"label": "a", "shape_type": "blob", "points": [[0, 0]]}]}',
            "unsupported shape_type 'blob'",
        ),
        (
            '{"shapes": [{"label": "a", "shape_type": "polygon", "points": [[0, 0], [1, 1]]}]}',
            "needs at least 3 points",
        ),
        ('{"shapes": [], "imagePath": "missing.png"}', "no such file"),
        ('{"shapes": [], "imageData": "bm90IGFuIGltYWdl"}', "imageData is not a readable image"),
        ('{"shapes": []}', "neither imageData nor imagePath"),
    ],
)
def test_bad_files_give_one_line_errors(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(AnalysisError, match=message) as info:
        read_labelme(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_size_mismatch_and_missing_things(tmp_path: Path) -> None:
    path = write(tmp_path / "e.json", [], imageHeight=H + 1)
    with pytest.raises(AnalysisError, match="imageWidth x imageHeight say"):
        read_labelme(path)
    with pytest.raises(AnalysisError, match="no such labelme file"):
        read_labelme(tmp_path / "nope.json")
    with pytest.raises(AnalysisError, match=r"no labelme \.json files"):
        read_labelme_dir(tmp_path / "empty" if (tmp_path / "empty").mkdir() is None else tmp_path)
