"""Run first by every llama.cpp process the tests start (``llama_cpp_models.LLAMA_CPP_ENV`` puts
this folder on PYTHONPATH): the step around llama-cpp-python's crash on CPUs with Intel's AMX
that ``peftkit serve`` takes too (``peftkit.llama_cpp_launch``, where the crash is described)."""

try:
    from peftkit.llama_cpp_launch import avoid_amx_crash
except ImportError:  # peftkit or llama_cpp not importable: nothing to step around
    pass
else:
    try:
        avoid_amx_crash()
    except ImportError:
        pass
