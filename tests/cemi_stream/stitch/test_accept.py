"""Noise-aware acceptance: noisy true pairs from real micrographs are accepted at the LD
dose, unrelated places of the same material are refused, and the statistics behave."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from cemi_stream.errors import ConfigError
from cemi_stream.stitch.register import RegisterConfig, Registrar
from cemi_stream.stitch.register.accept import (
    Agreement,
    ambiguous,
    noise_variance,
    tolerance,
    trustworthy,
)
from drivers.sim.scanner import Scanner, scaled_preset
from drivers.sim.specimen import load_specimen

W, H = 512, 384
# (folder glob, frame size): micrographs the registration was not tuned on.
TEXTURES = {
    "eutectic": ("eutectic-alcumg/*.tif", (W, H)),
    "superalloy": ("superalloy-gamma-prime/images/*.png", (384, 288)),
    "pearlite": ("uhcs-steel/pearlite/*", (384, 288)),
    "bse": ("bse-tiles-stitch2d/*Grid@0 0*.jpg", (384, 288)),
}


def _pairs(path: Path, size: tuple[int, int], noise_scale: float, seed: int):  # type: ignore[no-untyped-def]
    """Three overlapping pairs (30-60 % along x or y) with their true shifts."""
    specimen = load_specimen(str(path))
    scanner = Scanner(scaled_preset("ld", noise_scale))
    rng = np.random.default_rng(seed)
    w, h = size
    out = []
    for ov, along_x in ((0.3, True), (0.45, False), (0.6, True)):
        jit = rng.uniform(-8, 8)
        dx, dy = ((1 - ov) * w, jit) if along_x else (jit, (1 - ov) * h)
        x0, y0 = rng.uniform(0, 40), rng.uniform(0, 40)
        a = scanner.render(specimen, x0, y0, w, h, rng)
        b = scanner.render(specimen, x0 + dx, y0 + dy, w, h, rng)
        out.append((a, b, (dx, dy)))
    return out


@pytest.mark.parametrize("name", sorted(TEXTURES))
def test_noisy_true_pairs_of_real_textures_are_accepted(data_dir: Path, name: str) -> None:
    pattern, size = TEXTURES[name]
    path = sorted(data_dir.glob(pattern))[0]
    reg = Registrar()
    raw_ncc = []
    for a, b, (tx, ty) in _pairs(path, size, 1.0, seed=5):
        shift = reg.register(reg.prepare(a), reg.prepare(b))
        assert shift.ok, (name, shift)
        assert math.hypot(shift.dx - tx, shift.dy - ty) < 1.5, (name, shift, (tx, ty))
        assert 0.6 < shift.signal < 1.6  # ~1 for a true match whatever the dose
        raw_ncc.append(shift.score)
    if name == "superalloy":
        # The plain NCC of these LD overlaps is far below the old fixed 0.3
        # threshold: a scale-dependent test would have refused every one.
        assert max(raw_ncc) < 0.3


def test_unrelated_places_of_one_material_are_refused(data_dir: Path) -> None:
    """Hard negatives: frames from different superalloy and UHCS micrographs, LD to 2x noise."""
    reg = Registrar()
    rng = np.random.default_rng(11)
    refused = 0
    for pattern in ("superalloy-gamma-prime/images/*.png", "uhcs-steel/spheroidite/*"):
        paths = sorted(data_dir.glob(pattern))[:4]
        specimens = [load_specimen(str(p)) for p in paths]
        for noise in (1.0, 2.0):
            scanner = Scanner(scaled_preset("ld", noise))
            frames = [
                reg.prepare(
                    scanner.render(s, rng.uniform(0, 100), rng.uniform(0, 100), 384, 288, rng)
                )
                for s in specimens
            ]
            for i in range(len(frames)):
                for j in range(len(frames)):
                    if i != j:
                        shift = reg.register(frames[i], frames[j])
                        assert not shift.ok, (pattern, noise, i, j, shift)
                        assert shift.why
                        refused += 1
    assert refused == 2 * 2 * 12


def test_noise_variance_measures_the_added_noise() -> None:
    """Independent lines, correlated along them, brightness-dependent: the real SEM noise."""
    rng = np.random.default_rng(1)
    y, x = np.mgrid[0:384, 0:512]
    signal = 100 + 60 * np.sin(x / 23.0) * np.cos(y / 17.0)
    for sd, slack in ((2.0, 1.4), (8.0, 1.2), (20.0, 1.2)):
        white = rng.normal(0, 1, signal.shape)
        along = (white + np.roll(white, 1, axis=1)) / math.sqrt(2)  # lag-1 correlation 0.5
        noisy = np.clip(signal + sd * along * np.sqrt(signal / 100), 0, 255).astype(np.uint8)
        est = noise_variance(noisy)
        true = sd**2 * float(np.mean(signal / 100))
        # (At 2 grey levels the 8-bit rounding and half-level bins add ~1.)
        assert true / slack < est < true * slack, (sd, est, true)


def test_acceptance_rules() -> None:
    cfg = RegisterConfig()
    assert trustworthy(Agreement(1.0, 80.0, 0.9), cfg) == ""
    assert trustworthy(Agreement(1.0, 80.0, 0.01), cfg) == "noise"
    assert trustworthy(Agreement(1.0, 5.0, 0.9), cfg) == "insignificant"
    assert trustworthy(Agreement(0.5, 20.0, 0.95), cfg) == "disagree"
    # Tolerance widens as the reliability falls, and never beyond 1.
    assert tolerance(0.9, cfg) < tolerance(0.3, cfg) <= 1.0
    assert tolerance(0.01, cfg) == 1.0
    # A rival that would pass as a match itself and is close: ambiguous.
    assert ambiguous(1.0, 0.95, 0.95, cfg)
    assert not ambiguous(1.0, 0.5, 0.95, cfg)
    with pytest.raises(ConfigError, match="strong_band_z"):
        RegisterConfig(strong_band_z=0.0)
