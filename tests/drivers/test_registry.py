"""Parsing source strings and picking the driver that claims them."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

import drivers
from cemi_stream.errors import SourceError
from drivers.registry import parse_uri, resolve


def test_query_options_pace_and_loop_are_split() -> None:
    uri, pace, loop = parse_uri("sim:?rows=3&noise=ld&pace=12.5&loop=1")
    assert (uri.scheme, uri.target) == ("sim", "")
    assert uri.options == {"rows": "3", "noise": "ld"}
    assert (pace, loop) == ("12.5", True)
    assert uri.raw == "sim:?rows=3&noise=ld&pace=12.5&loop=1"


def test_defaults_without_query() -> None:
    uri, pace, loop = parse_uri("  /data/run1  ")
    assert (uri.scheme, uri.target, uri.options, pace, loop) == ("", "/data/run1", {}, None, False)


def test_bad_loop_value() -> None:
    with pytest.raises(SourceError, match="loop must be 0 or 1"):
        parse_uri("x.avi?loop=maybe")


def test_file_scheme_is_a_plain_path() -> None:
    uri, _, _ = parse_uri("file:///data/clip.avi?pace=native")
    assert (uri.scheme, uri.target) == ("", "/data/clip.avi")


def test_windows_drive_is_not_a_scheme() -> None:
    uri, _, _ = parse_uri(r"C:\data\clip.avi")
    assert (uri.scheme, uri.target) == ("", r"C:\data\clip.avi")


def test_rtsp_keeps_the_full_url() -> None:
    uri, pace, _ = parse_uri("rtsp://user:pw@10.0.0.5:554/stream1#timeout_ms=2000&pace=native")
    assert uri.scheme == "rtsp"
    assert uri.target == "rtsp://user:pw@10.0.0.5:554/stream1"
    assert uri.options == {"timeout_ms": "2000"}
    assert pace == "native"


def test_empty_string_is_an_error() -> None:
    with pytest.raises(SourceError, match="empty source string"):
        parse_uri("   ")


def test_driver_order() -> None:
    names = [entry.name for entry in drivers.drivers()]
    ours = [name for name in names if name in ("device", "url", "folder", "tiff", "video")]
    assert ours == ["device", "url", "folder", "tiff", "video"]
    assert names[-1] == "video"


@pytest.fixture
def media(tmp_path: Path) -> Path:
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((4, 4), np.uint8))
    tifffile.imwrite(tmp_path / "stack.TIF", np.zeros((2, 4, 4), np.uint8))
    writer = cv2.VideoWriter(str(tmp_path / "clip.avi"), cv2.VideoWriter.fourcc(*"FFV1"), 5, (4, 4))
    writer.write(np.zeros((4, 4, 3), np.uint8))
    writer.release()
    return tmp_path


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("{media}", "folder"),
        ("{media}/stack.TIF", "tiff"),
        ("{media}/clip.avi", "video"),
        ("{media}/a.png", "video"),
        ("video:{media}/stack.TIF", "video"),
        ("tiff:{media}/stack.TIF", "tiff"),
        ("folder:{media}", "folder"),
        ("device:0", "device"),
        ("device:/dev/video1", "device"),
        ("0", "device"),
        ("/dev/video0", "device"),
        ("rtsp://127.0.0.1/x", "url"),
        ("https://example.org/live.m3u8", "url"),
        ("udp://@:5000", "url"),
        ("gst:videotestsrc ! appsink", "url"),
    ],
)
def test_resolve_picks_the_driver(media: Path, text: str, expected: str) -> None:
    uri, _, _ = parse_uri(text.format(media=media))
    assert resolve(uri).name == expected


def test_resolve_sim() -> None:
    if "sim" not in {entry.name for entry in drivers.drivers()}:
        pytest.skip("drivers.sim does not register a driver yet")
    assert resolve(parse_uri("sim:")[0]).name == "sim"


def test_unknown_scheme(media: Path) -> None:
    with pytest.raises(SourceError, match="unknown source scheme 'ftp'"):
        resolve(parse_uri("ftp://host/file")[0])


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no such file or directory"):
        resolve(parse_uri(str(tmp_path / "absent.avi"))[0])


@pytest.mark.parametrize("scheme", ["folder", "tiff", "video"])
def test_unknown_option_is_named(media: Path, scheme: str) -> None:
    target = {"folder": media, "tiff": media / "stack.TIF", "video": media / "clip.avi"}[scheme]
    with pytest.raises(SourceError, match=r"unknown option\(s\) bogus"):
        drivers.open_source(f"{scheme}:{target}?bogus=1")


def test_network_url_keeps_its_own_query() -> None:
    uri, pace, loop = parse_uri("http://cam/video.mjpg?res=hd&x=1#timeout_ms=2000&pace=max")
    assert uri.target == "http://cam/video.mjpg?res=hd&x=1"
    assert uri.options == {"timeout_ms": "2000"}
    assert pace == "max" and loop is False
