"""How each method is put on a model: one attacher per method, named by its registry record.

An attacher takes the ``PeftModel`` being built, the method's config, the adapter's name and
the paths of the modules this adapter trains in full, puts the adapter's modules in place,
and returns the paths it adapted (none for the input-side methods, which replace no layer).
It never changes which parameters train: ``PeftModel`` derives that from the protocol after
every change (M1).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from . import integrations, sites, targets
from .config import AdapterConfig, LoraConfig, PrefixConfig, PromptConfig
from .methods.adapter import AdapterWrapper
from .methods.lora import LoraLayer
from .methods.prefix import PrefixEncoder
from .methods.prompt import PromptEncoder, init_token_ids, initial_prompt


def attach_lora(peft_model: Any, config: LoraConfig, name: str, trained_in_full: list[str]) -> list[str]:
    """Wrap every targeted layer (or add to its existing LoRA wrapper) outside the modules
    ``trained_in_full``; return their paths."""
    model = peft_model.base_model
    chosen = targets.find_targets(model, config.target_modules, trained_in_full)
    targets.check_rank(chosen, config.r)
    for target in chosen:
        layer = model.get_submodule(target.path)
        if not isinstance(layer, LoraLayer):
            layer = target.wrap(layer)
            model.set_submodule(target.path, layer)
        layer.add_adapter(name, config.r, config.alpha, config.dropout, config.use_rslora,
                          train_bias=config.bias == "lora_only")
    return [t.path for t in chosen]


def attach_bottleneck(peft_model: Any, config: AdapterConfig, name: str, trained_in_full: list[str]) -> list[str]:
    """Put a bottleneck adapter at every site of ``config.placement``; return their paths."""
    model = peft_model.base_model
    found = sites.adapter_sites(model, config)
    for site in found:
        wrapper = model.get_submodule(site.path)
        if not isinstance(wrapper, AdapterWrapper):
            wrapper = AdapterWrapper(wrapper)
            model.set_submodule(site.path, wrapper)
        wrapper.add_adapter(name, site.width, config.bottleneck, mode=site.mode,
                            activation=config.activation, dropout=config.dropout,
                            scaling=config.scaling)
    return [site.path for site in found]


def attach_prompt(peft_model: Any, config: PromptConfig, name: str, trained_in_full: list[str]) -> list[str]:
    """Learn N embeddings that are prepended to the input embeddings (M7)."""
    model = peft_model.base_model
    _check_input_side_supported(model, "prompt tuning")
    if not integrations.accepts_argument(model, "inputs_embeds"):
        raise ValueError(f"prompt tuning feeds embeddings, but {type(model).__name__}.forward "
                         "takes no inputs_embeds.")
    init = initial_prompt(config, model.get_input_embeddings())
    encoders = peft_model.input_adapters
    if "prompt" not in encoders:
        encoders["prompt"] = PromptEncoder(init.shape[1])
    encoders["prompt"].add_adapter(name, init)
    return []


def default_prefix_init(model: nn.Module) -> str:
    """How a prefix starts when its config leaves ``init`` open: ``"random"`` (N(0, 1)) on a
    sequence classifier, whose head is new anyway, else ``"vocab"`` (the model's own keys and
    values of vocabulary tokens), so that a language model's first outputs stay its own.
    PrefixConfig's docstring gives the reasons."""
    return "random" if integrations.is_sequence_classifier(model) else "vocab"


def attach_prefix(peft_model: Any, config: PrefixConfig, name: str, trained_in_full: list[str]) -> list[str]:
    """Learn N keys and values per attention layer (M11). ``config.init`` must be decided
    (``PeftModel.add_adapter`` fills it in with ``default_prefix_init``)."""
    model = peft_model.base_model
    _check_input_side_supported(model, "prefix tuning")
    if integrations.cache_argument(model) is None:
        raise ValueError(
            f"prefix tuning hands the prefix to the model as the start of its KV cache, but "
            f"{type(model).__name__}.forward takes no cache (cache / past_key_values)."
        )
    encoders = peft_model.input_adapters
    if "prefix" not in encoders:
        encoders["prefix"] = PrefixEncoder(*integrations.attention_geometry(model))
    device = next(model.parameters()).device
    ids = init_token_ids(config, model.get_input_embeddings().num_embeddings)
    # Li & Liang's init from real words: the keys and values the model gives those tokens.
    initial = None if ids is None else integrations.token_key_values(model, ids.to(device)[None])
    encoders["prefix"].add_adapter(name, config.num_virtual_tokens, config.projection_dim, device, initial)
    return []


def _check_input_side_supported(model: nn.Module, method: str) -> None:
    if integrations.is_encoder_decoder(model):
        raise ValueError(f"peftkit's {method} supports decoder-only and encoder-only models; "
                         f"{type(model).__name__} is an encoder-decoder.")
