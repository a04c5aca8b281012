"""PeftModel: a user's model with named adapters attached.

The wrapped model stays the user's own module tree; peftkit only swaps targeted layers
for adapter modules that keep the original inside. Freezing is derived from the adapter
protocol: after every change, exactly the parameters that the active adapters' modules
declare are trainable (M1), everything else is frozen.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import integrations, masks, targets
from .config import AdapterConfig, LoraConfig, PeftConfig, PrefixConfig, PromptConfig
from .methods.adapter import AdapterWrapper
from .methods.base import AdapterModule, adapter_modules
from .methods.lora import LoraEmbedding, LoraLayer, LoraLinear
from .methods.prefix import PrefixEncoder
from .methods.prompt import PromptEncoder, init_token_ids, initial_prompt
from .methods.trained_copy import TrainedCopy

INPUT_CONFIGS = (PromptConfig, PrefixConfig)
"""Methods that put virtual tokens in front of the input instead of changing layers."""
ATTACHABLE_CONFIGS = (LoraConfig, AdapterConfig, PromptConfig, PrefixConfig)
"""Every method ``add_adapter`` attaches."""


def default_prefix_init(model: nn.Module) -> str:
    """How a prefix starts when its config leaves ``init`` open: ``"random"`` (N(0, 1)) on a
    sequence classifier, whose head is new anyway, else ``"vocab"`` (the model's own keys and
    values of vocabulary tokens), so that a language model's first outputs stay its own.
    PrefixConfig's docstring gives the measurements."""
    return "random" if integrations.is_sequence_classifier(model) else "vocab"


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
    def add_adapter(self, config: PeftConfig, name: str = "default") -> None:
        """Attach a new adapter ``name`` and make it the active one."""
        if name in self.configs:
            raise ValueError(f"an adapter named {name!r} already exists; pick another name.")
        if self._lora_layers_merged():
            raise RuntimeError("adapters are merged into the weights; unmerge() before adding another.")
        if type(config) not in ATTACHABLE_CONFIGS:
            raise TypeError(f"unsupported config type {type(config).__name__}; "
                            f"peftkit attaches {[c.__name__ for c in ATTACHABLE_CONFIGS]}.")
        if isinstance(config, PrefixConfig) and config.init is None:
            config = dataclasses.replace(config, init=default_prefix_init(self.base_model))
        copies = targets.trained_copy_paths(self.base_model, config.modules_to_save)
        # LoRA needs the copies too: it leaves the layers inside them alone.
        attachers = {LoraConfig: lambda c, n: self._add_lora(c, n, copies), AdapterConfig: self._add_bottleneck,
                     PromptConfig: self._add_prompt, PrefixConfig: self._add_prefix}
        self.target_paths[name] = attachers[type(config)](config, name)
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

    def _trained_copy_at(self, path: str) -> TrainedCopy:
        module = self.base_model.get_submodule(path)
        if isinstance(module, TrainedCopy):
            return module
        if isinstance(module, AdapterModule):
            raise ValueError(f"{path!r} is in modules_to_save but already carries a "
                             f"{type(module).__name__}; a module is either adapted or trained in full.")
        copy = TrainedCopy(module)
        self.base_model.set_submodule(path, copy)
        return copy

    def _add_lora(self, config: LoraConfig, name: str, trained_in_full: list[str]) -> list[str]:
        """Wrap every targeted layer (or add to its existing LoRA wrapper) outside the modules
        ``trained_in_full``; return their paths."""
        chosen = targets.find_targets(self.base_model, config.target_modules, trained_in_full)
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

    def _add_bottleneck(self, config: AdapterConfig, name: str) -> list[str]:
        """Put a bottleneck adapter at every site of ``config.placement``; return their paths."""
        sites = targets.adapter_sites(self.base_model, config)
        for site in sites:
            wrapper = self.base_model.get_submodule(site.path)
            if not isinstance(wrapper, AdapterWrapper):
                wrapper = AdapterWrapper(wrapper)
                self.base_model.set_submodule(site.path, wrapper)
            wrapper.add_adapter(name, site.width, config.bottleneck, mode=site.mode,
                                activation=config.activation, dropout=config.dropout,
                                scaling=config.scaling)
        return [site.path for site in sites]

    def _add_prompt(self, config: PromptConfig, name: str) -> list[str]:
        """Learn N embeddings that are prepended to the input embeddings (M7); no layer is
        replaced, so there are no target paths."""
        model = self.base_model
        self._check_input_side_supported(model, "prompt tuning")
        if not integrations.accepts_argument(model, "inputs_embeds"):
            raise ValueError(f"prompt tuning feeds embeddings, but {type(model).__name__}.forward "
                             "takes no inputs_embeds.")
        init = initial_prompt(config, model.get_input_embeddings())
        if "prompt" not in self.input_adapters:
            self.input_adapters["prompt"] = PromptEncoder(init.shape[1])
        self.input_adapters["prompt"].add_adapter(name, init)
        return []

    def _add_prefix(self, config: PrefixConfig, name: str) -> list[str]:
        """Learn N keys and values per attention layer (M11); no layer is replaced."""
        model = self.base_model
        self._check_input_side_supported(model, "prefix tuning")
        if not integrations.native_prefix(model) and integrations.cache_argument(model) is None:
            raise ValueError(
                f"prefix tuning hands the prefix to the model as the start of its KV cache, but "
                f"{type(model).__name__}.forward takes no cache (cache / past_key_values) and no "
                "prefix_key_values."
            )
        if "prefix" not in self.input_adapters:
            self.input_adapters["prefix"] = PrefixEncoder(*integrations.attention_geometry(model))
        device = next(model.parameters()).device
        ids = init_token_ids(config, model.get_input_embeddings().num_embeddings)
        # Li & Liang's init from real words: the keys and values the model gives those tokens.
        initial = None if ids is None else integrations.token_key_values(model, ids.to(device)[None])
        self.input_adapters["prefix"].add_adapter(name, config.num_virtual_tokens, config.projection_dim,
                                                  device, initial)
        return []

    @staticmethod
    def _check_input_side_supported(model: nn.Module, method: str) -> None:
        if integrations.is_encoder_decoder(model):
            raise ValueError(f"peftkit's {method} supports decoder-only and encoder-only models; "
                             f"{type(model).__name__} is an encoder-decoder.")

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
        input_side = [n for n in names if isinstance(self.configs[n], INPUT_CONFIGS)]
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
        for _, param in self._adapter_parameters(trained):
            param.requires_grad_(True)

    def _adapter_parameters(self, names: list[str]) -> Iterator[tuple[str, nn.Parameter]]:
        """(path, parameter) of adapters ``names``: paths inside the wrapped model, and
        ``input_adapters.<kind>.<local>`` for prompt and prefix encoders."""
        located = [*adapter_modules(self.base_model),
                   *((f"input_adapters.{kind}", e) for kind, e in self.input_adapters.items())]
        for path, module in located:
            for name in names:
                if name in module.adapter_names:
                    for local, param in module.adapter_parameters(name):
                        yield f"{path}.{local}", param

    def parameter_groups(self) -> list[tuple[str, list[nn.Parameter]]]:
        """(adapter name, its trainable parameters) for each active adapter, so that each
        method can train at its own learning rate (M9) when several are active."""
        groups, seen = [], set()
        for name in self.active_adapters:
            params = [p for _, p in self._adapter_parameters([name]) if p.requires_grad and id(p) not in seen]
            seen.update(id(p) for p in params)
            if params:
                groups.append((name, params))
        return groups

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """Path -> parameter for every parameter that requires grad (the optimizer's list);
        paths are relative to the wrapped model, prompt and prefix ones start ``input_adapters.``."""
        return {n.removeprefix("base_model."): p for n, p in self.named_parameters() if p.requires_grad}

    def parameter_counts(self) -> tuple[int, int]:
        """(trainable, total) parameter counts; shared (tied) tensors are counted once."""
        params = list(self.parameters())  # parameters() already deduplicates ties
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.parameter_counts()
        print(f"trainable params: {trainable:,} || all params: {total:,} || "
              f"trainable%: {100 * trainable / total:.4f}")

    # -- running ----------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the wrapped model with the active adapters.

        With a prompt or prefix adapter active, the call is rewritten around its N virtual
        tokens (rules in ``peftkit.masks``): ``attention_mask`` (B, P + T) covers the caller's
        tokens only, past and current, never the virtual ones, and is extended here, as are
        token labels (-100 on the prompt) and positions; a padded row is placed as if it were
        alone. A cache passed in (``past_key_values`` or ``cache``) must come from an earlier
        call of this model: it then already holds the virtual tokens, which are not added
        again. As in Hugging Face PEFT, prompt tuning's outputs cover N + T positions, the
        prompt's first; prefix tuning's cover T.
        """
        active = self._active_input_adapter()
        if active is None:
            return self.base_model(*args, **kwargs)
        if len(args) > 1 or (args and "input_ids" in kwargs):
            raise TypeError("with a prompt or prefix adapter active, pass inputs by keyword "
                            "(input_ids may be the one positional argument).")
        if args:
            kwargs["input_ids"] = args[0]
        encoder, name = active
        if isinstance(encoder, PromptEncoder):
            return self._prompt_forward(encoder, name, **kwargs)
        return self._prefix_forward(encoder, name, **kwargs)

    def _pass_cache(self, kwargs: dict[str, Any]) -> Any:
        """Take the caller's cache out of ``kwargs`` under either name; None if there is none."""
        cache, legacy = kwargs.pop("cache", None), kwargs.pop("past_key_values", None)
        return cache if cache is not None else legacy

    def _prompt_forward(self, encoder: PromptEncoder, name: str, input_ids=None, inputs_embeds=None,
                        attention_mask=None, labels=None, position_ids=None, token_type_ids=None,
                        **kwargs: Any) -> Any:
        """Prepend the soft prompt at the input embeddings (M7)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds.")
        model = self.base_model
        cache = self._pass_cache(kwargs)
        if inputs_embeds is None:
            inputs_embeds = model.get_input_embeddings()(input_ids)
        batch, length = inputs_embeds.shape[:2]
        n = encoder.num_virtual_tokens(name)
        if attention_mask is None:
            past = 0 if cache is None else integrations.cache_length(cache) - n
            attention_mask = masks.full_mask(batch, past + length, inputs_embeds.device)
        attention_mask = masks.extend_attention_mask(attention_mask, n)
        if cache is None:  # first call: the prompt enters as the first N positions
            prompt = encoder(name, batch, inputs_embeds.dtype)
            inputs_embeds = torch.cat([prompt, inputs_embeds], dim=1)
            if labels is not None and masks.is_token_labels(labels, batch, length):
                labels = masks.extend_labels(labels, n)
            if token_type_ids is not None:
                token_type_ids = masks.extend_token_type_ids(token_type_ids, n)
            if position_ids is not None:
                position_ids = masks.extend_position_ids(position_ids, n)
            length += n
        else:
            kwargs[integrations.cache_argument(model)] = cache
            if position_ids is not None:
                position_ids = masks.shift_position_ids(position_ids, n)
        if integrations.accepts_argument(model, "position_ids"):
            kwargs["position_ids"] = (masks.position_ids(attention_mask, length)
                                      if position_ids is None else position_ids)
        if labels is not None:
            kwargs["labels"] = labels
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        return model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)

    def _prefix_forward(self, encoder: PrefixEncoder, name: str, input_ids=None, inputs_embeds=None,
                        attention_mask=None, position_ids=None, **kwargs: Any) -> Any:
        """Let every attention layer attend to the learned prefix (M11)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds.")
        model = self.base_model
        cache = self._pass_cache(kwargs)
        batch, length = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        prefix = encoder(name, batch, dtype if inputs_embeds is None else inputs_embeds.dtype)
        if integrations.native_prefix(model):
            # The model keeps the prefix out of its mask, cache and positions itself.
            if cache is not None:
                kwargs[integrations.cache_argument(model)] = cache
            return model(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                         position_ids=position_ids, prefix_key_values=prefix, **kwargs)
        n = encoder.num_virtual_tokens(name)
        if cache is None:
            cache = integrations.prefix_cache(prefix)
        if attention_mask is None:
            attention_mask = masks.full_mask(batch, integrations.cache_length(cache) - n + length,
                                             prefix[0][0].device)
        attention_mask = masks.extend_attention_mask(attention_mask, n)
        position_ids = (masks.position_ids(attention_mask, length) if position_ids is None
                        else masks.shift_position_ids(position_ids, n))
        kwargs[integrations.cache_argument(model)] = cache
        return model(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                     position_ids=position_ids, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """Generate with the active adapters; returns the input ids followed by the new ones.

        Without a prompt or prefix adapter this is the wrapped model's own ``generate``.
        With one, peftkit runs the loop itself (greedy, or sampling with ``temperature``,
        ``top_k``, ``top_p``), with the KV cache: the virtual tokens enter once, at the
        first step, and the mask grows by one column per step. Batches must be left-padded.
        """
        if self._active_input_adapter() is None:
            return self.base_model.generate(*args, **kwargs)
        if len(args) > 1:
            raise TypeError("pass generation settings by keyword; input_ids may be positional.")
        return self._generate_with_virtual_tokens(*args, **kwargs)

    @torch.no_grad()
    def _generate_with_virtual_tokens(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
        max_new_tokens: int | None = None, do_sample: bool = False, temperature: float = 1.0,
        top_k: int | None = None, top_p: float | None = None,
        eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
        **unsupported: Any,
    ) -> torch.Tensor:
        if unsupported:
            raise TypeError(
                f"generate() with a prompt or prefix adapter takes attention_mask, max_new_tokens, "
                f"do_sample, temperature, top_k, top_p, eos_token_id and pad_token_id; got "
                f"{sorted(unsupported)}."
            )
        defaults = getattr(self.base_model, "generation_config", None)
        if max_new_tokens is None:
            max_new_tokens = getattr(defaults, "max_new_tokens", None) or 20
        if eos_token_id is None:
            eos_token_id = getattr(defaults, "eos_token_id", None)
        eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id or [],
                           dtype=torch.long, device=input_ids.device)
        if pad_token_id is None:
            pad_token_id = getattr(defaults, "pad_token_id", None)
        if pad_token_id is None and len(eos):
            pad_token_id = int(eos[0])
        if attention_mask is None:
            attention_mask = masks.full_mask(*input_ids.shape, input_ids.device)
        if not bool(attention_mask[:, -1].all()):
            raise ValueError("generate() reads the next token from the last position, so batches must be "
                             "left-padded (some row ends in padding).")

        sequences, step_ids, cache = input_ids, input_ids, None
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for _ in range(max_new_tokens):
            output = self(input_ids=step_ids, attention_mask=attention_mask, past_key_values=cache,
                          use_cache=True)
            cache = integrations.output_cache(output)
            if cache is None:  # the next step would add the virtual tokens a second time
                raise TypeError(f"{type(self.base_model).__name__} returned no KV cache with use_cache=True; "
                                "peftkit's generate() needs one to add the prompt or prefix only once.")
            next_ids = _next_tokens(output.logits[:, -1, :].float(), do_sample, temperature, top_k, top_p)
            if len(eos):
                next_ids = torch.where(finished, torch.full_like(next_ids, pad_token_id), next_ids)
                finished |= torch.isin(next_ids, eos)
            sequences = torch.cat([sequences, next_ids[:, None]], dim=1)
            if bool(finished.all()):
                break
            step_ids = next_ids[:, None]
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], dim=1)
        return sequences

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

    # -- merging (M6) -------------------------------------------------------------
    def _lora_layers(self) -> list[LoraLayer]:
        return [m for _, m in adapter_modules(self.base_model) if isinstance(m, LoraLayer)]

    def _lora_layers_merged(self) -> bool:
        return any(layer.merged for layer in self._lora_layers())

    def _refuse_bottleneck_merge(self) -> None:
        bottleneck = [n for n in self.active_adapters if isinstance(self.configs[n], AdapterConfig)]
        if bottleneck:
            raise TypeError(
                f"bottleneck adapters cannot be folded into the weights (active: {bottleneck}): each "
                "adds h + up(act(down(h))), a nonlinear function that no weight matrix can absorb. "
                "Keep the adapter attached for inference (its cost is small), or use unload() to get "
                "the base model back without it."
            )

    def merge(self) -> None:
        """Fold the active LoRA adapters into the base weights (W ← W + s·B A)."""
        self._refuse_bottleneck_merge()
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
        self._refuse_bottleneck_merge()
        if self._active_input_adapter() is not None:
            raise TypeError(
                "a prompt or prefix adapter is active: it adds virtual tokens to every input rather "
                "than changing a weight, so the plain model cannot carry it. Keep the PeftModel for "
                "inference (merge() still folds any LoRA), or use unload() to drop it."
            )
        if not self._lora_layers_merged():
            self.merge()
        return self._unwrap_all(keep_trained_copies=True)

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
    def save(self, directory: str | Path, name: str | None = None) -> Path:
        """Write adapter ``name`` (default: the active one) as adapter_config.json +
        adapter_model.safetensors, adapter weights only, atomically."""
        from . import io

        return io.save_adapter(self, directory, name or self.active_adapter)

    def load_adapter(self, directory: str | Path, name: str = "default", trainable: bool = False) -> None:
        """Attach a saved adapter under ``name`` (checked against this model)."""
        from . import io

        io.load_adapter_into(self, directory, name, trainable=trainable)

    def _file_prefix(self, name: str) -> str:
        """Hugging Face PEFT's key prefix for modules of the wrapped model: its LoRA wraps
        the model one level deeper (``base_model.model.``) than its prompt learning does."""
        return "base_model." if isinstance(self.configs[name], INPUT_CONFIGS) else "base_model.model."

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """File key -> tensor for adapter ``name``, in Hugging Face PEFT's key layout."""
        tensors: dict[str, torch.Tensor] = {}
        for path, module in adapter_modules(self.base_model):
            if name in module.adapter_names:
                for local, tensor in module.adapter_state_dict(name).items():
                    tensors[f"{self._file_prefix(name)}{path}.{local}"] = tensor
        # A prompt or prefix sits outside the model: PEFT stores it under its bare key.
        for encoder in self.input_adapters.values():
            if name in encoder.adapter_names:
                tensors.update(encoder.adapter_state_dict(name))
        return tensors

    def load_adapter_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Copy file tensors (keys as in ``adapter_tensors``) into adapter ``name``."""
        for path, module in adapter_modules(self.base_model):
            if name in module.adapter_names:
                prefix = f"{self._file_prefix(name)}{path}."
                module.load_adapter_state_dict(
                    name, {k[len(prefix):]: t for k, t in tensors.items() if k.startswith(prefix)})
        for encoder in self.input_adapters.values():
            if name in encoder.adapter_names:
                encoder.load_adapter_state_dict(name, tensors)

    def saved_target_names(self, name: str) -> list[str]:
        """Module names to record in the adapter file so any loader picks the same layers."""
        return targets.minimal_names(self.base_model, self.target_paths[name])

    def uses_conv1d(self, name: str) -> bool:
        return any(integrations.is_conv1d(self.base_model.get_submodule(p).unwrap())
                   for p in self.target_paths[name])


def _next_tokens(logits: torch.Tensor, do_sample: bool, temperature: float,
                 top_k: int | None, top_p: float | None) -> torch.Tensor:
    """(B, V) logits -> (B,) ids: the argmax, or a draw from softmax(logits / temperature)
    restricted to the top_k tokens and to the smallest set whose probability reaches top_p."""
    if not do_sample:
        return logits.argmax(dim=-1)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}.")
    logits = logits / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        ordered, order = logits.sort(dim=-1, descending=True)
        # Drop a token when the tokens ranked above it already reach top_p (the first always stays).
        above = ordered.softmax(dim=-1).cumsum(dim=-1) - ordered.softmax(dim=-1)
        drop = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order, above >= top_p)
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1).squeeze(-1)


def attach(model: nn.Module, config: PeftConfig, name: str = "default") -> PeftModel:
    """Attach an adapter to ``model`` and freeze everything else.

    ``model`` may be a plain model (it is wrapped, in place) or a PeftModel (the adapter
    is added beside the existing ones and becomes the active one).
    """
    peft_model = model if isinstance(model, PeftModel) else PeftModel(model)
    peft_model.add_adapter(config, name)
    return peft_model
