"""Finding a model (denoiser or lamellar segmenter) by name or path.

Shipped models live in :data:`WEIGHTS_DIR` (``models/weights/``) as
``NAME.safetensors`` + ``NAME.json`` (see :mod:`models.weights`).  Commands
accept ``--model`` as a name from there, a ``.safetensors`` file, or a folder
holding one (e.g. a training run's output folder).
"""

from __future__ import annotations

import logging
from pathlib import Path

from cemi_stream.errors import ModelError

log = logging.getLogger(__name__)

#: The model used when none is named.
DEFAULT_MODEL = "semnet-compact-kriss"
#: Folder of the shipped models.
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
_SUFFIX = ".safetensors"
_TRAIN_HINT = "train one with `python run_daemon.py train-denoiser`"


def _weights_dir(weights_dir: Path | None) -> Path:
    # Looked up at call time so that WEIGHTS_DIR can be redirected (tests, packaging).
    return Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR


def list_models(weights_dir: Path | None = None) -> list[str]:
    """Names (file stems) of the models in ``weights_dir`` (default :data:`WEIGHTS_DIR`), sorted."""
    folder = _weights_dir(weights_dir)
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.glob(f"*{_SUFFIX}") if p.is_file())


def _not_found(what: str, folder: Path, hint: str = _TRAIN_HINT) -> ModelError:
    names = list_models(folder)
    available = ", ".join(names) if names else "none"
    return ModelError(f"{what}; available models in {folder}: {available}; {hint}")


def _is_bare_name(text: str) -> bool:
    return bool(text) and "/" not in text and "\\" not in text and text not in (".", "..")


def resolve_model(
    name_or_path: str | Path | None,
    *,
    weights_dir: Path | None = None,
    default: str = DEFAULT_MODEL,
    train_hint: str = _TRAIN_HINT,
) -> Path:
    """The ``.safetensors`` file a model name or path refers to.

    Parameters
    ----------
    name_or_path : str, Path or None
        ``None``: the default model :data:`DEFAULT_MODEL`; a bare name: the
        model ``NAME`` in the weights folder; a path to a ``.safetensors`` file;
        or a folder holding exactly one ``.safetensors`` file (or several, one
        of which is named like the folder).
    weights_dir : Path, optional
        The weights folder (default :data:`WEIGHTS_DIR`).
    default : str
        The model ``None`` stands for (default :data:`DEFAULT_MODEL`, the
        denoiser; the lamellar segmenters pass theirs).
    train_hint : str
        How to train a model, appended to the not-found messages.

    Returns
    -------
    Path
        An existing ``.safetensors`` file (its card is checked on loading).

    Raises
    ------
    ModelError
        Nothing matches; the message lists the available models and how to
        train one.
    """
    folder = _weights_dir(weights_dir)
    if name_or_path is None:
        path = folder / f"{default}{_SUFFIX}"
        if not path.is_file():
            raise _not_found(f"default model {default} not found at {path}", folder, train_hint)
        return path
    text = str(name_or_path)
    # A name from the zoo wins over a same-named entry in the working directory.
    if isinstance(name_or_path, str) and _is_bare_name(text):
        path = folder / f"{text}{_SUFFIX}"
        if path.is_file():
            return path
    path = Path(name_or_path).expanduser()
    if path.is_file():
        if path.suffix != _SUFFIX:
            raise ModelError(f"{path}: not a model weights file (expected a {_SUFFIX} file)")
        return path
    if path.is_dir():
        candidates = sorted(p for p in path.glob(f"*{_SUFFIX}") if p.is_file())
        if len(candidates) == 1:
            return candidates[0]
        named = path / f"{path.resolve().name}{_SUFFIX}"
        if named.is_file():
            return named
        if not candidates:
            raise ModelError(f"{path}: folder holds no {_SUFFIX} model; {train_hint}")
        raise ModelError(
            f"{path}: folder holds {len(candidates)} {_SUFFIX} models "
            f"({', '.join(p.name for p in candidates[:5])}); name the file"
        )
    raise _not_found(f"no such model {text!r}", folder, train_hint)


__all__ = ["DEFAULT_MODEL", "WEIGHTS_DIR", "list_models", "resolve_model"]
