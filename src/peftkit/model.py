"""PeftModel: a user's model with named adapters attached.

The wrapped model stays the user's own module tree; peftkit only swaps targeted layers
for adapter modules that keep the original inside. Freezing is derived from the adapter
protocol: after every change, exactly the parameters that the active adapters' modules
declare are trainable (M1), everything else is frozen.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import integrations, targets
from .config import LoraConfig, PeftConfig
from .methods.base import adapter_modules
from .methods.lora import LoraEmbedding, LoraLayer, LoraLinear


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
        self.configs: dict[str, PeftConfig] = {}
        self.target_paths: dict[str, list[str]] = {}
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
    def add_adapter(self, config: PeftConfig, name: str = "default") -> None:
        """Attach a new adapter ``name`` and make it the active one."""
        if name in self.configs:
            raise ValueError(f"an adapter named {name!r} already exists; pick another name.")
        if self._lora_layers_merged():
            raise RuntimeError("adapters are merged into the weights; unmerge() before adding another.")
        attachers = {LoraConfig: self._add_lora}
        if type(config) not in attachers:
            raise TypeError(f"unsupported config type {type(config).__name__}; "
                            f"peftkit attaches {[c.__name__ for c in attachers]}.")
        self.target_paths[name] = attachers[type(config)](config, name)
        self.configs[name] = config
        self.set_adapter(name)

    def _add_lora(self, config: LoraConfig, name: str) -> list[str]:
        """Wrap every targeted layer (or add to its existing LoRA wrapper); return their paths."""
        chosen = targets.find_targets(self.base_model, config.target_modules)
        targets.check_rank(chosen, config.r)
        for target in chosen:
            self._lora_layer_at(target).add_adapter(
                name, config.r, config.alpha, config.dropout, config.use_rslora,
                train_bias=config.bias == "lora_only",
            )
        return [t.path for t in chosen]

    def _lora_layer_at(self, target: targets.Target) -> LoraLayer:
        module = self.base_model.get_submodule(target.path)
        if isinstance(module, LoraLayer):
            return module
        layer = LoraEmbedding(module) if target.kind == "embedding" else LoraLinear(
            module, fan_in_fan_out=target.kind == "conv1d")
        self.base_model.set_submodule(target.path, layer)
        return layer

    def set_adapter(self, names: str | list[str]) -> None:
        """Make ``names`` the active adapters: they run in forward and are the trainable ones."""
        names = [names] if isinstance(names, str) else list(names)
        if not names and self.configs:
            raise ValueError("set_adapter needs at least one adapter name.")
        unknown = [n for n in names if n not in self.configs]
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; this model has {sorted(self.configs)}.")
        for _, module in adapter_modules(self.base_model):
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
        del self.configs[name], self.target_paths[name]
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
        for param in self.base_model.parameters():
            param.requires_grad_(False)
        trained = [n for n in self.active_adapters if n not in self.frozen_adapters]
        for _, param in self._adapter_parameters(trained):
            param.requires_grad_(True)

    def _adapter_parameters(self, names: list[str]) -> Iterator[tuple[str, nn.Parameter]]:
        for path, module in adapter_modules(self.base_model):
            for name in names:
                if name in module.adapter_names:
                    for local, param in module.adapter_parameters(name):
                        yield f"{path}.{local}", param

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """Path -> parameter for every parameter that requires grad (the optimizer's list)."""
        return {n: p for n, p in self.base_model.named_parameters() if p.requires_grad}

    def parameter_counts(self) -> tuple[int, int]:
        """(trainable, total) parameter counts; shared (tied) tensors are counted once."""
        params = list(self.base_model.parameters())  # parameters() already deduplicates ties
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.parameter_counts()
        print(f"trainable params: {trainable:,} || all params: {total:,} || "
              f"trainable%: {100 * trainable / total:.4f}")

    # -- running ----------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model.generate(*args, **kwargs)

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
        for _, module in adapter_modules(self.base_model):
            module.set_active_adapters([])
        try:
            yield
        finally:
            for _, module in adapter_modules(self.base_model):
                module.set_active_adapters(active)
            if was_merged:
                self.merge()

    # -- merging (M6) -------------------------------------------------------------
    def _lora_layers(self) -> list[LoraLayer]:
        return [m for _, m in adapter_modules(self.base_model) if isinstance(m, LoraLayer)]

    def _lora_layers_merged(self) -> bool:
        return any(layer.merged for layer in self._lora_layers())

    def merge(self) -> None:
        """Fold the active LoRA adapters into the base weights (W ← W + s·B A)."""
        if self._lora_layers_merged():
            warnings.warn("adapters are already merged; merge() did nothing.", stacklevel=2)
            return
        for layer in self._lora_layers():
            layer.merge()

    def unmerge(self) -> None:
        """Subtract merged adapters from the base weights again."""
        if not self._lora_layers_merged():
            warnings.warn("no adapter is merged; unmerge() did nothing.", stacklevel=2)
            return
        for layer in self._lora_layers():
            layer.unmerge()

    def merge_and_unload(self) -> nn.Module:
        """Merge the active adapters and return the plain model, with no peftkit module left."""
        if not self._lora_layers_merged():
            self.merge()
        return self._unwrap_all()

    def unload(self) -> nn.Module:
        """Remove every adapter without merging and return the plain base model."""
        if self._lora_layers_merged():
            self.unmerge()
        return self._unwrap_all()

    def _unwrap_all(self) -> nn.Module:
        for path, module in list(adapter_modules(self.base_model)):
            self.base_model.set_submodule(path, module.unwrap())
        self.configs.clear()
        self.target_paths.clear()
        self.active_adapters = []
        self._set_trainable()
        return self.base_model

    # -- files (M10) ----------------------------------------------------------------
    def save(self, directory: str | Path, name: str | None = None) -> Path:
        """Write adapter ``name`` (default: the active one) as adapter_config.json +
        adapter_model.safetensors, adapter weights only, atomically."""
        from . import io

        return io.save_adapter(self, directory, name or self.active_adapter)

    def load_adapter(self, directory: str | Path, name: str = "default", trainable: bool = False) -> None:
        """Attach a saved adapter under ``name`` (checked against this model)."""
        from . import io

        io.load_adapter_into(self, directory, name, trainable=trainable)

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """File key -> tensor for adapter ``name``, in Hugging Face PEFT's key layout."""
        tensors: dict[str, torch.Tensor] = {}
        for path, module in adapter_modules(self.base_model):
            if name in module.adapter_names:
                for local, tensor in module.adapter_state_dict(name).items():
                    tensors[f"base_model.model.{path}.{local}"] = tensor
        return tensors

    def load_adapter_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Copy file tensors (keys as in ``adapter_tensors``) into adapter ``name``."""
        for path, module in adapter_modules(self.base_model):
            if name in module.adapter_names:
                prefix = f"base_model.model.{path}."
                module.load_adapter_state_dict(
                    name, {k[len(prefix):]: t for k, t in tensors.items() if k.startswith(prefix)})

    def saved_target_names(self, name: str) -> list[str]:
        """Module names to record in the adapter file so any loader picks the same layers."""
        return targets.minimal_names(self.base_model, self.target_paths[name])

    def uses_conv1d(self, name: str) -> bool:
        return any(integrations.is_conv1d(self.base_model.get_submodule(p).unwrap())
                   for p in self.target_paths[name])


def attach(model: nn.Module, config: PeftConfig, name: str = "default") -> PeftModel:
    """Attach an adapter to ``model`` and freeze everything else.

    ``model`` may be a plain model (it is wrapped, in place) or a PeftModel (the adapter
    is added beside the existing ones and becomes the active one).
    """
    peft_model = model if isinstance(model, PeftModel) else PeftModel(model)
    peft_model.add_adapter(config, name)
    return peft_model
