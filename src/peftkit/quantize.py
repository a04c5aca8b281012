"""Quantizing a model's frozen base to 4-bit NF4 (``--quantize nf4``), layer by layer into
``nf4.Nf4Linear``; what NF4 is and why bitsandbytes is in ``nf4.py``."""

from __future__ import annotations

from torch import nn

from .nf4 import BLOCK_SIZE, SCHEMES, Nf4Linear, QuantizeError, bitsandbytes, check_scheme, is_quantized

__all__ = ["BLOCK_SIZE", "SCHEMES", "Nf4Linear", "QuantizeError", "bitsandbytes", "check_scheme", "is_quantized",
           "quantize_base"]


def quantize_base(model: nn.Module, scheme: str = "nf4", trained_in_full: list[str] | None = None) -> int:
    """Replace the linear layers of ``model`` by ``Nf4Linear`` in place, before adapters are
    attached; return how many were replaced. The output head stays as it is (bitsandbytes' and
    transformers' default: the logits are the most sensitive to rounding), as do embeddings,
    norms and the modules an adapter will train in full (``trained_in_full``, as
    ``modules_to_save``; None: a classifier's head and pooler), whose weights must stay
    trainable. Layers already quantized are kept, so a base loaded quantized is left as it is."""
    from . import integrations, sites
    from .methods.base import AdapterModule

    check_scheme(scheme)
    if any(isinstance(m, AdapterModule) for m in model.modules()):
        raise QuantizeError("quantize the base before attaching adapters: quantize_base(model), then attach.")
    head = integrations.output_head(model)
    skipped = {id(head)} if head is not None else set()
    for path in sites.trained_copy_paths(model, trained_in_full):
        skipped.update(id(m) for m in model.get_submodule(path).modules())
    targets = [(path, module) for path, module in model.named_modules()
               if id(module) not in skipped and (isinstance(module, nn.Linear) or integrations.is_conv1d(module))]
    for path, module in targets:
        model.set_submodule(path, Nf4Linear.from_linear(module))
    if not targets and not any(is_quantized(m) for m in model.modules()):
        raise QuantizeError(f"{type(model).__name__} has no linear layer to quantize (besides its output head).")
    return len(targets)
