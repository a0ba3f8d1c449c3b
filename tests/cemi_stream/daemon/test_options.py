"""RunOptions: untrusted run options validated field by field, paths kept in DATA_DIR."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from cemi_stream.cli import build_parser
from cemi_stream.daemon.options import RunOptions
from cemi_stream.daemon.stages import stage_commands
from cemi_stream.errors import ConfigError


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "frames").mkdir()
    (tmp_path / "frames" / "000000.png").write_bytes(b"")
    (tmp_path / "run.toml").write_text("[stitch]\nmin_band_z = 12.0\n")
    return tmp_path


def test_defaults_and_a_full_set_of_options(root: Path) -> None:
    opts = RunOptions.from_mapping({"source": "sim:?rows=2"}, root)
    assert opts.pace == "native" and opts.denoise == "off" and opts.to_replay_args() == []
    full = RunOptions.from_mapping(
        {"source": "frames", "pace": "12.5", "keyframes": "on", "keyframe_overlap": 0.4,
         "crop": "none", "levels": "full", "pixel_size_um": 0.25, "layout": "raster",
         "grid": "3x2", "order": "column", "serpentine": True, "overlap": "0.1,0.2",
         "allow_predicted": True, "name": "eutectic 7", "config_file": "run.toml"},
        root,
    )  # fmt: skip
    assert full.source == str(root / "frames") and full.config_file == str(root / "run.toml")
    args = full.to_replay_args()
    # replay's own parser takes them, and gives the same values back
    ns = build_parser().parse_args(["replay", "x", "--out", "y", *args])
    assert (ns.keyframes, ns.levels, ns.pixel_size_um, ns.layout) == ("on", "full", 0.25, "raster")
    assert (ns.grid, ns.order, ns.serpentine, ns.grid_overlap) == ("3x2", "column", True, "0.1,0.2")
    assert ns.allow_predicted and ns.config == str(root / "run.toml")
    commands = stage_commands(full, root / "runs" / "r")
    capture = commands["capture"]
    assert capture[capture.index("--pace") + 1] == "12.5"
    assert capture[capture.index("--crop") + 1] == "none"
    assert capture[capture.index("--overlap") + 1] == "0.4"
    assert "--allow-predicted" in commands["stitch"] and list(commands) == ["capture", "stitch"]
    # a record reads back to the same options
    assert RunOptions.from_record(full.to_dict()) == full


def test_denoise_workers_analysis_and_their_stage_commands(root: Path) -> None:
    opts = RunOptions.from_mapping(
        {"source": "sim:?rows=2", "denoise": "cpu", "denoise_workers": 2,
         "denoise_listen": "tcp://127.0.0.1:5999", "analyze": True}, root)  # fmt: skip
    ns = build_parser().parse_args(["replay", "x", "--out", "y", *opts.to_replay_args()])
    assert (ns.denoise_workers, ns.denoise_listen, ns.analyze) == (2, "tcp://127.0.0.1:5999", True)
    commands = stage_commands(opts, root / "runs" / "r")
    assert list(commands) == ["denoise", "capture", "stitch", "analyze"]
    dn = commands["denoise"]
    assert dn[dn.index("--workers") + 1] == "2" and "tcp://127.0.0.1:5999" in dn
    assert commands["analyze"][3:5] == ["analyze-stage", "--run-dir"]
    for bad, why in (({"denoise_workers": 2}, "only used with denoise"),
                     ({"denoise": "cpu", "denoise_workers": 0}, "denoise_workers"),
                     ({"denoise": "cpu", "denoise_listen": "udp://x"}, "tcp://")):  # fmt: skip
        with pytest.raises(ConfigError, match=why):
            RunOptions.from_mapping({"source": "sim:", **bad}, root)


@pytest.mark.parametrize(
    ("data", "field", "why"),
    [
        ({"source": "sim:", "bogus": 1}, "bogus", "unknown"),
        ({}, "source", "required"),
        ({"source": ""}, "source", "empty"),
        ({"source": 3}, "source", "expected a string"),
        ({"source": "nosuch"}, "source", "no such file"),
        ({"source": "/etc"}, "source", "outside the data directory"),
        ({"source": "../etc"}, "source", "'..'"),
        ({"source": "sim:/etc/hostname"}, "source", "outside the data directory"),
        ({"source": "sim:?bogus=1"}, "source", "unknown option 'bogus'"),
        ({"source": "weird:thing"}, "source", "unknown source scheme"),
        ({"source": "sim:", "pace": "fast"}, "pace", "native, max or a positive"),
        ({"source": "sim:", "pace": "-3"}, "pace", "native, max or a positive"),
        ({"source": "sim:", "pace": 5}, "pace", "expected a string"),
        ({"source": "sim:", "denoise": "gpu"}, "denoise", "unknown"),
        ({"source": "sim:", "model": "x"}, "model", "only used with denoise"),
        ({"source": "sim:", "denoise": "cpu", "model": "no-such-model"}, "model", "no such"),
        ({"source": "sim:", "denoise": "cpu", "model": "/etc/x.safetensors"}, "model", "outside"),
        ({"source": "sim:", "keyframes": "maybe"}, "keyframes", "'on', 'off'"),
        ({"source": "sim:", "keyframe_overlap": 0.99}, "keyframe_overlap", "0.05..0.95"),
        ({"source": "sim:", "crop": "bad"}, "crop", "x,y,width,height"),
        ({"source": "sim:", "levels": "x"}, "levels", "LO,HI"),
        ({"source": "sim:", "pixel_size_um": -1}, "pixel_size_um", "positive"),
        ({"source": "sim:", "pixel_size_um": True}, "pixel_size_um", "expected a number"),
        ({"source": "sim:", "layout": "spiral"}, "layout", "'auto'"),
        ({"source": "sim:", "grid": "1x1"}, "grid", "at least 2 tiles"),
        ({"source": "sim:", "order": "diagonal"}, "order", "'row', 'column'"),
        ({"source": "sim:", "serpentine": "yes"}, "serpentine", "true or false"),
        ({"source": "sim:", "overlap": "2"}, "overlap", "between 0 and 0.9"),
        ({"source": "sim:", "allow_predicted": 1}, "allow_predicted", "true or false"),
        ({"source": "sim:", "name": "../x"}, "name", "letters, digits"),
        ({"source": "sim:", "config_file": "/etc/passwd"}, "config_file", "outside"),
        ({"source": "sim:", "config_file": "nosuch.toml"}, "config_file", "no such file"),
        ({"source": "sim:\x00"}, "source", "NUL"),
    ],
)
def test_bad_options_are_rejected_naming_the_field(
    root: Path, data: dict[str, Any], field: str, why: str
) -> None:
    with pytest.raises(ConfigError) as info:
        RunOptions.from_mapping(data, root)
    message = str(info.value)
    assert message.startswith(field) and why in message and "\n" not in message, message


def test_not_a_mapping_and_a_bad_config_file(root: Path) -> None:
    with pytest.raises(ConfigError, match=r"^options: expected a JSON object"):
        RunOptions.from_mapping(["sim:"], root)  # type: ignore[arg-type]
    (root / "bad.toml").write_text("[stitch]\nno_such_key = 1\n")
    with pytest.raises(ConfigError, match=r"^config_file: stitch.no_such_key: unknown"):
        RunOptions.from_mapping({"source": "sim:", "config_file": "bad.toml"}, root)


def test_a_symlink_out_of_the_data_directory_is_refused(
    root: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    outside = tmp_path_factory.mktemp("outside")
    (root / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ConfigError, match=r"^source: link is outside the data directory"):
        RunOptions.from_mapping({"source": "link"}, root)


def test_direct_construction_checks_values_too() -> None:
    with pytest.raises(ConfigError, match=r"^grid:"):
        RunOptions(source="sim:", grid="nope")
    opts = RunOptions(source="sim:", pace="MAX")
    assert opts.pace == "max"
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.pace = "native"  # type: ignore[misc]
