"""Saving a PeftModel's adapter and loading one onto a model (M10).

The files themselves (layout, keys, config fields, atomic writes) are ``formats``'s, which
takes plain configs, facts and tensors; this module gathers those from a PeftModel and
puts what it reads back into one, checked against the model first.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from . import integrations, registry
from .config import PeftConfig
from .formats import peft_config
from .formats.adapter_folder import (AdapterFileError, file_key, module_tensors, read_config_data, read_tensors,
                                     write_adapter)
from .formats.peft_config import ModelFacts

if TYPE_CHECKING:  # the model hands itself over; this module never builds one
    from .model import PeftModel


def _name_or_path(model: nn.Module) -> str | None:
    """The ``name_or_path`` transformers gives a model read with ``from_pretrained`` (its
    config's: peftkit's GGUF loading points that at the file rather than its folder)."""
    return getattr(getattr(model, "config", None), "name_or_path", None) or None


def _facts(model: PeftModel, name: str) -> ModelFacts:
    base = model.base_model
    input_side = any(name in encoder.adapter_names for encoder in model.input_adapters.values())
    num_kv_heads = head_dim = token_dim = None
    if input_side:  # a prompt or prefix, which PEFT describes by the model's geometry
        token_dim = base.get_input_embeddings().embedding_dim
        try:
            _, num_kv_heads, head_dim = integrations.attention_geometry(base)
        except ValueError:  # a config without head counts: a prompt does not need them
            pass
    return ModelFacts(
        base_model_name_or_path=_name_or_path(base), task_type=integrations.task_type(base),
        modules_to_save=list(model.trained_copy_paths[name]), target_names=model.saved_target_names(name),
        fan_in_fan_out=model.uses_conv1d(name), num_layers=integrations.num_layers(base),
        num_attention_heads=integrations.num_attention_heads(base), num_kv_heads=num_kv_heads,
        head_dim=head_dim, token_dim=token_dim,
    )


def adapter_tensors(model: PeftModel, name: str) -> dict[str, torch.Tensor]:
    """File key -> tensor for adapter ``name``, in Hugging Face PEFT's key layout."""
    modules, encoder = model.adapter_state(name)
    input_side = model.is_input_side(name)
    tensors = {file_key(path, local, input_side): t for path, state in modules.items() for local, t in state.items()}
    tensors.update(encoder)  # a prompt or prefix sits outside the model: PEFT stores it under its bare key
    return tensors


def load_adapter_tensors(model: PeftModel, name: str, tensors: dict[str, torch.Tensor]) -> None:
    """Copy file tensors (keys as ``adapter_tensors`` gives them) into adapter ``name``."""
    modules, _ = model.adapter_state(name)
    input_side = model.is_input_side(name)
    model.load_adapter_state(name, {path: module_tensors(tensors, path, input_side) for path in modules}, tensors)


def save_adapter(model: PeftModel, directory: str | Path, name: str, chat_template: str | None = None,
                 tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write adapter ``name`` of ``model`` to ``directory`` (adapter weights only, and the
    chat template the data was rendered with when given). ``tensors`` (``adapter_tensors``'
    keys) replaces the model's own: a sharded model's, gathered into plain tensors."""
    if name not in model.configs:
        raise ValueError(f"no adapter named {name!r}; this model has {sorted(model.configs)}.")
    config = model.configs[name]
    data = registry.method_for(config).to_file(config, _facts(model, name))
    return write_adapter(directory, data, adapter_tensors(model, name) if tensors is None else tensors, chat_template)


# -- loading --------------------------------------------------------------------------
def read_config(directory: str | Path) -> PeftConfig:
    """Parse and validate ``adapter_config.json`` (peftkit's or Hugging Face PEFT's) with the
    reader of the method its ``peft_type`` names."""
    data, path = read_config_data(directory)
    try:
        method = registry.method_of_type(data.get("peft_type"))
    except ValueError as e:
        raise AdapterFileError(f"{path}: {e}") from e
    return peft_config.parse(method.from_file, data, path)


def _check_tensors(model: PeftModel, name: str, found: dict[str, torch.Tensor], directory: Path) -> None:
    expected = adapter_tensors(model, name)
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''} ({len(missing)} in all)")
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} ({len(unexpected)} in all)")
    for key in sorted(set(expected) & set(found)):
        if tuple(expected[key].shape) != tuple(found[key].shape):
            problems.append(f"{key}: expected shape {tuple(expected[key].shape)}, found {tuple(found[key].shape)}")
    if problems:
        raise AdapterFileError(
            f"adapter {directory} does not fit this model (was it saved for another base model?): "
            + "; ".join(problems[:6])
        )


def load_adapter_into(model: PeftModel, directory: str | Path, name: str, trainable: bool = False) -> None:
    """Attach the adapter saved in ``directory`` to ``model`` under ``name``."""
    directory = Path(directory)
    config = read_config(directory)
    tensors = read_tensors(directory)
    _warn_on_other_base(model, config)
    try:
        model.add_adapter(config, name)
    except ValueError as e:
        raise AdapterFileError(f"adapter {directory} does not fit this model: {e}") from e
    try:
        base_weights = _take_saved_base_weights(model, name, tensors, directory)
        _check_tensors(model, name, tensors, directory)
    except AdapterFileError:
        model.delete_adapter(name)
        raise
    load_adapter_tensors(model, name, tensors)
    _load_saved_base_weights(model, base_weights, directory)
    model.set_trainable(name, trainable)


def _take_saved_base_weights(
    model: PeftModel, name: str, tensors: dict[str, torch.Tensor], directory: Path
) -> dict[str, torch.Tensor]:
    """Remove from ``tensors`` the full weights of targeted layers that Hugging Face PEFT adds
    (``<path>.base_layer.weight``; its ``save_embedding_layers="auto"`` does so whenever an
    embedding such as ``embed_tokens`` is a target, in case the vocabulary was resized).
    Returns layer path -> saved weight, shape-checked against the model."""
    taken: dict[str, torch.Tensor] = {}
    for path in model.target_paths[name]:
        key = file_key(path, "base_layer.weight", input_side=False)
        current = getattr(model.base_model.get_submodule(path).unwrap(), "weight", None)
        if key in tensors and current is not None:  # else left for the key check to report
            saved = tensors.pop(key)
            if tuple(saved.shape) != tuple(current.shape):
                raise AdapterFileError(
                    f"adapter {directory} does not fit this model (was it saved for another base "
                    f"model?): {key}: expected shape {tuple(current.shape)}, found {tuple(saved.shape)}"
                )
            taken[path] = saved
    return taken


def _load_saved_base_weights(model: PeftModel, weights: dict[str, torch.Tensor], directory: Path) -> None:
    """Use a saved layer weight as PEFT would; say so when it differs from the model's own."""
    for path, saved in weights.items():
        current = model.base_model.get_submodule(path).unwrap().weight
        saved = saved.to(device=current.device, dtype=current.dtype)
        if not torch.equal(saved, current):
            warnings.warn(
                f"adapter {directory} carries its own copy of the weight of {path!r}, which differs "
                "from this model's (a resized vocabulary?); it replaces the model's weight, as in "
                "Hugging Face PEFT.", UserWarning, stacklevel=4,
            )
            with torch.no_grad():
                current.copy_(saved)


def _warn_on_other_base(model: PeftModel, config: PeftConfig) -> None:
    saved = config.base_model_name_or_path
    current = _name_or_path(model.base_model)
    if saved and current and Path(saved).name != Path(current).name:
        warnings.warn(
            f"this adapter was trained on {saved!r} but the model is {current!r}; the shapes fit, "
            "but the outputs will only be right on the same base model.",
            UserWarning, stacklevel=3,
        )


