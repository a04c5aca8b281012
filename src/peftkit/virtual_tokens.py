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

from . import integrations, masks
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
        cache = integrations.prefix_cache(model, prefix)
    if attention_mask is None:
        attention_mask = masks.full_mask(batch, integrations.cache_length(cache) - n + length,
                                         prefix[0][0].device)
    attention_mask = masks.extend_attention_mask(attention_mask, n)
    position_ids = (masks.position_ids(attention_mask, length) if position_ids is None
                    else masks.shift_position_ids(position_ids, n))
    kwargs[integrations.cache_argument(model)] = cache
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
        output = peft_model(input_ids=step_ids, attention_mask=attention_mask, past_key_values=cache,
                      use_cache=True)
        cache = integrations.output_cache(output)
        if cache is None:  # the next step would add the virtual tokens a second time
            raise TypeError(f"{type(peft_model.base_model).__name__} returned no KV cache with use_cache=True; "
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


