"""Frame sources for cemi-stream.

Every source satisfies :class:`drivers.base.FrameSource` and is chosen from a
URI-like string by :func:`open_source` (see :mod:`drivers.registry` for the
grammar).  Importing this package registers the built-in drivers; the virtual
SEM (``sim``) is one of them, on an equal footing with real devices.
"""

# isort: skip_file
# (the import order below is meaningful; see the comment)

from __future__ import annotations

# Import order is the order in which drivers claim scheme-less URIs: the
# narrow ones (sim, devices, URLs, folders, TIFF) before the catch-all video.
from . import sim as _sim  # noqa: F401
from . import opencv_stream as _opencv_stream  # noqa: F401
from . import image_folder as _image_folder  # noqa: F401
from . import tiff_stack as _tiff_stack  # noqa: F401
from . import video_file as _video_file  # noqa: F401
from .base import FrameSource, SourceInfo, to_gray, to_gray8
from .pacing import wrap_pacing
from .registry import SourceUri, drivers, parse_uri, resolve

__all__ = [
    "FrameSource",
    "SourceInfo",
    "SourceUri",
    "drivers",
    "open_source",
    "to_gray",
    "to_gray8",
]


def open_source(uri: str, *, pace: str | None = None, loop: bool | None = None) -> FrameSource:
    """Open the source named by ``uri``, with pacing and looping applied.

    Parameters
    ----------
    uri : str
        Source string (see :mod:`drivers.registry`).
    pace : str or None
        ``native``, ``max`` or a frame rate in frames/s; overrides the URI's
        ``pace`` option.  Default: ``native`` for live sources (they pace
        themselves) and ``max`` for replay.
    loop : bool or None
        Restart a replay source at its end; overrides the URI's ``loop``.

    Returns
    -------
    FrameSource
        An opened source; the caller closes it.

    Raises
    ------
    cemi_stream.errors.SourceError
        With a one-line reason naming the source.
    """
    parsed, uri_pace, uri_loop = parse_uri(uri)
    entry = resolve(parsed)
    source = entry.factory(parsed)
    source = wrap_pacing(
        source,
        pace=pace if pace is not None else uri_pace,
        loop=loop if loop is not None else uri_loop,
    )
    source.open()
    return source
