"""The token-by-token decoding loop for the models that peftkit runs itself: the reference
decoder, and any model with a prompt or prefix adapter (whose virtual tokens must enter the
KV cache once, which a transformers ``generate`` cannot know).

The model is called as a Hugging Face causal LM: ``model(input_ids=(B, t), attention_mask=
(B, P + t), past_key_values=cache, use_cache=True)`` returning ``logits`` (B, t, V) and a
cache. The first call reads the whole prompt (t = T), each later one the last new token
(t = 1). The next token is read from the last position, so batches must be left-padded.
"""

from __future__ import annotations

import torch
from torch import nn

from . import integrations, masks


def next_tokens(logits: torch.Tensor, do_sample: bool, temperature: float,
                top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """(B, V) logits -> (B,) ids: the argmax, or a draw from softmax(logits / temperature)
    restricted to the top_k tokens and to the smallest set whose probability reaches top_p."""
    if not do_sample:
        return logits.argmax(dim=-1)
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


@torch.no_grad()
def decode(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, *,
           max_new_tokens: int, do_sample: bool = False, temperature: float = 1.0,
           top_k: int | None = None, top_p: float | None = None,
           eos_ids: list[int] | tuple[int, ...] = (), pad_token_id: int | None = None) -> torch.Tensor:
    """Extend each row of ``input_ids`` (B, T) by up to ``max_new_tokens`` tokens; return the
    prompt plus the new tokens, (B, T + new). Once a row emits one of ``eos_ids`` it is filled
    with ``pad_token_id`` (default: the first eos id), and the loop stops early when every
    row has finished."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}.")
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}.")
    if attention_mask is None:
        attention_mask = masks.full_mask(*input_ids.shape, input_ids.device)
    if not bool(attention_mask[:, -1].all()):
        raise ValueError("generate() reads the next token from the last position, so batches must be "
                         "left-padded; some row ends in padding (tokenizer.padding_side = 'left' gives left padding).")
    eos = torch.tensor(list(eos_ids), dtype=torch.long, device=input_ids.device)
    if pad_token_id is None and len(eos):
        pad_token_id = int(eos[0])

    sequences = step_ids = input_ids.long()
    cache = None
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for _ in range(max_new_tokens):
        output = model(input_ids=step_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True)
        cache = integrations.output_cache(output)
        if cache is None:  # without one, each step would rerun (and re-add) everything before it
            raise TypeError(f"{type(model).__name__} returned no KV cache with use_cache=True; "
                            "peftkit's generate() needs one.")
        ids = next_tokens(output.logits[:, -1, :].float(), do_sample, temperature, top_k, top_p)
        if len(eos):
            ids = torch.where(finished, torch.full_like(ids, pad_token_id), ids)
            finished |= torch.isin(ids, eos)
        sequences = torch.cat([sequences, ids[:, None]], dim=1)
        if bool(finished.all()):
            break
        step_ids = ids[:, None]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], dim=1)
    return sequences
