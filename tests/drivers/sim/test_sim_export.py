"""Writing simulations to disk: image frames, video, ground truth CSV."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import cv2
import numpy as np

from drivers.sim.config import SimConfig
from drivers.sim.export import video_codec, write_simulation
from drivers.sim.source import SimSource

SMALL = SimConfig(rows=2, frames_per_row=3, frame_width=128, frame_height=96)


def _read_truth(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == ["src_index", "row", "x_px", "y_px"]
        return list(reader)


def test_image_mode_export(tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    summary = write_simulation(SMALL, tmp_path / "out", progress=lambda d, t: calls.append((d, t)))
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["frames", "ground_truth.csv"]
    pngs = sorted((out / "frames").iterdir())
    assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(6)]
    assert summary["frames"] == 6
    assert summary["rows"] == 2
    assert summary["path"] == str(out / "frames")
    assert isinstance(summary["seconds"], float)
    assert calls[-1] == (6, 6)
    assert len(calls) == 6

    rows = _read_truth(out / "ground_truth.csv")
    reference = SimSource(SMALL)
    reference.open()
    for i, row in enumerate(rows):
        truth = reference.truth_for(i)
        assert int(row["src_index"]) == i
        assert int(row["row"]) == truth.row
        assert row["x_px"] == f"{truth.x_px:.3f}"
        assert row["y_px"] == f"{truth.y_px:.3f}"
    image = cv2.imread(str(pngs[4]), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(image, reference.render(4))


def test_video_mode_export(tmp_path: Path) -> None:
    config = dataclasses.replace(SMALL, video=True, video_overlap=0.8)
    summary = write_simulation(config, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ground_truth.csv", "video.avi"]
    rows = _read_truth(tmp_path / "ground_truth.csv")
    assert summary["frames"] == len(rows) > 6
    assert {r["row"] for r in rows} == {"0", "1"}
    assert summary["codec"] == video_codec()
    capture = cv2.VideoCapture(str(tmp_path / "video.avi"))
    decoded = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        decoded.append(frame[:, :, 0] if frame.ndim == 3 else frame)
    capture.release()
    assert len(decoded) == len(rows)
    reference = SimSource(config)
    reference.open()
    expected = reference.render(3)
    if summary["codec"] == "FFV1":
        np.testing.assert_array_equal(decoded[3], expected)
    else:
        assert np.abs(decoded[3].astype(int) - expected).mean() < 4
