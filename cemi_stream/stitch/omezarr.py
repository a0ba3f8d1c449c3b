"""OME-Zarr (NGFF) 0.5 metadata of the mosaic: builder and validator.

Implements the parts of the OME-Zarr specification version 0.5
(https://ngff.openmicroscopy.org/0.5/) that a 2-D multiscale image uses:

* the metadata lives in the zarr v3 group's ``zarr.json`` under
  ``attributes["ome"]``, with ``"version": "0.5"`` there (no longer inside
  each multiscale object, as in 0.4);
* ``multiscales[i]`` holds ``axes`` (2 to 5; here ``y``, ``x``, type
  ``space``, unit ``micrometer`` when the pixel size is known), ``datasets``
  (one per resolution level, highest resolution first) and optionally
  ``name``, ``type`` (the downsampling method), ``metadata`` and
  multiscale-wide ``coordinateTransformations``;
* every dataset has exactly one ``scale`` transformation, optionally followed
  by exactly one ``translation``, each with one value per axis;
* each level is a zarr v3 array whose ``dimension_names`` match the axis names.

Coordinates: the transformations map array indices ``(y, x)`` to physical
coordinates (micrometres, or pixels when the pixel size is unknown) of the
*pixel centre*.  A ``2**k`` block-mean level therefore has scale ``2**k`` times
the level-0 pixel size and an extra half-block translation ``(2**k - 1) / 2``
level-0 pixels, so every level overlays level 0 exactly.

Everything here is a pure function of its arguments (except
:func:`validate_store`, which only reads JSON files).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CemiError

NGFF_VERSION = "0.5"

SPACE_UNITS = frozenset(
    {
        "angstrom", "attometer", "centimeter", "decimeter", "exameter", "femtometer",
        "foot", "gigameter", "hectometer", "inch", "kilometer", "megameter", "meter",
        "micrometer", "mile", "millimeter", "nanometer", "parsec", "petameter",
        "picometer", "terameter", "yard", "yoctometer", "yottameter", "zeptometer",
        "zettameter",
    }
)  # fmt: skip
TIME_UNITS = frozenset(
    {
        "attosecond", "centisecond", "day", "decisecond", "exasecond", "femtosecond",
        "gigasecond", "hectosecond", "hour", "kilosecond", "megasecond", "microsecond",
        "millisecond", "minute", "nanosecond", "petasecond", "picosecond", "second",
        "terasecond", "yoctosecond", "yottasecond", "zeptosecond", "zettasecond",
    }
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class ArrayDescription:
    """What the validator needs to know about one level's zarr array.

    Attributes
    ----------
    shape : tuple of int
        Array shape, axis order as stored (``(y, x)`` for the mosaic).
    dimension_names : tuple of str or None
        The array's ``dimension_names`` (None when absent).
    zarr_format : int
        3 for a zarr v3 array.
    """

    shape: tuple[int, ...]
    dimension_names: tuple[str | None, ...] | None
    zarr_format: int = 3


def level_transforms(
    level: int,
    *,
    pixel_size_um: float | None,
    origin_yx_px: tuple[float, float] = (0.0, 0.0),
    factor: int = 2,
) -> list[dict[str, Any]]:
    """Coordinate transformations of one pyramid level of a 2-D ``(y, x)`` image.

    Parameters
    ----------
    level : int
        Pyramid level (0 = full resolution); level ``k`` is a ``factor**k``
        block mean of level 0.
    pixel_size_um : float or None
        Level-0 pixel size in micrometres; None gives transformations in
        level-0 pixels.
    origin_yx_px : (float, float)
        Mosaic coordinate ``(y, x)`` of level-0 array element ``(0, 0)``, in
        level-0 pixels.
    factor : int
        Downsampling factor between consecutive levels.

    Returns
    -------
    list of dict
        ``[{"type": "scale", ...}, {"type": "translation", ...}]``, values in
        ``(y, x)`` order, micrometres (or pixels).

    Raises
    ------
    CemiError
        On a negative level, a factor < 1 or a non-positive pixel size.
    """
    if level < 0 or factor < 1:
        raise CemiError(f"NGFF transforms: invalid level {level} or factor {factor}")
    if pixel_size_um is not None and not (math.isfinite(pixel_size_um) and pixel_size_um > 0):
        raise CemiError(f"NGFF transforms: pixel size {pixel_size_um} um must be positive")
    unit = 1.0 if pixel_size_um is None else float(pixel_size_um)
    block = float(factor**level)
    # The centre of a block of ``block`` level-0 pixels lies (block - 1) / 2
    # pixels after the centre of its first pixel.
    half = (block - 1.0) / 2.0
    return [
        {"type": "scale", "scale": [block * unit, block * unit]},
        {
            "type": "translation",
            "translation": [
                (float(origin_yx_px[0]) + half) * unit,
                (float(origin_yx_px[1]) + half) * unit,
            ],
        },
    ]


def image_attributes(
    levels: int,
    *,
    pixel_size_um: float | None,
    origin_yx_px: tuple[float, float] = (0.0, 0.0),
    factor: int = 2,
    name: str = "mosaic",
    method: str = "mean",
    method_description: str | None = None,
) -> dict[str, Any]:
    """The ``attributes`` of the zarr v3 group of a 2-D multiscale image (NGFF 0.5).

    Parameters
    ----------
    levels : int
        Number of resolution levels; the arrays are at paths ``"0"``,
        ``"1"``, ... (highest resolution first).
    pixel_size_um : float or None
        Level-0 pixel size in micrometres.  When None the axes carry no unit
        and the transformations are in level-0 pixels.
    origin_yx_px : (float, float)
        Mosaic coordinate ``(y, x)`` of level-0 array element ``(0, 0)``, in
        level-0 pixels (becomes the level-0 translation).
    factor : int
        Downsampling factor between consecutive levels.
    name : str
        Name of the multiscale image.
    method : str
        Downsampling method (the multiscale ``type``).
    method_description : str or None
        Free text stored in the multiscale ``metadata``.

    Returns
    -------
    dict
        ``{"ome": {"version": "0.5", "multiscales": [...]}}``; the result passes
        :func:`validate_image_attributes`.

    Raises
    ------
    CemiError
        On invalid arguments (no level, bad pixel size or factor).
    """
    if levels < 1:
        raise CemiError(f"NGFF metadata: an image needs at least one level, got {levels}")
    axes: list[dict[str, Any]] = []
    for axis in ("y", "x"):
        entry: dict[str, Any] = {"name": axis, "type": "space"}
        if pixel_size_um is not None:
            entry["unit"] = "micrometer"
        axes.append(entry)
    datasets = [
        {
            "path": str(k),
            "coordinateTransformations": level_transforms(
                k, pixel_size_um=pixel_size_um, origin_yx_px=origin_yx_px, factor=factor
            ),
        }
        for k in range(levels)
    ]
    metadata: dict[str, Any] = {"downsampling_factor": factor}
    if method_description:
        metadata["description"] = method_description
    multiscale = {
        "name": name,
        "axes": axes,
        "datasets": datasets,
        "type": method,
        "metadata": metadata,
    }
    return {"ome": {"version": NGFF_VERSION, "multiscales": [multiscale]}}


def _numbers(values: Any, n: int, where: str, problems: list[str], positive: bool) -> None:
    if not isinstance(values, list) or len(values) != n:
        problems.append(f"{where}: needs a list of {n} numbers (one per axis), got {values!r}")
        return
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            problems.append(f"{where}: {v!r} is not a finite number")
        elif positive and v <= 0:
            problems.append(f"{where}: {v!r} must be positive")


def _transforms(items: Any, n: int, where: str, problems: list[str]) -> list[float] | None:
    """Check a coordinateTransformations list; return its inline scale (or None)."""
    if not isinstance(items, list) or not items:
        problems.append(f"{where}: coordinateTransformations must be a non-empty list")
        return None
    kinds = [t.get("type") if isinstance(t, dict) else None for t in items]
    if kinds.count("scale") != 1 or kinds[0] != "scale":
        problems.append(f"{where}: exactly one 'scale' transformation, first, is required")
    if kinds.count("translation") > 1 or (
        "translation" in kinds and kinds.index("translation") != 1
    ):
        problems.append(f"{where}: at most one 'translation', right after the scale")
    extra = [k for k in kinds if k not in ("scale", "translation")]
    if extra:
        problems.append(f"{where}: unsupported transformation types {extra}")
    scale: list[float] | None = None
    for t, kind in zip(items, kinds, strict=True):
        if kind not in ("scale", "translation") or not isinstance(t, dict):
            continue
        has_values = kind in t
        if has_values == ("path" in t):
            problems.append(f"{where}: a '{kind}' needs either inline values or a 'path'")
            continue
        if has_values:
            _numbers(t[kind], n, f"{where} {kind}", problems, positive=kind == "scale")
            values = t[kind]
            if (
                kind == "scale"
                and isinstance(values, list)
                and all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
            ):
                scale = values
    return scale


def _axes(axes: Any, where: str, problems: list[str]) -> list[str]:
    if not isinstance(axes, list) or not 2 <= len(axes) <= 5:
        problems.append(f"{where}: 'axes' must be a list of 2 to 5 axes")
        return []
    names: list[str] = []
    kinds: list[str | None] = []
    for i, axis in enumerate(axes):
        if not isinstance(axis, dict) or not isinstance(axis.get("name"), str):
            problems.append(f"{where}: axis {i} needs a string 'name'")
            continue
        names.append(axis["name"])
        kind = axis.get("type")
        kinds.append(kind)
        unit = axis.get("unit")
        if kind == "space" and unit is not None and unit not in SPACE_UNITS:
            problems.append(f"{where}: axis {axis['name']!r}: {unit!r} is not a space unit")
        if kind == "time" and unit is not None and unit not in TIME_UNITS:
            problems.append(f"{where}: axis {axis['name']!r}: {unit!r} is not a time unit")
    if len(set(names)) != len(names):
        problems.append(f"{where}: axis names must be unique, got {names}")
    n_space = kinds.count("space")
    if n_space not in (2, 3):
        problems.append(f"{where}: needs 2 or 3 axes of type 'space', got {n_space}")
    if kinds.count("time") > 1 or kinds.count("channel") > 1:
        problems.append(f"{where}: at most one 'time' and one 'channel' axis")
    # Order required by the spec: time, then channel (or custom), then space.
    rank = {"time": 0, "channel": 1, "space": 2}
    ranks = [rank.get(k, 1) if k is not None else 1 for k in kinds]
    if ranks != sorted(ranks):
        problems.append(f"{where}: axes must be ordered time, channel, then space")
    return names


def validate_image_attributes(
    attrs: Mapping[str, Any], arrays: Mapping[str, ArrayDescription] | None = None
) -> list[str]:
    """Check a group's attributes against the OME-Zarr 0.5 image rules.

    Parameters
    ----------
    attrs : mapping
        The group's ``attributes`` (the whole dict, holding ``"ome"``).
    arrays : mapping of str to ArrayDescription, optional
        The group's arrays by path; when given, each dataset must name an
        existing zarr v3 array whose rank equals the number of axes and whose
        ``dimension_names`` match the axis names.

    Returns
    -------
    list of str
        One line per problem; empty when the metadata is valid.
    """
    problems: list[str] = []
    ome = attrs.get("ome")
    if not isinstance(ome, dict):
        return ["attributes: no 'ome' object (NGFF 0.5 keeps its metadata under 'ome')"]
    if ome.get("version") != NGFF_VERSION:
        problems.append(f"ome.version: expected {NGFF_VERSION!r}, got {ome.get('version')!r}")
    multiscales = ome.get("multiscales")
    if not isinstance(multiscales, list) or not multiscales:
        problems.append("ome.multiscales: must be a non-empty list")
        return problems
    for m, ms in enumerate(multiscales):
        where = f"ome.multiscales[{m}]"
        if not isinstance(ms, dict):
            problems.append(f"{where}: must be an object")
            continue
        if "version" in ms:
            problems.append(f"{where}: 'version' belongs in 'ome' since NGFF 0.5")
        names = _axes(ms.get("axes"), where, problems)
        n = len(names)
        if "coordinateTransformations" in ms:
            _transforms(ms["coordinateTransformations"], n, where, problems)
        datasets = ms.get("datasets")
        if not isinstance(datasets, list) or not datasets:
            problems.append(f"{where}: 'datasets' must be a non-empty list")
            continue
        previous: list[float] | None = None
        paths: list[str] = []
        for d, ds in enumerate(datasets):
            dwhere = f"{where}.datasets[{d}]"
            if not isinstance(ds, dict) or not isinstance(ds.get("path"), str) or not ds["path"]:
                problems.append(f"{dwhere}: needs a non-empty string 'path'")
                continue
            paths.append(ds["path"])
            scale = _transforms(ds.get("coordinateTransformations"), n, dwhere, problems)
            if (
                scale is not None
                and previous is not None
                and len(scale) == len(previous)
                and any(s < p for s, p in zip(scale, previous, strict=True))
            ):
                problems.append(f"{dwhere}: levels must go from highest to lowest resolution")
            previous = scale if scale is not None else previous
            if arrays is not None:
                _check_array(ds["path"], arrays, names, dwhere, problems)
        if len(set(paths)) != len(paths):
            problems.append(f"{where}: dataset paths must be unique, got {paths}")
    return problems


def _check_array(
    path: str,
    arrays: Mapping[str, ArrayDescription],
    names: Sequence[str],
    where: str,
    problems: list[str],
) -> None:
    array = arrays.get(path)
    if array is None:
        problems.append(f"{where}: no array at path {path!r}")
        return
    if array.zarr_format != 3:
        problems.append(f"{where}: array {path!r} is zarr v{array.zarr_format}, NGFF 0.5 needs v3")
    if names and len(array.shape) != len(names):
        problems.append(f"{where}: array {path!r} has {len(array.shape)} dims, {len(names)} axes")
    if array.dimension_names is not None and list(array.dimension_names) != list(names):
        problems.append(
            f"{where}: array {path!r} dimension_names {list(array.dimension_names)} "
            f"do not match the axes {list(names)}"
        )


def validate_store(path: Path) -> list[str]:
    """Validate an OME-Zarr 0.5 image on disk by reading its ``zarr.json`` files.

    Parameters
    ----------
    path : Path
        The image group's directory (e.g. ``mosaic.ome.zarr``).

    Returns
    -------
    list of str
        Problems found; empty when the group, its metadata and every level
        array are valid.
    """
    path = Path(path)
    try:
        group = json.loads((path / "zarr.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return [f"{path}: no readable zarr.json ({exc})"]
    problems: list[str] = []
    if group.get("zarr_format") != 3 or group.get("node_type") != "group":
        problems.append(f"{path}: not a zarr v3 group")
    attrs = group.get("attributes") or {}
    arrays: dict[str, ArrayDescription] = {}
    multiscales = (attrs.get("ome") or {}).get("multiscales") or []
    for ms in multiscales if isinstance(multiscales, list) else []:
        for ds in (ms.get("datasets") or []) if isinstance(ms, dict) else []:
            sub = ds.get("path") if isinstance(ds, dict) else None
            if not isinstance(sub, str) or sub in arrays:
                continue
            try:
                meta = json.loads((path / sub / "zarr.json").read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue  # reported as a missing array by the attribute check
            if meta.get("node_type") != "array":
                continue
            names = meta.get("dimension_names")
            arrays[sub] = ArrayDescription(
                shape=tuple(meta.get("shape", ())),
                dimension_names=tuple(names) if names is not None else None,
                zarr_format=int(meta.get("zarr_format", 0)),
            )
    problems.extend(validate_image_attributes(attrs, arrays))
    return problems
