"""Mixed-adapter batches: ``pm(..., adapter_names=[...])`` and ``pm.generate(...,
adapter_names=[...])`` run one LoRA adapter per row of the batch, as Hugging Face PEFT does
(the same argument, ``"__base__"`` for a row without adapter).

For one call, every module that ``mixes_rows`` (the LoRA layers) holds the same
``RowAdapters``, the grouping of the rows by adapter, and adds each adapter's s · B A x to its
own rows only (``methods/lora.py``); every other adapter module is off, so a ``"__base__"``
row is the base model. The names are checked first, each wrong one with its fix.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from . import registry
from .methods.base import NO_ADAPTER, AdapterModule, RowAdapters
from .methods.lora import LoraLayer


@contextlib.contextmanager
def one_adapter_per_row(pm, adapter_names: Sequence[str], rows: int | None, expanded: bool = False) -> Iterator[None]:
    """Inside the block row i runs adapter ``adapter_names[i]`` alone (Hugging Face PEFT's
    ``adapter_names``): the modules that mix rows (LoRA layers) get the grouping, every other
    adapter module is off, so ``"__base__"`` rows run the base model. ``expanded``: see
    ``RowAdapters``. The previous state comes back on exit."""
    modules = list(pm._all_adapter_modules())
    routing = RowAdapters(checked_names(pm, adapter_names, rows, modules), expanded)
    mixing = [m for m in modules if m.mixes_rows]
    others = [(m, list(m.active_adapters)) for m in modules if not m.mixes_rows]
    for module in mixing:
        module.row_adapters = routing
    for module, _ in others:
        module.set_active_adapters([])
    try:
        yield
    finally:
        for module in mixing:
            module.row_adapters = None
        for module, names in others:
            module.set_active_adapters(names)


def checked_names(pm, adapter_names: Sequence[str], rows: int | None, modules: list[AdapterModule]) -> list[str]:
    """``adapter_names`` as a list, or the error that says what is wrong with it and the fix
    (``modules``: every adapter module of the model)."""
    if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names):
        raise TypeError(f"adapter_names takes one adapter name per row of the batch (a list of str), "
                        f"got {adapter_names!r}.")
    names = list(adapter_names)
    if pm.base_model.training:
        raise ValueError("adapter_names is for inference (each row runs its adapter with dropout off, and "
                         "training updates the active adapters, see set_adapter), but the model is in "
                         "training mode; call pm.eval() first.")
    if rows is not None and len(names) != rows:
        raise ValueError(f"adapter_names has {len(names)} names for a batch of {rows} rows; give one per row "
                         f"({NO_ADAPTER!r} for a row without adapter).")
    unknown = sorted({n for n in names if n != NO_ADAPTER and n not in pm.configs})
    if unknown:
        raise ValueError(f"unknown adapter(s) {unknown} in adapter_names; this model has {sorted(pm.configs)}, "
                         f"and {NO_ADAPTER!r} runs a row without adapter.")
    if any(isinstance(m, LoraLayer) and m.merged for m in modules):
        raise ValueError("adapters are merged into the base weights, so every row would run them; a mixed "
                         "batch needs the base weights alone: call pm.unmerge() first.")
    whole_batch = {n for m in modules if not m.mixes_rows for n in m.adapter_names}
    for name in sorted(whole_batch.intersection(names)):
        why = ("it puts virtual tokens in front of the input, which changes the length (and KV cache) of the "
               "whole batch" if pm.is_input_side(name) else
               f"it trains {pm.trained_copy_paths[name]} in full (modules_to_save), which runs the whole batch"
               if pm.trained_copy_paths[name] else "its modules run on the whole batch")
        raise ValueError(f"adapter {name!r} ({registry.method_for(pm.configs[name]).label}) cannot run on some "
                         f"rows of a batch only: {why}; adapter_names mixes LoRA layers per row. Run its rows in "
                         f"a call of their own: pm.set_adapter({name!r}), then pm(...) or pm.generate(...).")
    return names


def batch_rows(args: tuple, kwargs: dict) -> int | None:
    """Rows in the batch of a forward or generate call, read from its ids or embeddings."""
    for value in (*args[:1], kwargs.get("input_ids"), kwargs.get("inputs_embeds"), kwargs.get("inputs")):
        if isinstance(value, torch.Tensor):
            return value.shape[0]
    return None
