"""The one place that knows about Hugging Face transformers.

peftkit imports without transformers. Everything here looks transformers up lazily and
only when the user's model could have come from it: a GPT-2 ``Conv1D`` can only exist
if ``transformers.pytorch_utils`` has already been imported by whoever built the model.
"""

from __future__ import annotations

import sys

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
