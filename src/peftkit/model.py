"""PeftModel: a user's model with named adapters attached.

The wrapped model stays the user's own module tree; peftkit only swaps targeted layers
for adapter modules that keep the original inside. Freezing is derived from the adapter
protocol: after every change, exactly the parameters that the active adapters' modules
declare are trainable (M1), everything else is frozen.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import adapter_files, integrations, merging, mixed_batch, nf4, precision, registry, sites, targets, virtual_tokens
from .config import PeftConfig
from .methods.base import NO_ADAPTER, AdapterModule, adapter_modules
from .methods.prefix import PrefixEncoder
from .methods.prompt import PromptEncoder
from .methods.trained_copy import TrainedCopy


class PeftModel(nn.Module):
    """A model with one or more named adapters; forwards everything to the wrapped model.

    Build it with ``peftkit.attach(model, config)`` or ``peftkit.load(model, path)``.
    ``pm.base_model`` is the wrapped model; attributes it has (``config``, ...) are also
    reachable on ``pm``.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if isinstance(model, PeftModel):
            raise TypeError("model is already a PeftModel; use pm.add_adapter(config, name).")
        self.base_model = model
        # The prompt and prefix encoders ("prompt", "prefix"): they add virtual tokens in
        # front of the input, so they live beside the wrapped model, not inside it.
        self.input_adapters = nn.ModuleDict()
        self.configs: dict[str, PeftConfig] = {}
        self.target_paths: dict[str, list[str]] = {}
        # Paths of the modules each adapter trains in full (``modules_to_save``).
        self.trained_copy_paths: dict[str, list[str]] = {}
        self.active_adapters: list[str] = []
        self.frozen_adapters: set[str] = set()
        # Given back when the last adapter is removed, so that a refused load or an unload
        # leaves the user's model as it was.
        self._user_requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    # -- adapters -------------------------------------------------------------
    def add_adapter(self, config: PeftConfig, name: str = "default",
                    adapter_dtype: torch.dtype | None = torch.float32) -> None:
        """Attach a new adapter ``name`` and make it the active one.

        On a bfloat16 or float16 base the adapter's weights are kept in ``adapter_dtype``
        (float32 by default, as Hugging Face PEFT's ``autocast_adapter_dtype``: a half-precision
        weight loses AdamW's small updates to rounding); None keeps the base's dtype. A
        float32 or float64 base's adapters keep its dtype either way."""
        if name in self.configs:
            raise ValueError(f"an adapter named {name!r} already exists; pick another name.")
        if name == NO_ADAPTER:
            raise ValueError(f"{NO_ADAPTER!r} names the base model in adapter_names; pick another adapter name.")
        if self._lora_layers_merged():
            raise RuntimeError("adapters are merged into the weights; unmerge() before adding another.")
        method = registry.method_for(config)
        if method.settle is not None:  # choices the config leaves to the model (prefix init)
            config = method.settle(config, self.base_model)
        copies = sites.trained_copy_paths(self.base_model, config.modules_to_save)
        # The attacher gets the copies too: LoRA leaves the layers inside them alone.
        self.target_paths[name] = method.attach(self, config, name, copies)
        if adapter_dtype is not None:
            self._store_adapter_in(name, adapter_dtype)
        # Recorded as resolved, so the config says what was done (as a reloaded file does).
        self.configs[name] = dataclasses.replace(config, modules_to_save=copies)
        self.trained_copy_paths[name] = []
        try:
            for path in copies:
                self._trained_copy_at(path).add_adapter(name)
                self.trained_copy_paths[name].append(path)
        except ValueError:
            self.delete_adapter(name)  # leave the model as it was
            raise
        self.set_adapter(name)

    def _store_adapter_in(self, name: str, dtype: torch.dtype) -> None:
        """Adapter ``name``'s half-precision weights converted to ``dtype`` (through ``.data``,
        so the modules keep their parameters). Modules trained in full (``modules_to_save``)
        keep the base's dtype: they run as the layers they copy."""
        for _, role, param in self.adapter_parameters([name]):
            if role != "full" and param.dtype in (torch.bfloat16, torch.float16):
                param.data = param.data.to(dtype)

    def _trained_copy_at(self, path: str) -> TrainedCopy:
        module = self.base_model.get_submodule(path)
        if isinstance(module, TrainedCopy):
            return module
        if isinstance(module, AdapterModule):
            raise ValueError(f"{path!r} is in modules_to_save but already carries a "
                             f"{type(module).__name__}; a module is either adapted or trained in full.")
        if any(nf4.is_quantized(m) for m in module.modules()):
            raise ValueError(f"{path!r} is in modules_to_save but its weights are quantized (NF4), so they cannot "
                             "train; quantize the base with quantize_base(model, trained_in_full=[...]) naming it.")
        copy = TrainedCopy(module)
        self.base_model.set_submodule(path, copy)
        return copy

    def _all_adapter_modules(self) -> Iterator[AdapterModule]:
        """The adapter modules inside the wrapped model, then the input-side encoders."""
        for _, module in adapter_modules(self.base_model):
            yield module
        yield from self.input_adapters.values()

    def _active_input_adapter(self) -> tuple[PromptEncoder | PrefixEncoder, str] | None:
        """(encoder, adapter name) of the active prompt or prefix adapter, if any."""
        for encoder in self.input_adapters.values():
            if encoder.active_adapters:
                return encoder, encoder.active_adapters[0]
        return None

    def set_adapter(self, names: str | list[str]) -> None:
        """Make ``names`` the active adapters: they run in forward and are the trainable ones."""
        names = [names] if isinstance(names, str) else list(names)
        if not names and self.configs:
            raise ValueError("set_adapter needs at least one adapter name.")
        unknown = [n for n in names if n not in self.configs]
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; this model has {sorted(self.configs)}.")
        input_side = [n for n in names if registry.method_for(self.configs[n]).input_side]
        if len(input_side) > 1:
            raise ValueError(f"at most one prompt or prefix adapter can be active at a time, got "
                             f"{input_side}: each claims the first positions of the input.")
        for module in self._all_adapter_modules():
            module.set_active_adapters(names)
        self.active_adapters = names
        self._set_trainable()

    @property
    def active_adapter(self) -> str:
        return self.active_adapters[0]

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name``; layers left with no adapter get their original module back."""
        if name not in self.configs:
            raise ValueError(f"no adapter named {name!r}; this model has {sorted(self.configs)}.")
        for path, module in list(adapter_modules(self.base_model)):
            if name in module.adapter_names:
                module.delete_adapter(name)
                if not module.adapter_names:
                    self.base_model.set_submodule(path, module.unwrap())
        for kind, encoder in list(self.input_adapters.items()):
            if name in encoder.adapter_names:
                encoder.delete_adapter(name)
                if not encoder.adapter_names:
                    del self.input_adapters[kind]
        del self.configs[name], self.target_paths[name], self.trained_copy_paths[name]
        self.frozen_adapters.discard(name)
        remaining = [n for n in self.active_adapters if n != name]
        self.set_adapter(remaining or list(self.configs)[:1])

    def set_trainable(self, name: str, trainable: bool = True) -> None:
        """Train adapter ``name`` when active (the default), or keep it frozen (inference)."""
        if trainable:
            self.frozen_adapters.discard(name)
        else:
            self.frozen_adapters.add(name)
        self._set_trainable()

    def _set_trainable(self) -> None:
        """Freeze everything, then unfreeze what the active adapters' modules declare (M1)."""
        if not self.configs:
            for name, param in self.base_model.named_parameters():
                param.requires_grad_(self._user_requires_grad.get(name, False))
            return
        for param in self.parameters():
            param.requires_grad_(False)
        trained = [n for n in self.active_adapters if n not in self.frozen_adapters]
        for _, _, param in self.adapter_parameters(trained):
            param.requires_grad_(True)

    def adapter_parameters(self, names: list[str]) -> Iterator[tuple[str, str, nn.Parameter]]:
        """(path, role, parameter) of adapters ``names``, the role as the owning module
        declares it (``methods.base.ROLES``): paths inside the wrapped model, and
        ``input_adapters.<kind>.<local>`` for prompt and prefix encoders."""
        located = [*adapter_modules(self.base_model),
                   *((f"input_adapters.{kind}", e) for kind, e in self.input_adapters.items())]
        for path, module in located:
            for name in names:
                if name in module.adapter_names:
                    for local, role, param in module.parameter_roles(name):
                        yield f"{path}.{local}", role, param

    def parameter_groups(self) -> list[tuple[str, list[tuple[str, nn.Parameter]]]]:
        """(adapter name, its trainable (role, parameter) pairs) for each active adapter, so
        that each method, and each role within it (LoRA+), can train at its own rate (M9)."""
        groups, seen = [], set()
        for name in self.active_adapters:
            params = [(role, p) for _, role, p in self.adapter_parameters([name])
                      if p.requires_grad and id(p) not in seen]
            seen.update(id(p) for _, p in params)
            if params:
                groups.append((name, params))
        return groups

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """Path -> parameter for every parameter that requires grad (the optimizer's list);
        paths are relative to the wrapped model, prompt and prefix ones start ``input_adapters.``."""
        return {n.removeprefix("base_model."): p for n, p in self.named_parameters() if p.requires_grad}

    def parameter_counts(self) -> tuple[int, int]:
        """(trainable, total) parameter counts; shared (tied) tensors are counted once, and a
        4-bit layer's weight counts its in x out values (its codes are a buffer, two per byte)."""
        params = list(self.parameters())  # parameters() already deduplicates ties
        quantized = sum(m.in_features * m.out_features for m in self.modules() if nf4.is_quantized(m))
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params) + quantized

    def print_trainable_parameters(self) -> None:
        trainable, total = self.parameter_counts()
        print(f"trainable params: {trainable:,} || all params: {total:,} || "
              f"trainable%: {100 * trainable / total:.4f}")

    # -- running ----------------------------------------------------------------
    def forward(self, *args: Any, adapter_names: Sequence[str] | None = None,
                run_inside: Callable[["PeftModel", dict], Any] | None = None, **kwargs: Any) -> Any:
        """Run the wrapped model with the active adapters. With a prompt or prefix adapter
        active, the call is rewritten around its virtual tokens (``peftkit.virtual_tokens``).

        With ``adapter_names``, one per row of the batch (``"__base__"`` for none), each row
        runs its own LoRA adapter alone instead, whatever is active (``mixed_batch.py``).

        With ``run_inside``, a function of (this model, the keyword arguments), its result is
        returned instead: a computation on the model's parts that must run inside this
        module's call, where a DDP or FSDP2 wrapper's hooks run around it (the fused loss of
        ``lm_loss.training_loss``)."""
        if run_inside is not None:
            if args or adapter_names is not None:
                raise TypeError("run_inside takes the batch by keyword (input_ids=..., labels=...) and no "
                                "adapter_names.")
            return run_inside(self, kwargs)
        if adapter_names is not None:
            with mixed_batch.one_adapter_per_row(self, adapter_names, mixed_batch.batch_rows(args, kwargs)):
                return self.base_model(*args, **kwargs)
        active = self._active_input_adapter()
        if active is None:
            return self.base_model(*args, **kwargs)
        encoder, name = active
        return virtual_tokens.forward(self.base_model, encoder, name, args, kwargs)

    def generate(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        """Generate with the active adapters; returns the input ids followed by the new ones.

        Without a prompt or prefix adapter this is the wrapped model's own ``generate``.
        With one, peftkit runs the loop itself (``virtual_tokens.generate``: greedy, or
        sampling with ``temperature``, ``top_k``, ``top_p``), with the KV cache: the virtual
        tokens enter once, at the first step. Batches must be left-padded.

        With ``adapter_names`` (one per prompt row) every decode step of the wrapped model's
        ``generate`` runs each row, and each beam or returned sequence of it, with its own LoRA
        adapter alone, as ``forward`` does.
        """
        if adapter_names is not None:
            with mixed_batch.one_adapter_per_row(self, adapter_names, mixed_batch.batch_rows(args, kwargs),
                                                 expanded=True):
                return self.base_model.generate(*args, **kwargs)
        if self._active_input_adapter() is None:
            return self.base_model.generate(*args, **kwargs)
        if len(args) > 1:
            raise TypeError("pass generation settings by keyword; input_ids may be positional.")
        return virtual_tokens.generate(self, *args, **kwargs)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run as the base model inside the block; the previous state comes back on exit.

        Unmerged adapters are simply skipped, so the output is exactly the base output;
        merged ones are subtracted and re-added, exact up to float rounding.
        """
        was_merged = self._lora_layers_merged()
        if was_merged:
            self.unmerge()
        active = list(self.active_adapters)
        for module in self._all_adapter_modules():
            module.set_active_adapters([])
        try:
            yield
        finally:
            for module in self._all_adapter_modules():
                module.set_active_adapters(active)
            if was_merged:
                self.merge()

    # -- merging (M6): merging.py -------------------------------------------------
    def _lora_layers_merged(self) -> bool:
        return merging.any_merged(self.base_model)

    def merge(self) -> None:
        """Fold the active LoRA adapters into the base weights (W ← W + s·B A)."""
        merging.merge(self)

    def unmerge(self) -> None:
        """Subtract merged adapters from the base weights again."""
        merging.unmerge(self.base_model)

    def merge_and_unload(self, dtype: torch.dtype | None = None) -> nn.Module:
        """Merge the active adapters and return the plain model, with no peftkit module left;
        with ``dtype``, the whole model is stored in it (``merging.merge_for_unload``: an NF4
        base is merged into its dequantized weights)."""
        merging.merge_for_unload(self, dtype)
        model = self._unwrap_all(keep_trained_copies=True)
        if dtype is not None:  # the whole merged model in the dtype asked for
            precision.place(model, precision.model_device(model), dtype)
        return model

    def unload(self) -> nn.Module:
        """Remove every adapter without merging and return the plain base model."""
        if self._lora_layers_merged():
            self.unmerge()
        return self._unwrap_all(keep_trained_copies=False)

    def _unwrap_all(self, keep_trained_copies: bool) -> nn.Module:
        """Give every replaced module back; a fully trained module (``modules_to_save``) is
        replaced by the active adapter's trained copy when ``keep_trained_copies``."""
        for path, module in list(adapter_modules(self.base_model)):
            plain = module.current() if keep_trained_copies and isinstance(module, TrainedCopy) else module.unwrap()
            self.base_model.set_submodule(path, plain)
        self.input_adapters.clear()
        self.configs.clear()
        self.target_paths.clear()
        self.trained_copy_paths.clear()
        self.active_adapters = []
        self._set_trainable()
        return self.base_model

    # -- files (M10) ----------------------------------------------------------------
    def save(self, directory: str | Path, name: str | None = None, *, chat_template: str | None = None) -> Path:
        """Write adapter ``name`` (default: the active one) as adapter_config.json +
        adapter_model.safetensors, adapter weights only, atomically; with ``chat_template``
        (the Jinja text the training conversations were rendered with) also
        chat_template.jinja, so that serving renders prompts the same way."""
        return adapter_files.save_adapter(self, directory, name or self.active_adapter, chat_template)

    def load_adapter(self, directory: str | Path, name: str = "default", trainable: bool = False) -> None:
        """Attach a saved adapter under ``name`` (checked against this model)."""
        adapter_files.load_adapter_into(self, directory, name, trainable=trainable)

    def is_input_side(self, name: str) -> bool:
        """True when adapter ``name`` adds virtual tokens at the input (a prompt or prefix)."""
        return registry.method_for(self.configs[name]).input_side

    def adapter_state(self, name: str) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
        """Adapter ``name``'s tensors as its modules name them: (module path in the wrapped
        model -> its local tensors, and the prompt or prefix encoder's tensors). The file
        layout (``peftkit.adapter_files``) builds its keys from these."""
        modules = {path: module.adapter_state_dict(name) for path, module in adapter_modules(self.base_model)
                   if name in module.adapter_names}
        encoder: dict[str, torch.Tensor] = {}
        for input_encoder in self.input_adapters.values():
            if name in input_encoder.adapter_names:
                encoder.update(input_encoder.adapter_state_dict(name))
        return modules, encoder

    def load_adapter_state(self, name: str, modules: dict[str, dict[str, torch.Tensor]],
                           encoder: dict[str, torch.Tensor]) -> None:
        """Copy tensors laid out as ``adapter_state`` gives them into adapter ``name``."""
        for path, module in adapter_modules(self.base_model):
            if name in module.adapter_names:
                module.load_adapter_state_dict(name, modules[path])
        for input_encoder in self.input_adapters.values():
            if name in input_encoder.adapter_names:
                input_encoder.load_adapter_state_dict(name, encoder)

    def saved_target_names(self, name: str) -> list[str]:
        """Module names to record in the adapter file so any loader picks the same layers."""
        return targets.minimal_names(self.base_model, self.target_paths[name])

    def uses_conv1d(self, name: str) -> bool:
        return any(integrations.is_conv1d(self.base_model.get_submodule(p).unwrap())
                   for p in self.target_paths[name])


def load(model: nn.Module, directory: str | Path, name: str = "default", trainable: bool = False) -> PeftModel:
    """Load a saved adapter (peftkit's or Hugging Face PEFT's) onto ``model`` (a plain model,
    wrapped in place, or a PeftModel). ``trainable=False`` (the default, as in PEFT) loads it
    frozen for inference; pass True to continue training it."""
    peft_model = model if isinstance(model, PeftModel) else PeftModel(model)
    peft_model.load_adapter(directory, name, trainable=trainable)
    return peft_model


def attach(model: nn.Module, config: PeftConfig, name: str = "default", *,
           adapter_dtype: torch.dtype | None = torch.float32) -> PeftModel:
    """Attach an adapter to ``model`` and freeze everything else.

    ``model`` may be a plain model (it is wrapped, in place) or a PeftModel (the adapter
    is added beside the existing ones and becomes the active one). On a bfloat16 or float16
    model the adapter's weights are float32 unless ``adapter_dtype`` says otherwise (None:
    the model's dtype); see ``PeftModel.add_adapter``.
    """
    peft_model = model if isinstance(model, PeftModel) else PeftModel(model)
    peft_model.add_adapter(config, name, adapter_dtype)
    return peft_model
