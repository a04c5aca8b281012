"""llama_cpp.server as ``peftkit serve`` starts it: ``python -m peftkit.llama_cpp_launch ARGS``
is ``python -m llama_cpp.server ARGS``, with one llama.cpp problem stepped around.

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


def without_extra_buffers() -> None:
    """Every llama.cpp model built in this process after this call: no extra buffer types."""
    import llama_cpp.llama_cpp as native

    defaults = native.llama_model_default_params
    if getattr(defaults, "peftkit_plain_buffers", False):
        return

    def plain_buffers():
        params = defaults()
        params.use_extra_bufts = False
        return params

    plain_buffers.peftkit_plain_buffers = True
    native.llama_model_default_params = plain_buffers


def avoid_amx_crash() -> bool:
    """``without_extra_buffers`` on a CPU with AMX; whether it was needed."""
    if not cpu_has_amx():
        return False
    without_extra_buffers()
    return True


if __name__ == "__main__":
    avoid_amx_crash()
    sys.argv[0] = "llama_cpp.server"
    runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
