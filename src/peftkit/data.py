"""Training data from JSONL files: seven line formats, checked line by line.

One JSON object per line, all lines of one format:

- ``{"messages": [{"role", "content"}, ...]}``, ShareGPT ``{"conversations": [{"from", "value"}, ...]}``
  and Alpaca ``{"instruction", "input"?, "output"}``: conversations, rendered with the
  tokenizer's chat template, the loss on the assistant's turns (``chat``); other keys on
  such a line (an id, a source) are ignored;
- ``{"text": ...}``                      causal language modelling on the whole text;
- ``{"prompt": ..., "completion": ...}`` loss on the completion only (prompt labels -100);
- ``{"text": ..., "label": ...}``        sequence classification (label: string or int);
- ``{"input_ids": [...], "labels": [...]?}`` pre-tokenized (labels default to input_ids).

Errors name the file and line and say how to fix it; nothing is half-loaded. A file is
UTF-8, with or without a byte-order mark. An example left with no label to learn from
(a prompt that fills ``max_length``, empty ``input_ids``, labels all -100) is left out with
a warning, and counted on the dataset; a file with no example left is an error.
"""

from __future__ import annotations

import json
import random
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .chat import CHAT_FORMATS, ChatError, ChatRenderer, conversation
from .validate import positive_int

FORMATS = {
    "text": ("text",),
    "completion": ("prompt", "completion"),
    "classification": ("text", "label"),
    "tokens": ("input_ids",),
    **{name: required for name, (required, _) in CHAT_FORMATS.items()},
}
_OPTIONAL = {"tokens": ("labels",), **{name: optional for name, (_, optional) in CHAT_FORMATS.items()}}
IGNORE = -100  # a label left out of the loss
_SHOWN = 5  # dropped examples named in a message


class DataError(ValueError):
    """A data file that cannot be used as it is."""


class UnknownClassError(DataError):
    """Classification labels outside the classes given to ``build_dataset``."""


class Record(dict):
    """One line of a data file, as its JSON object, remembering where it was read so that
    later errors can name the line."""

    __slots__ = ("path", "line")

    def __init__(self, data: dict, path: Path, line: int) -> None:
        super().__init__(data)
        self.path, self.line = path, line

    @property
    def where(self) -> str:
        return f"{self.path}, line {self.line}"


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int] | int  # token labels (causal LM) or one class id


@dataclass
class Dataset:
    format: str
    examples: list[Example]
    classes: list[str] = field(default_factory=list)  # classification only
    dropped_where: list[str] = field(default_factory=list)  # left out: "where: why", in file order
    chat_template: str | None = None  # the template conversations were rendered with (saved with the adapter)

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def dropped(self) -> int:
        """How many examples were left out because no label was left to learn from."""
        return len(self.dropped_where)


def _json_type(value: Any) -> str:
    """``value`` as JSON names it, with the value itself, for messages."""
    kind = ("null" if value is None else "a boolean" if isinstance(value, bool) else
            "a number" if isinstance(value, (int, float)) else "a string" if isinstance(value, str) else
            "an array" if isinstance(value, list) else "an object")
    if value is None:
        return kind
    shown = json.dumps(value, ensure_ascii=False)
    return f"{kind} ({shown[:40] + '...' if len(shown) > 40 else shown})"


def _token_ids(obj: dict, key: str, where: str, *, labels: bool = False) -> None:
    values = obj[key]
    if not isinstance(values, list):
        raise DataError(f'{where}: "{key}" must be an array of integer token ids, got {_json_type(values)}.')
    for i, t in enumerate(values):
        if isinstance(t, bool) or not isinstance(t, int):
            raise DataError(f'{where}: "{key}"[{i}] must be an integer token id, got {_json_type(t)}.')
        if t < 0 and not (labels and t == IGNORE):
            allowed = " (or -100 to leave the position out of the loss)" if labels else ""
            raise DataError(f'{where}: "{key}"[{i}] is {t}; a token id is 0 or more{allowed}.')


def _check_fields(obj: dict, fmt: str, where: str) -> None:
    """The JSON types of a record of format ``fmt``: DataError naming the field and the type."""
    missing = [k for k in FORMATS[fmt] if k not in obj]
    if missing:
        raise DataError(f"{where}: the {fmt!r} format needs the keys {list(FORMATS[fmt])}; {missing} missing.")
    if fmt in CHAT_FORMATS:
        try:
            conversation(obj, fmt, where)
        except ChatError as e:
            raise DataError(str(e)) from None
        return
    if fmt == "tokens":
        _token_ids(obj, "input_ids", where)
        if "labels" in obj:
            _token_ids(obj, "labels", where, labels=True)
            if len(obj["labels"]) != len(obj["input_ids"]):
                raise DataError(f'{where}: "labels" has {len(obj["labels"])} entries but "input_ids" has '
                                f'{len(obj["input_ids"])}; give one label per token (-100 to skip one).')
        return
    for key in ("text", "prompt", "completion"):
        if key in obj and not isinstance(obj[key], str):
            raise DataError(f'{where}: "{key}" must be a string, got {_json_type(obj[key])}.')
    label = obj.get("label", "")
    if isinstance(label, bool) or not isinstance(label, (str, int)):
        raise DataError(f'{where}: "label" must be a string or an integer (the class), got {_json_type(label)}.')


def _line_format(obj: dict, where: str) -> str:
    keys = set(obj)
    for name, required in FORMATS.items():
        allowed = set(required) | set(_OPTIONAL.get(name, ()))
        # Chat data sets carry extra keys (an id, a source, a score): a conversation ignores them.
        if set(required) <= keys and (keys <= allowed or name in CHAT_FORMATS):
            return name
    raise DataError(
        f"{where}: keys {sorted(keys)} match no format; use one of "
        + ", ".join("{" + ", ".join(f'"{k}"' for k in req) + "}" for req in FORMATS.values())
    )


def _decode(raw: bytes, where: str) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where} is not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                        "save the file as UTF-8.") from e
    # A byte-order mark, as some Windows tools write one (at the start of each file they join).
    return text.removeprefix("\ufeff")


def read_jsonl(path: str | Path) -> tuple[str, list[Record]]:
    """Parse ``path``; return the format shared by all lines and the records, each checked
    for the keys and JSON types of that format."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist.")
    records, fmt, first = [], None, 0
    try:
        with path.open("rb") as f:  # bytes: a decoding error is then reported by line
            lines = list(f)
    except OSError as e:
        raise DataError(f"cannot read data file {path} ({e.strerror}).") from e
    for number, raw in enumerate(lines, start=1):
        where = f"{path}, line {number}"
        line = _decode(raw, where)
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where} is not valid JSON ({e.msg} at column {e.colno}).") from e
        if not isinstance(obj, dict):
            raise DataError(f"{where} must be a JSON object, got {_json_type(obj)}.")
        line_fmt = _line_format(obj, where)
        if fmt is None:
            fmt, first = line_fmt, number
        elif line_fmt != fmt:
            raise DataError(
                f"{where} is in the {line_fmt!r} format but line {first} set {fmt!r}; "
                "a file holds one format only."
            )
        _check_fields(obj, line_fmt, where)
        records.append(Record(obj, path, number))
    if not records:
        raise DataError(f"data file {path} holds no examples.")
    return fmt, records


def build_dataset(fmt: str, records: Sequence[dict], encode: Callable[[str], list[int]], *,
                  eos_id: int | None, max_length: int, classes: Sequence[str] | None = None,
                  vocab_size: int | None = None, tokenizer: Any = None, train_on: str = "assistant",
                  source: str = "the model") -> Dataset:
    """Tokenize records. ``encode`` maps text to ids (with the model's BOS if it uses one);
    ``{text}`` and ``{prompt, completion}`` examples end with ``eos_id`` (None: no EOS) so
    the model learns to stop. Conversations are rendered with ``tokenizer``'s chat template
    (``chat.ChatRenderer``; ``train_on`` picks the trained turns; ``source`` names the model
    in errors) and end with the template's own end-of-turn token.

    ``vocab_size`` (the model's, ``LoadedModel.vocab_size``) refuses token ids the model has
    no embedding for. An example with no label left to predict (see the module docstring)
    is left out with a warning and listed in ``Dataset.dropped_where``.
    """
    positive_int("build_dataset", "max_length", max_length)
    if vocab_size is not None:
        positive_int("build_dataset", "vocab_size", vocab_size)
    wheres = [getattr(r, "where", f"record {i + 1}") for i, r in enumerate(records)]
    for r, where in zip(records, wheres):
        if not isinstance(r, Record):  # a Record was checked when its line was read
            _check_fields(r, fmt, where)
    if fmt == "classification":
        found = sorted({str(r["label"]) for r in records})
        classes = list(classes) if classes is not None else found
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise UnknownClassError(f"labels {unknown} are not among the classes {classes}; add them or fix the data.")
        index = {c: i for i, c in enumerate(classes)}
        built = [Example(encode(r["text"])[:max_length], index[str(r["label"])]) for r in records]
    elif fmt in CHAT_FORMATS:
        try:
            renderer = ChatRenderer(tokenizer, train_on, source=source, where=wheres[0] if wheres else "the data")
            rendered = [renderer.render(conversation(r, fmt, where), where) for r, where in zip(records, wheres)]
        except ChatError as e:
            raise DataError(str(e)) from None
        built = [Example(ids[:max_length], labels[:max_length]) for ids, labels in rendered]
    else:
        end = [] if eos_id is None else [eos_id]
        built = [_causal_example(fmt, r, encode, end, max_length) for r in records]
    examples, dropped = [], []
    for example, where in zip(built, wheres):
        if vocab_size is not None:
            _check_vocabulary(example, fmt, vocab_size, where)
        why = _nothing_to_learn(example, fmt, max_length)
        if why:
            dropped.append(f"{where}: {why}")
        else:
            examples.append(example)
    if dropped:
        shown = _listing(dropped, records)
        if not examples:
            raise DataError(f"no example has a label left to learn from: {shown}. Fix the data, or raise "
                            "max_length (--max-length) where a prompt fills it.")
        warnings.warn(f"left out {len(dropped)} of {len(built)} examples with no label to learn from: {shown}.",
                      UserWarning, stacklevel=2)
    return Dataset(fmt, examples, list(classes) if fmt == "classification" else [], dropped,
                   renderer.template if fmt in CHAT_FORMATS else None)


def _listing(dropped: list[str], records: Sequence[dict]) -> str:
    """The first few dropped examples, the file named once when all came from one file."""
    paths = {getattr(r, "path", None) for r in records}
    shown = dropped[:_SHOWN]
    if len(paths) == 1 and None not in paths:
        prefix = f"{paths.pop()}, "
        shown = [prefix + "; ".join(d.removeprefix(prefix) for d in shown)]
    more = f" and {len(dropped) - _SHOWN} more" if len(dropped) > _SHOWN else ""
    return "; ".join(shown) + more


def _causal_example(fmt: str, r: dict, encode: Callable[[str], list[int]], end: list[int],
                    max_length: int) -> Example:
    if fmt == "text":
        ids = (encode(r["text"]) + end)[:max_length]
        return Example(ids, list(ids))
    if fmt == "completion":
        prompt, completion = encode(r["prompt"]), _encode_continuation(encode, r["completion"]) + end
        ids = (prompt + completion)[:max_length]
        return Example(ids, ([IGNORE] * len(prompt) + completion)[:max_length])
    ids = list(r["input_ids"][:max_length])
    return Example(ids, list(r.get("labels", ids)[:max_length]))


def _check_vocabulary(example: Example, fmt: str, vocab_size: int, where: str) -> None:
    """Every token id (and token label) indexes the model's embedding: an id past it is an
    index error inside the model (a device-side assert on a GPU)."""
    labels = example.labels if isinstance(example.labels, list) else []
    for key, values in (("input_ids", example.input_ids), ("labels", labels)):
        for i, t in enumerate(values):
            if t >= vocab_size:
                span = f"the model's vocabulary (ids 0..{vocab_size - 1})"
                if fmt == "tokens":
                    raise DataError(f'{where}: "{key}"[{i}] is {t}, outside {span}; were these ids made '
                                    "with another model's tokenizer?")
                raise DataError(f"{where}: the tokenizer gave the id {t}, outside {span}; the tokenizer does "
                                "not belong to this model (or tokens were added without resizing its embeddings).")


def _nothing_to_learn(example: Example, fmt: str, max_length: int) -> str | None:
    """Why ``example`` gives no loss, or None. A causal LM predicts position t from the
    tokens before it, so the label of the first position is never used."""
    if not example.input_ids:
        return "no tokens"
    if isinstance(example.labels, int):
        return None
    if any(label != IGNORE for label in example.labels[1:]):
        return None
    if len(example.input_ids) == 1:
        return "a single token, nothing to predict"
    full = len(example.input_ids) == max_length
    if fmt == "completion":
        return f"the prompt fills max_length={max_length}" if full else "the completion is empty"
    if fmt in CHAT_FORMATS and full:
        return f"max_length={max_length} cuts off every trained assistant turn"
    return "every label is -100"


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
    pick = lambda idx: Dataset(dataset.format, [dataset.examples[i] for i in idx], dataset.classes,  # noqa: E731
                               chat_template=dataset.chat_template)
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


class EpochBatches:
    """Training batches drawn anew each epoch: epoch e takes the examples in the order of a
    permutation seeded by (seed, e), in batches of ``batch_size`` (the last one may be
    shorter). The order is a function of the seed and the epoch alone, so a resumed run
    draws exactly the batches the uninterrupted run would have, with no sampler state to
    save. ``len()`` is the number of batches in one epoch; ``at(k)`` is the k-th batch of the
    run, counting across epochs."""

    def __init__(self, dataset: Dataset, batch_size: int, pad_id: int, seed: int = 0) -> None:
        positive_int("EpochBatches", "batch_size", batch_size)
        if not dataset.examples:
            raise DataError("there are no training examples to draw batches from.")
        self.dataset, self.batch_size, self.pad_id, self.seed = dataset, batch_size, pad_id, seed
        self._order: tuple[int, list[int]] | None = None  # (epoch, permutation), the last one drawn

    def __len__(self) -> int:
        return -(-len(self.dataset.examples) // self.batch_size)

    def order(self, epoch: int) -> list[int]:
        """The example indices of ``epoch`` in the order they are drawn."""
        if self._order is None or self._order[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order = (epoch, torch.randperm(len(self.dataset.examples), generator=generator).tolist())
        return self._order[1]

    def at(self, index: int) -> dict[str, torch.Tensor]:
        epoch, position = divmod(index, len(self))
        picked = self.order(epoch)[position * self.batch_size:(position + 1) * self.batch_size]
        return collate([self.dataset.examples[i] for i in picked], self.pad_id)
