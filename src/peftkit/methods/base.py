"""The protocol every peftkit method module follows.

A parameter is an adapter parameter because the module that owns it says so through
``adapter_parameters()``, never because of its name. Freezing, saving, counting and
the doctor all go through this one protocol.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn


class AdapterModule(nn.Module):
    """Base class of modules that carry adapter weights for one or more named adapters.

    Subclasses keep their parameters in ``nn.ParameterDict``s keyed by adapter name and
    implement the four methods below.
    """

    def adapter_parameters(self, name: str | None = None) -> Iterator[tuple[str, nn.Parameter]]:
        """(local name, parameter) for the adapter ``name``, or for every adapter when None."""
        raise NotImplementedError

    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """Tensors of adapter ``name`` under the local keys used in adapter files."""
        raise NotImplementedError

    def load_adapter_state_dict(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Copy ``tensors`` (same keys as ``adapter_state_dict``) into adapter ``name``."""
        raise NotImplementedError

    def delete_adapter(self, name: str) -> None:
        """Drop adapter ``name`` and its parameters."""
        raise NotImplementedError

    def unwrap(self) -> nn.Module:
        """The module this adapter module replaced in the model tree."""
        raise NotImplementedError

    def set_active_adapters(self, names: list[str]) -> None:
        """Which adapters take part in the forward pass; an empty list means none."""
        raise NotImplementedError

    @property
    def adapter_names(self) -> list[str]:
        raise NotImplementedError


def adapter_modules(model: nn.Module) -> Iterator[tuple[str, AdapterModule]]:
    """Every adapter-carrying module of ``model`` with its dotted path."""
    for path, module in model.named_modules():
        if isinstance(module, AdapterModule):
            yield path, module
