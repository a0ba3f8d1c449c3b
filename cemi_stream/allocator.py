"""Keep freed memory for reuse instead of returning it to the kernel at once (glibc).

glibc serves every allocation above ``M_MMAP_THRESHOLD`` (128 KiB at first,
growing up to 32 MiB as it adapts) from a fresh ``mmap`` and unmaps it on
free, so a loop that makes and drops arrays of a few MB faults in every page
of every temporary again.  In the virtual machines this project runs on a
page fault is expensive: for one 508 x 413 analysis tile the Bradley-Roth
phase fraction spent 7.8 ms, of which ~5 ms were page faults of its float64
temporaries; with the settings below it takes 2.7 ms (2-core AMD EPYC VM).
The cost is that up to ``trim_bytes`` of freed memory stay resident.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

# mallopt(3) parameters
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

_done = False


def keep_freed_memory(mmap_bytes: int = 64 << 20, trim_bytes: int = 256 << 20) -> bool:
    """Raise glibc's mmap and trim thresholds for this process (once; later calls do nothing).

    Parameters
    ----------
    mmap_bytes : int
        Allocations below this many bytes come from the heap (reused) instead
        of a fresh mapping.
    trim_bytes : int
        Free memory at the top of the heap is returned to the kernel only
        above this many bytes.

    Returns
    -------
    bool
        Whether the settings are in force (False off glibc, e.g. macOS or musl).
    """
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(_M_MMAP_THRESHOLD, int(mmap_bytes))) and bool(
        mallopt(_M_TRIM_THRESHOLD, int(trim_bytes))
    )
    if not ok:
        log.debug("mallopt refused the thresholds; allocations stay as glibc decides")
    _done = ok
    return ok
