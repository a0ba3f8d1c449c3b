"""The typed configuration: defaults, TOML files, overrides, rejection of bad keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from cemi_stream.config import Config, load_config
from cemi_stream.errors import ConfigError


def test_defaults() -> None:
    config = load_config()
    assert config == Config()
    assert config.capture.keyframes.overlap == 0.5
    assert config.bus.transport == "ipc" and config.bus.host == "127.0.0.1"
    assert config.bus.pipes == ["stitch"]


def test_toml_file_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        '[bus]\ntransport = "tcp"\nport_base = 6000\n'
        "[capture.keyframes]\noverlap = 0.4\n[spool]\nfsync_interval_s = 0\n"
    )
    config = load_config(path, {"capture.keyframes.overlap": 0.35, "bus.pipes": ["a", "b"]})
    assert config.bus.transport == "tcp" and config.bus.port_base == 6000
    assert config.capture.keyframes.overlap == 0.35
    assert config.bus.pipes == ["a", "b"]
    assert config.spool.fsync_interval_s == 0.0  # int in TOML accepted as float


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"capture.keyframe.overlap": 0.5}, "capture.keyframe: unknown configuration key"),
        ({"bogus": 1}, "bogus: unknown configuration key"),
        ({"bus.hwm": "64"}, "bus.hwm: expected an integer"),
        ({"bus.hwm": True}, "bus.hwm: expected an integer"),
        ({"bus.transport": "udp"}, "bus.transport: 'udp' is not one of"),
        ({"capture.keyframes.overlap": 0.99}, "outside 0.05..0.95"),
        ({"bus.pipes": "stitch"}, "bus.pipes: expected a list"),
        ({"bus.pipes": ["a", "a"]}, "unique"),
        ({"bus.pipes": ["bad name"]}, "not a valid pipe name"),
        ({"spool.memory_frames": 0}, "at least 1"),
        ({"log_level": "LOUD"}, "log_level"),
        ({"denoise.cpu_nice": 20}, "denoise.cpu_nice: 20 is outside 0..19"),
    ],
)
def test_bad_values_name_the_key(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_missing_and_broken_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="configuration file not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[bus\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
