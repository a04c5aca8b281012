"""The protocol every peftkit method module follows, with the code it shares.

A parameter is an adapter parameter, and has its role, because the module that owns it
says so, never because of its name. Each adapter module declares its tables: the
attributes (``nn.ParameterDict`` / ``nn.ModuleDict`` keyed by adapter name) that hold its
parameters, each with the role those parameters play, and the plain per-adapter settings
(``dict`` keyed by adapter name). Listing, activating and deleting adapters, and naming
parameters with their roles, are then written once here for every module kind (Hugging
Face PEFT's ``adapter_layer_names`` / ``other_param_names`` idea). Freezing, saving, the
LoRA+ optimizer groups and the doctor all go through this one protocol.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import ClassVar

import torch
from torch import nn

ROLES: dict[str, str] = {
    "lora_A": "LoRA's down-projection A (r, in) of a linear layer",
    "lora_B": "LoRA's up-projection B (out, r) of a linear layer, zero at init",
    "lora_embedding_A": "LoRA's A (r, num_embeddings) of an embedding, zero at init",
    "lora_embedding_B": "LoRA's B (dim, r) of an embedding",
    "bias": "a trained change to a targeted layer's bias (LoRA bias='lora_only')",
    "bottleneck": "a bottleneck adapter's down and up projections",
    "virtual_tokens": "a soft prompt's embeddings, or a prefix's keys and values (and its MLP)",
    "full": "a copy of a model module trained in full (modules_to_save)",
}
"""Role -> what a parameter with that role is."""


class AdapterModule(nn.Module):
    """Base class of modules that carry adapter weights for one or more named adapters.

    Subclasses declare ``adapter_tables`` (attribute -> role) and ``adapter_settings``
    (attributes of plain dicts keyed by adapter name), create their entries in their own
    ``add_adapter``, and implement ``adapter_state_dict``, ``load_adapter_state_dict`` and
    ``unwrap``. ``single_active`` modules (a prompt, a prefix) run one adapter at a time.
    """

    adapter_tables: ClassVar[dict[str, str]] = {}
    adapter_settings: ClassVar[tuple[str, ...]] = ()
    single_active: ClassVar[bool] = False
    method_label: ClassVar[str] = "adapter"  # how messages name the method

    def __init__(self) -> None:
        super().__init__()
        self.active_adapters: list[str] = []

    # -- written once for every module kind --------------------------------
    @property
    def adapter_names(self) -> list[str]:
        """Every adapter this module holds, in the order they were added."""
        names: dict[str, None] = {}
        for table in (*self.adapter_tables, *self.adapter_settings):
            names.update(dict.fromkeys(getattr(self, table).keys()))
        return list(names)

    def set_active_adapters(self, names: list[str]) -> None:
        """Which adapters take part in the forward pass; an empty list means none."""
        mine = [n for n in names if n in self.adapter_names]
        if self.single_active and len(mine) > 1:
            raise ValueError(f"only one {self.method_label} adapter can be active at a time, got {mine}.")
        self.active_adapters = mine

    def parameter_roles(self, name: str | None = None) -> Iterator[tuple[str, str, nn.Parameter]]:
        """(local name, role, parameter) for the adapter ``name``, or for every adapter."""
        for adapter in [name] if name is not None else self.adapter_names:
            for table, role in self.adapter_tables.items():
                store = getattr(self, table)
                if adapter not in store:
                    continue
                entry = store[adapter]
                if isinstance(entry, nn.Parameter):
                    yield f"{table}.{adapter}", role, entry
                else:
                    for local, param in entry.named_parameters():
                        yield f"{table}.{adapter}.{local}", role, param

    def adapter_parameters(self, name: str | None = None) -> Iterator[tuple[str, nn.Parameter]]:
        """(local name, parameter) for the adapter ``name``, or for every adapter when None."""
        for local, _, param in self.parameter_roles(name):
            yield local, param

    def delete_adapter(self, name: str) -> None:
        """Drop adapter ``name``: its entry in every table and setting."""
        self._check_deletable(name)
        for table in self.adapter_tables:
            store = getattr(self, table)
            if name in store:
                del store[name]
        for setting in self.adapter_settings:
            getattr(self, setting).pop(name, None)
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def _check_deletable(self, name: str) -> None:
        """Raise when adapter ``name`` cannot be removed now (a merged LoRA, say)."""

    # -- each module kind's own ---------------------------------------------
    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """Tensors of adapter ``name`` under the local keys used in adapter files."""
        raise NotImplementedError

    def load_adapter_state_dict(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Copy ``tensors`` (same keys as ``adapter_state_dict``) into adapter ``name``."""
        raise NotImplementedError

    def unwrap(self) -> nn.Module:
        """The module this adapter module replaced in the model tree."""
        raise NotImplementedError


def adapter_modules(model: nn.Module) -> Iterator[tuple[str, AdapterModule]]:
    """Every adapter-carrying module of ``model`` with its dotted path."""
    for path, module in model.named_modules():
        if isinstance(module, AdapterModule):
            yield path, module
