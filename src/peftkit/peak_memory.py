"""The peak resident memory of this process, for the demo's table and the benchmarks."""

from __future__ import annotations

import resource


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MB.

    Linux's VmHWM, not ``ru_maxrss``: ru_maxrss survives ``exec``, so a case run in a fresh
    child process would report its parent's peak whenever the parent's was higher (a child
    of a 800 MB process reads 800 MB on its first line). VmHWM belongs to the new image.
    Elsewhere (macOS) ``ru_maxrss``, in bytes there."""
    peak_kib = _status_kib("VmHWM")
    if peak_kib is not None:
        return peak_kib / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if peak > 2**32 else peak / 1024  # bytes on macOS, KiB on Linux and BSD


def current_rss_mb() -> float | None:
    """This process's resident set size now, in MB (VmRSS); None where /proc is missing."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib / 1024


def _status_kib(field: str) -> int | None:
    """A "<field>:  <n> kB" line of /proc/self/status (Linux), or None."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None
