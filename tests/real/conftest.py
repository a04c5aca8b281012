"""The real-model tests' shared fixtures: SmolLM2 (the session's copy, see tests/conftest.py),
its float32 GGUF, and a small adapter on it, each made once per session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def base_gguf(tmp_path_factory) -> Path:
    """SmolLM2's Q4_1 GGUF dequantized to float32 (llama.cpp then runs what torch runs)."""
    pytest.importorskip("gguf")
    from llama_cpp_models import Q4_GGUF, require_smollm2, write_float32_gguf

    require_smollm2()
    return write_float32_gguf(Q4_GGUF, tmp_path_factory.mktemp("base") / "smollm2-f32.gguf")


@pytest.fixture(scope="session")
def smollm(_smollm2_loaded):
    """The session's SmolLM2; every test unloads what it attaches, so the model is shared
    rather than copied."""
    return _smollm2_loaded.model


@pytest.fixture(scope="session")
def small_adapter(smollm, tmp_path_factory) -> Path:
    """An all-linear r=4 adapter folder, for the tests that only export."""
    from llama_cpp_models import train_like_adapter
    from peftkit import LoraConfig

    folder = tmp_path_factory.mktemp("small") / "adapter"
    train_like_adapter(smollm, LoraConfig(r=4, alpha=8, target_modules="all-linear"), folder)
    return folder
