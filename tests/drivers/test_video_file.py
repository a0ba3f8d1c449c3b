"""The ``video`` driver on generated AVI files and on files that are not videos."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from cemi_stream.errors import SourceError
from cemi_stream.frame import Frame
from drivers import open_source
from drivers.video_file import VideoFileSource

RNG = np.random.default_rng(3)


def write_video(path: Path, frames: list[np.ndarray], fourcc: str, fps: float = 10.0) -> None:
    height, width = frames[0].shape
    writer = cv2.VideoWriter(
        str(path), cv2.VideoWriter.fourcc(*fourcc), fps, (width, height), isColor=False
    )
    assert writer.isOpened()
    for frame in frames:
        writer.write(frame)
    writer.release()


def read_all(source: VideoFileSource) -> list[Frame]:
    frames = []
    while (frame := source.read()) is not None:
        frames.append(frame)
    return frames


def test_lossless_avi_round_trip(tmp_path: Path) -> None:
    images = [RNG.integers(0, 256, size=(24, 32), dtype=np.uint8) for _ in range(5)]
    path = tmp_path / "clip.avi"
    write_video(path, images, "FFV1", fps=12.5)
    source = VideoFileSource(path)
    source.open()
    info = source.info
    assert (info.kind, info.frame_size, info.frame_count) == ("video", (32, 24), 5)
    assert info.fps == pytest.approx(12.5)
    assert (info.live, info.video_like) == (False, True)
    frames = read_all(source)
    assert [f.meta.src_index for f in frames] == [0, 1, 2, 3, 4]
    for frame, image in zip(frames, images, strict=True):
        assert frame.image.dtype == np.uint8
        assert frame.image.ndim == 2
        np.testing.assert_array_equal(frame.image, image)
    times = [f.meta.capture_time_ns for f in frames]
    assert times == sorted(times)
    source.close()
    source.close()


def test_mjpeg_avi_is_close_and_reopens(tmp_path: Path) -> None:
    images = [np.full((48, 64), 40 * i, np.uint8) for i in range(4)]
    path = tmp_path / "clip.avi"
    write_video(path, images, "MJPG")
    source = VideoFileSource(path)
    source.open()
    first_pass = [int(f.image.mean().round()) for f in read_all(source)]
    source.close()
    source.open()
    second_pass = [int(f.image.mean().round()) for f in read_all(source)]
    source.close()
    assert first_pass == second_pass
    assert first_pass == pytest.approx([0, 40, 80, 120], abs=2)


def test_open_source_picks_video_for_other_files(tmp_path: Path) -> None:
    path = tmp_path / "clip.mkv"
    write_video(path, [np.zeros((16, 16), np.uint8)] * 2, "FFV1")
    source = open_source(str(path))
    assert isinstance(source, VideoFileSource)
    assert len(read_all(source)) == 2
    source.close()


@pytest.mark.parametrize("content", [b"hello, I am a text file\n" * 10, b""], ids=["text", "empty"])
def test_non_video_fails_with_one_line(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "fake.avi"
    path.write_bytes(content)
    with pytest.raises(SourceError, match=r"fake\.avi: cannot decode as video \(") as err:
        open_source(str(path))
    assert "\n" not in str(err.value)


def test_missing_file_and_unknown_option(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=r"nope\.avi: no such file"):
        VideoFileSource(tmp_path / "nope.avi").open()
    path = tmp_path / "clip.avi"
    write_video(path, [np.zeros((16, 16), np.uint8)], "FFV1")
    with pytest.raises(SourceError, match=r"unknown option\(s\) speed"):
        open_source(f"{path}?speed=2")


def test_read_before_open_raises(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="before open"):
        VideoFileSource(tmp_path / "x.avi").read()
