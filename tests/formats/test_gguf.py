"""GGUF files: the header reader agrees with gguf-py's own reader, refuses damaged files,
and the LoRA writer leaves a complete file or none."""

from __future__ import annotations

import numpy as np
import pytest

from peftkit.formats.gguf import GgufError, read_header, write_lora_adapter

gguf = pytest.importorskip("gguf")


def write_model(path, *, tensors=None):
    """A GGUF with scalars, strings, a numeric array, a string array and tensors of two types."""
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(2)
    writer.add_head_count(4)
    writer.add_float32("llama.rope.freq_base", 10000.0)
    writer.add_bool("general.flag", True)
    writer.add_array("llama.attention.head_count_kv", [2, 1])
    writer.add_token_list(["<s>", "a", "b"])
    for name, array in (tensors or {"token_embd.weight": np.ones((16, 8), np.float32),
                                     "blk.0.attn_q.weight": np.ones((8, 8), np.float16)}).items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_the_header_matches_gguf_py(tmp_path):
    path = write_model(tmp_path / "m.gguf")
    header = read_header(path)
    theirs = gguf.GGUFReader(path)
    for key, field in theirs.fields.items():
        if key.startswith("GGUF.") or key == "tokenizer.ggml.tokens":
            continue
        assert header.metadata[key] == field.contents(), key
    assert "tokenizer.ggml.tokens" not in header.metadata  # string arrays are stepped over
    assert header.metadata["llama.attention.head_count_kv"] == [2, 1]
    assert header.architecture == "llama"
    for tensor in theirs.tensors:  # torch order: the reverse of GGUF's innermost-first dims
        assert header.tensors[tensor.name].shape == tuple(reversed([int(d) for d in tensor.shape]))
        assert header.tensors[tensor.name].type == tensor.tensor_type.name
    assert header.tensors["token_embd.weight"].shape == (16, 8)
    assert header.tensor_types() == {"F32": 1, "F16": 1}


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.95])
def test_a_truncated_file_is_refused(tmp_path, keep):
    whole = write_model(tmp_path / "m.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole[: int(len(whole) * keep)])
    with pytest.raises(GgufError, match="not a readable GGUF file.*truncated or corrupt"):
        read_header(cut)


@pytest.mark.parametrize("data", [b"", b"not a model at all", b"GGUF\x07\x00\x00\x00" + bytes(32)])
def test_a_file_that_is_not_gguf_is_refused(tmp_path, data):
    (tmp_path / "x.gguf").write_bytes(data)
    with pytest.raises(GgufError, match="not a (readable )?GGUF"):
        read_header(tmp_path / "x.gguf")


def test_the_lora_writer(tmp_path):
    arrays = [("blk.0.attn_q.weight.lora_a", np.ones((4, 8), np.float16)),
              ("blk.0.attn_q.weight.lora_b", np.ones((8, 4), np.float16))]
    out = write_lora_adapter(tmp_path / "a.gguf", "llama", 8.0, "float16", arrays)
    header = read_header(out)
    assert header.metadata["general.type"] == "adapter" and header.metadata["adapter.type"] == "lora"
    assert header.metadata["adapter.lora.alpha"] == 8.0
    assert header.tensors["blk.0.attn_q.weight.lora_a"].shape == (4, 8)
    assert header.tensor_types() == {"F16": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["a.gguf"]


def test_a_failed_lora_write_keeps_the_previous_file(tmp_path, monkeypatch):
    (tmp_path / "a.gguf").write_bytes(b"previous")

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", fail)
    with pytest.raises(OSError, match="disk full"):
        write_lora_adapter(tmp_path / "a.gguf", "llama", 8.0, "float32", [("t", np.ones(4, np.float32))])
    assert [p.name for p in tmp_path.iterdir()] == ["a.gguf"]
    assert (tmp_path / "a.gguf").read_bytes() == b"previous"
