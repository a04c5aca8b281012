"""Gradient (activation) checkpointing for the models peftkit trains.

The trade: in a training forward each decoder block keeps only its inputs, and backward
runs the block's forward again to rebuild the activations it needs. Activation memory
falls from every block's activations to one block's plus each block's input, (B, T, C)
per layer, for roughly one extra forward of compute per step.

Always non-reentrant (``use_reentrant=False``). Reentrant checkpointing runs the block
under ``no_grad`` and re-enters autograd through a Function whose inputs are the block's
positional tensor arguments; when none of them needs grad, as with frozen embeddings
feeding block 0, the block's output needs none either and backward never enters it, so
the LoRA and adapter weights inside get no gradient at all (mistake M12; the doctor
names this case). Non-reentrant checkpointing records the graph through saved-tensor
hooks instead, so gradients reach every parameter used inside the block, and tensors
that enter by keyword or closure (a prefix handed in as the cache) as well.

Prefix tuning hands its prefix to a transformers model as the KV cache, and transformers
withholds the cache from a checkpointed layer (``GradientCheckpointingLayer`` sets
``cache=None``; GPT-2's model passes the layers None already), because the recompute in
backward would append the new keys to it a second time. ``prefix_cache`` and
``keeping_prefix`` let such a call keep its prefix: the cache only reads (each
``update`` returns the prefix followed by the new keys and stores nothing), so the
recompute sees exactly what the forward saw, which is the condition under which
transformers lets a layer keep its cache under checkpointing. The reference decoder
takes the prefix as plain tensors and needs none of this.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .models.reference import ReferenceDecoder

_NON_REENTRANT = {"use_reentrant": False}


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Turn on non-reentrant gradient checkpointing of every decoder block of ``model``.

    Args:
        model: a peftkit ``PeftModel`` (its ``base_model`` is changed), a transformers
            ``PreTrainedModel`` or peftkit's ``ReferenceDecoder``; adapters may be attached
            before or after.

    A transformers model gets its own switch with ``use_reentrant=False``,
    ``config.use_cache = False`` (a training forward has no use for the cache;
    ``generate`` reads ``generation_config`` and still caches) and
    ``enable_input_require_grads()``, which transformers documents for training adapters
    on frozen embeddings: needed only by reentrant checkpointing, harmless here, and it
    keeps gradients flowing if someone switches the mode back. The reference decoder
    gets ``gradient_checkpointing = True``.

    Checkpointing acts only in a training forward with grad enabled; eval, ``no_grad``
    and generation run as before.

    Raises:
        TypeError: ``model`` is none of the supported kinds.
        ValueError: a transformers model whose class does not support checkpointing.
    """
    base = _checkpointable(model)
    if isinstance(base, ReferenceDecoder):
        base.gradient_checkpointing = True
        return
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise ValueError(
            f"{type(base).__name__} does not support gradient checkpointing in transformers "
            "(supports_gradient_checkpointing is False); train it without checkpointing.")
    # transformers 5 renamed the switch; the old name still works with a FutureWarning.
    if hasattr(base, "activation_checkpointing_enable"):
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=dict(_NON_REENTRANT))
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=dict(_NON_REENTRANT))
    if getattr(base, "config", None) is not None:
        base.config.use_cache = False
    # Recent transformers already hook the embeddings inside the switch; a second call
    # would register the hook twice and forget the first handle, so look before calling.
    if not (getattr(base, "_require_grads_hooks", None) or getattr(base, "_require_grads_hook", None)):
        base.enable_input_require_grads()


def disable_gradient_checkpointing(model: nn.Module) -> None:
    """Undo ``enable_gradient_checkpointing`` (``config.use_cache`` is left as it is)."""
    base = _checkpointable(model)
    if isinstance(base, ReferenceDecoder):
        base.gradient_checkpointing = False
        return
    if hasattr(base, "activation_checkpointing_disable"):
        base.activation_checkpointing_disable()
    else:
        base.gradient_checkpointing_disable()


def _checkpointable(model: nn.Module) -> nn.Module:
    """The model whose blocks get checkpointed (a PeftModel's base), or TypeError."""
    base = _base_model(model)
    if not isinstance(base, ReferenceDecoder) and not _is_pretrained_model(base):
        raise TypeError(_unsupported(base))
    return base


def gradient_checkpointing_enabled(model: nn.Module) -> bool:
    """True when the blocks of ``model`` (or of a PeftModel's ``base_model``) are
    checkpointed in training; False for a model peftkit does not know how to checkpoint."""
    base = _base_model(model)
    if isinstance(base, ReferenceDecoder):
        return bool(base.gradient_checkpointing)
    if not _is_pretrained_model(base):
        return False
    # Read the flags directly: ``is_gradient_checkpointing`` warns in transformers 5.
    return any(getattr(m, "gradient_checkpointing", False) is True for m in base.modules())


# -- a prefix under checkpointing (transformers models) -----------------------------------
def prefix_cache(model: nn.Module, key_values: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> Any:
    """A read-only cache holding the prefix, for a call of transformers ``model`` that
    will run its layers checkpointed (training, grad enabled, checkpointing on); None for
    any other call, which takes the usual growing cache.

    ``key_values``: one (key, value) per layer, each (B, num_kv_heads, N, head_dim).
    The cache's length is N, and ``update(k, v)`` returns (cat(prefix, k), cat(prefix, v))
    without storing k or v: the cache is the same before the forward and the recompute.
    """
    if not (_is_pretrained_model(model) and model.training and torch.is_grad_enabled()
            and _checkpointed_layers(model)):
        return None
    layer_class = _read_only_layer_class()
    if layer_class is None:  # a transformers without cache layers (< 4.56)
        return None
    from transformers.cache_utils import Cache

    return Cache(layers=[layer_class(key, value) for key, value in key_values])


@contextlib.contextmanager
def keeping_prefix(model: nn.Module, cache: Any) -> Iterator[None]:
    """Around the forward of ``model`` that reads ``cache``: when it is a read-only prefix
    cache, the model hands it to its checkpointed layers for this call, and an error says
    so if it still does not. Any other cache passes through untouched.

    Two switches, both put back on exit. Each checkpointed layer is told it may keep
    its cache (``_can_checkpoint_with_cache``, which transformers provides for layers that
    only read one; with this cache they do). The modules above the layers that carry a
    ``gradient_checkpointing`` flag have it off for the call: in transformers 5 only the
    layers checkpoint, and those flags only make the model withhold the cache from them
    (GPT-2: ``cache if not (self.gradient_checkpointing and self.training) else None``).
    The layers still recompute in backward.
    """
    layer_class = _read_only_layer_class()
    layers = getattr(cache, "layers", None)
    if layer_class is None or not layers or not all(isinstance(layer, layer_class) for layer in layers):
        yield
        return
    checkpointed = _checkpointed_layers(model)
    ids = {id(m) for m in checkpointed}
    above = [m for m in model.modules() if id(m) not in ids and getattr(m, "gradient_checkpointing", False) is True]
    saved = [(m, m.__dict__.get("_can_checkpoint_with_cache")) for m in checkpointed]
    for module in checkpointed:
        module._can_checkpoint_with_cache = True  # an instance attribute for this call only
    for module in above:
        module.gradient_checkpointing = False
    try:
        yield
    except RuntimeError as error:
        if any(layer.reads for layer in layers):
            raise
        raise ValueError(_dropped_prefix(model)) from error
    finally:
        for module, value in saved:
            if value is None:
                del module._can_checkpoint_with_cache
            else:
                module._can_checkpoint_with_cache = value
        for module in above:
            module.gradient_checkpointing = True
    # Not "every layer": a layer that shares another's keys and values reads no cache.
    if not any(layer.reads for layer in layers):
        raise ValueError(_dropped_prefix(model))


def _dropped_prefix(model: nn.Module) -> str:
    return (f"{type(model).__name__} did not pass the prefix (handed in as its cache) to its attention "
            "layers while gradient checkpointing is on: its forward drops the cache of a checkpointed "
            "training call. Prefix tuning cannot train this model with gradient checkpointing; turn "
            "checkpointing off, or use LoRA, a bottleneck adapter or prompt tuning.")


def _checkpointed_layers(model: nn.Module) -> list[nn.Module]:
    """The transformers ``GradientCheckpointingLayer`` blocks of ``model`` that are on;
    none with a transformers whose layers cannot keep a cache under checkpointing."""
    module = sys.modules.get("transformers.modeling_layers")
    layer_type = getattr(module, "GradientCheckpointingLayer", None)
    if layer_type is None or not hasattr(layer_type, "_can_checkpoint_with_cache"):
        return []
    return [m for m in model.modules() if isinstance(m, layer_type) and m.gradient_checkpointing]


def _read_only_layer_class() -> type | None:
    """The cache layer that holds a prefix and never grows, or None without transformers
    (or with one that has no cache layers)."""
    if "transformers" not in sys.modules:
        return None  # not cached: transformers may be imported later
    return _define_read_only_layer()


@functools.cache
def _define_read_only_layer() -> type | None:
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:
        return None

    class ReadOnlyPrefixLayer(DynamicLayer):
        """A prefix's keys and values (B, H, N, D) for one layer; ``reads`` counts updates."""

        def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
            super().__init__()
            self.lazy_initialization(keys, values)
            self.keys, self.values = keys, values
            self.reads = 0

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
                   **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            self.reads += 1
            return (torch.cat([self.keys, key_states], dim=-2),
                    torch.cat([self.values, value_states], dim=-2))

    return ReadOnlyPrefixLayer


# -- which model --------------------------------------------------------------------------
def _base_model(model: nn.Module) -> nn.Module:
    """``model`` itself when it is a kind peftkit checkpoints, else the model a PeftModel
    wraps. Told apart by kind, not by importing PeftModel (model.py, through
    virtual_tokens, imports this module); a transformers model is looked at first because
    its ``base_model`` is its own inner model."""
    if isinstance(model, ReferenceDecoder) or _is_pretrained_model(model):
        return model
    inner = getattr(model, "base_model", None)
    return inner if isinstance(inner, nn.Module) else model


def _is_pretrained_model(model: nn.Module) -> bool:
    # Looked up, not imported: transformers is optional, and a model from it means it is loaded.
    module = sys.modules.get("transformers.modeling_utils")
    pretrained = getattr(module, "PreTrainedModel", None)
    return pretrained is not None and isinstance(model, pretrained)


def _unsupported(model: nn.Module) -> str:
    return (f"gradient checkpointing supports transformers models (PreTrainedModel) and peftkit's "
            f"ReferenceDecoder, bare or inside a PeftModel; got {type(model).__name__}. For another "
            "model, run each block through torch.utils.checkpoint.checkpoint(block, ..., "
            "use_reentrant=False) in its forward.")


__all__ = ["disable_gradient_checkpointing", "enable_gradient_checkpointing",
           "gradient_checkpointing_enabled", "keeping_prefix", "prefix_cache"]
