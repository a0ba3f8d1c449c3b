"""The real-texture low-definition stitching cases, defined once for every bench.

Each case is a virtual-SEM traversal (:mod:`drivers.sim`) whose specimen is
a real micrograph from the shared data folder (``$CEMI_DATA``, default
``../shared/data`` beside the repository), imaged through the calibrated LD
preset, optionally made noisier with ``noise_scale`` (shot noise multiplied,
dose divided by its square).  The simulator mirror-tiles a specimen to cover
the whole traversal and does not strip data bars, so each micrograph is first
cropped to its image area with the capture's own detector
(:func:`cemi_stream.capture.crop.detect_crop`) and written as a PNG to a
scratch folder (never into the repository).

A mirror-tiled specimen is periodic (period ``2 * (side - 1)`` pixels), and
two frames a period apart show identical content: no stitcher can tell them
apart, so a traversal longer than the period measures the bench, not the
stitcher (it showed up as whole-period, 1016 px, errors on the 509 px wide
KRISS frames).  Each case therefore magnifies a specimen that is smaller than
its traversal (``specimen_scale``, cubic interpolation) just enough for the
planned traversal plus a margin to fit inside one period in x and in y; the
scale used is recorded with the case.

Grids (deterministic; each case's seed is a CRC of its name, so adding or
dropping a case changes no other case's frames):

* ``texture``: every specimen at LD (``noise_scale`` 1), 512 x 384 frames,
  overlaps 0.3 / 0.45 / 0.6, raster and serpentine, as an image folder; plus
  two video traversals per specimen, whose overlap and layout rotate over the
  six combinations with the specimen's index;
* ``dose``: a few specimens at 0.45 overlap, raster, image folder (and one in
  video mode), ``noise_scale`` 0.5, 1, 1.5, 2, 3, 4;
* ``large``: one case with 1024 x 768 frames.

``--quick`` subsets (:func:`cases` with ``quick=True``) keep one image case
per specimen, three video cases, two dose sweeps and the large case.
"""

from __future__ import annotations

import csv
import math
import os
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from cemi_stream.capture.crop import detect_crop
from drivers.base import to_gray8
from drivers.sim import SimConfig, plan_traversal, write_simulation
from drivers.sim.specimen import read_image

REPO = Path(__file__).resolve().parents[1]
OVERLAPS = (0.3, 0.45, 0.6)
NOISE_SWEEP = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0)
FRAME_SIZE = (512, 384)
LARGE_FRAME_SIZE = (1024, 768)
ROWS = 3
# Five frames per row keeps the magnification small specimens need (see above) below ~2.
FRAMES_PER_ROW = 5
LARGE_FRAMES_PER_ROW = 5
# Extra room beyond the traversal's extent inside one mirror period, pixels.
PERIOD_MARGIN_PX = 32.0
# The layout/overlap combinations the video cases rotate through.
COMBOS = tuple((o, s) for o in OVERLAPS for s in (False, True))
# Issue 8's acceptance targets for LD real-texture frames with --denoise off.
TARGETS = {
    "placed_fraction_min": 0.99,
    "median_px_max": 0.3,
    "p99_px_max": 1.0,
    "gross_px": 3.0,
    "gross_count_max": 0,
    "ashlar_median_ratio_min": 3.0,
}


def data_dir() -> Path:
    """Folder of the real SEM data (``$CEMI_DATA`` or ``../shared/data``)."""
    return Path(os.environ.get("CEMI_DATA", REPO.parent / "shared" / "data")).resolve()


@dataclass(frozen=True, slots=True)
class Specimen:
    """One real micrograph used as a specimen.

    Attributes
    ----------
    key : str
        Short name used in case names.
    texture : str
        Texture family (summaries are grouped by it).
    path : str
        File path relative to the data folder.
    """

    key: str
    texture: str
    path: str


SPECIMENS: tuple[Specimen, ...] = (
    Specimen("eutectic", "eutectic", "eutectic-alcumg/3000X_Al-Cu_Mg_EXP9_S7.tif"),
    Specimen("superalloy1", "superalloy", "superalloy-gamma-prime/images/spot1_0d_0.png"),
    Specimen("superalloy4", "superalloy", "superalloy-gamma-prime/images/spot4_180d_2.png"),
    Specimen("superalloy7", "superalloy", "superalloy-gamma-prime/images/spot7_0d_5.png"),
    Specimen("pearlite200", "uhcs_pearlite", "uhcs-steel/pearlite/micrograph200.jpg"),
    Specimen("pearlite201", "uhcs_pearlite", "uhcs-steel/pearlite/micrograph201.jpg"),
    Specimen("spheroidite", "uhcs_spheroidite", "uhcs-steel/spheroidite/{first}"),
    Specimen("network", "uhcs_network", "uhcs-steel/network/{first}"),
    Specimen("bse00", "bse", "bse-tiles-stitch2d/stitch2d_ex[Grid@0 0].jpg"),
    Specimen("bse11", "bse", "bse-tiles-stitch2d/stitch2d_ex[Grid@1 1].jpg"),
    # The clean (slow-scan) frames: the simulator adds the LD noise itself.
    Specimen("kriss_time", "kriss", "kriss-sem-pairs/time/high/high_30us_001.png"),
    Specimen("kriss_line", "kriss", "kriss-sem-pairs/line/clean/{first}"),
    Specimen("fei_retic", "fei_teneo", "fei-teneo-databar/retic.tif"),
)
DOSE_SPECIMENS = ("eutectic", "superalloy1", "pearlite200", "spheroidite", "kriss_time", "bse00")
QUICK_DOSE_SPECIMENS = ("eutectic", "pearlite200")
VIDEO_DOSE_SPECIMEN = "eutectic"
QUICK_VIDEO_SPECIMENS = ("eutectic", "superalloy1", "pearlite200")
# Cases also replayed with --denoise auto (the denoiser runs ~2 frames/s here).
DENOISE_COMPARE = ("eutectic-img-rast-o45-n1-512x384", "pearlite200-img-rast-o45-n2-512x384")


@dataclass(frozen=True, slots=True)
class RealCase:
    """One traversal of a real-texture specimen.

    Attributes
    ----------
    specimen : str
        :attr:`Specimen.key`.
    texture : str
        :attr:`Specimen.texture`.
    overlap : float
        Frame-to-frame (image mode, and keyframe target in video mode) and
        row-to-row overlap fraction.
    serpentine : bool
        Alternate rows run backwards.
    video : bool
        Continuous-motion video (keyframes selected by the capture) instead of
        one image per stage step.
    noise_scale : float
        Shot-noise multiplier on the LD preset (1 = the calibrated preset).
    frame_size : tuple of int
        ``(width, height)`` in pixels.
    rows, frames_per_row : int
        Traversal size (video: a row spans what that many image frames would).
    groups : tuple of str
        Which grids the case belongs to (``texture``, ``dose``, ``large``).
    """

    specimen: str
    texture: str
    overlap: float
    serpentine: bool
    video: bool
    noise_scale: float = 1.0
    frame_size: tuple[int, int] = FRAME_SIZE
    rows: int = ROWS
    frames_per_row: int = FRAMES_PER_ROW
    groups: tuple[str, ...] = field(default=())

    @property
    def name(self) -> str:
        """Unique, readable name; it also seeds the case."""
        w, h = self.frame_size
        return (
            f"{self.specimen}-{'vid' if self.video else 'img'}-"
            f"{'serp' if self.serpentine else 'rast'}-o{round(self.overlap * 100)}-"
            f"n{self.noise_scale:g}-{w}x{h}"
        )

    @property
    def seed(self) -> int:
        """Deterministic seed from the name (stable whatever the case list)."""
        return zlib.crc32(self.name.encode()) & 0x7FFFFFFF

    @property
    def is_target(self) -> bool:
        """Whether issue 8's LD targets apply (the calibrated LD preset)."""
        return self.noise_scale == 1.0

    @property
    def denoise_compare(self) -> bool:
        """Whether the case is also replayed with ``--denoise auto``."""
        return self.name in DENOISE_COMPARE

    def sim_config(self, specimen: Prepared) -> SimConfig:
        """The virtual-SEM configuration of this case on a prepared specimen.

        ``specimen_scale`` is the smallest (>= 1, in steps of 0.01) that puts
        the whole planned traversal inside one mirror period of the specimen.
        """
        config = self._config(specimen.path, 1.0)
        steps = list(plan_traversal(config))
        w, h = self.frame_size
        xs = [s.x_px for s in steps]
        ys = [s.y_px for s in steps]
        need = 1.0
        for extent, side in ((max(xs) - min(xs) + w, specimen.width),
                             (max(ys) - min(ys) + h, specimen.height)):  # fmt: skip
            # Period after scaling: 2 * (side * scale - 1); +2 px covers resize rounding.
            need = max(need, ((extent + PERIOD_MARGIN_PX) / 2 + 2) / side)
        return replace(config, specimen_scale=math.ceil(need * 100) / 100)

    def _config(self, specimen_path: Path, scale: float) -> SimConfig:
        w, h = self.frame_size
        return SimConfig(
            rows=self.rows,
            frames_per_row=self.frames_per_row,
            frame_width=w,
            frame_height=h,
            overlap=self.overlap,
            serpentine=self.serpentine,
            noise="ld",
            noise_scale=self.noise_scale,
            video=self.video,
            seed=self.seed,
            source=str(specimen_path),
            specimen_scale=scale,
        )

    def describe(self) -> dict[str, Any]:
        """Plain-data description for the JSON rows."""
        return {
            "specimen": self.specimen,
            "texture": self.texture,
            "mode": "video" if self.video else "images",
            "layout": "serpentine" if self.serpentine else "raster",
            "overlap": self.overlap,
            "noise_scale": self.noise_scale,
            "frame_size": list(self.frame_size),
            "rows": self.rows,
            "frames_per_row": self.frames_per_row,
            "seed": self.seed,
            "groups": list(self.groups),
        }


@dataclass(frozen=True, slots=True)
class Prepared:
    """A specimen cropped to its image area and written as a PNG.

    Attributes
    ----------
    path : Path
        The PNG.
    width, height : int
        Its size in pixels.
    """

    path: Path
    width: int
    height: int


def _texture(key: str) -> str:
    return next(s.texture for s in SPECIMENS if s.key == key)


def _add(found: dict[str, RealCase], case: RealCase) -> None:
    """Add a case, merging its groups into an identical one already listed."""
    old = found.get(case.name)
    if old is None:
        found[case.name] = case
    else:
        groups = tuple(dict.fromkeys((*old.groups, *case.groups)))
        found[case.name] = replace(old, groups=groups)


def cases(quick: bool = False) -> list[RealCase]:
    """The case list, in a fixed order.

    Parameters
    ----------
    quick : bool
        The ~3-minute subset instead of the full (~15-minute) grid.

    Returns
    -------
    list of RealCase
        Cases sharing a name (a dose-sweep point that is also a texture
        case) are listed once with both groups.
    """
    found: dict[str, RealCase] = {}
    for i, spec in enumerate(SPECIMENS):
        if quick:
            # One image case per specimen, rotating overlap and layout.
            overlap, serp = COMBOS[i % len(COMBOS)]
            _add(found, RealCase(spec.key, spec.texture, overlap, serp, False, groups=("texture",)))
            if spec.key in QUICK_VIDEO_SPECIMENS:
                overlap, serp = COMBOS[(i + 3) % len(COMBOS)]
                _add(
                    found,
                    RealCase(spec.key, spec.texture, overlap, serp, True, groups=("texture",)),
                )
            continue
        for overlap, serp in COMBOS:
            _add(found, RealCase(spec.key, spec.texture, overlap, serp, False, groups=("texture",)))
        # Two videos per specimen; i + 3 flips the layout and moves the overlap.
        for j in (i, i + 3):
            overlap, serp = COMBOS[j % len(COMBOS)]
            _add(found, RealCase(spec.key, spec.texture, overlap, serp, True, groups=("texture",)))
    for key in QUICK_DOSE_SPECIMENS if quick else DOSE_SPECIMENS:
        for scale in NOISE_SWEEP:
            _add(found, RealCase(key, _texture(key), 0.45, False, False, scale, groups=("dose",)))
    if not quick:
        for scale in NOISE_SWEEP:
            case = RealCase(
                VIDEO_DOSE_SPECIMEN,
                _texture(VIDEO_DOSE_SPECIMEN),
                0.45,
                False,
                True,
                scale,
                groups=("dose",),
            )
            _add(found, case)
    large = RealCase(
        "eutectic",
        "eutectic",
        0.45,
        False,
        False,
        frame_size=LARGE_FRAME_SIZE,
        frames_per_row=LARGE_FRAMES_PER_ROW,
        groups=("large",),
    )
    _add(found, large)
    return list(found.values())


def _resolve(spec: Specimen, data: Path) -> Path | None:
    """The specimen's file, ``{first}`` meaning the first file of its folder by name."""
    if "{first}" not in spec.path:
        path = data / spec.path
        return path if path.is_file() else None
    folder = (data / spec.path).parent
    if not folder.is_dir():
        return None
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".tif"))
    return files[0] if files else None


def prepare_specimens(
    scratch: Path, keys: Iterable[str] | None = None
) -> tuple[dict[str, Prepared], dict[str, Any]]:
    """Crop each specimen to its image area and write it as a PNG in ``scratch``.

    Parameters
    ----------
    scratch : Path
        Scratch folder (outside the repository).
    keys : iterable of str or None
        Specimens wanted (default: all).

    Returns
    -------
    (dict, dict)
        The prepared specimens by key for those found, and a description
        by key (source file, original size, crop, or why it is missing).
    """
    data = data_dir()
    wanted = set(keys) if keys is not None else {s.key for s in SPECIMENS}
    scratch.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Prepared] = {}
    info: dict[str, Any] = {}
    for spec in SPECIMENS:
        if spec.key not in wanted:
            continue
        src = _resolve(spec, data)
        if src is None:
            info[spec.key] = {"missing": f"{data / spec.path} not found"}
            continue
        gray = to_gray8(read_image(src), name=str(src))
        # The simulator would image a data bar or UI frame as specimen texture.
        crop = detect_crop(gray)
        area = crop.rect.apply(gray)
        out = scratch / f"{spec.key}.png"
        cv2.imwrite(str(out), area)
        paths[spec.key] = Prepared(out, int(area.shape[1]), int(area.shape[0]))
        info[spec.key] = {
            "file": str(src.relative_to(data)),
            "texture": spec.texture,
            "size": [int(gray.shape[1]), int(gray.shape[0])],
            "crop": str(crop.rect),
            "databar_rows": crop.databar_rows,
        }
    return paths, info


def simulate(
    case: RealCase, specimen: Prepared, out_dir: Path
) -> tuple[Path, dict[int, Any], SimConfig]:
    """Write the case's frames (or video) and read back its ground truth.

    Returns
    -------
    (Path, dict, SimConfig)
        The replay source (frames folder or ``video.avi``), the true top-left
        ``(x, y)`` of every source frame by source index, and the
        configuration simulated.
    """
    config = case.sim_config(specimen)
    written = write_simulation(config, out_dir)
    with open(str(written["ground_truth"]), newline="") as f:
        truth = {
            int(r["src_index"]): (float(r["x_px"]), float(r["y_px"])) for r in csv.DictReader(f)
        }
    return Path(str(written["path"])), truth, config


def error_vector(est: np.ndarray, tru: np.ndarray) -> np.ndarray:
    """Per-frame position errors after removing the one global translation.

    Parameters
    ----------
    est, tru : numpy.ndarray
        ``(n, 2)`` estimated and true ``(x, y)`` top-left positions, pixels.

    Returns
    -------
    numpy.ndarray
        ``(n,)`` distances in pixels.  The offset removed is the median
        difference (as in ``bench_stitch``), so a few lost frames do not shift
        the others.
    """
    diff = np.asarray(est, dtype=float) - np.asarray(tru, dtype=float)
    diff = diff - np.median(diff, axis=0)
    err: np.ndarray = np.hypot(diff[:, 0], diff[:, 1])
    return err


def error_stats(err: np.ndarray) -> dict[str, float | None]:
    """Median, 99th percentile and maximum of an error vector (None when empty)."""
    if len(err) == 0:
        return {"median_px": None, "p99_px": None, "max_px": None}
    return {
        "median_px": round(float(np.median(err)), 3),
        "p99_px": round(float(np.percentile(err, 99)), 3),
        "max_px": round(float(err.max()), 3),
    }
