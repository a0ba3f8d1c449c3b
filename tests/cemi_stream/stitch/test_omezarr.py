"""OME-Zarr 0.5 metadata: our builder and validator, and third-party readers."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import zarr

from cemi_stream.errors import CemiError
from cemi_stream.stitch.mosaic import MosaicCanvas
from cemi_stream.stitch.omezarr import (
    ArrayDescription,
    image_attributes,
    level_transforms,
    validate_image_attributes,
    validate_store,
)


def test_builder_output_is_valid():
    attrs = image_attributes(3, pixel_size_um=0.22, origin_yx_px=(-1024, 2048))
    assert validate_image_attributes(attrs) == []
    ome = attrs["ome"]
    assert ome["version"] == "0.5"
    ms = ome["multiscales"][0]
    assert [a["name"] for a in ms["axes"]] == ["y", "x"]
    assert all(a["type"] == "space" and a["unit"] == "micrometer" for a in ms["axes"])
    assert [d["path"] for d in ms["datasets"]] == ["0", "1", "2"]
    scale, translation = ms["datasets"][2]["coordinateTransformations"]
    assert scale == {"type": "scale", "scale": [0.88, 0.88]}
    # a level-2 pixel centre is 1.5 level-0 pixels after its block's first pixel
    assert translation["translation"] == pytest.approx([(-1024 + 1.5) * 0.22, (2048 + 1.5) * 0.22])


def test_unknown_pixel_size_gives_pixels_without_unit():
    attrs = image_attributes(2, pixel_size_um=None)
    assert validate_image_attributes(attrs) == []
    ms = attrs["ome"]["multiscales"][0]
    assert all("unit" not in a for a in ms["axes"])
    assert ms["datasets"][1]["coordinateTransformations"][0]["scale"] == [2.0, 2.0]


def test_builder_rejects_bad_arguments():
    with pytest.raises(CemiError):
        image_attributes(0, pixel_size_um=1.0)
    with pytest.raises(CemiError):
        level_transforms(1, pixel_size_um=-1.0)


def _broken(edit) -> list[str]:
    attrs = copy.deepcopy(image_attributes(2, pixel_size_um=0.1))
    edit(attrs)
    return validate_image_attributes(attrs)


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda a: a["ome"].update(version="0.4"), "version"),
        (lambda a: a.pop("ome"), "no 'ome'"),
        (lambda a: a["ome"]["multiscales"][0]["axes"][0].update(unit="micron"), "space unit"),
        (lambda a: a["ome"]["multiscales"][0]["axes"][1].update(name="y"), "unique"),
        (lambda a: a["ome"]["multiscales"][0]["axes"][0].update(type="channel"), "2 or 3"),
        (lambda a: a["ome"]["multiscales"][0]["datasets"][0].pop("coordinateTransformations"),
         "non-empty list"),
        (lambda a: a["ome"]["multiscales"][0]["datasets"][0]["coordinateTransformations"]
         .reverse(), "scale"),
        (lambda a: a["ome"]["multiscales"][0]["datasets"][1]["coordinateTransformations"][0]
         .update(scale=[1.0]), "one per axis"),
        (lambda a: a["ome"]["multiscales"][0]["datasets"][1]["coordinateTransformations"][0]
         .update(scale=[0.0, 1.0]), "positive"),
        (lambda a: a["ome"]["multiscales"][0]["datasets"].reverse(), "highest to lowest"),
        (lambda a: a["ome"]["multiscales"][0].update(version="0.5"), "belongs in 'ome'"),
        (lambda a: a["ome"]["multiscales"][0]["datasets"][1].update(path="0"), "unique"),
    ],
)  # fmt: skip
def test_validator_finds_problems(edit, needle):
    problems = _broken(edit)
    assert problems and any(needle in p for p in problems), problems


def test_validator_checks_arrays():
    attrs = image_attributes(2, pixel_size_um=0.1)
    good = {
        "0": ArrayDescription((100, 200), ("y", "x")),
        "1": ArrayDescription((50, 100), ("y", "x")),
    }
    assert validate_image_attributes(attrs, good) == []
    assert any("no array" in p for p in validate_image_attributes(attrs, {"0": good["0"]}))
    bad = dict(good, **{"1": ArrayDescription((50, 100), ("x", "y"))})
    assert any("dimension_names" in p for p in validate_image_attributes(attrs, bad))
    v2 = dict(good, **{"1": ArrayDescription((50, 100), None, zarr_format=2)})
    assert any("v3" in p for p in validate_image_attributes(attrs, v2))
    rank = dict(good, **{"1": ArrayDescription((5, 50, 100), None)})
    assert any("dims" in p for p in validate_image_attributes(attrs, rank))


@pytest.fixture(scope="module")
def mosaic(tmp_path_factory):
    path = tmp_path_factory.mktemp("ngff") / "mosaic.ome.zarr"
    canvas = MosaicCanvas(
        path, (40, 50), pixel_size_um=0.22, chunk=64, feather_px=6, pyramid_max_side=30
    )
    rng = np.random.default_rng(0)
    for i in range(8):
        canvas.add(rng.integers(1, 255, (40, 50), dtype=np.uint8), i * 25.5 - 30, (i % 2) * 7.25)
    return canvas.finalize()


def test_finalized_mosaic_is_valid_ngff(mosaic):
    assert validate_store(mosaic.path) == []
    meta = json.loads((mosaic.path / "zarr.json").read_text())
    assert meta["zarr_format"] == 3 and meta["node_type"] == "group"
    ms = meta["attributes"]["ome"]["multiscales"][0]
    assert len(ms["datasets"]) == mosaic.levels
    level0 = json.loads((mosaic.path / "0" / "zarr.json").read_text())
    assert level0["shape"] == list(mosaic.shape) and level0["dimension_names"] == ["y", "x"]
    # level-0 translation is the array origin in micrometres
    translation = ms["datasets"][0]["coordinateTransformations"][1]["translation"]
    assert translation == pytest.approx([mosaic.origin_xy[1] * 0.22, mosaic.origin_xy[0] * 0.22])


def test_live_mosaic_is_valid_ngff(tmp_path):
    canvas = MosaicCanvas(tmp_path / "live.ome.zarr", (40, 50), chunk=64)
    canvas.add(np.full((40, 50), 7, np.uint8), 3.0, 4.0)
    canvas.flush([])
    assert validate_store(canvas.path) == []


def test_store_validator_reports_missing_pieces(tmp_path):
    assert validate_store(tmp_path / "nothing")[0].endswith(")")
    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w", zarr_format=3)
    group.update_attributes(image_attributes(1, pixel_size_um=None))
    assert any("no array" in p for p in validate_store(tmp_path / "g.zarr"))


def test_ome_zarr_models_accepts_it(mosaic):
    v05 = pytest.importorskip("ome_zarr_models.v05", reason="ome-zarr-models not installed")
    image = v05.Image.from_zarr(zarr.open_group(str(mosaic.path), mode="r"))
    assert len(image.ome_attributes.multiscales[0].datasets) == mosaic.levels


def test_ome_zarr_py_reads_it(mosaic):
    pytest.importorskip("ome_zarr", reason="ome-zarr (dev extra) not installed")
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    location = parse_url(str(mosaic.path))
    assert location is not None and location.version == "0.5"
    nodes = list(Reader(location)())
    assert nodes, "ome-zarr found no image"
    node = nodes[0]
    assert [tuple(d.shape) for d in node.data] == list(mosaic.level_shapes)
    assert [a["name"] for a in node.metadata["axes"]] == ["y", "x"]
    level0 = np.asarray(node.data[0])
    stored = np.asarray(zarr.open_array(str(mosaic.path / "0"), mode="r")[...])
    assert np.array_equal(level0, stored)
    transforms = node.metadata["coordinateTransformations"]
    assert transforms[1][0]["scale"] == pytest.approx([0.44, 0.44])
