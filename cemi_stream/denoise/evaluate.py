"""The ``eval-denoiser`` command's engine: score denoisers on real LD/HD pairs.

For every registered pair (see :mod:`cemi_stream.denoise.pairs`) each method
turns the LD image into an estimate of the HD image, which is compared with
the HD image on the pair's common area:

* ``raw-ld``: the LD image itself (the floor every method must beat);
* ``nlm``: OpenCV non-local means with ``h`` tuned on the evaluated pairs
  (the classical baseline);
* one row per trained model, named by its model card.

Metrics per image and method: PSNR (dB), SSIM, and the dark-phase fraction
error ``|dark_fraction(output) - dark_fraction(HD)| x 100`` in percentage
points, the CEMI paper's phase-fraction check.  Methods see the whole LD
image (data bar stripped), as they would in the pipeline, and their output is
then cropped with the pair's registration crop, so a model's border handling
is judged too.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ..errors import DenoiseError
from ..progress import Progress
from .metrics import NLM_HS, dark_fraction, nlm, psnr, ssim, tune_nlm
from .pairs import AlignedPair, align_pair, list_pairs, load_gray

logger = logging.getLogger(__name__)

#: Columns of ``eval.csv``.
CSV_COLUMNS = ("image", "method", "psnr_db", "ssim", "dark_fraction_error_pp")
#: ``image`` value of the rows holding the mean over all images.
ALL_IMAGES = "ALL"
LPIPS_UNAVAILABLE = (
    "not computed: needs pretrained AlexNet weights (lpips package) which are not available"
)
# Side of the square crop shown per method in eval.png (pixels, 1:1) and the
# height of the label band above it.
_PANEL_PX = 192
_LABEL_PX = 22


@dataclass
class _Item:
    label: str
    pair: AlignedPair
    ld_stripped: np.ndarray


def _dir_labels(dirs: Sequence[Path]) -> list[str]:
    # The shortest path suffix that tells the LD folders apart, so pairs from
    # several folders (KRISS time/low and line/noisy both hold "001") get
    # distinct image labels.
    if len(dirs) == 1:
        return [""]
    for depth in range(1, max(len(d.parts) for d in dirs) + 1):
        labels = ["/".join(d.parts[-depth:]) for d in dirs]
        if len(set(labels)) == len(labels):
            return [f"{label}/" for label in labels]
    return [f"{i}/" for i in range(len(dirs))]


def _load_items(
    dir_pairs: Sequence[tuple[Path, Path]], ids: set[str] | None, progress: bool
) -> list[_Item]:
    listed = []
    for ld_dir, hd_dir in dir_pairs:
        pairs = list_pairs(Path(ld_dir), Path(hd_dir))
        if ids is not None:
            pairs = [p for p in pairs if p[0] in ids]
            if not pairs:
                logger.warning("%s / %s: none of the selected pair ids is present", ld_dir, hd_dir)
        listed.append(pairs)
    total = sum(len(p) for p in listed)
    if total == 0:
        raise DenoiseError("eval-denoiser: no LD/HD pairs selected")
    prefixes = _dir_labels([Path(ld) for ld, _ in dir_pairs])
    items: list[_Item] = []
    bar = Progress("align", total=total, enabled=progress, unit="pairs")
    for prefix, pairs in zip(prefixes, listed, strict=True):
        for name, ld_path, hd_path in pairs:
            ld_frame = load_gray(ld_path)
            pair = align_pair(ld_frame, load_gray(hd_path), name=name)
            if pair.frame_crop is None:  # align_pair always sets it
                raise DenoiseError(f"pair {name}: registration gave no crop")
            items.append(_Item(prefix + name, pair, pair.frame_crop.apply(ld_frame)))
            bar.update(len(items))
    bar.close()
    return items


def _crop_output(item: _Item, output: np.ndarray, method: str) -> np.ndarray:
    if output.shape != item.ld_stripped.shape or output.dtype != np.uint8:
        raise DenoiseError(
            f"{method} on {item.label}: output {output.dtype} {output.shape} does not match "
            f"the uint8 input {item.ld_stripped.shape}"
        )
    rect = item.pair.ld_rect
    return rect.apply(output) if rect is not None else output


def _score(output: np.ndarray, hd: np.ndarray, hd_dark: float) -> dict[str, float]:
    return {
        "psnr_db": psnr(output, hd),
        "ssim": ssim(output, hd),
        "dark_fraction_error_pp": abs(dark_fraction(output) - hd_dark) * 100.0,
    }


def _mean(rows: list[dict[str, float]]) -> dict[str, float]:
    return {key: float(np.mean([r[key] for r in rows])) for key in CSV_COLUMNS[2:]}


def _unique_name(name: str, taken: set[str]) -> str:
    candidate, n = name, 2
    while candidate in taken:
        candidate, n = f"{name}#{n}", n + 1
    return candidate


def _lpips_status() -> Callable[[np.ndarray, np.ndarray], float] | str:
    """An LPIPS(AlexNet) function when the package and its weights load, else why not."""
    try:
        import lpips  # type: ignore[import-not-found]  # optional, not a dependency
        import torch

        net = lpips.LPIPS(net="alex", verbose=False).eval()
    except Exception as exc:  # any failure (import, missing weights offline) -> not computed
        logger.info("LPIPS unavailable: %s", exc)
        return LPIPS_UNAVAILABLE

    def distance(a: np.ndarray, b: np.ndarray) -> float:
        # LPIPS expects RGB in [-1, 1]; a grey image is repeated over channels.
        ta = torch.from_numpy(a.astype(np.float32) / 127.5 - 1.0)[None, None].repeat(1, 3, 1, 1)
        tb = torch.from_numpy(b.astype(np.float32) / 127.5 - 1.0)[None, None].repeat(1, 3, 1, 1)
        with torch.no_grad():
            return float(net(ta, tb).item())

    return distance


def _panel(image: np.ndarray, label: str, y0: int, x0: int, side: int) -> np.ndarray:
    crop = image[y0 : y0 + side, x0 : x0 + side]
    band = np.full((_LABEL_PX, crop.shape[1]), 255, dtype=np.uint8)
    cv2.putText(band, label[:24], (4, _LABEL_PX - 7), cv2.FONT_HERSHEY_SIMPLEX, 0.45, 0, 1)
    return np.vstack([band, crop])


def _write_figure(path: Path, item: _Item, outputs: dict[str, np.ndarray]) -> None:
    hd = item.pair.hd
    side = min(_PANEL_PX, *hd.shape)
    y0, x0 = (hd.shape[0] - side) // 2, (hd.shape[1] - side) // 2
    panels = [_panel(img, name, y0, x0, side) for name, img in outputs.items()]
    panels.append(_panel(hd, "HD", y0, x0, side))
    gap = np.full((panels[0].shape[0], 4), 255, dtype=np.uint8)
    row = [gap]
    for p in panels:
        row += [p, gap]
    if not cv2.imwrite(str(path), np.hstack(row)):
        raise DenoiseError(f"{path}: cannot write the comparison figure")


def _fmt(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.4f}"


def _write_csv(path: Path, rows: list[tuple[str, str, dict[str, float]]]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(CSV_COLUMNS)
        for image, method, m in rows:
            writer.writerow([image, method, *(_fmt(m[k]) for k in CSV_COLUMNS[2:])])


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def evaluate(
    ld_dirs_hd_dirs: Sequence[tuple[Path, Path]],
    models: Sequence[str | Path],
    *,
    ids: set[str] | None = None,
    backend: str = "auto",
    out_dir: Path | None = None,
    nlm_h: float | None = None,
    nlm_hs: Sequence[float] = NLM_HS,
    progress: bool = True,
) -> dict[str, Any]:
    """Score raw LD, NLM and trained models against HD on registered pairs.

    Parameters
    ----------
    ld_dirs_hd_dirs : sequence of (Path, Path)
        ``(ld_dir, hd_dir)`` folder pairs (matched as in
        :func:`~cemi_stream.denoise.pairs.list_pairs`).
    models : sequence of str or Path
        Model names or weight files for
        :class:`cemi_stream.denoise.infer.Denoiser`; may be empty.
    ids : set of str, optional
        Pair keys to evaluate (e.g. ``select_ids("33-40")``); all when None.
    backend : str
        Inference backend for the models (``"auto"``, ``"cpu"``, ...).
    out_dir : Path, optional
        Folder for ``eval.csv``, ``eval.json`` and ``eval.png`` (created).
    nlm_h : float, optional
        NLM strength in grey levels; tuned on the evaluated pairs when None.
    nlm_hs : sequence of float
        Candidate strengths for the tuning.
    progress : bool
        Report progress on stderr / the log.

    Returns
    -------
    dict
        The overall table (also ``eval.json``): ``methods`` maps each method
        (``"raw-ld"``, ``"nlm"``, model card names) to its mean ``psnr_db``,
        ``ssim`` and ``dark_fraction_error_pp`` (plus ``seconds_per_image``
        and, for models, ``model_path`` and ``backend``); ``nlm_h``,
        ``nlm_h_tuned``, ``images`` (count), ``pairs`` (name, shift, score),
        ``hd_dark_fraction`` (mean), ``lpips`` (a table or why it is absent)
        and ``files`` (written paths).

    Raises
    ------
    DenoiseError
        If no pair is selected, a pair cannot be registered, the inference
        module or a backend is unavailable, or an output cannot be written.
    ModelError
        If a model file is missing or corrupt.
    SourceError
        If an image cannot be read.
    """
    items = _load_items(ld_dirs_hd_dirs, ids, progress)
    tuned = nlm_h is None
    h = tune_nlm([it.pair for it in items], nlm_hs) if nlm_h is None else float(nlm_h)

    methods: list[tuple[str, Callable[[np.ndarray], np.ndarray], dict[str, Any]]] = [
        ("raw-ld", lambda image: image, {}),
        ("nlm", lambda image: nlm(image, h), {"h": h}),
    ]
    if models:
        try:
            from .infer import Denoiser
        except ImportError as exc:
            raise DenoiseError(
                f"eval-denoiser: the inference module is unavailable ({exc})"
            ) from exc
        taken = {"raw-ld", "nlm", ALL_IMAGES}
        for model in models:
            denoiser = Denoiser(model, backend)
            name = _unique_name(denoiser.card.name, taken)
            taken.add(name)
            info = {"model_path": str(denoiser.model_path), "backend": denoiser.backend}
            methods.append((name, denoiser.denoise, info))

    lpips_fn = _lpips_status()
    per_image: list[tuple[str, str, dict[str, float]]] = []
    lpips_values: dict[str, list[float]] = {name: [] for name, _, _ in methods}
    seconds: dict[str, float] = {name: 0.0 for name, _, _ in methods}
    figure_outputs: dict[str, np.ndarray] = {}
    hd_darks: list[float] = []
    bar = Progress("eval", total=len(items), enabled=progress, unit="images")
    for index, item in enumerate(items):
        hd_dark = dark_fraction(item.pair.hd)
        hd_darks.append(hd_dark)
        for name, run, _ in methods:
            start = time.perf_counter()
            output = _crop_output(item, np.asarray(run(item.ld_stripped)), name)
            seconds[name] += time.perf_counter() - start
            per_image.append((item.label, name, _score(output, item.pair.hd, hd_dark)))
            if callable(lpips_fn):
                lpips_values[name].append(lpips_fn(output, item.pair.hd))
            if index == 0:
                label = {"raw-ld": "LD", "nlm": f"NLM h={h:g}"}.get(name, name)
                figure_outputs[label] = output
        bar.update(index + 1)
    bar.close()

    overall: dict[str, dict[str, Any]] = {}
    for name, _, info in methods:
        rows = [m for _, method, m in per_image if method == name]
        overall[name] = {**_mean(rows), "seconds_per_image": seconds[name] / len(items), **info}
    result: dict[str, Any] = {
        "images": len(items),
        "methods": overall,
        "nlm_h": h,
        "nlm_h_tuned": tuned,
        "hd_dark_fraction": float(np.mean(hd_darks)),
        "lpips": (
            {name: float(np.mean(v)) for name, v in lpips_values.items()}
            if callable(lpips_fn)
            else lpips_fn
        ),
        "pairs": [
            {"image": it.label, "shift_yx": list(it.pair.shift_yx), "score": it.pair.score}
            for it in items
        ],
        "files": {},
    }
    for name, m in overall.items():
        logger.info(
            "%-24s PSNR %6.2f dB  SSIM %.4f  dark-fraction error %5.2f pp",
            name,
            m["psnr_db"],
            m["ssim"],
            m["dark_fraction_error_pp"],
        )

    if out_dir is not None:
        out = Path(out_dir)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DenoiseError(f"{out}: cannot create the output folder ({exc})") from exc
        files = {"csv": out / "eval.csv", "json": out / "eval.json", "png": out / "eval.png"}
        table = per_image + [
            (ALL_IMAGES, name, {k: overall[name][k] for k in CSV_COLUMNS[2:]})
            for name, _, _ in methods
        ]
        try:
            _write_csv(files["csv"], table)
            _write_figure(files["png"], items[0], figure_outputs)
            result["files"] = {k: str(v) for k, v in files.items()}
            files["json"].write_text(json.dumps(_json_safe(result), indent=2) + "\n")
        except OSError as exc:
            raise DenoiseError(f"{out}: cannot write the evaluation results ({exc})") from exc
    return result
