"""cemi-stream: a real-time streaming acquisition daemon for SEM video mosaics.

The package holds the daemon's contracts (frames, bus protocol, configuration,
errors) and its stages (capture, keyframe selection, spool; later stitch,
denoise, monitor).  Frame sources live in the sibling package :mod:`drivers`,
neural networks in :mod:`models`.
"""

__version__ = "0.1.0"
