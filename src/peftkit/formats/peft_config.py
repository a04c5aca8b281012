"""``adapter_config.json``: Hugging Face PEFT's config fields <-> peftkit's configs.

One writer and one reader per ``peft_type``:

    LORA                 PEFT's LoraConfig fields (r, lora_alpha, target_modules, fan_in_fan_out ...)
    PROMPT_TUNING        PEFT's PromptTuningConfig (token_dim, num_attention_heads, num_layers ...)
    PREFIX_TUNING        PEFT's PrefixTuningConfig, the folded prefix (prefix_projection: false)
    BOTTLENECK_ADAPTER   peftkit's own (PEFT lacks it): ``AdapterConfig.to_dict()``, from which
                         loading finds the same sites in the same architecture

Writers take the config and ``ModelFacts``, plain values about the model the adapter was
saved from; readers refuse unknown fields and PEFT features peftkit lacks (AdapterFileError).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import AdapterConfig, LoraConfig, PeftConfig, PrefixConfig, PromptConfig
from .adapter_folder import AdapterFileError


@dataclass(frozen=True)
class ModelFacts:
    """What an adapter file records about the model it was saved from.

    Attributes:
        base_model_name_or_path: the model's ``name_or_path``, recorded when the config names
            no base model (as PEFT does).
        task_type: PEFT's task type for the model (``CAUSAL_LM``, ``SEQ_CLS`` ...).
        modules_to_save: the module paths trained in full.
        target_names: LoRA: module names that select exactly the adapted layers.
        fan_in_fan_out: LoRA: the adapted layers are GPT-2 Conv1D (weight stored (in, out)).
        num_layers, num_attention_heads: from the model's config (None where it says nothing).
        num_kv_heads, head_dim: the attention's key/value heads and head size (prefix tuning).
        token_dim: the width of the input embeddings (prompt tuning).
    """

    base_model_name_or_path: str | None
    task_type: str
    modules_to_save: list[str]
    target_names: list[str]
    fan_in_fan_out: bool
    num_layers: int | None
    num_attention_heads: int | None
    num_kv_heads: int | None
    head_dim: int | None
    token_dim: int | None


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
# PEFT's names for the prompt initialisations.
_PROMPT_INITS = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT"}


# -- writing --------------------------------------------------------------------------
def _common(config: PeftConfig, facts: ModelFacts) -> dict[str, Any]:
    """Fields every writer records. ``modules_to_save`` is the paths actually trained in full
    (the config may say None, "the head if there is one"), or None when there are none, as
    PEFT writes it."""
    return {"base_model_name_or_path": config.base_model_name_or_path or facts.base_model_name_or_path,
            "modules_to_save": list(facts.modules_to_save) or None}


def lora_to_peft(config: LoraConfig, facts: ModelFacts) -> dict[str, Any]:
    return {
        **{peft: getattr(config, ours) for ours, peft in _LORA_FIELDS.items()}, **_common(config, facts),
        "peft_type": "LORA", "target_modules": list(facts.target_names),
        "fan_in_fan_out": facts.fan_in_fan_out, "inference_mode": True, "init_lora_weights": True,
    }


def bottleneck_to_peft(config: AdapterConfig, facts: ModelFacts) -> dict[str, Any]:
    return {**config.to_dict(), **_common(config, facts)}


def _prompt_learning_fields(config: PromptConfig | PrefixConfig, facts: ModelFacts) -> dict[str, Any]:
    """Fields PEFT writes for every prompt-learning method. task_type is always set: PEFT
    picks its wrapper class from it, and its base class (task_type None) skips the prompt."""
    return {
        **_common(config, facts), "num_virtual_tokens": config.num_virtual_tokens,
        "num_transformer_submodules": 1, "num_layers": facts.num_layers,
        "task_type": config.task_type or facts.task_type,
        "inference_mode": True, "revision": None, "auto_mapping": None,
    }


def prompt_to_peft(config: PromptConfig, facts: ModelFacts) -> dict[str, Any]:
    """The init is only a record (the saved prompt replaces it). PEFT refuses a ``TEXT``
    init without a tokenizer it can load, so ``TEXT`` is written only when the tokenizer
    has a ``name_or_path``, and ``RANDOM`` otherwise."""
    tokenizer_name = getattr(config.tokenizer, "name_or_path", None) or None
    init = _PROMPT_INITS[config.init] if config.init != "text" or tokenizer_name else "RANDOM"
    return {
        **_prompt_learning_fields(config, facts), "peft_type": "PROMPT_TUNING",
        "token_dim": facts.token_dim, "num_attention_heads": facts.num_attention_heads,
        "prompt_tuning_init": init,
        "prompt_tuning_init_text": config.init_text if init == "TEXT" else None,
        "tokenizer_name_or_path": tokenizer_name if init == "TEXT" else None,
        "tokenizer_kwargs": None,
    }


def prefix_to_peft(config: PrefixConfig, facts: ModelFacts) -> dict[str, Any]:
    """As PEFT does for grouped-query attention, ``token_dim`` is num_kv_heads * head_dim and
    ``num_attention_heads`` the key/value heads. The file holds the folded prefix, so it is
    described as unprojected (``prefix_projection: false``) whatever peftkit trained with."""
    kv_dim = facts.num_kv_heads * facts.head_dim
    return {
        **_prompt_learning_fields(config, facts), "peft_type": "PREFIX_TUNING",
        "token_dim": kv_dim, "num_attention_heads": facts.num_kv_heads, "encoder_hidden_size": kv_dim,
        "prefix_projection": False, "init_weights": None,
    }


# -- reading --------------------------------------------------------------------------
def _read_modules_to_save(value: Any) -> list[str]:
    """A file's ``modules_to_save``: absent or null means no module was saved in full (not
    peftkit's "pick the head" default, which would expect tensors the file lacks)."""
    return list(value) if value else []


def lora_from_peft(data: dict[str, Any], path: Path) -> LoraConfig:
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
    return LoraConfig(**kwargs)


def bottleneck_from_peft(data: dict[str, Any], path: Path) -> AdapterConfig:
    return AdapterConfig.from_dict({**data, "modules_to_save": _read_modules_to_save(data.get("modules_to_save"))})


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


def prompt_from_peft(data: dict[str, Any], path: Path) -> PromptConfig:
    # The init is a record only: the saved prompt replaces whatever it would give.
    return PromptConfig(**_prompt_learning_kwargs(data, path, _PROMPT_INFORMATIONAL))


def prefix_from_peft(data: dict[str, Any], path: Path) -> PrefixConfig:
    # The saved prefix replaces any init, so none is computed (a "vocab" init runs the model).
    return PrefixConfig(**_prompt_learning_kwargs(data, path, _PREFIX_INFORMATIONAL), init="random")


def parse(reader: Callable[[dict[str, Any], Path], PeftConfig], data: dict[str, Any], path: Path) -> PeftConfig:
    """``reader(data, path)`` (one of the ``*_from_peft`` above, as the method's record names
    it), with a value its config class refuses reported as an AdapterFileError on ``path``."""
    try:
        return reader(data, path)
    except AdapterFileError:
        raise
    except (TypeError, ValueError) as e:
        raise AdapterFileError(f"{path}: {e}") from e
