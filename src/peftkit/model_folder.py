"""Write a loaded base model (a merged one, or ``peftkit models save``'s) as a model folder
that ``load_model`` and transformers' ``from_pretrained`` read, atomically, refusing a model
that holds a NaN or infinite weight."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch

from .loading import LoadedModel, ModelLoadError
from .models import ReferenceDecoder


def first_non_finite(tensors: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """The first (name, tensor) pair holding NaN or inf, as "name (k of n values)", or None."""
    for name, tensor in tensors:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return f"{name} ({int((~torch.isfinite(tensor)).sum())} of {tensor.numel()} values are NaN or inf)"
    return None


def save_model_folder(loaded: LoadedModel, folder: str | Path, *, max_shard_size: str | int = "5GB") -> Path:
    """Write ``loaded.model`` (and its tokenizer) as a model folder that ``load_model`` and,
    for transformers models, ``from_pretrained`` read: safetensors weights, split into files
    of at most ``max_shard_size`` with a ``model.safetensors.index.json`` when larger
    (transformers' own sharding; the reference decoder is always one file), built aside and
    renamed into place so a crash leaves no half-written folder. A model with a NaN or
    infinite weight is refused before anything is written: it could only compute NaN."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ModelLoadError(f"{folder} is a file; pick a new folder for the model.")
    if folder.exists() and any(folder.iterdir()):
        raise ModelLoadError(f"{folder} is not empty; pick a new folder for the model.")
    bad = first_non_finite(loaded.model.state_dict().items())
    if bad is not None:
        raise ModelLoadError(f"the model's weight {bad}; nothing was written to {folder}. A model with "
                             "non-finite weights outputs NaN: find where they came from (an adapter "
                             "trained into NaN, a 16-bit overflow) and save again.")
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    except OSError as e:
        raise ModelLoadError(f"cannot write into {folder.parent} ({e.strerror}); pick a folder you can write to.") from e
    try:
        if isinstance(loaded.model, ReferenceDecoder):
            loaded.model.save_pretrained(staging)
        else:
            loaded.model.save_pretrained(staging, safe_serialization=True, max_shard_size=max_shard_size)
            if loaded.tokenizer is not None:
                loaded.tokenizer.save_pretrained(staging)
        if folder.exists():
            folder.rmdir()
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder
