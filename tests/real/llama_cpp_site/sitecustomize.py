"""Run first by every llama.cpp process the tests start (``llama_cpp_models.LLAMA_CPP_ENV`` puts
this folder on PYTHONPATH). On a CPU with Intel's AMX, llama-cpp-python 0.3.36 repacks the
weights of a Q4_1 or Q8_0 model into its AMX buffer type and then crashes in the first decode
(SIGSEGV, even for the base model alone, with no adapter). Without the extra buffer types
(llama.cpp's ``use_extra_bufts = false``, its --no-repack) the same model runs on llama.cpp's
plain CPU kernels. Elsewhere llama.cpp is left as it is."""

from pathlib import Path

try:
    _amx = "amx_int8" in Path("/proc/cpuinfo").read_text()
except OSError:
    _amx = False

if _amx:
    try:
        import llama_cpp.llama_cpp as _native
    except ImportError:
        pass
    else:
        _defaults = _native.llama_model_default_params

        def _without_extra_buffers():
            params = _defaults()
            params.use_extra_bufts = False
            return params

        _native.llama_model_default_params = _without_extra_buffers
