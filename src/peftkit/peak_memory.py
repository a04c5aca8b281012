"""The peak resident memory of this process, for the demo's table and the benchmarks."""

from __future__ import annotations

import resource


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MB.

    Linux's VmHWM, not ``ru_maxrss``: ru_maxrss survives ``exec``, so a case run in a fresh
    child process would report its parent's peak whenever the parent's was higher (a child
    of a 800 MB process reads 800 MB on its first line). VmHWM belongs to the new image.
    Elsewhere (macOS) ``ru_maxrss``, in bytes there."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if peak > 2**32 else peak / 1024  # bytes on macOS, KiB on Linux and BSD
