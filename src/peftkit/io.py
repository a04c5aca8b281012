"""Adapter files (M10): ``adapter_config.json`` + ``adapter_model.safetensors``.

The layout, key names and config fields are Hugging Face PEFT's, so an adapter moves
between the two libraries both ways:

    base_model.model.<module path>.lora_A.weight        (r, in)
    base_model.model.<module path>.lora_B.weight        (out, r)
    base_model.model.<module path>.lora_embedding_A     (r, num_embeddings)
    base_model.model.<module path>.lora_embedding_B     (dim, r)

Prompt and prefix tuning (``PROMPT_TUNING``, ``PREFIX_TUNING``) are one tensor each,
as in PEFT:

    prompt_embeddings    prompt: (num_virtual_tokens, token_dim)
                         prefix: (num_virtual_tokens, num_layers * 2 * num_kv_heads * head_dim)

Bottleneck adapters, which PEFT lacks, use the same layout under ``peft_type``
``"BOTTLENECK_ADAPTER"``: the config holds ``AdapterConfig.to_dict()``, from which
loading finds the same sites in the same architecture (the keys must then match them
exactly), and the weights are, per site,

    base_model.model.<site path>.adapter_down.weight    (bottleneck, hidden)
    base_model.model.<site path>.adapter_down.bias      (bottleneck,)
    base_model.model.<site path>.adapter_up.weight      (hidden, bottleneck)
    base_model.model.<site path>.adapter_up.bias        (hidden,)

Only adapter weights are written. Files are written atomically (temporary file, fsync,
rename), so a crash leaves either the old adapter or the new one, never half of one.
Nothing is unpickled: safetensors, or a legacy ``.bin`` through ``weights_only=True``.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import nn

from . import integrations
from .config import AdapterConfig, LoraConfig, PeftConfig, PrefixConfig, PromptConfig
from .model import PeftModel

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"


class AdapterFileError(ValueError):
    """An adapter folder that cannot be used: missing, corrupt or made for another model."""


# peftkit field <-> Hugging Face PEFT field.
_LORA_FIELDS = {
    "r": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "target_modules": "target_modules",
    "use_rslora": "use_rslora", "bias": "bias",
    "base_model_name_or_path": "base_model_name_or_path", "task_type": "task_type",
    "modules_to_save": "modules_to_save",
}
# PEFT fields that only describe the file or the initialisation (loaded weights replace it).
_PEFT_INFORMATIONAL = {
    "peft_type", "auto_mapping", "peft_version", "revision", "inference_mode", "fan_in_fan_out",
    "init_lora_weights", "megatron_core", "runtime_config", "qalora_group_size",
    "ensure_weight_tying",
}
# PEFT features peftkit does not implement: accepted only when switched off.
_PEFT_UNSUPPORTED = {
    "exclude_modules", "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern",
    "megatron_config", "trainable_token_indices", "loftq_config", "eva_config", "corda_config",
    "lora_ga_config", "use_dora", "velora_config", "alora_invocation_tokens", "use_qalora",
    "monteclora_config", "layer_replication", "lora_bias", "target_parameters", "use_bdlora",
    "arrow_config", "kasa_config",
}


# -- writing --------------------------------------------------------------------------
def _write_temporary(path: Path, data: bytes) -> Path:
    """Write ``data`` to a synced temporary file beside ``path``; the caller renames it."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = _write_temporary(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _replace_pair(directory: Path, payload: bytes, config_bytes: bytes) -> None:
    """Replace weights and config in an existing folder so that a failure at any point
    leaves the previous pair: both new files are written and synced before either is
    renamed, and if the config cannot be renamed the previous weights are put back."""
    weights, config = directory / WEIGHTS_NAME, directory / CONFIG_NAME
    previous = weights.read_bytes() if weights.is_file() else None
    temporaries: list[Path] = []
    try:
        temporaries.append(_write_temporary(weights, payload))
        temporaries.append(_write_temporary(config, config_bytes))
        os.replace(temporaries[0], weights)
        try:
            os.replace(temporaries[1], config)
        except BaseException:
            if previous is None:
                weights.unlink(missing_ok=True)
            else:
                _atomic_write_bytes(weights, previous)
            raise
    finally:
        for tmp in temporaries:
            tmp.unlink(missing_ok=True)


def write_adapter_folder(directory: str | Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    """Write the two adapter files. A new folder appears whole (built aside, then renamed);
    in an existing folder both files are replaced (see ``_replace_pair``) and nothing else
    in the folder is touched."""
    directory = Path(directory)
    payload = save_safetensors_bytes(
        {k: t.detach().to("cpu").contiguous() for k, t in tensors.items()}, metadata={"format": "pt"}
    )
    config_bytes = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
    if directory.exists():
        if not directory.is_dir():
            raise AdapterFileError(f"{directory} exists and is not a folder.")
        _replace_pair(directory, payload, config_bytes)
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        _atomic_write_bytes(staging / WEIGHTS_NAME, payload)
        _atomic_write_bytes(staging / CONFIG_NAME, config_bytes)
        os.replace(staging, directory)
    except BaseException:
        for f in staging.glob("*"):
            f.unlink()
        staging.rmdir()
        raise
    return directory


def lora_config_to_peft(config: LoraConfig, model: PeftModel, name: str) -> dict[str, Any]:
    """The adapter_config.json that Hugging Face PEFT writes for the same LoRA."""
    data = {peft: getattr(config, ours) for ours, peft in _LORA_FIELDS.items()}
    data.update(
        peft_type="LORA", target_modules=model.saved_target_names(name),
        fan_in_fan_out=model.uses_conv1d(name), inference_mode=True, init_lora_weights=True,
        modules_to_save=_saved_modules(model, name),
    )
    return data


def _saved_modules(model: PeftModel, name: str) -> list[str] | None:
    """``modules_to_save`` as written: the paths actually trained in full (the config may say
    None, "the head if there is one"), None when there are none, as PEFT writes it."""
    return list(model.trained_copy_paths[name]) or None


def _read_modules_to_save(value: Any) -> list[str]:
    """A file's ``modules_to_save``: absent or null means no module was saved in full (not
    peftkit's "pick the head" default, which would expect tensors the file lacks)."""
    return list(value) if value else []


# PEFT's names for the prompt initialisations.
_PROMPT_INITS = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT"}


def _prompt_learning_fields(config: PromptConfig | PrefixConfig, model: PeftModel, name: str) -> dict[str, Any]:
    """Fields PEFT writes for every prompt-learning method. task_type is always set: PEFT
    picks its wrapper class from it, and its base class (task_type None) skips the prompt."""
    return {
        "num_virtual_tokens": config.num_virtual_tokens, "num_transformer_submodules": 1,
        "num_layers": integrations.num_layers(model.base_model),
        "task_type": config.task_type or integrations.task_type(model.base_model),
        "base_model_name_or_path": config.base_model_name_or_path,
        "inference_mode": True, "modules_to_save": _saved_modules(model, name), "revision": None,
        "auto_mapping": None,
    }


def prompt_config_to_peft(config: PromptConfig, model: PeftModel, name: str) -> dict[str, Any]:
    """The adapter_config.json that Hugging Face PEFT writes for the same prompt tuning.

    The init is only a record (the saved prompt replaces it). PEFT refuses a ``TEXT`` init
    without a tokenizer it can load, so ``TEXT`` is written only when the tokenizer has a
    ``name_or_path``, and ``RANDOM`` otherwise.
    """
    tokenizer_name = getattr(config.tokenizer, "name_or_path", None) or None
    init = _PROMPT_INITS[config.init] if config.init != "text" or tokenizer_name else "RANDOM"
    return {
        **_prompt_learning_fields(config, model, name), "peft_type": "PROMPT_TUNING",
        "token_dim": model.input_adapters["prompt"].token_dim,
        "num_attention_heads": integrations.num_attention_heads(model.base_model),
        "prompt_tuning_init": init,
        "prompt_tuning_init_text": config.init_text if init == "TEXT" else None,
        "tokenizer_name_or_path": tokenizer_name if init == "TEXT" else None,
        "tokenizer_kwargs": None,
    }


def prefix_config_to_peft(config: PrefixConfig, model: PeftModel, name: str) -> dict[str, Any]:
    """The adapter_config.json that Hugging Face PEFT writes for the same prefix tuning.

    As PEFT does for grouped-query attention, ``token_dim`` is num_kv_heads * head_dim and
    ``num_attention_heads`` the key/value heads. The file holds the folded prefix, so it is
    described as unprojected (``prefix_projection: false``) whatever peftkit trained with.
    """
    encoder = model.input_adapters["prefix"]
    return {
        **_prompt_learning_fields(config, model, name), "peft_type": "PREFIX_TUNING",
        "token_dim": encoder.kv_dim, "num_attention_heads": encoder.num_kv_heads,
        "num_layers": encoder.num_layers, "encoder_hidden_size": encoder.kv_dim,
        "prefix_projection": False, "init_weights": None,
    }


def save_adapter(model: PeftModel, directory: str | Path, name: str) -> Path:
    """Write adapter ``name`` of ``model`` to ``directory`` (adapter weights only)."""
    if name not in model.configs:
        raise ValueError(f"no adapter named {name!r}; this model has {sorted(model.configs)}.")
    config = model.configs[name]
    if isinstance(config, LoraConfig):
        data = lora_config_to_peft(config, model, name)
    elif isinstance(config, AdapterConfig):
        data = {**config.to_dict(), "modules_to_save": _saved_modules(model, name)}
    elif isinstance(config, PromptConfig):
        data = prompt_config_to_peft(config, model, name)
    elif isinstance(config, PrefixConfig):
        data = prefix_config_to_peft(config, model, name)
    else:
        raise TypeError(f"peftkit cannot save a {type(config).__name__} adapter yet.")
    return write_adapter_folder(directory, data, model.adapter_tensors(name))


# -- reading --------------------------------------------------------------------------
def read_config(directory: str | Path) -> PeftConfig:
    """Parse and validate ``adapter_config.json`` (peftkit's or Hugging Face PEFT's)."""
    directory = Path(directory)
    path = directory / CONFIG_NAME
    if not directory.is_dir():
        raise AdapterFileError(f"adapter folder {directory} does not exist.")
    if not path.is_file():
        raise AdapterFileError(f"{directory} has no {CONFIG_NAME}; is it an adapter folder?")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterFileError(f"{path} is not valid JSON ({e}); the file is corrupt or truncated.") from e
    if not isinstance(data, dict):
        raise AdapterFileError(f"{path} must hold a JSON object.")
    readers = {"LORA": _lora_config_from_peft, "BOTTLENECK_ADAPTER": _bottleneck_config,
               "PROMPT_TUNING": _prompt_config_from_peft, "PREFIX_TUNING": _prefix_config_from_peft}
    peft_type = data.get("peft_type")
    if peft_type not in readers:
        raise AdapterFileError(
            f"{path}: unknown or unsupported peft_type {peft_type!r}; peftkit reads {sorted(readers)}.")
    return readers[peft_type](data, path)


def _lora_config_from_peft(data: dict[str, Any], path: Path) -> LoraConfig:
    ours = {v: k for k, v in _LORA_FIELDS.items()}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key == "modules_to_save":
            kwargs[key] = _read_modules_to_save(value)
        elif key in ours:
            kwargs[ours[key]] = value
        elif key in _PEFT_UNSUPPORTED:
            if value not in (None, False, {}, []):
                raise AdapterFileError(
                    f"{path}: field {key}={value!r} asks for a Hugging Face PEFT feature that "
                    "peftkit does not implement; load this adapter with PEFT instead."
                )
        elif key not in _PEFT_INFORMATIONAL:
            raise AdapterFileError(f"{path}: unknown config field {key!r}; the file is not a LoRA adapter config peftkit knows.")
    if "lora_alpha" not in data or "r" not in data:
        raise AdapterFileError(f"{path}: a LoRA config needs 'r' and 'lora_alpha'.")
    kwargs.setdefault("modules_to_save", [])
    try:
        return LoraConfig(**kwargs)
    except ValueError as e:
        raise AdapterFileError(f"{path}: {e}") from e


def _bottleneck_config(data: dict[str, Any], path: Path) -> AdapterConfig:
    try:
        return AdapterConfig.from_dict({**data, "modules_to_save": _read_modules_to_save(data.get("modules_to_save"))})
    except (TypeError, ValueError) as e:
        raise AdapterFileError(f"{path}: {e}") from e


# Fields of a PEFT prompt-learning config that describe the model or the initialisation:
# the saved tensor carries the adapter, and its shape is checked against the model.
_PROMPT_LEARNING_INFORMATIONAL = {
    "peft_type", "auto_mapping", "peft_version", "revision", "inference_mode",
    "token_dim", "num_layers", "num_attention_heads",
}
_PROMPT_INFORMATIONAL = _PROMPT_LEARNING_INFORMATIONAL | {
    "prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path", "tokenizer_kwargs",
}
# A saved prefix is always the folded tensor, whether PEFT trained it through an MLP or not.
_PREFIX_INFORMATIONAL = _PROMPT_LEARNING_INFORMATIONAL | {
    "encoder_hidden_size", "prefix_projection", "init_weights",
}


def _prompt_learning_kwargs(data: dict[str, Any], path: Path, informational: set[str]) -> dict[str, Any]:
    """The peftkit config fields of a PEFT prompt/prefix config; anything unknown, or a PEFT
    feature peftkit lacks, is an error."""
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key in ("num_virtual_tokens", "base_model_name_or_path", "task_type"):
            kwargs[key] = value
        elif key == "num_transformer_submodules":
            if value not in (None, 1):
                raise AdapterFileError(
                    f"{path}: num_transformer_submodules={value!r} is an encoder-decoder prompt, which "
                    "peftkit does not implement; load this adapter with PEFT instead.")
        elif key == "modules_to_save":
            kwargs[key] = _read_modules_to_save(value)
        elif key not in informational:
            raise AdapterFileError(f"{path}: unknown config field {key!r} for peft_type {data['peft_type']}.")
    if "num_virtual_tokens" not in data:
        raise AdapterFileError(f"{path}: a {data['peft_type']} config needs 'num_virtual_tokens'.")
    kwargs.setdefault("modules_to_save", [])
    return kwargs


def _prompt_config_from_peft(data: dict[str, Any], path: Path) -> PromptConfig:
    # The init is a record only: the saved prompt replaces whatever it would give.
    try:
        return PromptConfig(**_prompt_learning_kwargs(data, path, _PROMPT_INFORMATIONAL))
    except (TypeError, ValueError) as e:
        raise AdapterFileError(f"{path}: {e}") from e


def _prefix_config_from_peft(data: dict[str, Any], path: Path) -> PrefixConfig:
    # The saved prefix replaces any init, so none is computed (a "vocab" init runs the model).
    try:
        return PrefixConfig(**_prompt_learning_kwargs(data, path, _PREFIX_INFORMATIONAL), init="random")
    except (TypeError, ValueError) as e:
        raise AdapterFileError(f"{path}: {e}") from e


def read_tensors(directory: str | Path) -> dict[str, torch.Tensor]:
    """Load the adapter weights without unpickling anything."""
    directory = Path(directory)
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
        except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
            raise AdapterFileError(
                f"{legacy} was refused: it is corrupt or holds objects other than tensors, and "
                f"peftkit never unpickles arbitrary objects ({e}). Convert it to safetensors."
            ) from e
        if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
            raise AdapterFileError(f"{legacy} does not hold a flat name -> tensor mapping.")
        return tensors
    raise AdapterFileError(f"{directory} has no {WEIGHTS_NAME} (nor a legacy {LEGACY_WEIGHTS_NAME}).")


def _check_tensors(model: PeftModel, name: str, found: dict[str, torch.Tensor], directory: Path) -> None:
    expected = model.adapter_tensors(name)
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
    model.load_adapter_tensors(name, tensors)
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
        key = f"base_model.model.{path}.base_layer.weight"
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
    current = getattr(getattr(model.base_model, "config", None), "name_or_path", None)
    if saved and current and Path(saved).name != Path(current).name:
        warnings.warn(
            f"this adapter was trained on {saved!r} but the model is {current!r}; the shapes fit, "
            "but the outputs will only be right on the same base model.",
            UserWarning, stacklevel=3,
        )


def load(model: nn.Module, directory: str | Path, name: str = "default", trainable: bool = False) -> PeftModel:
    """Load a saved adapter (peftkit's or Hugging Face PEFT's) onto ``model``.

    ``trainable=False`` (the default, as in PEFT) loads it frozen for inference; pass True to
    continue training it.
    """
    peft_model = model if isinstance(model, PeftModel) else PeftModel(model)
    load_adapter_into(peft_model, directory, name, trainable=trainable)
    return peft_model
