"""Progress reporting for long commands.

On a terminal the count is redrawn in place on stderr; otherwise (logs, CI)
a log line is written every few seconds, so progress never floods a file.
"""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("cemi_stream.progress")


class Progress:
    """A frame counter with rate, drawn at most every ``interval_s`` seconds.

    Parameters
    ----------
    label : str
        What is being counted (``"simulate"``, ``"capture"`` ...).
    total : int or None
        Expected count, when known.
    interval_s : float
        Minimum seconds between two updates (terminal: 0.2 s is used).
    enabled : bool
        False makes every call a no-op.
    unit : str
        Plural name of what is counted (``"frames"``, ``"iterations"``, ``"images"``).
    """

    def __init__(
        self,
        label: str,
        total: int | None = None,
        interval_s: float = 5.0,
        enabled: bool = True,
        unit: str = "frames",
    ) -> None:
        self.label = label
        self.unit = unit
        self.total = total
        self.enabled = enabled
        self.tty = enabled and sys.stderr.isatty()
        self.interval_s = 0.2 if self.tty else interval_s
        self.count = 0
        self.extra = ""
        self._start = time.monotonic()
        self._last = 0.0

    def update(self, count: int, extra: str = "") -> None:
        """Set the current count (and a short status text)."""
        self.count = count
        self.extra = extra
        now = time.monotonic()
        if self.enabled and now - self._last >= self.interval_s:
            self._last = now
            self._draw(final=False)

    def close(self) -> None:
        """Draw the final state."""
        if self.enabled:
            self._draw(final=True)

    def _draw(self, final: bool) -> None:
        elapsed = max(time.monotonic() - self._start, 1e-9)
        of = f"/{self.total}" if self.total else ""
        rate = f"{self.count / elapsed:.1f} {self.unit}/s"
        text = f"{self.label}: {self.count}{of} {self.unit}, {rate}" + (
            f", {self.extra}" if self.extra else ""
        )
        if self.tty:
            sys.stderr.write("\r" + text + ("\n" if final else ""))
            sys.stderr.flush()
        else:
            log.info("%s", text)
