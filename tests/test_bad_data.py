"""Bad training data: wrong JSON types, bytes that are not UTF-8, token ids outside the
model's vocabulary, and examples with no label left to learn from. Each is refused with the
file and line, or (examples with nothing to learn) left out and counted."""

from __future__ import annotations

import json

import pytest
from helpers import tiny_reference

from peftkit.cli import main
from peftkit.data import DataError, build_dataset, read_jsonl
from peftkit.models import ByteTokenizer

TOKENIZER = ByteTokenizer()
VOCAB = TOKENIZER.vocab_size


def encode(text: str) -> list[int]:
    return TOKENIZER.encode(text, add_bos=True)


def write(path, lines: list[str | dict]):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def dataset(path, max_length=64, vocab_size=None):
    fmt, records = read_jsonl(path)
    return build_dataset(fmt, records, encode, eos_id=TOKENIZER.eos_token_id, max_length=max_length,
                         vocab_size=vocab_size)


@pytest.mark.parametrize("line,message", [
    ('{"text": 123}', r'"text" must be a string, got a number \(123\)'),
    ('{"text": null}', r'"text" must be a string, got null'),
    ('{"prompt": 1, "completion": "x"}', r'"prompt" must be a string, got a number'),
    ('{"prompt": "p", "completion": ["x"]}', r'"completion" must be a string, got an array'),
    ('{"text": "a", "label": [1, 2]}', r'"label" must be a string or an integer \(the class\), got an array'),
    ('{"text": "a", "label": true}', r'"label" must be .*, got a boolean \(true\)'),
    ('{"text": "a", "label": NaN}', r'"label" must be .*, got a number \(NaN\)'),
    ('{"input_ids": "hello"}', r'"input_ids" must be an array of integer token ids, got a string \("hello"\)'),
    ('{"input_ids": [1, true, 3]}', r'"input_ids"\[1\] must be an integer token id, got a boolean'),
    ('{"input_ids": [1, 2.0]}', r'"input_ids"\[1\] must be an integer token id, got a number \(2.0\)'),
    ('{"input_ids": [1, -5]}', r'"input_ids"\[1\] is -5; a token id is 0 or more'),
    ('{"input_ids": [1, 2], "labels": [1, -1]}', r'"labels"\[1\] is -1; .*\(or -100 to leave the position out'),
    ('{"input_ids": [1, 2, 3], "labels": [1, 2]}', r'"labels" has 2 entries but "input_ids" has 3'),
    ('[1, 2]', r"must be a JSON object, got an array"),
    ('"text"', r"must be a JSON object, got a string"),
    ('17', r"must be a JSON object, got a number"),
])
def test_a_field_of_the_wrong_json_type_names_file_line_and_type(tmp_path, line, message):
    path = write(tmp_path / "data.jsonl", ["", line])  # a blank line is skipped but counted
    with pytest.raises(DataError, match=rf"{tmp_path}/data.jsonl, line 2.*{message}"):
        read_jsonl(path)


def test_plain_records_from_python_are_checked_too():
    with pytest.raises(DataError, match=r'record 2: "text" must be a string, got null'):
        build_dataset("text", [{"text": "a"}, {"text": None}], encode, eos_id=None, max_length=8)


def test_bytes_that_are_not_utf8_name_the_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=rf"{path}, line 2 is not UTF-8 text \(byte 0xe9 at column 14\); save the file as UTF-8"):
        read_jsonl(path)


def test_a_byte_order_mark_is_accepted(tmp_path):
    """Windows tools write one; joining two such files puts a second one inside the file."""
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "a"}\r\n\xef\xbb\xbf{"text": "b"}\r\n')
    fmt, records = read_jsonl(path)
    assert fmt == "text" and [r["text"] for r in records] == ["a", "b"]


def test_token_ids_outside_the_vocabulary_are_refused_with_file_and_line(tmp_path):
    path = write(tmp_path / "ids.jsonl", [{"input_ids": [1, 2, 3]}, {"input_ids": [1, VOCAB, 3]}])
    assert len(dataset(path)) == 2  # without the model's vocabulary only the sign is checked
    with pytest.raises(DataError, match=rf'{path}, line 2: "input_ids"\[1\] is {VOCAB}, outside the model\'s '
                                        rf"vocabulary \(ids 0..{VOCAB - 1}\)"):
        dataset(path, vocab_size=VOCAB)
    write(path, [{"input_ids": [1, 2, 3], "labels": [-100, 2, 10**12]}])
    with pytest.raises(DataError, match=r'line 1: "labels"\[2\] is 1000000000000, outside'):
        dataset(path, vocab_size=VOCAB)


def test_a_tokenizer_that_does_not_fit_the_model_is_caught(tmp_path):
    path = write(tmp_path / "text.jsonl", [{"text": "hello"}])
    with pytest.raises(DataError, match=rf"{path}, line 1: the tokenizer gave the id \d+, outside the model's vocabulary \(ids 0..99\)"):
        dataset(path, vocab_size=100)  # the byte tokenizer's eos is 257


def test_loaded_models_know_their_vocabulary(tmp_path):
    from peftkit.loading import load_model

    tiny_reference().save_pretrained(tmp_path / "reference")
    assert load_model(tmp_path / "reference", progress=False).vocab_size == VOCAB


def test_examples_with_nothing_to_learn_are_dropped_and_counted(tmp_path):
    path = write(tmp_path / "mixed.jsonl", [
        {"input_ids": [1, 2, 3]},
        {"input_ids": []},                                   # line 2: no tokens
        {"input_ids": [1, 2], "labels": [-100, -100]},       # line 3: every label masked
        {"input_ids": [7]},                                  # line 4: nothing to predict
        {"input_ids": [4, 5, 6], "labels": [-100, 5, 6]},
    ])
    with pytest.warns(UserWarning, match=rf"left out 3 of 5 examples with no label to learn from: {path}, "
                                         r"line 2: no tokens; line 3: every label is -100; line 4: a single token"):
        data = dataset(path)
    assert len(data) == 2 and data.dropped == 3
    assert data.dropped_where[0] == f"{path}, line 2: no tokens"


def test_a_prompt_longer_than_max_length_is_dropped(tmp_path):
    path = write(tmp_path / "long.jsonl", [{"prompt": "2+2=", "completion": "4"},
                                            {"prompt": "x" * 40, "completion": "y"}])
    with pytest.warns(UserWarning, match=r"line 2: the prompt fills max_length=16"):
        data = dataset(path, max_length=16)
    assert data.dropped == 1 and len(data) == 1


def test_an_empty_completion_without_an_eos_token_is_dropped(tmp_path):
    path = write(tmp_path / "empty.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": ""}])
    fmt, records = read_jsonl(path)
    with pytest.warns(UserWarning, match=r"line 2: the completion is empty"):
        data = build_dataset(fmt, records, encode, eos_id=None, max_length=16)
    assert data.dropped == 1


def test_no_example_left_is_an_error_naming_the_lines(tmp_path):
    path = write(tmp_path / "long.jsonl", [{"prompt": "x" * 40, "completion": "y"}] * 8)
    with pytest.raises(DataError, match=rf"no example has a label left to learn from: {path}, line 1: the prompt "
                                        r"fills max_length=16; .*line 5: .* and 3 more\. .*--max-length"):
        dataset(path, max_length=16)


def test_max_length_below_one_is_refused():
    with pytest.raises(ValueError, match=r"max_length must be a positive integer, got 0"):
        build_dataset("text", [{"text": "a"}], encode, eos_id=None, max_length=0)


# -- through `peftkit train` ----------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model") / "reference"
    tiny_reference().save_pretrained(folder)
    return folder


def train(folder, data, out, capsys, *extra):
    code = main(["train", "--model", str(folder), "--data", str(data), "--out", str(out), "--steps", "1",
                 "--no-progress", *extra])
    return code, capsys.readouterr()


@pytest.mark.parametrize("content,where", [
    (b'{"text": "a"}\n{"text": 123}\n', "line 2"),
    (b'{"text": "a"}\n{"text": null}\n', "line 2"),
    (b'{"input_ids": "hello"}\n', "line 1"),
    (b'{"input_ids": [1, 2, true]}\n', "line 1"),
    (b'{"input_ids": [3, -1]}\n', "line 1"),
    (b'{"text": "a", "label": [1]}\n', "line 1"),
    (b'{"text": "ok"}\n{"text": "\xff"}\n', "line 2"),
    (b'{"prompt": "' + b"x" * 40 + b'", "completion": "y"}\n', "line 1"),
])
def test_train_refuses_bad_data_with_one_error_line(reference, tmp_path, capsys, content, where):
    data = tmp_path / "bad.jsonl"
    data.write_bytes(content)
    out = tmp_path / "out"
    code, captured = train(reference, data, out, capsys, "--max-length", "16")
    assert code == 2 and "Traceback" not in captured.err
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"{data}, {where}" in errors[0], captured.err
    assert not out.exists()


def test_train_accepts_a_bom_and_counts_what_it_dropped(reference, tmp_path, capsys):
    data = tmp_path / "bom.jsonl"
    lines = [json.dumps({"prompt": f"{i} + 1 =", "completion": f" {i + 1}"}) for i in range(8)]
    lines.append(json.dumps({"prompt": "x" * 40, "completion": "y"}))
    data.write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode() + b"\n")
    with pytest.warns(UserWarning, match=rf"left out 1 of 9 examples .*{data}, line 9: the prompt fills max_length=16"):
        code, captured = train(reference, data, tmp_path / "out", capsys, "--max-length", "16")
    assert code == 0, captured.err
    assert "7 train / 1 held-out examples" in captured.out  # the 8 kept, split
