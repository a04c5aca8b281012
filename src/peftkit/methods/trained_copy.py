"""Modules trained in full beside an adapter (Hugging Face PEFT's ``modules_to_save``).

A classification head starts random, so no adapter can make up for it being frozen: it is
trained in full. The model's own module stays untouched as ``original``; each adapter that
lists it gets its own trainable copy, and the forward pass runs the copy of the first active
adapter that has one (the original when none does). A copy is saved with its adapter under
the module's own path (``base_model.model.classifier.weight``), as PEFT writes it.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from .base import AdapterModule


class TrainedCopy(AdapterModule):
    """Per-adapter full copies of one module.

    Args:
        original: the model's module; never trained here, given back by ``unwrap``.
    """

    adapter_tables = {"copies": "full"}

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original = original
        self.copies = nn.ModuleDict()

    def add_adapter(self, name: str) -> None:
        """Give adapter ``name`` its own copy, starting from the original's weights."""
        self.copies[name] = copy.deepcopy(self.original)

    def current(self) -> nn.Module:
        """The module that runs now: the first active adapter's copy, else the original."""
        return self.copies[self.active_adapters[0]] if self.active_adapters else self.original

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.current()(*args, **kwargs)

    # -- adapter protocol -------------------------------------------------
    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        return {k: t.detach() for k, t in self.copies[name].state_dict().items()}

    def load_adapter_state_dict(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        self.copies[name].load_state_dict(tensors, strict=True)

    def unwrap(self) -> nn.Module:
        return self.original
