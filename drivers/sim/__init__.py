"""The virtual SEM: a simulated microscope that is also a frame source.

``sim:`` (or ``sim:?rows=2&noise=hd&video=1``) in any source string opens a
:class:`SimSource`; it produces the frames of a stage traversal over a
procedural eutectic (or a mirror-tiled micrograph) through a calibrated SEM
imaging model, and knows the true position of every frame.  With
``live=FPS`` it is a live device instead (:class:`drivers.live.LiveDevice`):
frames come on the device's clock and a reader that falls behind loses some.
"""

from __future__ import annotations

from drivers.live import LiveDevice
from drivers.registry import SourceUri, register

from .config import SimConfig, config_from_options
from .export import write_simulation
from .scanner import PRESETS, Scanner, ScanPreset
from .source import SimSource, TruthRecord
from .specimen import ImageSpecimen, ProceduralSpecimen, Specimen, load_specimen
from .traversal import Traversal, TraversalStep, plan_traversal

__all__ = [
    "PRESETS",
    "ImageSpecimen",
    "ProceduralSpecimen",
    "ScanPreset",
    "Scanner",
    "SimConfig",
    "SimSource",
    "Specimen",
    "Traversal",
    "TraversalStep",
    "TruthRecord",
    "config_from_options",
    "load_specimen",
    "plan_traversal",
    "write_simulation",
]


@register(
    "sim",
    claims=lambda u: u.scheme == "sim",
    description="virtual SEM: simulated stage traversal over a procedural or image specimen",
)
def open_sim(uri: SourceUri) -> SimSource | LiveDevice:
    """Registry factory: a :class:`SimSource` from ``sim:?key=value`` options.

    Parameters
    ----------
    uri : SourceUri
        Parsed source string; ``options`` map onto :class:`SimConfig` fields
        (``frame_size=WxH`` also accepted).  A target (``sim:PATH``) is taken
        as the specimen image when no ``source`` option is given.

    Returns
    -------
    SimSource or LiveDevice
        Not yet opened; with ``live=FPS`` the virtual SEM as a live device.

    Raises
    ------
    cemi_stream.errors.SourceError
        For an unknown or unparsable option.
    """
    options = dict(uri.options)
    if uri.target and "source" not in options:
        options["source"] = uri.target
    config = config_from_options(options)
    sim = SimSource(config, uri=uri.raw)
    return LiveDevice(sim, config.live, config.live_buffer) if config.live > 0 else sim
