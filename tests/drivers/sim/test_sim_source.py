"""The sim driver: FrameSource contract, metadata, truth, config and registry."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from cemi_stream.errors import ConfigError, SourceError
from cemi_stream.frame import Frame
from drivers.base import FrameSource
from drivers.registry import parse_uri, resolve
from drivers.sim import SimSource, config_from_options
from drivers.sim.config import SimConfig

SMALL = SimConfig(rows=2, frames_per_row=3, frame_width=128, frame_height=96)


def test_frame_source_contract_and_metadata() -> None:
    source = SimSource(SMALL, uri="sim:test")
    assert isinstance(source, FrameSource)
    with pytest.raises(SourceError, match="before open"):
        source.read()
    source.open()
    info = source.info
    assert (info.kind, info.frame_size, info.fps, info.frame_count) == ("sim", (128, 96), None, 6)
    assert info.pixel_size_nm == 220.0
    assert not info.live
    assert not info.video_like
    frames: list[Frame] = []
    while (frame := source.read()) is not None:
        frames.append(frame)
    assert source.read() is None
    assert [f.meta.src_index for f in frames] == list(range(6))
    assert [f.meta.row for f in frames] == [0, 0, 0, 1, 1, 1]
    for frame in frames:
        assert frame.image.dtype == np.uint8
        assert frame.image.shape == (96, 128)
        assert frame.image.flags.c_contiguous
        assert frame.meta.pixel_size_nm == 220.0
        assert frame.meta.capture_time_ns > 1_600_000_000 * 10**9
    # Commanded stage position in micrometres: jitter-free steps of 64 px.
    xs = [f.meta.stage_x_um for f in frames[:3]]
    assert xs[1] - xs[0] == pytest.approx(64 * 0.22)  # type: ignore[operator]
    step = source.traversal[4]
    assert frames[4].meta.stage_y_um == pytest.approx(step.stage_y_px * 0.22)
    assert frames[4].meta.stage_x_um != pytest.approx(step.x_px * 0.22)  # true != commanded
    source.close()
    source.close()


def test_truth_records_follow_reading() -> None:
    source = SimSource(SMALL)
    source.open()
    assert source.truth == []
    source.read()
    source.read()
    assert [(t.src_index, t.row) for t in source.truth] == [(0, 0), (1, 0)]
    later = source.truth_for(5)
    assert (later.src_index, later.row) == (5, 1)
    assert later.x_px == source.traversal.x[5]
    assert later.y_px == source.traversal.y[5]
    assert source.truth[1] == source.truth_for(1)
    # Re-opening rewinds the stream and the truth.
    source.open()
    assert source.truth == []
    assert source.read().meta.src_index == 0  # type: ignore[union-attr]


def test_report_stage_off_and_video_info() -> None:
    source = SimSource(dataclasses.replace(SMALL, report_stage=False, video=True, fps=30.0))
    source.open()
    assert source.info.fps == 30.0
    assert source.info.video_like
    frame = source.read()
    assert frame is not None
    assert frame.meta.stage_x_um is None
    assert frame.meta.stage_y_um is None
    assert frame.meta.row == 0


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("rows", 0),
        ("frames_per_row", -1),
        ("frame_width", 8),
        ("overlap", 1.0),
        ("noise", "loud"),
        ("fps", 0.0),
        ("video_overlap", 1.0),
        ("seed", -1),
        ("specimen_scale", 0.0),
        ("jitter_px", -1.0),
        ("pixel_size_nm", float("nan")),
        ("serpentine", 1),
        ("rows", 2.5),
        ("source", ""),
    ],
)
def test_config_rejects_bad_values_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=rf"^sim\.{field}: ") as info:
        SimConfig(**{field: value})  # type: ignore[arg-type]
    assert "\n" not in str(info.value)


def test_default_sim_uri_gives_the_default_traversal() -> None:
    parsed, pace, loop = parse_uri("sim:")
    entry = resolve(parsed)
    assert entry.name == "sim"
    source = entry.factory(parsed)
    assert isinstance(source, SimSource)
    assert source.config == SimConfig()
    assert (source.config.rows, source.config.frames_per_row) == (3, 8)
    assert source.config.frame_size == (1024, 768)
    assert source.config.noise == "ld"
    assert not source.config.video
    assert len(source.traversal) == 24
    assert pace is None
    assert not loop


def test_registry_options_map_onto_config() -> None:
    parsed, _, _ = parse_uri(
        "sim:?rows=2&noise=HD&frame_size=320x240&serpentine=yes&video=1&fps=12.5&seed=4"
        "&jitter_px=0&databar=true&report_stage=0&specimen_scale=2"
    )
    source = resolve(parsed).factory(parsed)
    assert isinstance(source, SimSource)
    c = source.config
    assert (c.rows, c.noise, c.frame_width, c.frame_height) == (2, "hd", 320, 240)
    assert c.serpentine
    assert c.video
    assert c.databar
    assert not c.report_stage
    assert (c.fps, c.seed, c.jitter_px, c.specimen_scale) == (12.5, 4, 0.0, 2.0)
    assert source.uri.startswith("sim:?rows=2")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"colour": "1"}, "unknown option 'colour'"),
        ({"rows": "two"}, "rows='two' is not an integer"),
        ({"overlap": "half"}, "overlap='half' is not a number"),
        ({"video": "maybe"}, "video='maybe' is not a boolean"),
        ({"frame_size": "1024"}, "frame_size='1024' must look like"),
    ],
)
def test_bad_options_raise_source_error(options: dict[str, str], message: str) -> None:
    with pytest.raises(SourceError, match=message):
        config_from_options(options)


def test_out_of_range_option_raises_config_error() -> None:
    with pytest.raises(ConfigError, match=r"sim\.rows"):
        config_from_options({"rows": "0"})


def test_bad_specimen_image_names_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "absent.tif"
    parsed, _, _ = parse_uri(f"sim:?source={missing}")
    source = resolve(parsed).factory(parsed)
    with pytest.raises(SourceError, match=r"absent\.tif"):
        source.open()
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    with pytest.raises(SourceError, match=r"broken\.png: cannot decode"):
        SimSource(SimConfig(source=str(broken))).open()


def test_image_specimen_source_and_open_source(tmp_path: Path) -> None:
    import cv2

    path = tmp_path / "micrograph.png"
    rng = np.random.default_rng(0)
    cv2.imwrite(
        str(path), cv2.GaussianBlur(rng.integers(0, 256, (120, 160), dtype=np.uint8), (0, 0), 2)
    )
    from drivers import open_source

    source = open_source(f"sim:{path}?rows=1&frames_per_row=2&frame_size=96x64&noise=none")
    try:
        first = source.read()
        assert first is not None
        assert first.image.shape == (64, 96)
        assert first.image.std() > 2
    finally:
        source.close()
