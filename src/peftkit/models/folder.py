"""A model folder's two files, ``config.json`` and ``model.safetensors``: written together,
read with an error that names the file and the fix, and checked against the model's own
state dict. The reference decoder's ``save_pretrained``/``from_pretrained`` use these.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from ..formats import atomic

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def write(directory: Union[str, os.PathLike], config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Commit both files at once (``formats.atomic.write_folder``): a crash at any point
    leaves the old pair or the new one."""
    config_text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    atomic.write_folder(directory, {CONFIG_NAME: config_text.encode("utf-8"),
                                    WEIGHTS_NAME: save(tensors, metadata={"format": "pt"})})


def read(directory: Union[str, os.PathLike]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config dict, tensors) of a folder written by ``write``; FileNotFoundError or
    ValueError naming the file when one is missing, truncated or not what it should be."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"model folder {directory} does not exist")
    atomic.recover_folder(directory)  # a save killed after its commit point completes first
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} is missing: not a saved ReferenceDecoder")
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path} is missing: the weights were not saved")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{config_path} is not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} holds {type(config).__name__}, not a JSON object of model sizes")
    try:
        tensors = load_file(weights_path)
    except (SafetensorError, OSError) as err:
        raise ValueError(f"cannot read {weights_path} (truncated or not a safetensors file): {err}") from err
    return config, tensors


def check_matches(tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                  directory: Union[str, os.PathLike]) -> None:
    """The file's tensors have exactly the names and shapes of ``expected`` (the model's
    state dict, less what is stored once by design); ValueError listing the differences."""
    where = f"{Path(directory) / WEIGHTS_NAME} does not match {Path(directory) / CONFIG_NAME}"
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{where}: missing keys {missing}, unexpected keys {unexpected}")
    mismatched = [f"{name} has shape {tuple(tensors[name].shape)}, expected {tuple(tensor.shape)}"
                  for name, tensor in expected.items() if tensors[name].shape != tensor.shape]
    if mismatched:
        raise ValueError(f"{where}: " + "; ".join(mismatched))
