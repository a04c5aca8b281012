"""Folding LoRA into the base weights and taking it out again (M6), for ``PeftModel``'s
``merge()``, ``unmerge()`` and ``merge_and_unload()``.

Merging adds each active adapter's update to its layer's weight, W ← W + s·B A (s = alpha/r,
or alpha/sqrt(r) with rsLoRA), so the merged model computes W x + s·B A x with the base
model's cost; unmerging subtracts it again. Only LoRA merges: a bottleneck adapter adds the
nonlinear up(act(down(h))), and a prompt or prefix adds virtual tokens, which no weight can
hold. A weight another module shares (tied embeddings) is copied before it is changed.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch
from torch import nn

from . import nf4, registry
from .methods.base import adapter_modules
from .methods.lora import LoraLayer

if TYPE_CHECKING:  # only for annotations: model.py imports this module
    from .model import PeftModel


def lora_layers(model: nn.Module) -> list[LoraLayer]:
    """The LoRA layers inside ``model`` (a PeftModel's wrapped model)."""
    return [m for _, m in adapter_modules(model) if isinstance(m, LoraLayer)]


def any_merged(model: nn.Module) -> bool:
    return any(layer.merged for layer in lora_layers(model))


def refuse_bottleneck_merge(pm: PeftModel) -> None:
    """A TypeError, with what to do instead, when an active adapter is a bottleneck adapter."""
    layer_side = [n for n in pm.active_adapters
                  if not registry.method_for(pm.configs[n]).mergeable
                  and not registry.method_for(pm.configs[n]).input_side]
    if layer_side:
        raise TypeError(
            f"bottleneck adapters cannot be folded into the weights (active: {layer_side}): each "
            "adds h + up(act(down(h))), a nonlinear function that no weight matrix can absorb. "
            "Keep the adapter attached for inference (its cost is small), or use unload() to get "
            "the base model back without it."
        )


def merge(pm: PeftModel, stacklevel: int = 3) -> None:
    """Fold ``pm``'s active LoRA adapters into the base weights (W ← W + s·B A), in place;
    a warning and nothing more when they already are. ``stacklevel``: of this function's
    warnings (3: the line that called ``PeftModel.merge``)."""
    refuse_bottleneck_merge(pm)
    layers = lora_layers(pm.base_model)
    if any(nf4.is_quantized(layer.base_layer) for layer in layers):
        # Adding s·B A to 4-bit codes would round it away; the merge goes into Ŵ made plain.
        raise RuntimeError("the LoRA layers' base is quantized (NF4), so the update cannot be folded into it in "
                           "place: use merge_and_unload(dtype=...), which merges into the dequantized weights.")
    if any(layer.merged for layer in layers):
        warnings.warn("adapters are already merged; merge() did nothing.", stacklevel=stacklevel)
        return
    owners: dict[int, set[str]] = {}  # parameter id -> the modules holding it, gathered once
    for path, module in pm.base_model.named_modules(remove_duplicate=False):
        for local, param in module.named_parameters(recurse=False, remove_duplicate=False):
            owners.setdefault(id(param), set()).add(f"{path}.{local}")
    for path, layer in adapter_modules(pm.base_model):
        if isinstance(layer, LoraLayer):
            if layer.active_adapters:
                sharers = sorted(owners[id(layer.base_layer.weight)] - {f"{path}.base_layer.weight"})
                untie(pm.base_model, layer, sharers, stacklevel + 1)
            layer.merge()


def untie(model: nn.Module, layer: LoraLayer, sharers: list[str], stacklevel: int) -> None:
    """Give ``layer`` its own base weight when other modules of ``model`` share it (``sharers``:
    GPT-2's ``wte`` and ``lm_head``, any model with tied word embeddings): merging W + s·B A
    into the shared tensor would change them too. The model's config stops declaring the tie,
    so a merged model written to disk and read back stays untied."""
    if not sharers:
        return
    weight = layer.base_layer.weight
    layer.base_layer.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
    config = getattr(model, "config", None)
    for part in (config, getattr(config, "get_text_config", lambda: None)()):
        if getattr(part, "tie_word_embeddings", False):
            part.tie_word_embeddings = False
    warnings.warn(f"merging LoRA into a weight that {sharers} share: the LoRA layer gets its own copy "
                  "first, so that the shared module keeps the base weight; the merged model no longer "
                  "ties them.", UserWarning, stacklevel=stacklevel)


def unmerge(model: nn.Module) -> None:
    """Subtract the merged adapters of ``model``'s LoRA layers from their weights again."""
    layers = lora_layers(model)
    if not any(layer.merged for layer in layers):
        warnings.warn("no adapter is merged; unmerge() did nothing.", stacklevel=3)
        return
    for layer in layers:
        layer.unmerge()


def merge_for_unload(pm: PeftModel, dtype: torch.dtype | None) -> None:
    """What ``merge_and_unload`` merges before it unwraps: every active LoRA into its weight.

    A quantized (NF4) base layer is first made a plain linear holding its dequantized
    weight Ŵ in ``dtype`` (default: the dtype it was quantized from), then merged: the
    result is the model that was trained, Ŵ + s · B A, never the weights before
    quantization; the 4-bit layers LoRA did not target become plain Ŵ too. A warning gives
    the largest rounding error of the merged weights against Ŵ + s · B A in float32."""
    refuse_bottleneck_merge(pm)
    if pm._active_input_adapter() is not None:
        raise TypeError(
            "a prompt or prefix adapter is active: it adds virtual tokens to every input rather "
            "than changing a weight, so the plain model cannot carry it. Keep the PeftModel for "
            "inference (merge() still folds any LoRA), or use unload() to drop it."
        )
    on_quantized = [layer for layer in lora_layers(pm.base_model) if nf4.is_quantized(layer.base_layer)]
    quantized_bases = {id(layer): layer.base_layer for layer in on_quantized}  # 4-bit: cheap to keep
    # Every 4-bit layer is made plain, targeted or not: a saved model holds no NF4 codes. A
    # GPT-2 layer becomes a Conv1D again, whose LoRA then folds in the (in, out) layout.
    for path, module in [(p, m) for p, m in pm.base_model.named_modules() if nf4.is_quantized(m)]:
        pm.base_model.set_submodule(path, module.to_linear(dtype))
    for layer in on_quantized:
        layer.fan_in_fan_out = quantized_bases[id(layer)].conv1d
    if not any_merged(pm.base_model):
        merge(pm, stacklevel=4)  # called by PeftModel.merge_and_unload
    if on_quantized:
        worst = max(merge_rounding(layer, quantized_bases[id(layer)]) for layer in on_quantized)
        stored = str(on_quantized[0].base_layer.weight.dtype).removeprefix("torch.")
        warnings.warn(f"merged {len(on_quantized)} LoRA layer(s) into their NF4 base dequantized to {stored}: "
                      f"the merged weights are within {worst:.1e} (relative to the largest) of Ŵ + s·B A in "
                      "float32, Ŵ being the 4-bit base the adapter was trained on, not the original weights.",
                      stacklevel=3)


@torch.no_grad()
def merge_rounding(layer: LoraLayer, quantized: nn.Module) -> float:
    """max |W_merged − (Ŵ + s·B A)| / max |Ŵ + s·B A|, the right side in float32, one layer at
    a time (a float32 copy of every weight at once would cost more than the 4-bit model)."""
    delta = sum(layer.delta_weight(n).float() for n in layer.active_adapters)
    merged = layer.base_layer.weight.float()
    if layer.fan_in_fan_out:  # a Conv1D again: (in, out); Ŵ is (out, in)
        delta, merged = delta.t(), merged.t()
    exact = quantized.weight.float() + delta
    return float((merged - exact).abs().max() / exact.abs().max().clamp_min(1e-12))
