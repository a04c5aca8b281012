"""What the doctor reads from a training batch: its labels, beside the attention mask and the
input ids they go with (``BatchLabels``), for the data checks D1-D4.

Only a batch given as a dict with a ``labels`` tensor of integer token labels, one row per
example, has labels to read; classification labels (one per row) and float targets are
left alone. Whether the labels are the input's own tokens (a language model's) is found by
comparing them with ``input_ids``, never assumed: token-classification or masked-LM labels
are not, and the checks that only make sense for a language model (D3, D4) skip them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..masks import IGNORE_INDEX as IGNORE  # the label the loss leaves out (cross_entropy's ignore_index)

_AGREEMENT = 0.9  # share of trained labels that must equal the input's tokens to be a language model's


@dataclass
class BatchLabels:
    """A batch's labels (rows, tokens), on the CPU, with what they go with.

    ``mask`` is the attention mask (True: a real token) and ``ids`` the input ids, each only
    when given with the labels' shape. ``shift`` says how labels relate to the input: 0 when
    ``labels[t] == ids[t]`` (transformers' causal LMs, which shift inside the loss), 1 when
    ``labels[t] == ids[t + 1]`` (shifted by the data), None when they are no input tokens (or
    no input ids came with them).
    """

    labels: Tensor
    mask: Tensor | None
    ids: Tensor | None
    shift: int | None

    @property
    def labelled(self) -> Tensor:
        """Where a label is set (not -100), bool (rows, tokens)."""
        return self.labels != IGNORE

    @property
    def learned(self) -> Tensor:
        """Where a label enters the loss: set, and not the first position when the model
        shifts (a causal LM predicts token t from the tokens before it, so label 0 is
        never used)."""
        learned = self.labelled.clone()
        if self.shift == 0:
            learned[:, 0] = False
        return learned

    @property
    def language_model(self) -> bool:
        return self.shift is not None


def read_labels(batch: Any, notes: list[str]) -> BatchLabels | None:
    """The batch's token labels, or None (with a note when a batch was given whose labels
    cannot be read)."""
    if batch is None:
        return None
    if not isinstance(batch, Mapping):
        notes.append("D1-D4 not checked: the batch is not a dict, so its labels cannot be told from its inputs.")
        return None
    labels = batch.get("labels")
    if not isinstance(labels, Tensor):
        notes.append("D1-D4 not checked: the batch has no labels tensor (pass labels=... to check what the "
                     "loss is on).")
        return None
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool or labels.dim() != 2:
        return None  # one class per row, or regression / multi-label targets: no token labels
    labels = labels.detach().to("cpu", torch.long)
    mask, ids = (_alongside(batch.get(key), labels) for key in ("attention_mask", "input_ids"))
    return BatchLabels(labels, None if mask is None else mask != 0, ids, _shift(labels, ids))


def _alongside(value: Any, labels: Tensor) -> Tensor | None:
    """``value`` as a CPU integer tensor when it is one of the labels' shape (a 4-D mask, or
    a mask extended for a prompt, is not read)."""
    if not isinstance(value, Tensor) or value.shape != labels.shape:
        return None
    return value.detach().to("cpu", torch.long)


def _shift(labels: Tensor, ids: Tensor | None) -> int | None:
    """0 or 1 when (nearly) every set label is the input's token at that offset, else None."""
    if ids is None:
        return None
    for shift in (0, 1):
        at = labels[:, :labels.shape[1] - shift] if shift else labels
        tokens = ids[:, shift:]
        set_ = at != IGNORE
        if set_.any() and float((at[set_] == tokens[set_]).float().mean()) >= _AGREEMENT:
            return shift
    return None
