"""FEI and Zeiss TIFF calibration parsing, on generated and real files."""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from cemi_stream.errors import SourceError
from drivers.metadata import (
    TAG_CZ_SEM,
    TAG_FEI_HELIOS,
    read_calibration,
    read_pixel_size_nm,
    read_stage_position_um,
)

FEI_TEXT = (
    "[User]\r\nDate=01/01/2020\r\n[Scan]\r\nPixelWidth=2.5e-09\r\nPixelHeight=2.5e-09\r\n"
    "[Stage]\r\nStageX=0.001\r\nStageY=-0.002\r\n"
)


def zeiss_text(pixel: str) -> bytes:
    """A minimal CZ_SEM tag body: key line in capitals, then ``Name = value unit``."""
    lines = [
        "0",
        "AP_IMAGE_PIXEL_SIZE",
        f"Image Pixel Size = {pixel}",
        "AP_STAGE_AT_X",
        "Stage at X = 52.5 mm",
        "AP_STAGE_AT_Y",
        "Stage at Y = -1.5 mm",
    ]
    return "\r\n".join(lines).encode("latin-1")


def write_tiff(path: Path, extratags: list[tuple[int, int, None, object, bool]]) -> Path:
    tifffile.imwrite(path, np.zeros((6, 8), np.uint8), extratags=extratags)
    return path


def test_fei_tag_gives_nm_and_um(tmp_path: Path) -> None:
    path = write_tiff(tmp_path / "fei.tif", [(TAG_FEI_HELIOS, 2, None, FEI_TEXT, True)])
    assert read_pixel_size_nm(path) == pytest.approx(2.5)
    assert read_stage_position_um(path) == pytest.approx((1000.0, -2000.0))


@pytest.mark.parametrize("pixel", ["3.5 nm", "0.0035 \u00b5m", "3500 pm"])
def test_zeiss_tag_units(tmp_path: Path, pixel: str) -> None:
    path = write_tiff(tmp_path / "zeiss.tif", [(TAG_CZ_SEM, 1, None, zeiss_text(pixel), True)])
    calibration = read_calibration(path)
    assert calibration.pixel_size_nm == pytest.approx(3.5)
    assert calibration.stage_um == pytest.approx((52500.0, -1500.0))


def test_fei_without_pixel_width_is_none(tmp_path: Path) -> None:
    path = write_tiff(
        tmp_path / "fei.tif", [(TAG_FEI_HELIOS, 2, None, "[User]\r\nUser=x\r\n", True)]
    )
    assert read_pixel_size_nm(path) is None
    assert read_stage_position_um(path) is None


def test_plain_tiff_and_png_have_no_calibration(tmp_path: Path) -> None:
    plain = write_tiff(tmp_path / "plain.tif", [])
    png = tmp_path / "a.png"
    cv2.imwrite(str(png), np.zeros((4, 4), np.uint8))
    assert read_pixel_size_nm(plain) is None
    assert read_pixel_size_nm(png) is None
    assert read_stage_position_um(png) is None


def test_missing_and_corrupt_files_raise(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=r"nope\.tif: no such file"):
        read_pixel_size_nm(tmp_path / "nope.tif")
    broken = tmp_path / "broken.tif"
    broken.write_bytes(b"II*\x00" + b"\xff" * 20)
    with pytest.raises(SourceError, match=r"broken\.tif: corrupt") as err:
        read_pixel_size_nm(broken)
    assert "\n" not in str(err.value)


def test_real_fei_teneo_pixel_size(data_dir: Path) -> None:
    path = data_dir / "fei-teneo-databar" / "retic.tif"
    assert read_pixel_size_nm(path) == pytest.approx(1.079, abs=0.001)


def test_real_kriss_tiffs_match_metadata_csv(data_dir: Path) -> None:
    root = data_dir / "kriss-sem-pairs"
    expected: dict[str, dict[str, str]] = {}
    with (root / "metadata.csv").open(newline="") as fh:
        for row in csv.DictReader(fh):
            # "Data/Line/Clean/Line 50x_001.tif" -> "line/clean/line50x_001.tif", the
            # layout of tif_original/ (files there were renamed without spaces).
            key = row["source_file"].removeprefix("Data/").replace(" ", "").lower()
            expected[key] = row
    tiffs = sorted((root / "tif_original").rglob("*.tif"))
    assert len(tiffs) == 30
    for path in tiffs:
        row = expected[path.relative_to(root / "tif_original").as_posix().lower()]
        calibration = read_calibration(path)
        assert calibration.pixel_size_nm == pytest.approx(5.828, abs=0.01)
        assert calibration.pixel_size_nm == pytest.approx(float(row["pixel_size_m"]) * 1e9)
        assert calibration.stage_um == pytest.approx(
            (float(row["stage_x_m"]) * 1e6, float(row["stage_y_m"]) * 1e6)
        )
