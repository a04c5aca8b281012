"""The one place where attention masks, labels and positions are extended (M7, M11).

Prompt and prefix tuning put N virtual tokens in front of every row. Everything a model
reads about positions then has to agree on where those N tokens sit, and getting any one
of them wrong is silent: the model still runs, it just attends to padding, loses the
prefix, or places a padded row somewhere it never was during training. So the rules live
here, once, as pure functions on tensors:

- the virtual tokens are always attendable: N leading ones in the 2-D attention mask;
  padding stays 0, and causality among the real tokens is left to the model, which
  builds it from this mask as usual;
- labels get N leading -100s, so the loss never scores a virtual position;
- positions come from the mask: each row counts only its real tokens (after the N
  virtual ones), so a padded row is placed exactly as it would be alone, with left or
  right padding. Without padding this is Hugging Face PEFT's numbering (virtual tokens
  0..N-1, real tokens from N), so adapters trained with PEFT reproduce exactly.

Shapes: B = batch, T = tokens in this call, S = every token the mask covers.
"""

from __future__ import annotations

import torch
from torch import Tensor

IGNORE_INDEX = -100
"""The label that cross-entropy skips (PyTorch's and Hugging Face's default)."""


def extend_attention_mask(attention_mask: Tensor, num_virtual: int) -> Tensor:
    """(B, S) -> (B, N + S): N leading ones, so every query may attend to the virtual
    tokens; padding in the real part stays masked."""
    ones = attention_mask.new_ones(attention_mask.shape[0], num_virtual)
    return torch.cat([ones, attention_mask], dim=1)


def extend_labels(labels: Tensor, num_virtual: int) -> Tensor:
    """(B, T) token labels -> (B, N + T) with -100 on the N virtual positions."""
    ignored = labels.new_full((labels.shape[0], num_virtual), IGNORE_INDEX)
    return torch.cat([ignored, labels], dim=1)


def extend_token_type_ids(token_type_ids: Tensor, num_virtual: int) -> Tensor:
    """(B, T) -> (B, N + T): the virtual tokens belong to the first segment (type 0)."""
    zeros = token_type_ids.new_zeros(token_type_ids.shape[0], num_virtual)
    return torch.cat([zeros, token_type_ids], dim=1)


def is_token_labels(labels: Tensor, batch: int, length: int) -> bool:
    """True for one integer label per input token, (B, T), as causal-LM and token
    classification use; False for sequence labels ((B,) class ids, float targets), which
    do not grow with the input."""
    return (
        labels.dim() == 2
        and tuple(labels.shape) == (batch, length)
        and not labels.is_floating_point()
    )


def position_ids(attention_mask: Tensor, length: int) -> Tensor:
    """Positions (B, length) of the last ``length`` columns of a (B, S) mask: each row
    counts its own attendable tokens, ``cumsum(mask) - 1``, clamped at 0.

    With the N virtual tokens at the front of the mask, a row's real tokens get N, N+1,
    ... whatever padding precedes them; padding positions get a harmless repeated value
    (they are masked out).
    """
    positions = attention_mask.long().cumsum(dim=-1) - 1
    return positions.clamp(min=0)[:, -length:]


def shift_position_ids(position_ids: Tensor, num_virtual: int) -> Tensor:
    """Caller-given positions (B, T) of real tokens, moved behind the N virtual ones
    (PEFT adds N to a prefix model's position_ids the same way)."""
    return position_ids + num_virtual


def extend_position_ids(position_ids: Tensor, num_virtual: int) -> Tensor:
    """Caller-given positions (B, T) -> (B, N + T): 0..N-1 for a prompt, then the given
    positions moved behind it."""
    prompt = torch.arange(num_virtual, device=position_ids.device, dtype=position_ids.dtype)
    prompt = prompt.expand(position_ids.shape[0], num_virtual)
    return torch.cat([prompt, shift_position_ids(position_ids, num_virtual)], dim=1)


def full_mask(batch: int, length: int, device: torch.device) -> Tensor:
    """The mask of an unpadded batch: every one of ``length`` tokens is real."""
    return torch.ones(batch, length, dtype=torch.long, device=device)


__all__ = [
    "IGNORE_INDEX", "extend_attention_mask", "extend_labels", "extend_position_ids",
    "extend_token_type_ids", "full_mask", "is_token_labels", "position_ids", "shift_position_ids",
]
