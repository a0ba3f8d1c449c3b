"""The ``tiff`` driver: multi-page stacks, bit depths, colour, codecs, real files."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from cemi_stream.errors import SourceError
from cemi_stream.frame import CORRUPT, Frame
from drivers.metadata import TAG_FEI_HELIOS
from drivers.tiff_stack import TiffStackSource

RNG = np.random.default_rng(11)


def read_all(source: TiffStackSource) -> list[Frame]:
    frames = []
    while (frame := source.read()) is not None:
        frames.append(frame)
    return frames


def opened(path: Path) -> TiffStackSource:
    source = TiffStackSource(path)
    source.open()
    return source


def test_multipage_round_trip(tmp_path: Path) -> None:
    pages = RNG.integers(0, 256, size=(5, 24, 32), dtype=np.uint8)
    path = tmp_path / "stack.tif"
    with tifffile.TiffWriter(path) as writer:
        for page in pages:
            writer.write(page)
    source = opened(path)
    info = source.info
    assert (info.kind, info.frame_size, info.frame_count) == ("tiff", (32, 24), 5)
    assert (info.fps, info.live, info.video_like) == (None, False, False)
    frames = read_all(source)
    assert [f.meta.src_index for f in frames] == list(range(5))
    for frame, page in zip(frames, pages, strict=True):
        np.testing.assert_array_equal(frame.image, page)
    assert source.read() is None
    source.close()
    source.close()


def test_pages_are_decoded_one_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, np.zeros((6, 8, 10), np.uint8))  # 6 pages
    decoded: list[int] = []
    original = tifffile.TiffPage.asarray

    def spy(page: tifffile.TiffPage, *args: object, **kwargs: object) -> np.ndarray:
        decoded.append(page.index)
        return original(page, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(tifffile.TiffPage, "asarray", spy)
    source = opened(path)
    assert decoded == [0]
    source.read()
    source.read()
    assert decoded == [0, 1]
    source.close()


def test_16bit_stack_keeps_its_depth(tmp_path: Path) -> None:
    pages = RNG.integers(0, 65536, size=(2, 10, 12), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "deep.tif", pages)
    source = opened(tmp_path / "deep.tif")
    assert source.info.significant_bits is None
    frames = read_all(source)
    for frame, page in zip(frames, pages, strict=True):
        np.testing.assert_array_equal(frame.image, page)  # the capture maps it to 8 bits


def test_max_sample_value_declares_significant_bits(tmp_path: Path) -> None:
    page = RNG.integers(0, 4096, size=(10, 12), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "12bit.tif", page, extratags=[(281, "H", 1, 4095, True)])
    source = opened(tmp_path / "12bit.tif")
    assert source.info.significant_bits == 12
    (frame,) = read_all(source)
    np.testing.assert_array_equal(frame.image, page)


def test_float_pages_keep_their_values(tmp_path: Path) -> None:
    page = RNG.random((10, 12), dtype=np.float32) * 1000
    tifffile.imwrite(tmp_path / "f.tif", page)
    (frame,) = read_all(opened(tmp_path / "f.tif"))
    assert frame.image.dtype == np.float32
    np.testing.assert_array_equal(frame.image, page)


def test_rgb_identical_channels_keep_the_channel(tmp_path: Path) -> None:
    grey = RNG.integers(0, 256, size=(10, 12), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tif", np.dstack([grey] * 3), photometric="rgb")
    (frame,) = read_all(opened(tmp_path / "rgb.tif"))
    np.testing.assert_array_equal(frame.image, grey)


@pytest.mark.parametrize("planar", ["contig", "separate"])
def test_colour_tiff_uses_rgb_luma(tmp_path: Path, planar: str) -> None:
    rgb = RNG.integers(0, 256, size=(10, 12, 3), dtype=np.uint8)
    data = rgb if planar == "contig" else np.moveaxis(rgb, -1, 0)
    tifffile.imwrite(tmp_path / "c.tif", data, photometric="rgb", planarconfig=planar)
    (frame,) = read_all(opened(tmp_path / "c.tif"))
    # Red must weigh 0.299 and blue 0.114: a channel-order mistake changes this.
    np.testing.assert_array_equal(frame.image, cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))


def test_lzw_tiff_written_by_opencv_is_read(tmp_path: Path) -> None:
    # OpenCV writes LZW, which tifffile cannot decode without imagecodecs.
    pages = [RNG.integers(0, 256, size=(16, 20), dtype=np.uint8) for _ in range(3)]
    assert cv2.imwritemulti(str(tmp_path / "lzw.tiff"), pages)
    frames = read_all(opened(tmp_path / "lzw.tiff"))
    assert len(frames) == 3
    for frame, page in zip(frames, pages, strict=True):
        np.testing.assert_array_equal(frame.image, page)


def test_per_page_fei_calibration(tmp_path: Path) -> None:
    path = tmp_path / "fei.tif"
    with tifffile.TiffWriter(path) as writer:
        for x_m in (1e-6, 2e-6):
            fei = f"[Scan]\r\nPixelWidth=5e-09\r\n[Stage]\r\nStageX={x_m}\r\nStageY=0\r\n"
            writer.write(
                np.zeros((4, 6), np.uint8), extratags=[(TAG_FEI_HELIOS, 2, None, fei, True)]
            )
    source = opened(path)
    assert source.info.pixel_size_nm == pytest.approx(5.0)
    frames = read_all(source)
    assert [f.meta.stage_x_um for f in frames] == pytest.approx([1.0, 2.0])
    assert all(f.meta.pixel_size_nm == pytest.approx(5.0) for f in frames)


def test_pages_of_other_size_are_delivered_as_they_are(tmp_path: Path) -> None:
    # The front end rejects them as size_changed; the driver goes on.
    path = tmp_path / "mixed.tif"
    with tifffile.TiffWriter(path) as writer:
        writer.write(np.zeros((4, 6), np.uint8))
        writer.write(np.zeros((5, 6), np.uint8))
        writer.write(np.zeros((4, 6), np.uint8))
    assert [f.shape for f in read_all(opened(path))] == [(4, 6), (5, 6), (4, 6)]


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"II*\x00" + b"\xff" * 40, "corrupt"),
        (b"this is just text\n", "not a TIFF file"),
        (b"", "not a TIFF file"),
    ],
    ids=["bad-ifd", "text", "empty"],
)
def test_bad_files_raise_one_line(tmp_path: Path, content: bytes, reason: str) -> None:
    path = tmp_path / "bad.tif"
    path.write_bytes(content)
    with pytest.raises(SourceError, match=reason) as err:
        TiffStackSource(path).open()
    assert str(path) in str(err.value)
    assert "\n" not in str(err.value)


def test_undecodable_page_mid_stack_is_a_fault_frame(tmp_path: Path) -> None:
    path = tmp_path / "stack.tif"
    pages = RNG.integers(0, 256, size=(3, 32, 32), dtype=np.uint8)
    with tifffile.TiffWriter(path) as writer:
        for page in pages:
            writer.write(page, compression="zlib")
    with tifffile.TiffFile(path) as tif:
        offset = tif.pages[1].dataoffsets[0]
    data = bytearray(path.read_bytes())
    data[offset : offset + 64] = b"\xff" * 64  # page 1's deflate stream is now garbage
    path.write_bytes(bytes(data))
    frames = read_all(opened(path))
    assert [f.meta.src_index for f in frames] == [0, 1, 2]
    assert [f.fault for f in frames] == [None, CORRUPT, None]
    np.testing.assert_array_equal(frames[2].image, pages[2])


def test_truncated_pixel_data_raises(tmp_path: Path) -> None:
    path = tmp_path / "cut.tif"
    tifffile.imwrite(path, RNG.integers(0, 256, size=(64, 64), dtype=np.uint8))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SourceError, match=r"cut\.tif: cannot decode TIFF page 0") as err:
        opened(path)
    assert "\n" not in str(err.value)


def test_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=r"nope\.tif: no such file"):
        TiffStackSource(tmp_path / "nope.tif").open()


def test_real_retic_fei_tiff(data_dir: Path) -> None:
    source = opened(data_dir / "fei-teneo-databar" / "retic.tif")
    assert source.info.frame_size == (1536, 1094)
    assert source.info.pixel_size_nm == pytest.approx(1.079, abs=0.001)
    (frame,) = read_all(source)
    assert frame.meta.pixel_size_nm == pytest.approx(1.079, abs=0.001)


def test_real_eutectic_tiff(data_dir: Path) -> None:
    source = opened(data_dir / "eutectic-alcumg" / "3000X_Al-Cu_Mg_EXP9_S7.tif")
    assert source.info.frame_size == (2048, 1770)
    assert source.info.pixel_size_nm is None
    (frame,) = read_all(source)
    assert frame.shape == (1770, 2048)


def test_real_kriss_rgb_tiff_matches_png_red_channel(data_dir: Path) -> None:
    root = data_dir / "kriss-sem-pairs"
    (frame,) = read_all(opened(root / "tif_original" / "time" / "high" / "30us_001.tif"))
    png = cv2.imread(str(root / "time" / "high" / "high_30us_001.png"), cv2.IMREAD_UNCHANGED)
    assert png is not None
    # Inside the green UI frame the grey content is identical in R, G and B.
    np.testing.assert_array_equal(frame.image[1:441, 1:511], png[1:441, 1:511])
    assert frame.meta.pixel_size_nm == pytest.approx(5.828, abs=0.01)
