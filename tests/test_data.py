"""JSONL data: formats, loss masks, classification labels, errors with line numbers."""

from __future__ import annotations

import json

import pytest
import torch

from peftkit.data import DataError, batches, build_dataset, collate, read_jsonl, split
from peftkit.models import ByteTokenizer

TOKENIZER = ByteTokenizer()


def encode(text: str) -> list[int]:
    return TOKENIZER.encode(text, add_bos=True)


def write(tmp_path, rows, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def load(tmp_path, rows, **kwargs):
    fmt, records = read_jsonl(write(tmp_path, rows))
    return build_dataset(fmt, records, encode, eos_id=TOKENIZER.eos_token_id, max_length=64, **kwargs)


def test_text_lines_train_on_every_token(tmp_path):
    data = load(tmp_path, [{"text": "hi"}, {"text": "yo!"}])
    assert data.format == "text"
    first = data.examples[0]
    assert first.input_ids == [TOKENIZER.bos_token_id, ord("h"), ord("i"), TOKENIZER.eos_token_id]
    assert first.labels == first.input_ids


def test_prompt_completion_masks_the_prompt(tmp_path):
    data = load(tmp_path, [{"prompt": "2+2=", "completion": "4"}])
    ex = data.examples[0]
    assert TOKENIZER.decode(ex.input_ids) == "2+2=4"
    n_prompt = len(encode("2+2="))
    assert ex.labels[:n_prompt] == [-100] * n_prompt
    assert ex.labels[n_prompt:] == [ord("4"), TOKENIZER.eos_token_id]  # no second BOS


def test_classification_labels_and_unknown_class(tmp_path):
    data = load(tmp_path, [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}])
    assert data.classes == ["neg", "pos"] and [e.labels for e in data.examples] == [1, 0]
    with pytest.raises(DataError, match=r"labels \['meh'\] are not among the classes"):
        load(tmp_path, [{"text": "ok", "label": "meh"}], classes=["neg", "pos"])


def test_pretokenized_with_and_without_labels(tmp_path):
    data = load(tmp_path, [{"input_ids": [1, 2, 3]}, {"input_ids": [4, 5], "labels": [-100, 5]}])
    assert [e.labels for e in data.examples] == [[1, 2, 3], [-100, 5]]


@pytest.mark.parametrize("rows,message", [
    ([{"text": "a"}, "{not json"], r"line 2 is not valid JSON"),
    ([{"text": "a"}, {"prompt": "p", "completion": "c"}], r"line 2 is in the 'completion' format but line 1"),
    ([{"txt": "a"}], r"line 1: keys \['txt'\] match no format"),
    (["[1, 2]"], r"line 1 must be a JSON object"),
    (["", "  "], r"holds no examples"),
])
def test_bad_files_name_the_line(tmp_path, rows, message):
    with pytest.raises(DataError, match=message):
        read_jsonl(write(tmp_path, rows))


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_jsonl(tmp_path / "nope.jsonl")


def test_collate_pads_right_and_ignores_padding_in_loss(tmp_path):
    data = load(tmp_path, [{"text": "a"}, {"text": "abcd"}])
    batch = collate(data.examples, pad_id=TOKENIZER.pad_token_id)
    assert batch["input_ids"].shape == (2, 6)
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 0, 0, 0]
    assert batch["labels"][0, 3:].tolist() == [-100] * 3
    assert torch.equal(batch["labels"][1], batch["input_ids"][1])


def test_split_is_seeded_and_disjoint(tmp_path):
    data = load(tmp_path, [{"text": str(i)} for i in range(20)])
    train, held = split(data, 0.25, seed=3)
    train2, held2 = split(data, 0.25, seed=3)
    assert len(held) == 5 and len(train) == 15
    assert [e.input_ids for e in held.examples] == [e.input_ids for e in held2.examples]
    ids = lambda d: {tuple(e.input_ids) for e in d.examples}  # noqa: E731
    assert not ids(train) & ids(held)
    assert sum(len(b["input_ids"]) for b in batches(train, 4, 0, shuffle=True)) == 15
