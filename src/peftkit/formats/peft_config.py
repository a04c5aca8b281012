"""``adapter_config.json``: what Hugging Face PEFT's config files share, for every method.

Each method's own fields are written and read by its declaration in ``specs/`` (a
``to_file`` and a ``from_file`` per ``peft_type``, named by its registry record):

    LORA                 PEFT's LoraConfig fields (r, lora_alpha, target_modules, fan_in_fan_out ...)
    PROMPT_TUNING        PEFT's PromptTuningConfig (token_dim, num_attention_heads, num_layers ...)
    PREFIX_TUNING        PEFT's PrefixTuningConfig, the folded prefix (prefix_projection: false)
    BOTTLENECK_ADAPTER   peftkit's own (PEFT lacks it)

This module holds what they share: ``ModelFacts`` (plain values about the model the adapter
was saved from, so that writers never see a model), the fields every file records, the
fields every prompt-learning method records, and ``parse``, which reports a value a config
class refuses as an AdapterFileError on the file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import MethodConfig
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


# -- what every writer and reader shares ----------------------------------------------------
def common_fields(config: MethodConfig, facts: ModelFacts) -> dict[str, Any]:
    """Fields every writer records. ``modules_to_save`` is the paths actually trained in full
    (the config may say None, "the head if there is one"), or None when there are none, as
    PEFT writes it."""
    return {"base_model_name_or_path": config.base_model_name_or_path or facts.base_model_name_or_path,
            "modules_to_save": list(facts.modules_to_save) or None}


def read_modules_to_save(value: Any) -> list[str]:
    """A file's ``modules_to_save``: absent or null means no module was saved in full (not
    peftkit's "pick the head" default, which would expect tensors the file lacks)."""
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(n, str) and n for n in value):
        raise ValueError(f"modules_to_save must be null or a list of module names, got {value!r}.")
    return value


# -- prompt-learning methods (prompt and prefix tuning) ---------------------------------------
def prompt_learning_fields(config: MethodConfig, facts: ModelFacts) -> dict[str, Any]:
    """Fields PEFT writes for every prompt-learning method. task_type is always set: PEFT
    picks its wrapper class from it, and its base class (task_type None) skips the prompt."""
    return {
        **common_fields(config, facts), "num_virtual_tokens": config.num_virtual_tokens,
        "num_transformer_submodules": 1, "num_layers": facts.num_layers,
        "task_type": config.task_type or facts.task_type,
        "inference_mode": True, "revision": None, "auto_mapping": None,
    }


# Fields of a PEFT prompt-learning config that describe the model or the initialisation:
# the saved tensor carries the adapter, and its shape is checked against the model.
PROMPT_LEARNING_INFORMATIONAL = frozenset({
    "peft_type", "auto_mapping", "peft_version", "revision", "inference_mode",
    "token_dim", "num_layers", "num_attention_heads",
})


def prompt_learning_kwargs(data: dict[str, Any], path: Path, informational: set[str] | frozenset[str]) -> dict[str, Any]:
    """The peftkit config fields of a PEFT prompt/prefix config; a field outside
    ``informational`` that peftkit does not know, or a PEFT feature it lacks, is an error."""
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
            kwargs[key] = read_modules_to_save(value)
        elif key not in informational:
            raise AdapterFileError(f"{path}: unknown config field {key!r} for peft_type {data['peft_type']}.")
    if "num_virtual_tokens" not in data:
        raise AdapterFileError(f"{path}: a {data['peft_type']} config needs 'num_virtual_tokens'.")
    kwargs.setdefault("modules_to_save", [])
    return kwargs


def parse(reader: Callable[[dict[str, Any], Path], MethodConfig], data: dict[str, Any], path: Path) -> MethodConfig:
    """``reader(data, path)`` (the method's ``from_file``, as its record names it), with a
    value its config class refuses reported as an AdapterFileError on ``path``."""
    try:
        return reader(data, path)
    except AdapterFileError:
        raise
    except (TypeError, ValueError) as e:
        raise AdapterFileError(f"{path}: {e}") from e
