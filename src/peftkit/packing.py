"""Sample packing (``peftkit train --pack``): several examples to a row, none seeing another.

Layout. The examples are packed once, in a seeded order, first-fit into rows of at most
``max_length`` tokens. A batch of rows, each right-padded to the longest row of the batch:

    input_ids     a0 a1 a2 b0 b1 b2 b3 p  p          (p: pad_id)
    position_ids  0  1  2  0  1  2  3  0  0          every example from 0; padding at 0
    labels        -  a1 a2 -  b1 b2 b3 -  -          (-: -100)

The position ids say where each example starts. Where the model has a variable-length path
(layout ``"positions"``), that is all it gets, with no ``attention_mask``: transformers finds
the blocks from ``position_ids`` when there is no mask and no cache (so a packed batch carries
``use_cache=False``: Llama, Qwen2 and GPT-2 make a cache whenever it is on, and packing would be
silently off) and attends causally within each example, never across; peftkit's reference
decoder does the same. A model whose attention ignores position ids (OPT builds its mask
without them) gets a 4D ``attention_mask`` (rows, 1, T, T) instead (layout ``"mask"``), which
transformers hands to the attention as it is: 0 where a query may look and the float32
minimum elsewhere, the additive form that eager and SDPA attention both take. Which layout a
model needs, or that it has neither, is found by running it (``packed_attention``). Every
padding token sits at position 0, so each is a segment of its own: it looks at nothing real,
nothing real looks at it, and a row that is mostly padding asks for no position past the
longest example.

The loss is the unpacked one. A causal LM's loss is the mean, over the label tokens, of
-log p(label_t | tokens before t of its example). Unpacked, the first token of an example is
never a target (nothing comes before it); packed, it would be predicted from the previous
example's last token, so its label is set to -100. Every other token is predicted from the
same context as unpacked (same tokens, same positions, nothing else visible), so the set of
(context, target) pairs, and with it the mean over them, is the same, and so is its gradient.
``train.accumulate_gradients`` weights micro-batches by their label tokens, so packed rows
split into any micro-batches give the mean over all of them again.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
from torch import nn

from . import registry
from .config import PeftConfig
from .data import IGNORE, DataError, Dataset, Example
from .precision import Precision
from .validate import positive_int

LAYOUTS = ("positions", "mask")  # packed attention: by position ids alone, or a 4D mask
_LEAK_SHARE = 0.25  # the probe: packed logits this close to the isolated ones, relative to a leak


class PackedBatch(dict):
    """A packed batch: the model's keyword arguments, and ``real_tokens``, its tokens that
    are not padding (with no padding mask, they cannot be counted from the batch)."""

    __slots__ = ("real_tokens",)

    def __init__(self, data: dict, real_tokens: int) -> None:
        super().__init__(data)
        self.real_tokens = real_tokens


def first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of ``lengths`` in rows of at most ``capacity``: each length, in order, goes to
    the first row it fits in (a new row when none has room). A max-tree over the rows' free
    space finds that row in O(log n)."""
    size = 1
    while size < len(lengths):
        size *= 2
    free = [capacity] * (2 * size)  # free[node]: the most room in any row under node; leaves are rows
    rows: list[list[int]] = []
    for index, length in enumerate(lengths):
        if length > capacity:
            raise ValueError(f"example {index} has {length} tokens, more than max_length={capacity}; "
                             "build the dataset with the max_length it is packed to.")
        node = 1
        while node < size:
            node = 2 * node if free[2 * node] >= length else 2 * node + 1
        row = node - size
        if row == len(rows):  # rows open left to right, so the first empty one is the next
            rows.append([])
        rows[row].append(index)
        free[node] -= length
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    return rows


def collate_packed(rows: Sequence[Sequence[Example]], pad_id: int, attention: str = "positions") -> PackedBatch:
    """The batch of ``rows``, each a list of causal examples: input_ids, position_ids and
    labels (R, T) with T the longest row, ``use_cache=False``, and with ``attention="mask"``
    the 4D block-diagonal ``attention_mask`` (R, 1, T, T); see the module docstring."""
    if attention not in LAYOUTS:
        raise ValueError(f"attention must be one of {LAYOUTS}, got {attention!r}.")
    used = [sum(len(e.input_ids) for e in row) for row in rows]
    length = max(used)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE, dtype=torch.long)
    positions = torch.empty((len(rows), length), dtype=torch.long)
    segments = torch.empty((len(rows), length), dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for s, example in enumerate(row):
            n = len(example.input_ids)
            ids[r, start:start + n] = torch.tensor(example.input_ids)
            labels[r, start + 1:start + n] = torch.tensor(example.labels[1:], dtype=torch.long)
            positions[r, start:start + n] = torch.arange(n)
            segments[r, start:start + n] = s
            start += n
        # Padding sits at position 0, each pad token a segment of its own: a row that is mostly
        # padding never asks for a position beyond the model's range.
        positions[r, start:] = 0
        segments[r, start:] = len(row) + torch.arange(length - start)
    batch = {"input_ids": ids, "position_ids": positions, "labels": labels, "use_cache": False}
    if attention == "mask":
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        allowed = (segments[:, :, None] == segments[:, None, :]) & causal
        mask = torch.zeros(allowed.shape, dtype=torch.float32).masked_fill_(~allowed, torch.finfo(torch.float32).min)
        batch["attention_mask"] = mask[:, None]
    return PackedBatch(batch, sum(used))


class PackedBatches:
    """Packed training batches with ``data.EpochBatches``' interface: ``len()`` is the batches
    of one epoch, ``at(k)`` the k-th batch of the run, counting across epochs.

    The examples are packed once (their order seeded by ``seed``, then ``first_fit``), so the
    number of rows, and ``len()``, stays the same every epoch; epoch e draws the rows in the
    order of a permutation seeded by (seed, e), ``batch_size`` rows to a batch. Everything is
    a function of the seed and the epoch, so a resumed run draws the batches the
    uninterrupted run would have. ``attention``: ``"positions"`` or ``"mask"``, what
    ``check_packable`` found the model needs.
    """

    def __init__(self, dataset: Dataset, batch_size: int, max_length: int, pad_id: int, seed: int = 0,
                 attention: str = "positions") -> None:
        positive_int("PackedBatches", "batch_size", batch_size)
        positive_int("PackedBatches", "max_length", max_length)
        if attention not in LAYOUTS:
            raise ValueError(f"attention must be one of {LAYOUTS}, got {attention!r}.")
        if not dataset.examples:
            raise DataError("there are no training examples to draw batches from.")
        if dataset.format == "classification":
            raise ValueError(_CLASSIFICATION)
        order = list(range(len(dataset.examples)))
        random.Random(seed).shuffle(order)
        rows = first_fit([len(dataset.examples[i].input_ids) for i in order], max_length)
        self.rows = [[dataset.examples[order[i]] for i in row] for row in rows]
        self.batch_size, self.max_length, self.pad_id, self.seed = batch_size, max_length, pad_id, seed
        self.attention = attention
        self._order: tuple[int, list[int]] | None = None  # (epoch, permutation of the rows), the last one drawn

    def __len__(self) -> int:
        return -(-len(self.rows) // self.batch_size)

    def order(self, epoch: int) -> list[int]:
        """The row indices of ``epoch`` in the order they are drawn."""
        if self._order is None or self._order[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order = (epoch, torch.randperm(len(self.rows), generator=generator).tolist())
        return self._order[1]

    def at(self, index: int) -> PackedBatch:
        epoch, position = divmod(index, len(self))
        picked = self.order(epoch)[position * self.batch_size:(position + 1) * self.batch_size]
        return collate_packed([self.rows[i] for i in picked], self.pad_id, self.attention)


_CLASSIFICATION = ("--pack packs causal-LM examples, but this is classification data ({\"text\", \"label\"}: "
                   "one label per example, read at its last token); train it without --pack.")


@torch.no_grad()
def packed_attention(model: nn.Module) -> str:
    """The packed layout under which ``model`` keeps examples apart: ``"positions"`` (its
    variable-length path, from position ids), else ``"mask"`` (a 4D mask); a ValueError when
    tokens leak across examples with both.

    Found by running it on a row of two short examples, a then b: b's logits must be those
    of b alone, to within a quarter of what a leak changes (b after a, causal over the whole
    row, positions restarting), so that rounding in half precision is no leak and a model
    that ignores the packing (its logits then equal the leak's) is refused.
    """
    vocab = model.get_input_embeddings().num_embeddings
    tokens = torch.randint(0, vocab, (7,), generator=torch.Generator().manual_seed(0)).tolist()
    a, b = Example(tokens[:3], tokens[:3]), Example(tokens[3:], tokens[3:])
    precision = Precision.of(model)
    was_training = model.training
    model.eval()
    found, problems = None, []
    try:
        def logits(**batch) -> torch.Tensor:
            with precision.autocast():
                return model(**precision.move(batch)).logits[0, -4:].float()

        alone = logits(input_ids=torch.tensor([b.input_ids]), use_cache=False)
        row = collate_packed([[a, b]], pad_id=0)
        leaked = logits(input_ids=row["input_ids"], position_ids=row["position_ids"],
                        attention_mask=torch.ones_like(row["input_ids"]), use_cache=False)
        leak = float((leaked - alone).abs().max())
        for layout in LAYOUTS:
            batch = dict(collate_packed([[a, b]], pad_id=0, attention=layout))
            del batch["labels"]
            try:
                error = float((logits(**batch) - alone).abs().max())
            except (TypeError, ValueError, RuntimeError) as e:  # the model takes no such arguments
                problems.append(f"{layout}: {type(e).__name__}: {e}")
                continue
            if error <= _LEAK_SHARE * leak:
                found = layout
                break
            problems.append(f"{layout}: the second example's logits moved by {error:.3g} (a leak moves them by "
                            f"{leak:.3g})")
    except (TypeError, ValueError, RuntimeError) as e:
        problems.append(f"{type(e).__name__}: {e}")
    finally:
        model.train(was_training)
    if found is None:
        raise ValueError(
            f"--pack needs attention that keeps packed examples apart, and {type(model).__name__} has none that "
            f"peftkit could find: neither restarting position ids nor a 4D block-diagonal mask stopped tokens "
            f"attending across examples ({'; '.join(problems)}). Train it without --pack.")
    return found


def check_packable(dataset: Dataset, config: PeftConfig, model: nn.Module) -> str:
    """Refuse what packing would get wrong, with the problem and the fix; return the
    model's packed layout (``packed_attention``) for ``PackedBatches(attention=...)``.

    Refused: classification data (one label per example); a method with virtual tokens
    (prompt, prefix: the whole row would share them, and they take its first positions);
    a model in which packed examples see each other."""
    if dataset.format == "classification":
        raise ValueError(_CLASSIFICATION)
    method = registry.method_for(config)
    if method.input_side:
        works = " and ".join(m.name for m in registry.METHODS if not m.input_side)
        raise ValueError(f"--pack works with {works}, not {method.label}: its virtual tokens would be shared by "
                         f"every example of a packed row and take the row's first positions. Train --method {method.name} "
                         "without --pack.")
    return packed_attention(model)
