"""The run-wide grey-level window (``cemi_stream.capture.levels``) on real arrays and frames."""

from __future__ import annotations

import numpy as np
import pytest

from cemi_stream.capture.levels import LevelsGate, LevelsSpec, parse_levels, rejected_all_message
from cemi_stream.errors import ConfigError
from cemi_stream.frame import CORRUPT, Frame, FrameMeta, fault_frame

RNG = np.random.default_rng(5)


def frame(image: np.ndarray, index: int) -> Frame:
    return Frame(image, FrameMeta(src_index=index, capture_time_ns=0))


def narrow16(shape: tuple[int, int] = (48, 64), low: int = 200, high: int = 1300) -> np.ndarray:
    return RNG.integers(low, high + 1, size=shape, dtype=np.uint16)


@pytest.mark.parametrize(
    ("text", "spec"),
    [
        ("auto", LevelsSpec("auto")),
        (" FULL ", LevelsSpec("full")),
        ("200,1300", LevelsSpec("explicit", 200.0, 1300.0)),
        ("-0.5,2.5", LevelsSpec("explicit", -0.5, 2.5)),
    ],
)
def test_parse_levels_accepts_the_three_forms(text: str, spec: LevelsSpec) -> None:
    assert parse_levels(text) == spec


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("bright", "expected auto, full or LO,HI"),
        ("1300,200", "HI must be greater than LO"),
        ("5,5", "HI must be greater than LO"),
        ("1,2,3", "expected auto, full or LO,HI"),
        ("0,inf", "must be finite"),
        ("", "expected auto, full or LO,HI"),
    ],
)
def test_parse_levels_rejects_bad_values_in_one_line(text: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason) as err:
        parse_levels(text)
    assert "capture.levels (--levels)" in str(err.value) and "\n" not in str(err.value)


def test_auto_holds_the_first_frames_then_releases_them_in_order() -> None:
    gate = LevelsGate("auto", sample_frames=3)
    images = [narrow16() for _ in range(5)]
    out: list[Frame] = []
    out += gate.push(frame(images[0], 0))
    out += gate.push(fault_frame(FrameMeta(src_index=1, capture_time_ns=0)))
    out += gate.push(frame(images[1], 2))
    assert out == []  # still sampling: nothing released, nothing lost
    out += gate.push(frame(images[2], 3))
    assert [f.meta.src_index for f in out] == [0, 1, 2, 3]
    assert [f.fault for f in out] == [None, CORRUPT, None, None]
    out += gate.push(frame(images[3], 4))  # window fixed: passes straight through
    assert [f.meta.src_index for f in out] == [0, 1, 2, 3, 4]
    info = gate.describe()
    assert info["source"] == "percentiles" and info["dtype"] == "uint16"
    low, high = info["window"]
    assert 200 <= low <= 205 and 1295 <= high <= 1300
    assert info["sample_frames"] == 3
    real = [f.image for f in out if f.fault is None]
    assert all(i.dtype == np.uint8 for i in real)
    assert min(int(i.min()) for i in real) == 0 and max(int(i.max()) for i in real) == 255
    # One window for every frame, held back or not: never stretched per frame.
    assert gate.window is not None
    for mapped, image in zip(real, images[:4], strict=True):
        np.testing.assert_array_equal(mapped, gate.window.apply(image))


def test_flush_decides_from_fewer_frames_at_the_end() -> None:
    gate = LevelsGate("auto")
    assert gate.push(frame(narrow16(), 0)) == []
    (released,) = gate.flush()
    assert released.image.dtype == np.uint8
    assert gate.describe()["sample_frames"] == 1
    assert gate.flush() == []


def test_8bit_input_is_untouched_in_auto_and_full() -> None:
    image = RNG.integers(0, 256, size=(20, 30), dtype=np.uint8)
    for mode in ("auto", "full"):
        gate = LevelsGate(mode)
        (out,) = gate.push(frame(image, 0))
        assert out.image is image
        assert gate.describe()["source"] == "8-bit"


def test_full_on_16bit_divides_by_257_and_explicit_maps_lo_hi() -> None:
    image = narrow16()
    (full,) = LevelsGate("full").push(frame(image, 0))
    np.testing.assert_array_equal(full.image, (image.astype(np.uint32) + 128) // 257)
    assert int(full.image.max()) <= 6
    (explicit,) = LevelsGate("200,1300").push(frame(image, 0))
    expected = np.clip((image.astype(np.float64) - 200) * 255 / 1100 + 0.5, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(explicit.image, expected)


def test_declared_significant_bits_give_the_window_when_the_data_fits() -> None:
    image = RNG.integers(0, 4096, size=(40, 40), dtype=np.uint16)
    image[0, :2] = [0, 4095]
    gate = LevelsGate("auto", significant_bits=12, sample_frames=1)
    (out,) = gate.push(frame(image, 0))
    assert gate.describe()["window"] == [0, 4095]
    assert gate.describe()["source"] == "metadata"
    assert list(out.image[0, :2]) == [0, 255]
    # Values beyond the declared bits: the metadata is wrong, percentiles decide.
    wrong = LevelsGate("auto", significant_bits=12, sample_frames=1)
    wrong.push(frame(narrow16(low=3000, high=9000), 0))
    assert wrong.describe()["source"] == "percentiles"


def test_float_input_uses_percentiles_and_nan_becomes_black() -> None:
    image = (RNG.random((40, 50)) * 1000 + 50).astype(np.float32)
    image[0, 0] = np.nan
    gate = LevelsGate("auto", sample_frames=1)
    (out,) = gate.push(frame(image, 0))
    low, high = gate.describe()["window"]
    assert 50 <= low < 52 and 1048 < high <= 1050
    assert out.image[0, 0] == 0 and out.image.dtype == np.uint8


def test_uniform_sample_falls_back_to_the_full_range() -> None:
    gate = LevelsGate("auto", sample_frames=1)
    gate.push(frame(np.full((10, 10), 700, np.uint16), 0))
    assert gate.describe()["source"] == "full"


def test_rejected_all_message_names_the_cause_and_the_fix() -> None:
    levels = {"mode": "full", "dtype": "uint16", "window": [0, 65535],
              "input_min": 200, "input_max": 1300}  # fmt: skip
    message = rejected_all_message(25, 0, {"blank": 25}, levels)
    assert message is not None and "\n" not in message
    assert message.startswith("all 25 frames rejected as blank: the images are 16-bit")
    assert "values 200..1300 of 65535" in message
    assert message.endswith("try --levels auto or --levels 200,1300")
    mixed = rejected_all_message(4, 0, {"blank": 3, "corrupt": 1}, levels)
    assert mixed is not None and mixed.startswith("all 4 frames rejected (blank 3, corrupt 1)")
    assert rejected_all_message(25, 1, {"blank": 24, "first": 1}, levels) is None
    assert rejected_all_message(2, 0, {"corrupt": 2}, levels) is None
