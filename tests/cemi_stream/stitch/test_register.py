"""Pairwise registration: accuracy against the virtual SEM's ground truth and real tiles,
and every way it must refuse rather than answer wrongly."""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from cemi_stream.errors import CemiError, ConfigError
from cemi_stream.stitch.register import (
    Prepared,
    RegisterConfig,
    Registrar,
    RegistrationError,
)
from drivers.sim import Scanner, SimConfig, SimSource

W, H = 512, 384  # smaller than real frames: the method does not depend on size
EUTECTIC = "eutectic-alcumg/3000X_Al-Cu_Mg_EXP9_S7.tif"
TILES = "bse-tiles-stitch2d"

Pair = tuple[np.ndarray, np.ndarray, tuple[float, float], str]


def _pairs(source: SimSource, fpr: int, scanner: Scanner | None = None) -> list[Pair]:
    """Horizontal and row-to-row neighbour pairs with their true shifts."""
    images = []
    for i in range(len(source.traversal)):
        if scanner is None:
            images.append(source.render(i))
        else:
            t = source.truth_for(i)
            rng = np.random.default_rng([source.config.seed, i, 99])
            images.append(scanner.render(source.specimen, t.x_px, t.y_px, W, H, rng))
    out: list[Pair] = []
    rows = len(images) // fpr
    for r in range(rows):
        for c in range(fpr):
            i = r * fpr + c
            for j, kind in ((i + 1, "row"), (i + fpr, "column")):
                if (kind == "row" and c == fpr - 1) or j >= len(images):
                    continue
                a, b = source.truth_for(i), source.truth_for(j)
                out.append((images[i], images[j], (b.x_px - a.x_px, b.y_px - a.y_px), kind))
    return out


@pytest.fixture(scope="module")
def sim() -> SimSource:
    """A 2 x 3 traversal (45 % overlap, +-10 px jitter); its specimen serves every test."""
    config = SimConfig(
        rows=2, frames_per_row=3, frame_width=W, frame_height=H, overlap=0.45, noise="ld", seed=3
    )
    source = SimSource(config)
    source.open()
    return source


@pytest.fixture(scope="module")
def sim_pairs(sim: SimSource) -> dict[str, list[Pair]]:
    """LD and HD renderings of the traversal's neighbour pairs."""
    return {"ld": _pairs(sim, 3), "hd": _pairs(sim, 3, Scanner("hd"))}


def _shot(sim: SimSource, x: float, y: float, w: int, h: int, noise: str = "hd") -> np.ndarray:
    """A frame of the fixture's specimen at any position and size."""
    return Scanner(noise).render(sim.specimen, x, y, w, h, np.random.default_rng([int(x), int(y)]))


@pytest.fixture(scope="module")
def registrar() -> Registrar:
    return Registrar()


def _errors(reg: Registrar, pairs: list[Pair]) -> list[float]:
    errors = []
    for a, b, (tx, ty), _ in pairs:
        shift = reg.register(reg.prepare(a), reg.prepare(b))
        assert shift.ok, (tx, ty, shift)
        errors.append(math.hypot(shift.dx - tx, shift.dy - ty))
    return errors


# -- accuracy --------------------------------------------------------------------


@pytest.mark.parametrize("noise", ["ld", "hd"])
def test_sim_neighbours_are_registered_to_sub_pixel_accuracy(
    registrar: Registrar, sim_pairs: dict[str, list[Pair]], noise: str
) -> None:
    # Estimated shifts against TRUE differences of positions: the LD smear
    # biases every frame alike, so it cancels in the difference.
    errors = _errors(registrar, sim_pairs[noise])
    assert len(errors) == 7
    assert float(np.median(errors)) < 0.2, errors
    assert max(errors) < 0.5, errors


def test_convention_mov_shows_ref_at_plus_shift(registrar: Registrar, sim: SimSource) -> None:
    # Two crops of one image: mov[y, x] = big[y0 + y, x0 + x] = ref[y + dy, x + dx].
    big = _shot(sim, 40.0, 30.0, W + 200, H + 100)
    for dx, dy in ((137, 41), (-3, 88), (150, -60)):
        x0, y0 = max(dx, 0), max(dy, 0)
        r0x, r0y = x0 - dx, y0 - dy
        mov = big[y0 : y0 + H, x0 : x0 + W]
        ref = big[r0y : r0y + H, r0x : r0x + W]
        shift = registrar.register(registrar.prepare(ref), registrar.prepare(mov))
        assert shift.ok
        assert shift.dx == pytest.approx(dx, abs=0.05)
        assert shift.dy == pytest.approx(dy, abs=0.05)
        # The score is exact; the detail check works on 4x4 blocks, which do
        # not line up unless the shift is a multiple of 4.
        assert shift.score > 0.99 and shift.detail > 0.5


def test_swapping_the_frames_negates_the_shift(
    registrar: Registrar, sim_pairs: dict[str, list[Pair]]
) -> None:
    a, b, _, _ = sim_pairs["ld"][0]
    pa, pb = registrar.prepare(a), registrar.prepare(b)
    forward, backward = registrar.register(pa, pb), registrar.register(pb, pa)
    assert forward.ok and backward.ok
    assert backward.dx == pytest.approx(-forward.dx, abs=0.05)
    assert backward.dy == pytest.approx(-forward.dy, abs=0.05)
    assert backward.score == pytest.approx(forward.score, abs=1e-9)


def test_strided_views_are_accepted(registrar: Registrar, sim_pairs: dict[str, list[Pair]]) -> None:
    # Rotated by 180 degrees (negative strides): the shift is negated.
    a, b, (tx, ty), _ = sim_pairs["hd"][0]
    shift = registrar.register(registrar.prepare(a[::-1, ::-1]), registrar.prepare(b[::-1, ::-1]))
    assert shift.ok
    assert shift.dx == pytest.approx(-tx, abs=0.3) and shift.dy == pytest.approx(-ty, abs=0.3)


def test_prepared_frames_are_reused_without_change(
    registrar: Registrar, sim_pairs: dict[str, list[Pair]]
) -> None:
    # One frame against its two neighbours, each registration twice.
    pairs = sim_pairs["ld"]
    a, b, _, _ = pairs[0]  # frame 0 -> 1
    _, c, _, _ = pairs[1]  # frame 0 -> 3 (the row below)
    pa, pb, pc = (registrar.prepare(x) for x in (a, b, c))
    first = (registrar.register(pa, pb), registrar.register(pa, pc))
    again = (registrar.register(pa, pb), registrar.register(pa, pc))
    assert first == again
    assert not pa.image.flags.writeable  # a read-only view: the cache cannot go stale silently


def test_frames_of_different_sizes(registrar: Registrar, sim_pairs: dict[str, list[Pair]]) -> None:
    a, b, (tx, ty), _ = sim_pairs["ld"][0]
    cropped = b[30:-40, 20:-60]  # mov's top-left moves by (20, 30)
    shift = registrar.register(registrar.prepare(a), registrar.prepare(cropped))
    assert shift.ok
    assert shift.dx == pytest.approx(tx + 20, abs=0.3)
    assert shift.dy == pytest.approx(ty + 30, abs=0.3)
    back = registrar.register(registrar.prepare(cropped), registrar.prepare(a))
    assert back.ok and back.dx == pytest.approx(-(tx + 20), abs=0.3)


def test_large_overlap_small_shift(registrar: Registrar, sim: SimSource) -> None:
    # Video-like neighbours (95 % overlap): the alias of a small shift must not win.
    big = _shot(sim, 700.0, 300.0, W + 40, H + 20, "ld")
    ref, mov = big[:H, :W], big[13 : 13 + H, 29 : 29 + W]
    shift = registrar.register(registrar.prepare(ref), registrar.prepare(mov))
    assert shift.ok and (round(shift.dx), round(shift.dy)) == (29, 13)


def test_prediction_and_search_region(
    registrar: Registrar, sim_pairs: dict[str, list[Pair]]
) -> None:
    a, b, (tx, ty), _ = sim_pairs["ld"][0]
    pa, pb = registrar.prepare(a), registrar.prepare(b)
    # A motion-model guess off by tens of pixels, bounded search: found.
    near = registrar.register(pa, pb, (tx + 35, ty - 25), 60)
    assert near.ok and math.hypot(near.dx - tx, near.dy - ty) < 0.5
    # Off by 200 px with no bound: the prediction only breaks ties.
    unbounded = registrar.register(pa, pb, (tx - 200, ty + 40))
    assert unbounded.ok and math.hypot(unbounded.dx - tx, unbounded.dy - ty) < 0.5
    # The default bound comes from the configuration.
    bounded = Registrar(RegisterConfig(search_px=30.0))
    shift = bounded.register(bounded.prepare(a), bounded.prepare(b), (tx - 120, ty))
    assert not shift.ok


def test_refine_near_a_good_prediction_and_falls_back_on_a_bad_one(
    registrar: Registrar, sim_pairs: dict[str, list[Pair]]
) -> None:
    """``refine`` agrees with ``register``; a prediction beyond its reach takes the full search."""
    for a, b, (tx, ty), _ in sim_pairs["ld"]:
        pa, pb = registrar.prepare(a), registrar.prepare(b)
        full = registrar.register(pa, pb, (tx + 3, ty - 2), 50)
        near = registrar.refine(pa, pb, (tx + 3, ty - 2), 50)
        assert full.ok and near.ok
        assert math.hypot(near.dx - tx, near.dy - ty) < 0.5
        assert math.hypot(near.dx - full.dx, near.dy - full.dy) < 0.2
    a, b, (tx, ty), _ = sim_pairs["ld"][0]
    pa, pb = registrar.prepare(a), registrar.prepare(b)
    # 40 px off: outside the fine stage's reach, found by the fallback search.
    far = registrar.refine(pa, pb, (tx + 40, ty), 60)
    assert far.ok and math.hypot(far.dx - tx, far.dy - ty) < 0.5
    # Out of the bound: refused, as register refuses it.
    assert not registrar.refine(pa, pb, (tx + 150, ty + 60), 40).ok
    with pytest.raises(RegistrationError):
        registrar.refine(pa, pb, (math.nan, 0.0))


# -- refusals ----------------------------------------------------------------------


def test_predicted_offset_far_off_with_search_is_refused(
    registrar: Registrar, sim_pairs: dict[str, list[Pair]]
) -> None:
    a, b, (tx, ty), _ = sim_pairs["ld"][0]
    predicted = (tx + 150, ty + 60)
    shift = registrar.register(registrar.prepare(a), registrar.prepare(b), predicted, 40)
    assert not shift.ok
    # Whatever it reports lies inside the region it was allowed to search.
    assert math.hypot(shift.dx - predicted[0], shift.dy - predicted[1]) <= 40 + 8


def test_blank_frame_is_refused(registrar: Registrar, sim_pairs: dict[str, list[Pair]]) -> None:
    a = sim_pairs["ld"][0][0]
    blank = registrar.prepare(np.full((H, W), 37, np.uint8))
    assert blank.flat
    for shift in (
        registrar.register(blank, registrar.prepare(a)),
        registrar.register(registrar.prepare(a), blank, (100.0, 5.0)),
    ):
        assert not shift.ok and shift.score == 0.0
    # With a prediction the failure reports it back, not an invented shift.
    shift = registrar.register(registrar.prepare(a), blank, (100.0, 5.0))
    assert (shift.dx, shift.dy) == (100.0, 5.0)


def test_frames_without_overlap_are_refused(registrar: Registrar, sim: SimSource) -> None:
    # Raster row end vs next row start, and two frames of one row 2 frames apart.
    for i, j in ((2, 3), (0, 2), (3, 5)):
        a, b = sim.truth_for(i), sim.truth_for(j)
        assert abs(b.x_px - a.x_px) > W or abs(b.y_px - a.y_px) > H
        shift = registrar.register(
            registrar.prepare(sim.render(i)), registrar.prepare(sim.render(j))
        )
        assert not shift.ok, (i, j, shift)


def test_identical_frame_gives_exactly_zero(
    registrar: Registrar, sim_pairs: dict[str, list[Pair]]
) -> None:
    a = sim_pairs["ld"][0][0]
    pa = registrar.prepare(a)
    for other in (pa, registrar.prepare(a.copy())):
        shift = registrar.register(pa, other)
        assert (shift.dx, shift.dy, shift.score, shift.ok, shift.why) == (0.0, 0.0, 1.0, True, "")
        assert shift.dx == 0.0 and shift.dy == 0.0  # exactly, not approximately


def test_pure_noise_frames_are_refused(
    registrar: Registrar, sim_pairs: dict[str, list[Pair]]
) -> None:
    rng = np.random.default_rng(7)
    noise = [rng.integers(0, 256, (H, W), dtype=np.uint8) for _ in range(3)]
    image = sim_pairs["ld"][0][0]
    for a, b in ((noise[0], noise[1]), (noise[2], image), (image, noise[1])):
        shift = registrar.register(registrar.prepare(a), registrar.prepare(b))
        assert not shift.ok and shift.score < 0.2, shift


def test_unrelated_coarse_shapes_are_refused(registrar: Registrar) -> None:
    # Large smooth blobs correlate by chance on a small overlap (plain NCC
    # up to ~0.45); their band-passed detail does not, and that is what is checked.
    rng = np.random.default_rng(3)
    blobs = [
        cv2.GaussianBlur(rng.normal(0, 1, (H, W)).astype(np.float32), (0, 0), 25) for _ in range(4)
    ]
    frames = []
    for field in blobs:
        grey = 128 + 60 * field / field.std() + rng.normal(0, 15, (H, W))
        frames.append(np.clip(grey, 0, 255).astype(np.uint8))
    scores = []
    for a, b in ((0, 1), (2, 3), (1, 3)):
        shift = registrar.register(registrar.prepare(frames[a]), registrar.prepare(frames[b]))
        assert not shift.ok, shift
        scores.append(shift.score)
    assert max(scores) >= 0.3  # the old fixed NCC threshold alone would have passed


# -- inputs and configuration --------------------------------------------------------


@pytest.mark.parametrize(
    "image",
    [
        np.zeros((H, W), np.float32),
        np.zeros((H, W, 3), np.uint8),
        np.zeros((8, W), np.uint8),
        [[0, 1], [2, 3]],
    ],
    ids=["float", "rgb", "tiny", "list"],
)
def test_bad_frames_raise(registrar: Registrar, image: object) -> None:
    with pytest.raises(RegistrationError, match="register: frame"):
        registrar.prepare(image)  # type: ignore[arg-type]


def test_frames_from_another_configuration_or_bad_prediction_raise(
    registrar: Registrar, sim_pairs: dict[str, list[Pair]]
) -> None:
    a, b, _, _ = sim_pairs["ld"][0]
    other = Registrar(RegisterConfig(downsample=2))
    with pytest.raises(RegistrationError, match="configuration"):
        registrar.register(registrar.prepare(a), other.prepare(b))
    with pytest.raises(RegistrationError, match="not finite"):
        registrar.register(registrar.prepare(a), registrar.prepare(b), (math.nan, 0.0))
    assert issubclass(RegistrationError, CemiError)


@pytest.mark.parametrize(
    "field",
    [
        {"downsample": 0},
        {"downsample": 2.0},
        {"min_reliability": 0.0},
        {"min_band_z": -1.0},
        {"noise_tolerance": math.inf},
        {"min_margin": 2.0},
        {"search_px": -1.0},
        {"min_overlap": 0.0},
        {"peaks": 0},
        {"fine_window": 8},
        {"fine_lowpass": 0.0},
        {"highpass": 0.5},
        {"fine_whiten": 2.0},
        {"subpixel": "spline"},
        {"fine_edges": "blackman"},
    ],
)
def test_bad_configuration_raises(field: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match="register\\."):
        RegisterConfig(**field)  # type: ignore[arg-type]


def test_other_resolutions_and_small_frames(sim_pairs: dict[str, list[Pair]]) -> None:
    # Non-power-of-two divisor (area averaging) and frames too small for 4x.
    a, b, (tx, ty), _ = sim_pairs["hd"][0]
    reg = Registrar(RegisterConfig(downsample=3))
    shift = reg.register(reg.prepare(a), reg.prepare(b))
    assert shift.ok
    assert math.hypot(shift.dx - tx, shift.dy - ty) < 0.3
    small = Registrar().prepare(a[:40, :300])
    assert isinstance(small, Prepared) and small.factor == 2


# -- real data ---------------------------------------------------------------------


@pytest.mark.realdata
def test_real_eutectic_specimen(registrar: Registrar, data_dir: Path) -> None:
    # The real micrograph as specimen: periodic lamellae, large uniform phases.
    config = SimConfig(
        rows=2,
        frames_per_row=3,
        frame_width=W,
        frame_height=H,
        overlap=0.45,
        noise="ld",
        seed=4,
        source=str(data_dir / EUTECTIC),
    )
    source = SimSource(config)
    source.open()
    errors = _errors(registrar, _pairs(source, 3))
    assert float(np.median(errors)) < 0.25, errors
    assert max(errors) < 0.6, errors


@pytest.mark.realdata
@pytest.mark.parametrize("predicted", [False, True], ids=["blind", "predicted"])
def test_real_bse_tiles_match_the_reference_offsets(
    registrar: Registrar, data_dir: Path, predicted: bool
) -> None:
    # 6 real BSE tiles (2 columns x 3 rows), 10-26 % overlap, strong
    # brightness mismatch; reference positions are [y, x] of each tile.
    folder = data_dir / TILES
    reference = json.loads((folder / "reference_offsets.json").read_text())["coords_yx_pixels"]

    def name(col: int, row: int) -> str:
        return f"stitch2d_ex[Grid@{col} {row}].jpg"

    prepared = {}
    for col in range(2):
        for row in range(3):
            image = cv2.imread(str(folder / name(col, row)), cv2.IMREAD_GRAYSCALE)
            assert image is not None and image.shape == (442, 512)
            prepared[col, row] = registrar.prepare(image)
    checked = 0
    for (col, row), pa in prepared.items():
        for other, guess in (((col + 1, row), (385.0, 0.0)), ((col, row + 1), (0.0, 396.0))):
            if other not in prepared:
                continue
            ya, xa = reference[name(col, row)]
            yb, xb = reference[name(*other)]
            # A stage guess off by ~20-30 px, searched within 60 px.
            guess_off = (guess[0] + 25.0, guess[1] - 20.0) if predicted else None
            shift = registrar.register(pa, prepared[other], guess_off, 60.0 if predicted else None)
            assert shift.ok, (col, row, other, shift)
            assert shift.dx == pytest.approx(xb - xa, abs=2.0), (col, row, other)
            assert shift.dy == pytest.approx(yb - ya, abs=2.0), (col, row, other)
            checked += 1
    assert checked == 7


@pytest.mark.realdata
def test_real_fast_scan_against_slow_scan(registrar: Registrar, data_dir: Path) -> None:
    # Real 100 ns noise: crops of a fast scan against overlapping crops of the
    # slow scan of the same field agree with the crop offset plus the drift
    # between the two scans (measured on the whole frames).
    folder = data_dir / "kriss-sem-pairs" / "time"
    for k in (1, 2, 3):
        fast = cv2.imread(str(folder / "low" / f"low_100ns_{k:03d}.png"), 0)[1:441, 1:511]
        slow = cv2.imread(str(folder / "high" / f"high_30us_{k:03d}.png"), 0)[1:441, 1:511]
        drift = registrar.register(registrar.prepare(slow), registrar.prepare(fast))
        assert drift.ok
        for ox, oy in ((190, 0), (0, 180), (150, 120)):
            shift = registrar.register(
                registrar.prepare(slow[: 440 - oy, : 510 - ox]), registrar.prepare(fast[oy:, ox:])
            )
            assert shift.ok, (k, ox, oy, shift)
            assert shift.dx == pytest.approx(ox + drift.dx, abs=0.75), (k, ox, oy)
            assert shift.dy == pytest.approx(oy + drift.dy, abs=0.75), (k, ox, oy)
