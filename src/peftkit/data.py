"""Training data from JSONL files: four line formats, checked line by line.

One JSON object per line, all lines of one format:

- ``{"text": ...}``                      causal language modelling on the whole text;
- ``{"prompt": ..., "completion": ...}`` loss on the completion only (prompt labels -100);
- ``{"text": ..., "label": ...}``        sequence classification (label: string or int);
- ``{"input_ids": [...], "labels": [...]?}`` pre-tokenized (labels default to input_ids).

Errors name the file and line and say how to fix it; nothing is half-loaded.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

FORMATS = {
    "text": ("text",),
    "completion": ("prompt", "completion"),
    "classification": ("text", "label"),
    "tokens": ("input_ids",),
}
_OPTIONAL = {"tokens": ("labels",)}


class DataError(ValueError):
    """A data file that cannot be used as it is."""


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int] | int  # token labels (causal LM) or one class id


@dataclass
class Dataset:
    format: str
    examples: list[Example]
    classes: list[str] = field(default_factory=list)  # classification only

    def __len__(self) -> int:
        return len(self.examples)


def _line_format(obj: dict, where: str) -> str:
    keys = set(obj)
    for name, required in FORMATS.items():
        allowed = set(required) | set(_OPTIONAL.get(name, ()))
        if set(required) <= keys and keys <= allowed:
            return name
    raise DataError(
        f"{where}: keys {sorted(keys)} match no format; use one of "
        + ", ".join("{" + ", ".join(f'"{k}"' for k in req) + "}" for req in FORMATS.values())
    )


def read_jsonl(path: str | Path) -> tuple[str, list[dict]]:
    """Parse ``path``; return the format shared by all lines and the raw records."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist.")
    records, fmt = [], None
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {number}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where} is not valid JSON ({e.msg} at column {e.colno}).") from e
            if not isinstance(obj, dict):
                raise DataError(f"{where} must be a JSON object, got {type(obj).__name__}.")
            line_fmt = _line_format(obj, where)
            if fmt is None:
                fmt, first = line_fmt, number
            elif line_fmt != fmt:
                raise DataError(
                    f"{where} is in the {line_fmt!r} format but line {first} set {fmt!r}; "
                    "a file holds one format only."
                )
            records.append(obj)
    if not records:
        raise DataError(f"data file {path} holds no examples.")
    return fmt, records


def build_dataset(fmt: str, records: list[dict], encode: Callable[[str], list[int]], *,
                  eos_id: int | None, max_length: int, classes: Sequence[str] | None = None) -> Dataset:
    """Tokenize records. ``encode`` maps text to ids (with the model's BOS if it uses one);
    causal examples end with ``eos_id`` so the model learns to stop."""
    end = [] if eos_id is None else [eos_id]
    examples = []
    if fmt == "classification":
        found = sorted({str(r["label"]) for r in records})
        classes = list(classes) if classes is not None else found
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise DataError(f"labels {unknown} are not among the classes {classes}; add them or fix the data.")
        index = {c: i for i, c in enumerate(classes)}
        examples = [Example(encode(r["text"])[:max_length], index[str(r["label"])]) for r in records]
        return Dataset(fmt, examples, classes)
    for r in records:
        if fmt == "text":
            ids = (encode(r["text"]) + end)[:max_length]
            examples.append(Example(ids, list(ids)))
        elif fmt == "completion":
            prompt, completion = encode(r["prompt"]), _encode_continuation(encode, r["completion"]) + end
            ids = (prompt + completion)[:max_length]
            labels = ([-100] * len(prompt) + completion)[:max_length]
            examples.append(Example(ids, labels))
        else:
            ids = [int(t) for t in r["input_ids"]][:max_length]
            labels = [int(t) for t in r.get("labels", ids)][:max_length]
            if len(labels) != len(ids):
                raise DataError(f"a pre-tokenized line has {len(ids)} input_ids but {len(labels)} labels.")
            examples.append(Example(ids, labels))
    return Dataset(fmt, examples)


def _encode_continuation(encode: Callable[[str], list[int]], text: str) -> list[int]:
    # The completion continues the prompt, so it must not get a second BOS token.
    ids = encode(text)
    bos = encode("")
    return ids[len(bos):] if bos and ids[:len(bos)] == bos else ids


def split(dataset: Dataset, eval_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """A seeded held-out split; at least one example on each side when there are two."""
    order = list(range(len(dataset)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(eval_fraction * len(order))) if len(order) > 1 and eval_fraction > 0 else 0
    pick = lambda idx: Dataset(dataset.format, [dataset.examples[i] for i in idx], dataset.classes)  # noqa: E731
    return pick(order[n_eval:]), pick(order[:n_eval])


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask and labels (-100 on padding)."""
    length = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    classification = isinstance(examples[0].labels, int)
    labels = (torch.tensor([e.labels for e in examples]) if classification
              else torch.full((len(examples), length), -100, dtype=torch.long))
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        mask[row, :n] = 1
        if not classification:
            labels[row, :n] = torch.tensor(e.labels)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def batches(dataset: Dataset, batch_size: int, pad_id: int, *, shuffle: bool, seed: int = 0) -> list[dict]:
    order = list(range(len(dataset)))
    if shuffle:
        random.Random(seed).shuffle(order)
    return [collate([dataset.examples[i] for i in order[k:k + batch_size]], pad_id)
            for k in range(0, len(order), batch_size)]
