"""Pre-tokenized data needs no tokenizer: a transformers folder with only config.json and
weights trains, merges and exports; text data and generate on it get a clear error."""

from __future__ import annotations

import json

import torch

from peftkit import cli
from helpers import tiny_llama


def _folder_and_ids(tmp_path):
    folder = tmp_path / "llama-no-tokenizer"
    tiny_llama().save_pretrained(folder)  # config.json + model.safetensors, no tokenizer files
    gen = torch.Generator().manual_seed(0)
    data = tmp_path / "ids.jsonl"
    data.write_text("".join(json.dumps({"input_ids": torch.randint(3, 128, (12,), generator=gen).tolist()}) + "\n"
                            for _ in range(16)))
    return folder, data


def test_token_id_data_trains_merges_and_exports_without_a_tokenizer(tmp_path, capsys):
    folder, data = _folder_and_ids(tmp_path)
    assert not list(folder.glob("tokenizer*"))
    run = tmp_path / "run"
    assert cli.main(["train", "--model", str(folder), "--data", str(data), "--out", str(run),
                     "--max-steps", "2", "--no-progress"]) == 0
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    merged = tmp_path / "merged"
    assert cli.main(["merge", "--model", str(folder), "--adapter", str(run / "adapter"), "--out", str(merged)]) == 0
    assert (merged / "model.safetensors").is_file() and not list(merged.glob("tokenizer*"))
    gguf = tmp_path / "lora.gguf"
    assert cli.main(["export", "--adapter", str(run / "adapter"), "--gguf", str(gguf), "--model", str(folder)]) == 0
    assert gguf.stat().st_size > 0
    capsys.readouterr()


def test_text_data_or_generate_without_a_tokenizer_is_one_clear_error(tmp_path, capsys):
    folder, _ = _folder_and_ids(tmp_path)
    text = tmp_path / "text.jsonl"
    text.write_text('{"text": "hello there"}\n' * 4)
    out = tmp_path / "run"
    capsys.readouterr()  # the folder's own writing
    code = cli.main(["train", "--model", str(folder), "--data", str(text), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "has no tokenizer files" in err and "input_ids" in err
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1 and "Traceback" not in err
    assert not out.exists()
    code = cli.main(["generate", "--model", str(folder), "--prompt", "hello"])
    err = capsys.readouterr().err
    assert code == 2 and "has no tokenizer files" in err and "Traceback" not in err
