"""The protocol every peftkit method module follows, with the code it shares.

A parameter is an adapter parameter, and has its role, because the module that owns it
says so, never because of its name. Each adapter module declares its tables: the
attributes (``nn.ParameterDict`` / ``nn.ModuleDict`` keyed by adapter name) that hold its
parameters, each with the role those parameters play, and the plain per-adapter settings
(``dict`` keyed by adapter name). Listing, activating and deleting adapters, and naming
parameters with their roles, are then written once here for every module kind (Hugging
Face PEFT's ``adapter_layer_names`` / ``other_param_names`` idea). Freezing, saving, the
LoRA+ optimizer groups and the doctor all go through this one protocol.

A module that ``mixes_rows`` can also run a different adapter on each row of one batch
(``adapter_names``, as in Hugging Face PEFT): while ``row_adapters`` holds a ``RowAdapters``
(below), it ignores its active adapters and gives each row the adapter named for it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
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

NO_ADAPTER = "__base__"
"""The ``adapter_names`` entry of a row that runs without any adapter (Hugging Face PEFT's name)."""

Rows = slice | torch.Tensor
"""Rows of a batch: a slice when they are consecutive (a view, nothing copied), else their indices."""


class RowAdapters:
    """Which adapter each row of a batch runs, grouped once per call for every layer of the model.

    Args:
        names: one adapter name per row (``NO_ADAPTER`` for none).
        expanded: True inside ``generate``, where transformers may repeat each prompt row k times
            in a row (``repeat_interleave``: k = beams or returned sequences per prompt); a layer
            that sees k · len(names) rows then gives each copy its prompt's adapter.
    """

    def __init__(self, names: Sequence[str], expanded: bool = False) -> None:
        self.names = list(names)
        self.expanded = expanded
        self._groups: dict[tuple[int, torch.device], list[tuple[str, Rows]]] = {}
        self._weights: dict[tuple, torch.Tensor] = {}
        self._stacked: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def groups(self, rows: int, device: torch.device) -> list[tuple[str, Rows]]:
        """(adapter, its rows) for a batch of ``rows`` rows, rows without an adapter left out;
        computed once per batch size and device, then shared by every layer."""
        key = (rows, device)
        if key not in self._groups:
            self._groups[key] = self._group(rows, device)
        return self._groups[key]

    def column_weights(self, columns: tuple[tuple[str, int, float], ...], rows: int, device: torch.device,
                       dtype: torch.dtype) -> torch.Tensor:
        """(rows, Σ width) for adapters laid side by side as ``columns`` (name, width, weight): each row
        holds its own adapter's weight in that adapter's columns, 0 in the others; computed once
        per layout, so the layers that share one share the tensor."""
        key = (columns, rows, device, dtype)
        if key not in self._weights:
            weights = torch.zeros(rows, sum(width for _, width, _ in columns), device=device, dtype=dtype)
            where, start = dict(self.groups(rows, device)), 0
            for name, width, weight in columns:
                if name in where:
                    weights[where[name], start:start + width] = weight
                start += width
            self._weights[key] = weights
        return self._weights[key]

    def stacked(self, layer: nn.Module, names: list[str], build) -> tuple[torch.Tensor, torch.Tensor]:
        """``layer``'s adapters ``names`` side by side, ``build()`` once per call and layer: the
        weights do not change during one forward or generate, and every decode step needs them."""
        key = (id(layer), tuple(names))
        if key not in self._stacked:
            self._stacked[key] = build()
        return self._stacked[key]

    def _group(self, rows: int, device: torch.device) -> list[tuple[str, Rows]]:
        count = len(self.names)
        if rows != count and not (self.expanded and count and rows % count == 0):
            raise ValueError(f"adapter_names names {count} rows but a layer got a batch of {rows}: this model's "
                             "layers do not see one row per input row, so the rows cannot be told apart.")
        repeat = rows // count
        positions: dict[str, list[int]] = {}
        for row, name in enumerate(self.names):
            positions.setdefault(name, []).extend(range(row * repeat, (row + 1) * repeat))
        positions.pop(NO_ADAPTER, None)
        return [(name, slice(where[0], where[-1] + 1) if where[-1] - where[0] + 1 == len(where)
                 else torch.tensor(where, device=device)) for name, where in positions.items()]


def add_to_rows(y: torch.Tensor, rows: Rows, delta: torch.Tensor, alpha: float = 1.0) -> None:
    """y[rows] += alpha · delta in place (delta: those rows' values, any shape of as many):
    through a view for a slice, with one ``index_add_`` for indices."""
    if isinstance(rows, slice):
        y[rows].add_(delta.view(y[rows].shape), alpha=alpha)
    else:
        delta = delta.view(len(rows), *y.shape[1:])
        y.index_add_(0, rows, delta if delta.dtype == y.dtype else delta.to(y.dtype), alpha=alpha)


def take_rows(x: torch.Tensor, rows: Rows) -> torch.Tensor:
    """x[rows]: a view for a slice, one ``index_select`` for indices."""
    return x[rows] if isinstance(rows, slice) else x.index_select(0, rows)


class AdapterModule(nn.Module):
    """Base class of modules that carry adapter weights for one or more named adapters.

    Subclasses declare ``adapter_tables`` (attribute -> role) and ``adapter_settings``
    (attributes of plain dicts keyed by adapter name), create their entries in their own
    ``add_adapter``, and implement ``adapter_state_dict``, ``load_adapter_state_dict`` and
    ``unwrap``. ``single_active`` modules (a prompt, a prefix) run one adapter at a time;
    ``mixes_rows`` modules follow ``row_adapters`` when it is set (see the module docstring).
    """

    adapter_tables: ClassVar[dict[str, str]] = {}
    adapter_settings: ClassVar[tuple[str, ...]] = ()
    single_active: ClassVar[bool] = False
    mixes_rows: ClassVar[bool] = False
    method_label: ClassVar[str] = "adapter"  # how messages name the method

    def __init__(self) -> None:
        super().__init__()
        self.active_adapters: list[str] = []
        self.row_adapters: RowAdapters | None = None

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
