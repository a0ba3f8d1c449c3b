"""The specimens: procedural eutectic (determinism, seams, texture, memory) and images."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from cemi_stream.errors import SourceError
from drivers.sim.eutectic import render_eutectic
from drivers.sim.fields import value_noise
from drivers.sim.specimen import ImageSpecimen, ProceduralSpecimen, load_specimen


def test_procedural_is_deterministic_by_seed() -> None:
    a = ProceduralSpecimen(seed=3).region(1000.25, 500.5, 160, 120)
    b = ProceduralSpecimen(seed=3).region(1000.25, 500.5, 160, 120)
    c = ProceduralSpecimen(seed=4).region(1000.25, 500.5, 160, 120)
    assert a.dtype == np.float32
    assert a.shape == (120, 160)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).mean() > 0.05


def test_region_across_tile_boundary_equals_its_halves() -> None:
    spec = ProceduralSpecimen(seed=1, tile_size=64)
    # x0 = 100 .. 260 crosses the tile edges at 128, 192 and 256.
    whole = spec.region(100.0, 40.0, 160, 50)
    left = spec.region(100.0, 40.0, 80, 50)
    right = spec.region(180.0, 40.0, 80, 50)
    np.testing.assert_array_equal(whole, np.hstack([left, right]))
    top = spec.region(100.0, 40.0, 160, 30)
    bottom = spec.region(100.0, 70.0, 160, 20)
    np.testing.assert_array_equal(whole, np.vstack([top, bottom]))


def test_plane_does_not_depend_on_the_tile_grid() -> None:
    # Continuity in the strong sense: tiles of another size and origin give
    # the same plane, so no tile edge can show.
    a = ProceduralSpecimen(seed=2, tile_size=64).region(37.0, 91.0, 200, 150)
    b = ProceduralSpecimen(seed=2, tile_size=96).region(37.0, 91.0, 200, 150)
    np.testing.assert_allclose(a, b, atol=2e-3)
    direct = render_eutectic(37, 91, 200, 150, seed=2)
    np.testing.assert_allclose(a, direct, atol=2e-3)


def test_value_noise_is_continuous_across_blocks() -> None:
    whole = value_noise(-50, -20, 120, 40, 7.5, seed=9, salt=1)
    parts = np.hstack(
        [value_noise(-50, -20, 33, 40, 7.5, 9, 1), value_noise(-17, -20, 87, 40, 7.5, 9, 1)]
    )
    np.testing.assert_allclose(whole, parts, atol=1e-5)
    assert whole.min() >= 0.0
    assert whole.max() <= 1.0
    # Smooth: neighbouring pixels differ by much less than the value range.
    assert np.abs(np.diff(whole, axis=1)).max() < 0.35


def test_subpixel_region_interpolates() -> None:
    spec = ProceduralSpecimen(seed=0, tile_size=128)
    base = spec.region(300.0, 200.0, 101, 80)
    half = spec.region(300.5, 200.0, 100, 80)
    expected = 0.5 * (base[:, :-1] + base[:, 1:])
    np.testing.assert_allclose(half, expected, atol=0.02)


def test_values_range_and_several_phases() -> None:
    field = ProceduralSpecimen(seed=5).region(20000.0, 3000.0, 512, 384)
    assert field.min() >= 0.0
    assert field.max() <= 1.0
    dark = (field < 0.25).mean()
    grey = ((field >= 0.25) & (field < 0.7)).mean()
    bright = (field >= 0.7).mean()
    assert 0.25 < dark < 0.6
    assert 0.25 < grey < 0.65
    assert 0.02 < bright < 0.25


def test_lamellar_period_in_range() -> None:
    # The strongest non-DC spatial frequency of a colony-sized window is the
    # lamellar one: its period must lie in the 8-20 px range of the paper.
    periods = []
    for seed in (0, 1, 2):
        field = render_eutectic(4000, 4000, 128, 128, seed)
        spectrum = np.abs(np.fft.fftshift(np.fft.fft2(field - field.mean())))
        fy, fx = np.meshgrid(
            np.fft.fftshift(np.fft.fftfreq(128)),
            np.fft.fftshift(np.fft.fftfreq(128)),
            indexing="ij",
        )
        radius = np.hypot(fx, fy)
        spectrum[radius < 1 / 40] = 0
        peak = np.unravel_index(np.argmax(spectrum), spectrum.shape)
        periods.append(1.0 / radius[peak])
    assert all(7.0 < p < 22.0 for p in periods), periods


def test_memory_stays_bounded_far_apart() -> None:
    spec = ProceduralSpecimen(seed=0, tile_size=64, max_tiles=12)
    for k in range(25):
        spec.region(5000.0 * k + 0.5, 1000.0 * (k % 3), 100, 70)
        assert spec.cached_tiles <= 12
    assert spec.tiles_rendered > 12
    # A position as far as the paper's mosaic still has texture.
    far = spec.region(123_000.3, 7_800.6, 100, 70)
    assert np.isfinite(far).all()
    assert far.std() > 0.1


def _gradient_image() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (30, 40), dtype=np.uint8)


def test_image_specimen_inside_and_mirror() -> None:
    image = _gradient_image()
    spec = ImageSpecimen(image)
    np.testing.assert_allclose(spec.region(3.0, 2.0, 10, 5), image[2:7, 3:13] / 255.0, atol=1e-6)
    # Reflection without repeating the edge: x = -1 is column 1, x = 40 is column 38.
    left = spec.region(-3.0, 0.0, 3, 30)
    np.testing.assert_allclose(left, image[:, [3, 2, 1]] / 255.0, atol=1e-6)
    right = spec.region(40.0, 0.0, 2, 30)
    np.testing.assert_allclose(right, image[:, [38, 37]] / 255.0, atol=1e-6)
    # Far away the plane repeats with period 2 * (size - 1).
    far = spec.region(3.0 + 78 * 50, 2.0 + 58 * 20, 10, 5)
    np.testing.assert_allclose(far, spec.region(3.0, 2.0, 10, 5), atol=1e-6)


def test_image_specimen_scale_and_colour() -> None:
    image = _gradient_image()
    colour = np.dstack([image, image, image])
    spec = ImageSpecimen(colour, scale=2.0)
    assert spec.size == (80, 60)
    shrunk = ImageSpecimen(image.astype(np.uint16) * 257, scale=0.5)
    assert shrunk.size == (20, 15)
    np.testing.assert_allclose(
        shrunk.region(0.0, 0.0, 20, 15).mean(), image.mean() / 255, atol=0.02
    )


def test_load_specimen_from_file(tmp_path: Path) -> None:
    path = tmp_path / "spec.png"
    image = _gradient_image()
    cv2.imwrite(str(path), image)
    spec = load_specimen(str(path))
    np.testing.assert_allclose(spec.region(0.0, 0.0, 40, 30), image / 255.0, atol=1e-6)


def test_load_specimen_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nothere.png"
    with pytest.raises(SourceError, match=r"nothere\.png.*not found"):
        load_specimen(str(missing))
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not an image")
    with pytest.raises(SourceError, match=r"garbage\.png.*cannot decode"):
        load_specimen(str(garbage))
    with pytest.raises(SourceError, match="not a file"):
        load_specimen(str(tmp_path))


@pytest.mark.realdata
def test_real_eutectic_specimen(data_dir: Path) -> None:
    path = data_dir / "eutectic-alcumg" / "3000X_Al-Cu_Mg_EXP9_S7.tif"
    spec = load_specimen(str(path), scale=0.5)
    assert isinstance(spec, ImageSpecimen)
    assert spec.size == (1024, 885)
    inside = spec.region(100.0, 100.0, 256, 192)
    # The micrograph is three-phase with a third of it clipped to black.
    assert (inside < 0.05).mean() > 0.1
    assert (inside > 0.6).mean() > 0.05
    # Traversals far beyond the image stay on (mirrored) texture.
    far = spec.region(5000.5, 3000.25, 256, 192)
    assert far.std() > 0.15
