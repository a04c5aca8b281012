"""llama_cpp.server as ``peftkit serve`` starts it: ``python .../peftkit/llama_cpp_launch.py ARGS``
is ``python -m llama_cpp.server ARGS``, with one llama.cpp problem stepped around. It is run
as a file, not through the peftkit package, so the server process does not import peftkit
(nor torch): this file needs only the standard library and llama_cpp.

On a CPU with Intel's AMX (Xeon Sapphire Rapids and newer), llama-cpp-python 0.3.36 repacks
the weights of a Q4_1 or Q8_0 model into its AMX buffer type and then crashes (SIGSEGV) in
the first decode, the base model alone included. Without llama.cpp's extra buffer types
(``use_extra_bufts = false`` in its model parameters, what its own --no-repack sets) the same
model runs on llama.cpp's plain CPU kernels. llama_cpp.server has no setting for it, so on
such a CPU the default model parameters are wrapped before the server builds any model.
Elsewhere llama.cpp runs as it is.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path


def cpu_has_amx(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    try:
        return "amx_int8" in cpuinfo.read_text()
    except OSError:  # not Linux: no /proc/cpuinfo, and none of this machine's problem
        return False


def without_extra_buffers() -> bool:
    """Every llama.cpp model built in this process after this call: no extra buffer types.
    False when this llama-cpp-python has no such parameter (ctypes would take the attribute
    and ignore it)."""
    import llama_cpp.llama_cpp as native

    defaults = native.llama_model_default_params
    if getattr(defaults, "peftkit_plain_buffers", False):
        return True
    if "use_extra_bufts" not in dict(native.llama_model_params._fields_):
        return False

    def plain_buffers():
        params = defaults()
        params.use_extra_bufts = False
        return params

    plain_buffers.peftkit_plain_buffers = True
    native.llama_model_default_params = plain_buffers
    return True


def avoid_amx_crash(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """``without_extra_buffers`` on a CPU with AMX; whether it is in effect."""
    return cpu_has_amx(cpuinfo) and without_extra_buffers()


if __name__ == "__main__":
    # Run as a file, Python put this folder first on sys.path: peftkit's module names (data,
    # config, models...) must not shadow the server's imports.
    if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
        sys.path.pop(0)
    avoid_amx_crash()
    runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
