"""The ``folder`` driver on generated folders and on the real SEM data."""

from __future__ import annotations

import logging
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from cemi_stream.capture.levels import full_window
from cemi_stream.errors import SourceError
from cemi_stream.frame import CORRUPT, Frame
from drivers import open_source, to_gray8
from drivers.image_folder import ImageFolderSource, VideoFolderSource, natural_key
from drivers.metadata import TAG_FEI_HELIOS

RNG = np.random.default_rng(7)


def noise(shape: tuple[int, ...], dtype: type = np.uint8) -> np.ndarray:
    high = 256 if dtype is np.uint8 else 65536
    return RNG.integers(0, high, size=shape, dtype=dtype)


def read_all(source: ImageFolderSource | VideoFolderSource) -> list[Frame]:
    frames = []
    while (frame := source.read()) is not None:
        frames.append(frame)
    return frames


def opened(folder: Path) -> ImageFolderSource:
    source = ImageFolderSource(folder)
    source.open()
    return source


def test_natural_key_orders_numbers_by_value() -> None:
    names = ["img10.png", "img2.png", "Img1.png", "img2b.png", "a.png"]
    assert sorted(names, key=natural_key) == [
        "a.png",
        "Img1.png",
        "img2.png",
        "img2b.png",
        "img10.png",
    ]


def test_lossless_formats_round_trip_in_natural_order(tmp_path: Path) -> None:
    images = [noise((30, 40)) for _ in range(4)]
    names = ["img10.PNG", "img2.bmp", "img1.Tif", "img3.png"]
    for name, image in zip(names, images, strict=True):
        assert cv2.imwrite(str(tmp_path / name), image)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "._img0.png").write_bytes(b"macOS resource fork, not a PNG")
    source = opened(tmp_path)
    assert [p.name for p in source.files] == ["img1.Tif", "img2.bmp", "img3.png", "img10.PNG"]
    info = source.info
    assert (info.kind, info.frame_size, info.frame_count) == ("folder", (40, 30), 4)
    assert info.fps is None
    assert not info.video_like
    assert not info.live
    frames = read_all(source)
    expected = [images[2], images[1], images[3], images[0]]
    assert [f.meta.src_index for f in frames] == [0, 1, 2, 3]
    for frame, image in zip(frames, expected, strict=True):
        assert frame.image.dtype == np.uint8
        np.testing.assert_array_equal(frame.image, image)
        assert frame.meta.pixel_size_nm is None
        assert frame.meta.row is None
        assert frame.meta.capture_time_ns > 1_600_000_000 * 10**9
    source.close()
    source.close()


def test_jpeg_is_close_to_original(tmp_path: Path) -> None:
    image = cv2.GaussianBlur(noise((64, 64)), (9, 9), 3)
    cv2.imwrite(str(tmp_path / "a.jpeg"), image, [cv2.IMWRITE_JPEG_QUALITY, 95])
    (frame,) = read_all(opened(tmp_path))
    assert np.abs(frame.image.astype(int) - image).mean() < 2.0


def test_16bit_png_keeps_its_depth_and_full_window_divides_by_257(tmp_path: Path) -> None:
    image = noise((20, 30), np.uint16)
    image[0, :4] = [0, 128, 65535, 257 * 100]
    cv2.imwrite(str(tmp_path / "deep.png"), image)
    source = opened(tmp_path)
    assert source.info.significant_bits is None  # no sBIT chunk
    (frame,) = read_all(source)
    # The capture chooses the 8-bit window for the whole run (cemi_stream.capture.levels).
    assert frame.image.dtype == np.uint16
    np.testing.assert_array_equal(frame.image, image)
    gray8 = full_window(frame.image.dtype).apply(frame.image)
    np.testing.assert_array_equal(gray8, ((image.astype(np.uint32) + 128) // 257))
    np.testing.assert_array_equal(gray8, to_gray8(image))
    assert list(gray8[0, :4]) == [0, 0, 255, 100]


def write_png_with_sbit(path: Path, image: np.ndarray, bits: int) -> None:
    """A PNG with an ``sBIT`` chunk (significant bits) after its ``IHDR``."""
    ok, encoded = cv2.imencode(".png", image)
    assert ok
    data = encoded.tobytes()
    ihdr_end = 8 + 8 + 13 + 4  # signature, IHDR length+type, body, CRC
    body = bytes([bits])
    chunk = struct.pack(">I", len(body)) + b"sBIT" + body
    chunk += struct.pack(">I", zlib.crc32(b"sBIT" + body))
    path.write_bytes(data[:ihdr_end] + chunk + data[ihdr_end:])


def test_png_sbit_declares_significant_bits(tmp_path: Path) -> None:
    image = RNG.integers(0, 4096, size=(20, 30), dtype=np.uint16)
    write_png_with_sbit(tmp_path / "a.png", image, 12)
    source = opened(tmp_path)
    assert source.info.significant_bits == 12
    (frame,) = read_all(source)
    np.testing.assert_array_equal(frame.image, image)


def test_rgb_tiff_with_identical_channels_keeps_the_channel(tmp_path: Path) -> None:
    grey = noise((20, 30))
    tifffile.imwrite(tmp_path / "rgb.tif", np.dstack([grey] * 3), photometric="rgb")
    (frame,) = read_all(opened(tmp_path))
    np.testing.assert_array_equal(frame.image, grey)


def test_tiff_calibration_reaches_frame_meta(tmp_path: Path) -> None:
    fei = "[Scan]\r\nPixelWidth=4e-09\r\n[Stage]\r\nStageX=2e-06\r\nStageY=3e-06\r\n"
    tifffile.imwrite(
        tmp_path / "f.tif", noise((10, 12)), extratags=[(TAG_FEI_HELIOS, 2, None, fei, True)]
    )
    source = opened(tmp_path)
    assert source.info.pixel_size_nm == pytest.approx(4.0)
    (frame,) = read_all(source)
    assert frame.meta.pixel_size_nm == pytest.approx(4.0)
    assert (frame.meta.stage_x_um, frame.meta.stage_y_um) == pytest.approx((2.0, 3.0))


def test_empty_folder_raises(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(SourceError, match="no images in folder") as err:
        ImageFolderSource(tmp_path).open()
    assert str(tmp_path) in str(err.value)


def test_corrupt_png_is_a_fault_frame_named_in_the_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cv2.imwrite(str(tmp_path / "a1.png"), noise((8, 8)))
    (tmp_path / "a2.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    cv2.imwrite(str(tmp_path / "a3.png"), noise((8, 8)))
    source = opened(tmp_path)
    with caplog.at_level(logging.WARNING, logger="drivers.image_folder"):
        frames = read_all(source)
    assert [f.meta.src_index for f in frames] == [0, 1, 2]
    assert [f.fault for f in frames] == [None, CORRUPT, None]
    assert frames[1].image.size == 0
    (record,) = [r for r in caplog.records if "a2.png" in r.getMessage()]
    assert "cannot decode image" in record.getMessage()


def test_undecodable_first_images_are_faults_and_the_next_one_opens(tmp_path: Path) -> None:
    (tmp_path / "a1.png").write_bytes(b"not a png")
    cv2.imwrite(str(tmp_path / "a2.png"), noise((8, 10)))
    source = opened(tmp_path)
    assert source.info.frame_size == (10, 8)
    assert [f.fault for f in read_all(source)] == [CORRUPT, None]


def test_folder_without_any_decodable_image_fails_to_open(tmp_path: Path) -> None:
    (tmp_path / "a1.png").write_bytes(b"not a png")
    (tmp_path / "a2.png").write_bytes(b"")
    with pytest.raises(SourceError, match="none of the 2 images can be decoded") as err:
        opened(tmp_path)
    assert "a1.png" in str(err.value) and "\n" not in str(err.value)


def test_image_of_another_size_is_delivered_as_it_is(tmp_path: Path) -> None:
    # The front end rejects it as size_changed; the driver does not stop.
    cv2.imwrite(str(tmp_path / "a1.png"), noise((8, 10)))
    cv2.imwrite(str(tmp_path / "a2.png"), noise((9, 10)))
    cv2.imwrite(str(tmp_path / "a3.png"), noise((8, 10)))
    source = opened(tmp_path)
    assert [f.shape for f in read_all(source)] == [(8, 10), (9, 10), (8, 10)]


def test_reopen_starts_again(tmp_path: Path) -> None:
    for i in range(3):
        cv2.imwrite(str(tmp_path / f"{i}.png"), np.full((4, 4), i, np.uint8))
    source = opened(tmp_path)
    assert len(read_all(source)) == 3
    source.close()
    source.open()
    assert [int(f.image[0, 0]) for f in read_all(source)] == [0, 1, 2]


def write_avi(path: Path, values: list[int], size: tuple[int, int] = (32, 24)) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"FFV1"), 10, size, isColor=False)
    for value in values:
        writer.write(np.full((size[1], size[0]), value, np.uint8))
    writer.release()


def test_folder_of_videos_plays_one_row_per_video(tmp_path: Path) -> None:
    write_avi(tmp_path / "row10.avi", [200, 210])
    write_avi(tmp_path / "row2.avi", [100, 110, 120])
    source = open_source(str(tmp_path))
    assert isinstance(source, VideoFolderSource)
    assert source.info.video_like
    assert source.info.frame_size == (32, 24)
    frames = read_all(source)
    source.close()
    assert [f.meta.src_index for f in frames] == [0, 1, 2, 3, 4]
    assert [f.meta.row for f in frames] == [0, 0, 0, 1, 1]
    assert [int(f.image[0, 0]) for f in frames] == [100, 110, 120, 200, 210]


def test_folder_of_videos_rejects_other_sizes(tmp_path: Path) -> None:
    write_avi(tmp_path / "a.avi", [1])
    write_avi(tmp_path / "b.avi", [2], size=(16, 24))
    source = open_source(str(tmp_path))
    source.read()
    with pytest.raises(SourceError, match=r"b\.avi: video frames are 16x24 but a\.avi has 32x24"):
        source.read()


def test_real_kriss_png_folder(data_dir: Path) -> None:
    source = opened(data_dir / "kriss-sem-pairs" / "time" / "high")
    frames = read_all(source)
    assert len(frames) == 40
    assert {f.shape for f in frames} == {(471, 512)}
    assert source.info.frame_size == (512, 471)


def test_real_bse_tiles_in_natural_order(data_dir: Path) -> None:
    folder = data_dir / "bse-tiles-stitch2d"
    source = opened(folder)
    expected = [f"stitch2d_ex[Grid@{c} {r}].jpg" for c in range(2) for r in range(3)]
    assert [p.name for p in source.files] == expected
    frames = read_all(source)
    assert len(frames) == 6
    for frame, name in zip(frames, expected, strict=True):
        reference = cv2.imread(str(folder / name), cv2.IMREAD_GRAYSCALE)
        np.testing.assert_array_equal(frame.image, reference)


def test_real_kriss_fei_tiff_folder(data_dir: Path) -> None:
    source = opened(data_dir / "kriss-sem-pairs" / "tif_original" / "time" / "high")
    frames = read_all(source)
    assert len(frames) == 10
    assert source.info.pixel_size_nm == pytest.approx(5.828, abs=0.01)
    # 30us_001: stage 3.125e-06 m, 1.6e-05 m in metadata.csv.
    assert (frames[0].meta.stage_x_um, frames[0].meta.stage_y_um) == pytest.approx((3.125, 16.0))
