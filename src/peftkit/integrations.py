"""The one place that knows about Hugging Face transformers.

peftkit imports without transformers. Everything here looks transformers up lazily and
only when the user's model could have come from it: a GPT-2 ``Conv1D`` can only exist
if ``transformers.pytorch_utils`` has already been imported by whoever built the model.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


def conv1d_type() -> type | None:
    """transformers' ``Conv1D`` class if transformers is loaded, else None."""
    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None)


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' GPT-2 style Conv1D (a linear layer with weight (in, out))."""
    conv1d = conv1d_type()
    return conv1d is not None and type(module) is conv1d


def model_type(model: nn.Module) -> str | None:
    """The architecture name a transformers model declares (``config.model_type``)."""
    return getattr(getattr(model, "config", None), "model_type", None)


def output_head(model: nn.Module) -> nn.Module | None:
    """The module that maps hidden states to the vocabulary, when the model says which."""
    getter = getattr(model, "get_output_embeddings", None)
    if getter is None:
        return None
    try:
        return getter()
    except (NotImplementedError, AttributeError):
        return None


# -- prompt and prefix tuning -----------------------------------------------------------
def accepts_argument(model: nn.Module, name: str) -> bool:
    """True when ``model.forward`` names the keyword ``name``."""
    return name in inspect.signature(model.forward).parameters


def is_transformers_model(model: nn.Module) -> bool:
    """True for a model class defined in transformers (it takes transformers' ``Cache``
    objects); any other model gets the plain tuple-of-layers cache."""
    return any(cls.__module__.startswith("transformers.") for cls in type(model).__mro__)


def cache_argument(model: nn.Module) -> str | None:
    """The keyword under which ``model`` takes a KV cache, or None if it takes none.

    transformers 5 renamed ``past_key_values`` to ``cache`` (the old name still works with a
    deprecation warning). Task heads such as ``BertForSequenceClassification`` take it through
    ``**kwargs`` and hand it to their inner model (``model.base_model``), so that is looked at
    too.
    """
    candidates = [model]
    parameters = inspect.signature(model.forward).parameters
    inner = getattr(model, "base_model", None)
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    if takes_kwargs and isinstance(inner, nn.Module) and inner is not model:
        candidates.append(inner)
    for candidate in candidates:
        names = inspect.signature(candidate.forward).parameters
        for name in ("cache", "past_key_values"):
            if name in names:
                return name
    return None


def prefix_cache(model: nn.Module, key_values: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> Any:
    """A new KV cache whose first N positions are the prefix: a transformers
    ``DynamicCache`` for a transformers model, else the tuple of per-layer (key, value)
    that other decoders (peftkit's reference one) take.

    A transformers cache grows in place as the model runs, so one made per call is the only
    safe kind: a cache kept and reused would hand each call the tokens of the one before.
    The prefix tensors themselves are not modified (the cache concatenates into new
    tensors), and gradients flow back to them.
    """
    if not is_transformers_model(model):
        return tuple(tuple(kv) for kv in key_values)
    from transformers import DynamicCache

    return DynamicCache(list(key_values))


def token_key_values(model: nn.Module, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The keys and values ``model`` computes for the token ids ``ids`` (1, N): one
    (key, value) per layer, each (1, num_kv_heads, N, head_dim), the cache the tokens leave.

    Runs in eval mode without gradients. A transformers model fills an empty cache handed
    to it (encoders such as BERT too, the way prefix tuning feeds them); any other model
    returns its cache.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if not is_transformers_model(model):
                return [tuple(kv) for kv in output_cache(model(input_ids=ids, use_cache=True))]
            from transformers import DynamicCache

            cache = DynamicCache()
            model(input_ids=ids, **{cache_argument(model): cache})
            if hasattr(cache, "layers"):  # transformers >= 4.56
                return [(layer.keys, layer.values) for layer in cache.layers]
            return list(zip(cache.key_cache, cache.value_cache))
    finally:
        model.train(was_training)


def cache_length(cache: Any) -> int:
    """Tokens held by a transformers ``Cache`` or a tuple-of-layers cache."""
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    return int(cache[0][0].shape[-2])


def output_cache(output: Any) -> Any:
    """The KV cache a forward returned (``cache`` in transformers 5, else ``past_key_values``)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def is_encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def attention_geometry(model: nn.Module) -> tuple[int, int, int]:
    """(num_layers, num_kv_heads, head_dim) from the model's config, read as Hugging Face
    PEFT reads it (GPT-2's ``n_layer``/``n_head``, GQA's ``num_key_value_heads``, an explicit
    ``head_dim`` where the config has one)."""
    layers, heads = num_layers(model), num_attention_heads(model)
    hidden = config_value(model, "hidden_size", "n_embd", "d_model")
    head_dim = config_value(model, "head_dim")
    if layers is None or heads is None or (hidden is None and head_dim is None):
        raise ValueError(
            "prefix tuning needs the model's number of layers and attention heads, read from "
            f"model.config; {type(model).__name__} has no config that says them."
        )
    kv_heads = config_value(model, "num_key_value_heads") or heads
    return int(layers), int(kv_heads), int(head_dim or hidden // heads)


def config_value(model: nn.Module, *names: str) -> Any:
    """The first of ``names`` that ``model.config`` sets (not None), else None."""
    config = getattr(model, "config", None)
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


def max_positions(model: nn.Module) -> int | None:
    """How many positions the model reads at most (prompt, virtual tokens and new tokens
    together), where its config says it (the reference decoder's ``max_positions`` too)."""
    return config_value(model, "max_position_embeddings", "n_positions", "max_positions")


def num_layers(model: nn.Module) -> int | None:
    return config_value(model, "num_hidden_layers", "n_layer", "num_layers")


def num_attention_heads(model: nn.Module) -> int | None:
    """Query heads per layer."""
    return config_value(model, "num_attention_heads", "n_head", "num_heads")


def is_sequence_classifier(model: nn.Module) -> bool:
    """A transformers ``...ForSequenceClassification`` model (its head maps to labels)."""
    return type(model).__name__.endswith("ForSequenceClassification")


def task_type(model: nn.Module) -> str:
    """The Hugging Face PEFT ``task_type`` to record for a prompt or prefix on ``model``.

    PEFT picks its wrapper class from it, and its base class (task_type None) silently
    skips the prompt. ``SEQ_CLS`` for a sequence classifier (PEFT's wrapper then loads the
    trained head from the file), ``CAUSAL_LM`` for a model that can ``generate``; otherwise
    ``FEATURE_EXTRACTION``, which prepends the prompt and passes everything else through.
    """
    if is_sequence_classifier(model):
        return "SEQ_CLS"
    return "CAUSAL_LM" if callable(getattr(model, "generate", None)) else "FEATURE_EXTRACTION"
