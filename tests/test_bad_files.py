"""Damaged files on the command line: a truncated or corrupt model, adapter or GGUF file, a
config.json that is not a JSON object, an adapter with NaN weights. Each is one `error:` line
naming the file and the fix, a non-zero exit, no traceback, and nothing written."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import randomize_adapters, save_transformers_folder, tiny_llama, tiny_reference

import peftkit
from peftkit.cli import main
from peftkit.loading import LoadedModel, ModelLoadError
from peftkit.model_folder import save_model_folder
from peftkit.models import ByteTokenizer


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """Whole files to damage: model folders, adapters for them, and a data file."""
    root = tmp_path_factory.mktemp("good")
    tiny_reference().save_pretrained(root / "reference")
    save_transformers_folder(tiny_llama(), root / "llama")
    for name, build in (("reference", tiny_reference), ("llama", tiny_llama)):
        pm = peftkit.attach(build(), peftkit.LoraConfig(r=4, alpha=8))
        randomize_adapters(pm)
        pm.save(root / f"{name}-adapter")
    (root / "text.jsonl").write_text("".join(json.dumps({"text": f"{i} + 1 = {i + 1}"}) + "\n" for i in range(8)))
    return root


def damaged(good, tmp_path, name: str, file: str, content: bytes | None = None, keep: float | None = None):
    """A copy of ``good / name`` whose ``file`` holds ``content``, or its first ``keep`` share."""
    folder = shutil.copytree(good / name, tmp_path / name)
    path = folder / file
    path.write_bytes(content if content is not None else path.read_bytes()[: int(path.stat().st_size * keep)])
    return folder


def run(capsys, *argv) -> tuple[int, str]:
    """``peftkit ARGV`` in-process: an exception would escape to pytest, so no traceback means none here."""
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def assert_one_error(code: int, err: str, *names) -> str:
    assert code not in (0, None)
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    for name in names:
        assert str(name) in errors[0], err
    return errors[0]


def commands(model, adapter, good, out):
    """Every command that reads ``--model``, writing (if it wrote anything) to ``out``."""
    return {
        "train": ["train", "--model", model, "--data", good / "text.jsonl", "--out", out, "--steps", 1, "--no-progress"],
        "merge": ["merge", "--model", model, "--adapter", adapter, "--out", out],
        "generate": ["generate", "--model", model, "--prompt", "hi", "--max-new-tokens", 2],
        "doctor": ["doctor", "--model", model],
        "info": ["info", model],
    }


MODEL_DAMAGE = [
    ("reference", "model.safetensors", None, 0.5, "truncated"),
    ("reference", "model.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00garbage", None, "truncated"),
    ("llama", "model.safetensors", None, 0.5, "truncated"),
    ("llama", "model.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00garbage", None, "truncated"),
    ("reference", "config.json", b"{not json", None, "not valid JSON"),
    ("reference", "config.json", b"[1, 2]", None, "not a JSON object"),
    ("llama", "config.json", b'{"model_type": "llama", ', None, "not valid JSON"),
    ("llama", "config.json", b"\xff\xfe{", None, "not valid JSON"),
    ("llama", "config.json", b'"llama"', None, "not a JSON object"),
]


@pytest.mark.parametrize("name,file,content,keep,problem", MODEL_DAMAGE)
@pytest.mark.parametrize("command", ["train", "merge", "generate", "doctor", "info"])
def test_a_damaged_model_folder_is_one_clear_error(good, tmp_path, capsys, name, file, content, keep, problem,
                                                   command):
    folder = damaged(good, tmp_path, name, file, content, keep)
    out = tmp_path / "out"
    argv = commands(folder, good / f"{name}-adapter", good, out)[command]
    line = assert_one_error(*run(capsys, *argv), folder / file)
    assert problem in line and "again" in line  # says what to do: copy or download it again
    assert not out.exists()


def test_a_truncated_pytorch_model_bin(good, tmp_path, capsys):
    from safetensors.torch import load_file

    folder = shutil.copytree(good / "llama", tmp_path / "llama")
    weights = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(weights, folder / "pytorch_model.bin")
    bin_file = folder / "pytorch_model.bin"
    bin_file.write_bytes(bin_file.read_bytes()[: bin_file.stat().st_size // 2])
    line = assert_one_error(*run(capsys, "generate", "--model", folder, "--prompt", "hi"), "pytorch_model.bin")
    assert "truncated or corrupt" in line


def test_a_model_folder_without_weights_is_not_described_as_usable(good, tmp_path, capsys):
    folder = shutil.copytree(good / "llama", tmp_path / "llama")
    (folder / "model.safetensors").unlink()
    assert_one_error(*run(capsys, "info", folder), folder, "no weights")


def _torch_zip(tensors, path, keep):
    torch.save(tensors, path)
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])


@pytest.mark.parametrize("file,keep", [
    ("adapter_model.safetensors", 0.1), ("adapter_model.safetensors", 0.5), ("adapter_model.safetensors", 0.0),
    ("adapter_model.bin", 0.1), ("adapter_model.bin", 0.5), ("adapter_model.bin", 0.99), ("adapter_model.bin", 0.0),
    ("adapter_config.json", 0.5),
])
@pytest.mark.parametrize("command", ["info", "generate", "merge", "export"])
def test_a_damaged_adapter_is_one_clear_error(good, tmp_path, capsys, file, keep, command):
    from safetensors.torch import load_file

    if command == "export":
        pytest.importorskip("gguf")
    adapter = shutil.copytree(good / "llama-adapter", tmp_path / "adapter")
    path = adapter / file
    if file == "adapter_model.bin":  # a legacy PEFT adapter, read with torch.load(weights_only=True)
        _torch_zip(load_file(adapter / "adapter_model.safetensors"), path, keep)
        (adapter / "adapter_model.safetensors").unlink()
    else:
        path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])
    out = tmp_path / "out"
    argv = {
        "info": ["info", adapter],
        "generate": ["generate", "--model", good / "llama", "--adapter", adapter, "--prompt", "hi"],
        "merge": ["merge", "--model", good / "llama", "--adapter", adapter, "--out", out],
        "export": ["export", "--adapter", adapter, "--model", good / "llama", "--gguf", out],
    }[command]
    line = assert_one_error(*run(capsys, *argv), path)
    assert "corrupt or truncated" in line and "again" in line
    assert not out.exists()


@pytest.mark.parametrize("command", ["info", "generate", "train", "export"])
def test_a_truncated_gguf_is_one_clear_error(good, tmp_path, capsys, command):
    pytest.importorskip("gguf")
    whole = tmp_path / "whole.gguf"
    assert main(["export", "--adapter", str(good / "llama-adapter"), "--model", str(good / "llama"),
                 "--gguf", str(whole)]) == 0
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    capsys.readouterr()
    out = tmp_path / "out"
    argv = {
        "info": ["info", cut],
        "generate": ["generate", "--model", cut, "--prompt", "hi"],
        "train": ["train", "--model", cut, "--data", good / "text.jsonl", "--out", out, "--no-progress"],
        "export": ["export", "--adapter", good / "llama-adapter", "--model", cut, "--gguf", out],
    }[command]
    line = assert_one_error(*run(capsys, *argv), cut)
    assert "truncated or corrupt" in line
    assert not out.exists()


def test_merge_refuses_an_adapter_with_nan_weights_and_writes_nothing(good, tmp_path, capsys):
    pm = peftkit.attach(tiny_reference(), peftkit.LoraConfig(r=4, alpha=8))
    randomize_adapters(pm)
    pm.save(tmp_path / "nan-adapter")
    from safetensors.torch import load_file, save_file

    weights_file = tmp_path / "nan-adapter" / "adapter_model.safetensors"
    tensors = load_file(weights_file)
    bad_key = sorted(tensors)[1]
    tensors[bad_key][0, 0] = float("nan")
    save_file(tensors, weights_file, metadata={"format": "pt"})
    out = tmp_path / "merged"
    line = assert_one_error(*run(capsys, "merge", "--model", good / "reference", "--adapter",
                                 tmp_path / "nan-adapter", "--out", out), tmp_path / "nan-adapter", bad_key)
    assert "non-finite" in line and "nothing was written" in line
    assert not out.exists()


def test_saving_a_model_with_an_infinite_weight_is_refused_before_writing(tmp_path):
    """What catches a merge whose W + s·B A overflowed (16-bit weights) or a base that held inf."""
    model = tiny_reference()
    with torch.no_grad():
        model.get_input_embeddings().weight[3, 1] = float("inf")
    with pytest.raises(ModelLoadError, match=r"embed_tokens.weight \(1 of \d+ values are NaN or inf\).*nothing was written"):
        save_model_folder(LoadedModel(model, ByteTokenizer(), "test"), tmp_path / "out")
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("make", [
    lambda d: (d / "file").write_text("x") and d / "file",
    lambda d: (d / "file").write_text("x") and d / "file" / "below",
])
def test_merge_into_a_file_is_one_clear_error(good, tmp_path, capsys, make):
    out = make(tmp_path)
    assert_one_error(*run(capsys, "merge", "--model", good / "reference", "--adapter", good / "reference-adapter",
                          "--out", out), tmp_path / "file")
    assert (tmp_path / "file").read_text() == "x"
