"""glibc's allocator, set for training: freed activation buffers stay in the process.

By default glibc serves a large request (over 128 KB, a threshold it raises up to 32 MB as
it sees big frees) with its own ``mmap`` and returns it with ``munmap`` when freed. A
training step frees and asks again for the same activation buffers every step, so each step
maps them afresh and the kernel zero-fills every page on first touch: time spent in page
faults, not in arithmetic. With ``M_MMAP_MAX = 0`` every buffer comes from the heap and
with a high ``M_TRIM_THRESHOLD`` freed memory is kept for the next step. The peak resident
memory is the step's peak either way; what changes is that it is not given back between
steps. ``peftkit train`` calls ``tune_for_training`` once the model is loaded
(``bench/lora_step`` measures both settings); the user's own settings of these (glibc's
``MALLOC_MMAP_MAX_``, ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``,
``MALLOC_TOP_PAD_`` or ``GLIBC_TUNABLES=glibc.malloc...``) or ``PEFTKIT_MALLOC=default``
leave glibc as it is. It is process-wide and stays: a notebook that calls ``peftkit.cli.main``
keeps it (``PEFTKIT_MALLOC=default`` keeps it off).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

# mallopt's parameter numbers (glibc's malloc.h).
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
TRIM_THRESHOLD = 1 << 30  # 1 GiB of freed heap kept before glibc trims it back to the OS
OPT_OUT = "PEFTKIT_MALLOC"
# The user's own choice of what this sets (other MALLOC_* variables, such as MALLOC_ARENA_MAX, are not).
USERS_OWN = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def tune_for_training() -> bool:
    """Set glibc's allocator for a training process (module docstring); whether it was set.
    Not on another libc, and not when the user set these (``USERS_OWN``, glibc.malloc tunables)
    or PEFTKIT_MALLOC=default: their choice stands."""
    if os.environ.get(OPT_OUT) == "default" or any(name in os.environ for name in USERS_OWN) \
            or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success: both or neither, so a half-set allocator is never reported as set.
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
