"""Prompt and prefix tuning at call time: the call rewritten around the virtual tokens, and
the generate loop that feeds them once through the KV cache.

With a prompt or prefix adapter active, ``PeftModel.forward`` hands the call here. The
caller's ``attention_mask`` (B, P + T) covers their own tokens only, past and current,
never the virtual ones; it is extended here, as are token labels (-100 on the prompt) and
positions, with the rules of ``peftkit.masks``, so that a padded row is placed as if it were
alone. A cache passed in (``past_key_values`` or ``cache``) must come from an earlier call
of the same model: it then already holds the virtual tokens, which are not added again. As
in Hugging Face PEFT, prompt tuning's outputs cover N + T positions, the prompt's first;
prefix tuning's cover T.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import checkpointing, generation, integrations, masks
from .methods.prefix import PrefixEncoder
from .methods.prompt import PromptEncoder


def forward(model: nn.Module, encoder: PromptEncoder | PrefixEncoder, name: str, args: tuple,
            kwargs: dict[str, Any]) -> Any:
    """Run ``model`` with the virtual tokens of adapter ``name`` of ``encoder``."""
    if len(args) > 1 or (args and "input_ids" in kwargs):
        raise TypeError("with a prompt or prefix adapter active, pass inputs by keyword "
                        "(input_ids may be the one positional argument).")
    if args:
        kwargs["input_ids"] = args[0]
    if isinstance(encoder, PromptEncoder):
        return prompt_forward(model, encoder, name, **kwargs)
    return prefix_forward(model, encoder, name, **kwargs)


def _take_cache(kwargs: dict[str, Any]) -> Any:
    """Take the caller's cache out of ``kwargs`` under either name; None if there is none."""
    cache, legacy = kwargs.pop("cache", None), kwargs.pop("past_key_values", None)
    return cache if cache is not None else legacy


def prompt_forward(model: nn.Module, encoder: PromptEncoder, name: str, input_ids=None, inputs_embeds=None,
                    attention_mask=None, labels=None, position_ids=None, token_type_ids=None,
                    **kwargs: Any) -> Any:
    """Prepend the soft prompt at the input embeddings (M7)."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids or inputs_embeds.")
    cache = _take_cache(kwargs)
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



def prefix_forward(model: nn.Module, encoder: PrefixEncoder, name: str, input_ids=None, inputs_embeds=None,
                    attention_mask=None, position_ids=None, **kwargs: Any) -> Any:
    """Let every attention layer attend to the learned prefix (M11)."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids or inputs_embeds.")
    cache = _take_cache(kwargs)
    batch, length = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    prefix = encoder(name, batch, dtype if inputs_embeds is None else inputs_embeds.dtype)
    n = encoder.num_virtual_tokens(name)
    if cache is None:
        # Under checkpointed training a read-only cache, which transformers lets a layer keep.
        cache = checkpointing.prefix_cache(model, prefix)
        if cache is None:
            cache = integrations.prefix_cache(model, prefix)
    if attention_mask is None:
        attention_mask = masks.full_mask(batch, integrations.cache_length(cache) - n + length,
                                         prefix[0][0].device)
    attention_mask = masks.extend_attention_mask(attention_mask, n)
    position_ids = (masks.position_ids(attention_mask, length) if position_ids is None
                    else masks.shift_position_ids(position_ids, n))
    kwargs[integrations.cache_argument(model)] = cache
    with checkpointing.keeping_prefix(model, cache):
        return model(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                     position_ids=position_ids, **kwargs)



@torch.no_grad()
def generate(
    peft_model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
    max_new_tokens: int | None = None, do_sample: bool = False, temperature: float = 1.0,
    top_k: int | None = None, top_p: float | None = None,
    eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
    **unsupported: Any,
) -> torch.Tensor:
    """``generate`` with the active prompt or prefix: the settings a transformers model's
    ``generation_config`` gives where the call gives none, then ``generation.decode``."""
    if unsupported:
        raise TypeError(
            f"generate() with a prompt or prefix adapter takes attention_mask, max_new_tokens, "
            f"do_sample, temperature, top_k, top_p, eos_token_id and pad_token_id; got "
            f"{sorted(unsupported)}."
        )
    defaults = getattr(peft_model.base_model, "generation_config", None)
    if max_new_tokens is None:
        max_new_tokens = getattr(defaults, "max_new_tokens", None) or 20
    if eos_token_id is None:
        eos_token_id = getattr(defaults, "eos_token_id", None)
    if pad_token_id is None:
        pad_token_id = getattr(defaults, "pad_token_id", None)
    eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    return generation.decode(peft_model, input_ids, attention_mask, max_new_tokens=max_new_tokens,
                             do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                             eos_ids=eos, pad_token_id=pad_token_id)
