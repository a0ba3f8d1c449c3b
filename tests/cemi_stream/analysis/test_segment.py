"""Lamellar segmentation inference: normalisation, padding, windows, loading, the shipped model."""

from __future__ import annotations

import math
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from cemi_stream.analysis.lamellae import synthetic_lamellae
from cemi_stream.analysis.segment import (
    DEFAULT_SEGMENTER,
    ClassicalSegmenter,
    ModelSegmenter,
    clear_cache,
    load_segmenter,
    normalise_tile,
    pad_to_multiple,
    windowed_logits,
)
from cemi_stream.errors import AnalysisError, CemiError, ModelError
from models.unetpp import SMALL_ENCODER, build_segmenter, save_segmenter
from models.weights import ModelCard, card_path

TINY = {"encoder": SMALL_ENCODER, "encoder_depth": 3, "decoder_channels": [16, 8, 8]}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("seg")
    card = ModelCard(name="tiny", arch={}, training={}, iterations=0, metrics={})
    return save_segmenter(build_segmenter(TINY), folder / "tiny.safetensors", card)


@pytest.fixture(scope="module")
def shipped() -> ModelSegmenter:
    seg = load_segmenter(DEFAULT_SEGMENTER)
    assert isinstance(seg, ModelSegmenter)
    return seg


def lamellar_tile(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A 413 x 508 uint8 tile: lamellae of period 9 px in a disc, isotropic blobs around."""
    yy, xx = np.mgrid[0:413, 0:508]
    region = (yy - 206) ** 2 + (xx - 254) ** 2 < 150**2
    img, region = synthetic_lamellae(
        (413, 508), 9.0, 0.6, region, noise=0.1, wave="square", background="blobs", seed=seed
    )
    return np.clip(img * 160 + 40, 0, 255).astype(np.uint8), region


def test_normalisation_is_independent_of_the_dtype() -> None:
    rng = np.random.default_rng(0)
    u8 = rng.integers(10, 240, (40, 50), dtype=np.uint8)
    a = normalise_tile(u8)
    assert a.dtype == np.float32 and a.min() == -1.0 and a.max() == 1.0
    np.testing.assert_allclose(normalise_tile(u8.astype(np.uint16) * 257), a, atol=1e-5)
    np.testing.assert_allclose(normalise_tile(u8 / 255.0), a, atol=1e-5)
    np.testing.assert_allclose(normalise_tile(u8.astype(np.float32) * 3 - 7), a, atol=1e-5)
    assert not normalise_tile(np.full((8, 8), 7, np.uint8)).any()  # flat: zeros
    valid = np.zeros((40, 50), bool)
    valid[:, :25] = True
    out = normalise_tile(u8, valid)
    assert not out[:, 25:].any() and out[:, :25].min() == -1.0
    with pytest.raises(AnalysisError, match="2-D"):
        normalise_tile(np.zeros((4, 4, 3)))
    with pytest.raises(AnalysisError, match="does not match"):
        normalise_tile(u8, valid[:10])


def test_padding_to_multiples_of_32_is_cropped_back_exactly() -> None:
    x = np.arange(37 * 45, dtype=np.float32).reshape(37, 45)
    p = pad_to_multiple(x, 32)
    assert p.shape == (64, 64)
    np.testing.assert_array_equal(p[:37, :45], x)
    assert pad_to_multiple(np.zeros((64, 96)), 32).shape == (64, 96)
    seen: list[tuple[int, ...]] = []

    def forward(batch: np.ndarray) -> np.ndarray:
        seen.append(batch.shape)
        return batch * 2.0

    out = windowed_logits(forward, x, window_px=128)
    assert seen == [(1, 1, 64, 64)]
    np.testing.assert_array_equal(out, x * 2.0)


def test_overlapping_windows_blend_to_the_single_pass() -> None:
    # A pointwise network (1x1 convolution): every window sees what the whole image gives,
    # so the blend of overlapping windows must equal the single pass.
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(1, 1, 1).eval()

    def forward(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out: np.ndarray = conv(torch.from_numpy(batch)).numpy()
        return out

    img = np.random.default_rng(1).standard_normal((300, 410)).astype(np.float32)
    single = windowed_logits(forward, img, window_px=512)
    windows = windowed_logits(forward, img, window_px=128, overlap_px=40)
    np.testing.assert_allclose(windows, single, rtol=1e-5, atol=1e-5)
    with pytest.raises(AnalysisError, match="overlap_px"):
        windowed_logits(forward, img, window_px=128, overlap_px=128)


def test_model_predicts_tile_shapes_and_respects_valid(tiny_model: Path) -> None:
    seg = load_segmenter(str(tiny_model))
    for shape in ((413, 508), (37, 45), (64, 64)):
        tile = np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8)
        mask = seg.predict(tile)
        assert mask.shape == shape and mask.dtype == bool
    tile = np.random.default_rng(1).integers(0, 255, (64, 80), dtype=np.uint8)
    valid = np.zeros((64, 80), bool)
    assert not seg.predict(tile, valid).any()
    many = seg.predict_many([tile, tile[:40], tile], [None, None, valid])
    assert [m.shape for m in many] == [(64, 80), (40, 80), (64, 80)]
    np.testing.assert_array_equal(many[0], seg.predict(tile))
    assert not many[2].any()


def test_load_caches_describes_and_refuses(tiny_model: Path, tmp_path: Path) -> None:
    clear_cache()
    a = load_segmenter(str(tiny_model))
    assert load_segmenter(tiny_model) is a
    assert load_segmenter(tiny_model.parent) is a  # a folder holding one model
    info = a.describe()
    assert info["name"] == "tiny" and info["encoder"] == SMALL_ENCODER
    assert len(info["sha256"]) == 64 and info["kind"] == "lamellar-segmenter"
    classical = load_segmenter("classical")
    assert isinstance(classical, ClassicalSegmenter)
    assert classical.describe() == {
        "name": "classical",
        "kind": "classical",
        "sha256": None,
        "encoder": None,
    }
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    card_path(bad).write_text(card_path(tiny_model).read_text())
    cases = [
        ("no-such-model", "no such model 'no-such-model'.*train-segmenter"),
        (str(tmp_path / "missing.safetensors"), "no such model"),
        (str(bad), "not a valid safetensors file"),
        ("none", "no segmenter to load"),
    ]
    nocard = tmp_path / "nocard.safetensors"
    nocard.write_bytes(tiny_model.read_bytes())
    cases.append((str(nocard), "missing model card"))
    for spec, message in cases:
        with pytest.raises(ModelError, match=message) as info_:
            load_segmenter(spec)
        assert isinstance(info_.value, CemiError) and "\n" not in str(info_.value)
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="no CUDA GPU"):
            load_segmenter(str(tiny_model), device="cuda")


def test_predict_is_safe_from_several_threads(tiny_model: Path) -> None:
    seg = load_segmenter(str(tiny_model))
    tiles = [np.random.default_rng(i).integers(0, 255, (96, 128), dtype=np.uint8) for i in range(6)]
    expected = [seg.predict(t) for t in tiles]
    results: dict[int, np.ndarray] = {}

    def work(i: int) -> None:
        results[i] = seg.predict(tiles[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(6):
        np.testing.assert_array_equal(results[i], expected[i])


def test_shipped_model_finds_lamellae_better_than_chance(shipped: ModelSegmenter) -> None:
    info = shipped.describe()
    assert info["name"] == DEFAULT_SEGMENTER and info["encoder"] == SMALL_ENCODER
    assert Path(info["path"]).stat().st_size < 8 * 2**20
    assert "train-segmenter" in shipped.card.training["command_cli"]
    assert "--weak-fold 0/2" in shipped.card.training["command"]
    tile, region = lamellar_tile()
    mask = shipped.predict(tile)
    iou = (mask & region).sum() / (mask | region).sum()
    assert iou > 0.6, iou
    # Isotropic texture alone is (almost) not lamellar.
    blobs, _ = synthetic_lamellae(
        (413, 508), 9.0, 0.0, np.zeros((413, 508), bool), noise=0.1, background="particles", seed=3
    )
    assert shipped.predict(np.clip(blobs * 160 + 40, 0, 255).astype(np.uint8)).mean() < 0.1


def test_shipped_model_windows_agree_with_the_single_pass(shipped: ModelSegmenter) -> None:
    tile, _ = lamellar_tile(seed=1)
    single = shipped.predict(tile)
    windowed = ModelSegmenter(
        shipped.model, shipped.card, shipped.path, window_px=256, overlap_px=96
    ).predict(tile)
    assert (single == windowed).mean() > 0.97
    assert not math.isnan(float(shipped.probability(tile).mean()))


def test_shipped_model_tells_pearlite_from_spheroidite(
    shipped: ModelSegmenter, data_dir: Path
) -> None:
    # Held-out images only: the model's weak labels came from the images at even
    # sorted positions of each class (--weak-fold 0/2); these are at odd ones.
    import cv2

    root = data_dir / "uhcs-steel"
    if not root.is_dir():
        pytest.skip(f"{root} not found")
    frac = {}
    for cls in ("pearlite", "spheroidite"):
        files = sorted((root / cls).glob("*.jpg"))[1::2][:3]
        frac[cls] = [
            float(shipped.predict(cv2.imread(str(f), cv2.IMREAD_GRAYSCALE)).mean()) for f in files
        ]
    assert np.median(frac["pearlite"]) > np.median(frac["spheroidite"]) + 0.2, frac
