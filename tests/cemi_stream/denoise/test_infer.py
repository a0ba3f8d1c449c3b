"""The Denoiser (padding, tiling, batching, input checks) and the ``denoise`` files command."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
import torch

from cemi_stream.capture.crop import detect_crop
from cemi_stream.denoise.infer import Denoiser, denoise_files, list_images, write_image
from cemi_stream.denoise.tiling import tile_boxes
from cemi_stream.errors import ConfigError, DenoiseError, ModelError
from models.rrdbnet import build_generator
from models.weights import ModelCard, save_model


def textured(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    """A smooth random 'specimen' with noise, uint8 (y, x)."""
    rng = np.random.default_rng(seed)
    base = cv2.GaussianBlur(rng.random(shape).astype(np.float32), (0, 0), 3)
    base = (base - base.min()) / (base.max() - base.min())
    noisy = base * 200 + 28 + rng.normal(0, 20, shape)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def save_test_model(path: Path, seed: int = 0) -> Path:
    """A random-initialised compact RRDBNet whose output spans the grey range.

    Freshly initialised, the output is nearly flat (mean ~0.03, std ~0.003);
    conv_last is rescaled (an affine change of the output) to mean 0.5 and
    std 0.2 on a textured frame, so tiling or padding errors show.
    """
    torch.manual_seed(seed)
    net = build_generator("compact").eval()
    x = torch.from_numpy(textured((128, 128), seed).astype(np.float32) / 255)[None, None]
    with torch.inference_mode():
        y = net(x)
    gain = 0.2 / float(y.std())
    with torch.no_grad():
        net.conv_last.weight.mul_(gain)
        net.conv_last.bias.mul_(gain).add_(0.5 - gain * float(y.mean()))
    return save_model(net, path, ModelCard(name="test-compact", arch={}))


def with_data_bar(shape: tuple[int, int], seed: int = 0, bar_rows: int = 29) -> np.ndarray:
    """A textured frame with an FEI-like data bar: flat dark rows with white labels."""
    height, width = shape
    bar = np.full((bar_rows, width), 30, np.uint8)
    font = cv2.FONT_HERSHEY_SIMPLEX
    cv2.putText(bar, "HV 5.00kV WD 5.1mm", (4, 12), font, 0.35, 255, 1, cv2.LINE_AA)
    cv2.putText(bar, "mag 10000x  2um", (4, 25), font, 0.35, 255, 1, cv2.LINE_AA)
    return np.vstack([textured((height - bar_rows, width), seed), bar])


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_test_model(tmp_path_factory.mktemp("model") / "test-compact.safetensors")


@pytest.fixture(scope="module")
def cpu(model_path: Path) -> Denoiser:
    return Denoiser(model_path, "cpu")


def test_denoiser_reports_its_model_and_backend(cpu: Denoiser, model_path: Path) -> None:
    assert cpu.backend == "cpu"
    assert cpu.model_path == model_path
    assert cpu.card.name == "test-compact"
    assert cpu.card.arch["num_feat"] == 16


def test_padding_keeps_the_original_size(cpu: Denoiser) -> None:
    image = textured((250, 330), seed=1)  # neither side a multiple of 4
    out = cpu.denoise(image)
    assert out.shape == (250, 330) and out.dtype == np.uint8
    assert float(out.std()) > 10  # a real image came back, not a flat one
    # The uint8 result is the float result clipped and rounded.
    ref = np.rint(np.clip(cpu.denoise_float(image) * 255, 0, 255)).astype(np.uint8)
    np.testing.assert_array_equal(out, ref)


def tile_edge_distance(shape: tuple[int, int], tile: int, overlap: int) -> np.ndarray:
    """Distance (px) of each pixel to the nearest tile edge inside the frame."""
    height, width = shape
    boxes = tile_boxes(shape, tile, overlap, align=4)
    rows = {b.y0 for b in boxes if b.y0 > 0} | {b.y1 for b in boxes if b.y1 < height}
    cols = {b.x0 for b in boxes if b.x0 > 0} | {b.x1 for b in boxes if b.x1 < width}
    yy, xx = np.mgrid[:height, :width]
    dist = np.full(shape, np.inf)
    for r in rows:
        dist = np.minimum(dist, np.abs(yy - r))
    for c in cols:
        dist = np.minimum(dist, np.abs(xx - c))
    return dist


def test_tiled_matches_whole_frame(model_path: Path, cpu: Denoiser) -> None:
    image = textured((256, 320), seed=2)
    whole = cpu.denoise_float(image)
    tiled = Denoiser(model_path, "cpu", tile_px=128, overlap_px=32).denoise_float(image)
    seams = Denoiser(model_path, "cpu", tile_px=128, overlap_px=0).denoise_float(image)
    assert tiled.shape == whole.shape == (256, 320)
    diff = np.abs(tiled - whole)
    far = tile_edge_distance(image.shape, 128, 32) > 16
    # RRDBNet's theoretical receptive field spans the whole tile (~50 3x3
    # convolutions at quarter resolution), but the effective one of this
    # network is small: measured, outputs more than 16 px from any tile edge
    # agree with the whole frame to ~1e-4 (float rounding), those within
    # 8 px differ by up to ~0.5 without overlap.  The feathered blend uses a
    # tile only >= 8 px (a quarter of the overlap) from its edge, so the
    # worst pixel anywhere was measured at 0.03 (7.5 grey levels, inside
    # the overlaps) and the mean at 5e-4.  A trained network sees farther
    # and needs a larger overlap for the same agreement.
    assert float(diff[far].max()) <= 1e-3
    assert float(diff.max()) <= 0.06
    assert float(diff.mean()) <= 2e-3
    # Without overlap the seams are plain: the same check would fail.
    assert float(np.abs(seams - whole).max()) > 0.1


@pytest.mark.parametrize("tile_px", [0, 32])
def test_denoise_batch_matches_single_frames(model_path: Path, cpu: Denoiser, tile_px: int) -> None:
    # Frames of equal size (and their tiles) share backend calls of up to 3.
    batched = Denoiser(model_path, "cpu", batch_size=3, tile_px=tile_px, overlap_px=8)
    single = Denoiser(model_path, "cpu", batch_size=1, tile_px=tile_px, overlap_px=8)
    images = [textured((64, 96), 1), textured((48, 64), 2), textured((64, 96), 3)]
    batch = batched.denoise_batch_float(images)
    assert [b.shape for b in batch] == [(64, 96), (48, 64), (64, 96)]
    for image, out in zip(images, batch, strict=True):
        assert float(np.abs(out - single.denoise_float(image)).max()) <= 1e-5
    as_uint8 = batched.denoise_batch(images)
    assert all(
        o.dtype == np.uint8 and o.shape == i.shape for o, i in zip(as_uint8, images, strict=True)
    )


def test_grey_saved_as_rgb_is_accepted(cpu: Denoiser) -> None:
    grey = textured((64, 64), 4)
    rgb = np.dstack([grey, grey, grey])
    np.testing.assert_array_equal(cpu.denoise(rgb), cpu.denoise(grey))


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.zeros((64, 64), np.float32), "uint8"),
        (np.zeros((0, 64), np.uint8), "empty"),
        (
            np.dstack([np.zeros((8, 8), np.uint8), np.ones((8, 8), np.uint8)] * 2)[:, :, :3],
            "colour",
        ),
        (np.zeros((2, 8, 8, 1), np.uint8), "2-D"),
        ([[1, 2], [3, 4]], "numpy array"),
    ],
)
def test_wrong_kind_of_image(cpu: Denoiser, image: np.ndarray, message: str) -> None:
    with pytest.raises(DenoiseError, match=message):
        cpu.denoise(image)


def test_bad_settings(model_path: Path) -> None:
    with pytest.raises(ConfigError, match="tile size"):
        Denoiser(model_path, "cpu", tile_px=130)
    with pytest.raises(ConfigError, match="overlap"):
        Denoiser(model_path, "cpu", tile_px=64, overlap_px=64)
    with pytest.raises(ConfigError, match="batch size"):
        Denoiser(model_path, "cpu", batch_size=0)


def test_missing_model_file(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"nope\.safetensors"):
        Denoiser(tmp_path / "nope.safetensors", "cpu")


def test_corrupt_weights_file(model_path: Path, tmp_path: Path) -> None:
    # A valid card beside random bytes in place of the weights.
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(np.random.default_rng(0).bytes(4096))
    card = json.loads(model_path.with_suffix(".json").read_text())
    bad.with_suffix(".json").write_text(json.dumps(card))
    with pytest.raises(ModelError, match="not a valid safetensors file"):
        Denoiser(bad, "cpu")


# --- denoise_files ---------------------------------------------------------------


def test_denoise_files_on_a_folder(model_path: Path, tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    frames = {
        "frame10.png": with_data_bar((160, 192), seed=1),
        "frame2.png": with_data_bar((160, 192), seed=2),
        "plain.tif": textured((100, 124), seed=3),  # no bar, odd size
    }
    for name, frame in frames.items():
        write_image(src / name, frame)
    (src / "notes.txt").write_text("not an image")
    assert [p.name for p in list_images(src)] == ["frame2.png", "frame10.png", "plain.tif"]
    out = tmp_path / "out"
    summary = denoise_files(src, out, model=model_path, backend="cpu", progress=False)
    assert summary["count"] == 3
    assert summary["backend"] == "cpu" and summary["model"] == "test-compact"
    assert summary["databar_frames"] == 2
    assert summary["frames_per_s"] > 0 and summary["seconds"] >= summary["load_seconds"]
    assert sorted(p.name for p in out.iterdir()) == sorted(frames)
    for name, frame in frames.items():
        if name.endswith(".tif"):
            result = tifffile.imread(out / name)
        else:
            result = cv2.imread(str(out / name), cv2.IMREAD_UNCHANGED)
        assert result.shape == frame.shape and result.dtype == np.uint8
        area = detect_crop(frame).rect
        inside = (
            slice(area.y, area.y + area.height),
            slice(area.x, area.x + area.width),
        )
        # The image area is denoised; everything outside it is copied bit for bit.
        assert float(np.abs(result[inside].astype(int) - frame[inside]).mean()) > 5
        outside = np.ones(frame.shape, bool)
        outside[inside] = False
        np.testing.assert_array_equal(result[outside], frame[outside])
        if name.startswith("frame"):
            np.testing.assert_array_equal(result[-29:], frame[-29:])


def test_denoise_files_passes_a_real_data_bar_through(
    model_path: Path, tmp_path: Path, data_dir: Path
) -> None:
    src = data_dir / "kriss-sem-pairs" / "time" / "low" / "low_100ns_001.png"
    if not src.is_file():
        pytest.skip(f"{src} not found")
    out = tmp_path / "out"
    summary = denoise_files(src, out, model=model_path, backend="cpu", tile_px=256, progress=False)
    assert summary["count"] == 1 and summary["databar_frames"] == 1
    frame = cv2.imread(str(src), cv2.IMREAD_GRAYSCALE)
    result = cv2.imread(str(out / src.name), cv2.IMREAD_UNCHANGED)
    assert result.shape == frame.shape == (471, 512)
    np.testing.assert_array_equal(result[-29:], frame[-29:])  # the FEI data bar
    np.testing.assert_array_equal(result[:, 0], frame[:, 0])  # the UI frame
    assert not np.array_equal(result[100:200, 100:200], frame[100:200, 100:200])


def test_denoise_files_stops_at_an_unreadable_file(model_path: Path, tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    write_image(src / "a1.png", textured((64, 64), 1))
    (src / "a2.png").write_text("this is a text file, not a PNG")
    write_image(src / "a3.png", textured((64, 64), 3))
    with pytest.raises(DenoiseError, match=r"a2\.png: cannot read image") as info:
        denoise_files(src, tmp_path / "out", model=model_path, backend="cpu", progress=False)
    assert "\n" not in str(info.value)
    assert (tmp_path / "out" / "a1.png").is_file()  # written before the bad file
    assert not (tmp_path / "out" / "a3.png").exists()


def test_denoise_files_input_errors(model_path: Path, tmp_path: Path) -> None:
    with pytest.raises(DenoiseError, match="no such file or folder"):
        denoise_files(tmp_path / "missing", tmp_path / "out", model=model_path, progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DenoiseError, match="holds no images"):
        denoise_files(empty, tmp_path / "out", model=model_path, progress=False)
    text = tmp_path / "notes.txt"
    text.write_text("x")
    with pytest.raises(DenoiseError, match="not an image file"):
        denoise_files(text, tmp_path / "out", model=model_path, progress=False)
    write_image(empty / "a.png", textured((32, 32)))
    with pytest.raises(DenoiseError, match="output folder is the input folder"):
        denoise_files(empty, empty, model=model_path, progress=False)
    with pytest.raises(ConfigError, match="choose from"):
        denoise_files(empty, tmp_path / "out", model=model_path, backend="gpu", progress=False)


def test_denoise_files_single_16_bit_tiff_is_refused(model_path: Path, tmp_path: Path) -> None:
    path = tmp_path / "deep.tif"
    tifffile.imwrite(path, np.zeros((32, 32), np.uint16))
    with pytest.raises(DenoiseError, match=r"deep\.tif: uint16 image"):
        denoise_files(path, tmp_path / "out", model=model_path, backend="cpu", progress=False)


def test_write_failures_are_raised(tmp_path: Path) -> None:
    image = textured((16, 16))
    with pytest.raises(DenoiseError, match="cannot write image"):
        write_image(tmp_path / "no-such-folder" / "a.png", image)
    with pytest.raises(DenoiseError, match=r"a\.xyz"):
        write_image(tmp_path / "a.xyz", image)


def test_default_model_missing_is_a_model_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A checkout without the shipped weights: a ModelError naming the model, nothing else.
    import models.zoo
    from models.zoo import DEFAULT_MODEL

    monkeypatch.setattr(models.zoo, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(ModelError, match=DEFAULT_MODEL):
        Denoiser(None, "cpu")
