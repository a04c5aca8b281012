"""Loading what a user names with --model: reference, reference folders, transformers folders."""

from __future__ import annotations

import pytest
import torch
from helpers import save_transformers_folder, tiny_llama, tiny_reference

import peftkit.pretrain
from peftkit.loading import ModelLoadError, load_model
from peftkit.models import ReferenceDecoder


def test_reference_is_built_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path))
    monkeypatch.setattr(peftkit.pretrain, "BASE_STEPS", 3)
    first = load_model("reference", progress=False)
    assert isinstance(first.model, ReferenceDecoder)
    cached = list(tmp_path.iterdir())
    assert len(cached) == 1 and (cached[0] / "model.safetensors").is_file()
    second = load_model("reference", progress=False)
    for (n, a), (_, b) in zip(first.model.state_dict().items(), second.model.state_dict().items()):
        assert torch.equal(a, b), n
    assert first.decode(first.encode("héllo")) == "héllo"


def test_reference_folder_and_transformers_folder(tmp_path):
    ref = tiny_reference()
    ref.save_pretrained(tmp_path / "ref")
    loaded = load_model(tmp_path / "ref")
    assert isinstance(loaded.model, ReferenceDecoder)

    llama = tiny_llama()
    save_transformers_folder(llama, tmp_path / "llama")
    loaded = load_model(tmp_path / "llama")
    ids = torch.tensor([loaded.encode("the movie was good")])
    assert ids[0, 0].item() == loaded.tokenizer.bos_token_id
    torch.testing.assert_close(loaded.model(input_ids=ids).logits, llama(input_ids=ids).logits)
    assert loaded.pad_id == loaded.tokenizer.pad_token_id


def test_classification_head_from_a_folder(tmp_path):
    from helpers import tiny_bert

    save_transformers_folder(tiny_bert(), tmp_path / "bert")
    loaded = load_model(tmp_path / "bert", task="classification", num_labels=3)
    assert loaded.model.config.num_labels == 3
    with pytest.raises(ModelLoadError, match="no classification head"):
        load_model("reference", task="classification")


@pytest.mark.parametrize("make,message", [
    (lambda p: p / "missing", "does not exist"),
    (lambda p: (p / "file.txt").write_text("x") and p / "file.txt", "is a file"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "no config.json"),
])
def test_bad_model_paths(tmp_path, make, message):
    with pytest.raises(ModelLoadError, match=message):
        load_model(make(tmp_path))


def test_folder_without_weights(tmp_path):
    llama = tiny_llama()
    llama.config.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="no weights"):
        load_model(tmp_path)


# -- GGUF files: the header is checked before transformers is asked to dequantize -------
def write_gguf(path, architecture: str, *, adapter: bool = False):
    """A small GGUF file with one float32 tensor and the metadata of ``architecture``."""
    gguf = pytest.importorskip("gguf")
    import numpy as np

    writer = gguf.GGUFWriter(path, architecture)
    writer.add_block_count(1)
    if adapter:
        writer.add_string("general.type", "adapter")
        writer.add_string("adapter.type", "lora")
    writer.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_gguf_of_an_architecture_transformers_cannot_read(tmp_path):
    path = write_gguf(tmp_path / "model.gguf", "rwkv6")
    with pytest.raises(ModelLoadError, match=r"cannot dequantize GGUF architecture 'rwkv6'.*'llama'.*Convert"):
        load_model(path)


def test_a_truncated_gguf(tmp_path):
    whole = write_gguf(tmp_path / "whole.gguf", "llama").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ModelLoadError, match="not a readable GGUF file.*truncated or corrupt"):
        load_model(cut)


def test_a_gguf_adapter_given_as_the_model(tmp_path):
    path = write_gguf(tmp_path / "lora.gguf", "llama", adapter=True)
    with pytest.raises(ModelLoadError, match="is a GGUF adapter"):
        load_model(path)


def test_a_gguf_without_the_gguf_package(tmp_path, monkeypatch):
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    monkeypatch.setitem(__import__("sys").modules, "gguf", None)  # import gguf now fails
    with pytest.raises(ModelLoadError, match="needs the gguf package: pip install gguf"):
        load_model(tmp_path / "model.gguf")


def test_a_folder_with_one_gguf_is_that_file_and_with_two_must_be_named(tmp_path):
    write_gguf(tmp_path / "a.gguf", "rwkv6")
    with pytest.raises(ModelLoadError, match="rwkv6"):  # it was read: the folder stood for the file
        load_model(tmp_path)
    write_gguf(tmp_path / "b.gguf", "rwkv6")
    with pytest.raises(ModelLoadError, match="several .gguf files"):
        load_model(tmp_path)


def test_a_truncated_safetensors_model_is_described_as_such(tmp_path, capsys):
    from peftkit.cli import main

    save_transformers_folder(tiny_llama(), tmp_path / "llama")
    weights = tmp_path / "llama" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert main(["info", str(tmp_path / "llama")]) == 1  # a message, not a traceback
    assert "model.safetensors is not a readable safetensors file" in capsys.readouterr().err
