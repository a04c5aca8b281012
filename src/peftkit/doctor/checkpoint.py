"""Reading a checkpoint for M10 without unpickling anything.

A checkpoint is one weight file or a folder of them: a ``save_pretrained`` folder, a
Trainer ``checkpoint-N`` folder, a sharded model (``model-00001-of-00002.safetensors``
...). safetensors headers are read without the data; ``.bin``/``.pt``/``.pth`` go through
``torch.load(weights_only=True)``, which refuses anything but tensors and plain containers.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")

# What a Trainer (or accelerate) checkpoint folder keeps beside the weights: optimizer,
# scheduler, grad-scaler and RNG state, and the training arguments (a pickled dataclass,
# which weights_only refuses). None of it is model weights, so M10 does not read it.
_TRAINING_STATE = re.compile(r"(optimizer|scheduler|scaler|rng_state(_\d+)?|training_args)\.(pt|pth|bin)")

# Bytes per element by safetensors dtype name; the rest (8-bit floats, ints, bool) take one.
_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2}

Entries = dict[str, tuple[tuple[int, ...], int]]
"""Tensor name -> (shape, bytes)."""


@dataclass(frozen=True)
class Checkpoint:
    """What ``doctor(checkpoint=...)`` was given: ``path``, the weight ``files`` to read
    (the path itself, or every weight file below the folder, subfolders too: PEFT saves a
    second adapter in one) and the training-state files ``skipped``."""

    path: Path
    files: tuple[Path, ...]
    skipped: tuple[Path, ...] = ()

    @property
    def is_folder(self) -> bool:
        return self.path.is_dir()

    def label(self, file: Path) -> str:
        """``file`` as a person finds it: relative to the folder."""
        return file.relative_to(self.path).as_posix() if self.is_folder else file.name


def open_checkpoint(path: str | Path) -> Checkpoint:
    """The weight files of ``path``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: a file of another type, or a folder that holds no weight file.
    """
    path = Path(path)
    if path.is_file():
        if path.suffix not in WEIGHT_SUFFIXES:
            raise ValueError(f"{path}: unknown checkpoint type {path.suffix!r}; the doctor reads "
                             f"{', '.join(WEIGHT_SUFFIXES)} files and folders of them.")
        return Checkpoint(path, (path,))
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} does not exist.")
    found = sorted(p for p in path.rglob("*") if p.suffix in WEIGHT_SUFFIXES and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    weights = tuple(p for p in found if not _TRAINING_STATE.fullmatch(p.name))
    if not weights:
        raise ValueError(f"{path} holds no weight file ({', '.join('*' + s for s in WEIGHT_SUFFIXES)}"
                         f"{'; only training state: ' + ', '.join(p.name for p in found) if found else ''}).")
    return Checkpoint(path, weights, tuple(p for p in found if p not in weights))


def read_entries(path: Path) -> Entries:
    """Name -> (shape, bytes) of every tensor in one weight file; ValueError when the file
    cannot be read without unpickling, or is no weight file."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: _entry(f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in f.keys()}
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path} is not a readable safetensors file ({e}).") from e
    return {k: (tuple(t.shape), t.numel() * t.element_size()) for k, t in _flatten(_torch_load(path)).items()}


def _entry(shape: list[int], dtype: str) -> tuple[tuple[int, ...], int]:
    numel = 1
    for extent in shape:
        numel *= extent
    return tuple(shape), numel * _DTYPE_BYTES.get(dtype, 1)


def _torch_load(path: Path) -> Any:
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as e:
        raise ValueError(f"{path} was refused: it is corrupt or holds objects other than tensors, and the doctor "
                         f"never unpickles arbitrary objects ({type(e).__name__}: {e}).") from e


def _flatten(obj: Any, prefix: str = "") -> dict[str, Tensor]:
    if isinstance(obj, Tensor):
        return {prefix.rstrip("."): obj}
    if isinstance(obj, Mapping):
        return {k: t for key, value in obj.items() for k, t in _flatten(value, f"{prefix}{key}.").items()}
    return {}
