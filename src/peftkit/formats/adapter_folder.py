"""The adapter folder (M10) as Hugging Face PEFT lays it out, so adapters move both ways:

    adapter_config.json          the config (see ``peft_config``)
    adapter_model.safetensors    file key -> tensor, adapter weights only
    chat_template.jinja          the chat template the training data was rendered with, if
                                 any (transformers' own file name), for serving the same one

Keys, as PEFT writes them:

    base_model.model.<module path>.lora_A.weight        (r, in)
    base_model.model.<module path>.lora_B.weight        (out, r)
    base_model.model.<module path>.lora_embedding_A     (r, num_embeddings)
    base_model.model.<module path>.lora_embedding_B     (dim, r)
    prompt_embeddings    prompt: (num_virtual_tokens, token_dim)
                         prefix: (num_virtual_tokens, num_layers * 2 * num_kv_heads * head_dim)

Bottleneck adapters, which PEFT lacks, use the same layout, per site:

    base_model.model.<site path>.adapter_down.weight    (bottleneck, hidden)
    base_model.model.<site path>.adapter_down.bias      (bottleneck,)
    base_model.model.<site path>.adapter_up.weight      (hidden, bottleneck)
    base_model.model.<site path>.adapter_up.bias        (hidden,)

The two files are written as one set (``atomic.write_folder``): after a crash at any
point the folder holds the old adapter or the new one. Nothing is unpickled: safetensors,
or a legacy ``adapter_model.bin`` read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from . import atomic

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
CHAT_TEMPLATE_NAME = "chat_template.jinja"


class AdapterFileError(ValueError):
    """An adapter folder that cannot be used: missing, corrupt or made for another model."""


# PEFT wraps the model one level deeper for LoRA (and peftkit's bottleneck adapters) than
# for prompt learning, whose prompt or prefix tensor is stored under its bare key.
LAYER_PREFIX = "base_model.model."
PROMPT_LEARNING_PREFIX = "base_model."


def file_key(path: str, local: str, input_side: bool) -> str:
    """The file key of tensor ``local`` of the module at ``path`` in the wrapped model."""
    return f"{PROMPT_LEARNING_PREFIX if input_side else LAYER_PREFIX}{path}.{local}"


def module_tensors(tensors: dict[str, torch.Tensor], path: str, input_side: bool) -> dict[str, torch.Tensor]:
    """The tensors of the module at ``path``, under their local keys (``file_key`` undone)."""
    prefix = file_key(path, "", input_side)
    return {k[len(prefix):]: t for k, t in tensors.items() if k.startswith(prefix)}


def write_adapter(directory: str | Path, config: dict[str, Any], tensors: dict[str, torch.Tensor],
                  chat_template: str | None = None) -> Path:
    """Write ``config`` (adapter_config.json fields) and ``tensors`` (file key -> tensor), and
    ``chat_template`` (the Jinja text training rendered its conversations with) when given."""
    directory = Path(directory)
    weights = save_safetensors_bytes(
        {k: t.detach().to("cpu").contiguous() for k, t in tensors.items()}, metadata={"format": "pt"})
    config_bytes = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
    files = {WEIGHTS_NAME: weights, CONFIG_NAME: config_bytes}
    if chat_template is not None:
        files[CHAT_TEMPLATE_NAME] = chat_template.encode("utf-8")
    try:
        return atomic.write_folder(directory, files)
    except NotADirectoryError as e:
        raise AdapterFileError(str(e)) from e


def _recovered(directory: str | Path) -> Path:
    """``directory``, checked to exist, with any interrupted save completed first."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterFileError(f"adapter folder {directory} does not exist.")
    try:
        atomic.recover_folder(directory)
    except OSError as e:
        raise AdapterFileError(f"{directory} holds an interrupted save that could not be completed ({e}); "
                               "make the folder writable, or save the adapter again.") from e
    return directory


def read_config_data(directory: str | Path) -> tuple[dict[str, Any], Path]:
    """The JSON object in ``adapter_config.json`` and the file's path."""
    path = _recovered(directory) / CONFIG_NAME
    if not path.is_file():
        raise AdapterFileError(f"{directory} has no {CONFIG_NAME}; is it an adapter folder?")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterFileError(f"{path} is not valid JSON ({e}); the file is corrupt or truncated. Save or "
                               "download the adapter again.") from e
    if not isinstance(data, dict):
        raise AdapterFileError(f"{path} must hold a JSON object.")
    return data, path


def read_chat_template(directory: str | Path) -> str | None:
    """The chat template saved with the adapter (``CHAT_TEMPLATE_NAME``), or None."""
    path = _recovered(directory) / CHAT_TEMPLATE_NAME
    if not path.is_file():
        return None
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise AdapterFileError(f"{path} cannot be read as UTF-8 text ({e}); save the adapter again.") from e


def read_tensors(directory: str | Path) -> dict[str, torch.Tensor]:
    """Load the adapter weights without unpickling anything."""
    directory = _recovered(directory)
    path = directory / WEIGHTS_NAME
    if path.is_file():
        try:
            return load_safetensors_bytes(path.read_bytes())
        except (SafetensorError, ValueError, OSError) as e:
            raise AdapterFileError(f"{path} is corrupt or truncated ({e}); save the adapter again.") from e
    legacy = directory / LEGACY_WEIGHTS_NAME
    if legacy.is_file():
        try:
            tensors = torch.load(legacy, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:  # what weights_only says of anything but tensors
            raise AdapterFileError(
                f"{legacy} was refused: it is corrupt or holds objects other than tensors, and "
                f"peftkit never unpickles arbitrary objects ({e}). Convert it to safetensors."
            ) from e
        except (RuntimeError, EOFError, OSError, ValueError) as e:  # torch's zip reader on a cut file
            raise AdapterFileError(f"{legacy} is corrupt or truncated ({type(e).__name__}: {e}); save or "
                                   "download the adapter again.") from e
        if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
            raise AdapterFileError(f"{legacy} does not hold a flat name -> tensor mapping.")
        return tensors
    raise AdapterFileError(f"{directory} has no {WEIGHTS_NAME} (nor a legacy {LEGACY_WEIGHTS_NAME}).")
