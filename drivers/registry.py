"""Choosing a frame source from a URI-like string.

Grammar: ``[scheme:]target[?key=value&key=value]``; network URLs keep their
own query string and take options after ``#`` instead
(``http://cam/video.mjpg?res=hd#timeout_ms=2000``).

* ``sim:`` / ``sim:?rows=3&noise=ld`` - the virtual SEM;
* ``device:0``, ``/dev/video0``, a bare integer - a capture device;
* ``rtsp://...``, ``http(s)://...``, ``udp://...``, ``gst:PIPELINE`` - network
  or GStreamer streams through OpenCV;
* a directory - a folder of images; a ``.tif``/``.tiff`` file - a (multi-page)
  TIFF; any other file - a video file.  ``folder:``, ``tiff:``, ``video:``
  force the choice.

``pace`` (``native``, ``max`` or frames per second) and ``loop`` (``0``/``1``)
are understood for every source and applied by :mod:`drivers.pacing`; every
other option goes to the driver, which rejects keys it does not know.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl

from cemi_stream.errors import SourceError

from .base import FrameSource

DriverFactory = Callable[["SourceUri"], FrameSource]

_NETWORK_SCHEMES = ("rtsp", "rtsps", "rtmp", "http", "https", "udp", "tcp", "srt")
_SCHEME_RE = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*):(.*)$", re.DOTALL)


@dataclass(frozen=True, slots=True)
class SourceUri:
    """A parsed source string.

    Attributes
    ----------
    raw : str
        The string as given (used in messages).
    scheme : str
        Explicit scheme (``"sim"``, ``"device"``, ``"rtsp"`` ...) or ``""``.
    target : str
        Everything after the scheme and before ``?``: a path, an index, a URL.
    options : dict of str to str
        Query options, minus ``pace`` and ``loop``.
    """

    raw: str
    scheme: str
    target: str
    options: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class DriverEntry:
    """One registry entry: a name, a claim test and a factory."""

    name: str
    claims: Callable[[SourceUri], bool]
    factory: DriverFactory
    description: str


_REGISTRY: dict[str, DriverEntry] = {}


def register(
    name: str, claims: Callable[[SourceUri], bool], description: str
) -> Callable[[DriverFactory], DriverFactory]:
    """Class/function decorator adding a driver to the registry.

    Parameters
    ----------
    name : str
        Registry name; also accepted as an explicit scheme (``name:target``).
    claims : callable
        Returns True when a scheme-less URI belongs to this driver.  Tried in
        registration order, so narrower drivers register first.
    description : str
        One line for ``--help`` texts.
    """

    def decorate(factory: DriverFactory) -> DriverFactory:
        if name in _REGISTRY:
            raise ValueError(f"driver {name!r} registered twice")
        _REGISTRY[name] = DriverEntry(name, claims, factory, description)
        return factory

    return decorate


def drivers() -> list[DriverEntry]:
    """All registered drivers, in the order they are tried."""
    return list(_REGISTRY.values())


def parse_uri(uri: str) -> tuple[SourceUri, str | None, bool]:
    """Split a source string into the driver part, ``pace`` and ``loop``.

    Returns
    -------
    (SourceUri, pace, loop)
        ``pace`` is the raw option value or None; ``loop`` is a bool.
    """
    text = uri.strip()
    if not text:
        raise SourceError("source: empty source string")
    query = ""
    head = text.split(":", 1)[0].lower()
    if head in _NETWORK_SCHEMES:
        # A URL keeps its own query string; our options follow a '#'.
        if "#" in text:
            text, query = text.split("#", 1)
    elif "?" in text:
        text, query = text.split("?", 1)
    options = dict(parse_qsl(query, keep_blank_values=True))
    pace = options.pop("pace", None)
    loop_text = options.pop("loop", "0").lower()
    if loop_text not in ("0", "1", "true", "false", "yes", "no", ""):
        raise SourceError(f"{uri}: loop must be 0 or 1, not {loop_text!r}")
    loop = loop_text in ("1", "true", "yes")

    scheme, target = "", text
    match = _SCHEME_RE.match(text)
    # A single letter before ':' is a Windows drive, not a scheme.
    if match and len(match.group(1)) > 1:
        scheme, target = match.group(1).lower(), match.group(2)
        if scheme == "file":
            scheme, target = "", target.removeprefix("//")
        elif scheme in _NETWORK_SCHEMES:
            target = text  # keep the full URL for OpenCV
    return SourceUri(uri, scheme, target, options), pace, loop


def resolve(uri: SourceUri) -> DriverEntry:
    """Pick the driver for a parsed URI, or raise :class:`SourceError`."""
    if uri.scheme:
        if uri.scheme in _REGISTRY:
            return _REGISTRY[uri.scheme]
        for entry in _REGISTRY.values():
            if entry.claims(uri):
                return entry
        known = ", ".join(sorted(_REGISTRY))
        raise SourceError(f"{uri.raw}: unknown source scheme {uri.scheme!r} (known: {known})")
    path = Path(uri.target).expanduser()
    for entry in _REGISTRY.values():
        if entry.claims(uri):
            return entry
    if not path.exists():
        raise SourceError(f"{uri.raw}: no such file or directory")
    raise SourceError(f"{uri.raw}: unsupported source type")
