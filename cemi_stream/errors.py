"""The one exception hierarchy of cemi-stream.

Every error a user can cause (a bad file, a bad option, an absent device) is a
:class:`CemiError` subclass whose message is one line naming the thing and the
reason; the command line prints exactly that line and exits non-zero.
"""

from __future__ import annotations


class CemiError(Exception):
    """Base of all errors raised on purpose by cemi-stream."""


class ConfigError(CemiError):
    """A configuration value or command-line option is invalid."""


class SourceError(CemiError):
    """A frame source is missing, corrupt, unsupported or failed while reading."""


class ProtocolError(CemiError):
    """A bus message could not be decoded or failed validation."""


class BusError(CemiError):
    """A ZeroMQ endpoint could not be bound, connected or used."""


class SpoolError(CemiError):
    """The raw frame spool could not be created, appended or read."""


class ModelError(CemiError):
    """A model file is missing, corrupt, or does not match its architecture."""


class DenoiseError(CemiError):
    """Denoising, training or evaluation could not run (bad input, missing backend)."""


class RunNotFoundError(CemiError):
    """No run with the given id is known to the daemon."""


class RunStateError(CemiError):
    """A run cannot make the requested transition (e.g. resume of a running run)."""


class DaemonError(CemiError):
    """The daemon cannot be reached, cannot start, or refused a request (its one-line error)."""


class AnalysisError(CemiError):
    """Microstructure analysis input or settings that cannot be used."""
