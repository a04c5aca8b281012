"""`peftkit info --serve vllm`: what vLLM's adapter loader refuses (vllm/lora/peft_helper.py
and its rank check), read from the folder alone, each with its fix; a folder it takes gets
the `vllm serve` line."""

from __future__ import annotations

import pytest

import peftkit
from helpers import tiny_bert_classifier, tiny_llama
from peftkit.cli import main


def saved(tmp_path, model, config, name="adapter"):
    return str(peftkit.attach(model, config).save(tmp_path / name))


def test_a_plain_lora_adapter_is_served_with_the_vllm_command(tmp_path, capsys):
    folder = saved(tmp_path, tiny_llama(hidden_size=256), peftkit.LoraConfig(r=8))
    assert main(["info", folder, "--serve", "vllm"]) == 0
    out = capsys.readouterr().out
    assert "vLLM: loads this adapter as it is" in out and "--enable-lora --lora-modules adapter=" in out
    assert "--max-lora-rank" not in out  # r=8 fits vLLM's default 16


@pytest.mark.parametrize("config, problem, fix", [
    (peftkit.LoraConfig(r=32, alpha=32), "its rank 32 is above --max-lora-rank 16", "--max-lora-rank 32"),
    (peftkit.LoraConfig(r=8, target_modules=["q_proj", "lm_head"]), "embeddings or the output head (lm_head)",
     "merge it"),
    (peftkit.LoraConfig(r=8, target_modules=["q_proj", "embed_tokens"]), "(model.embed_tokens)", "merge it"),
    (peftkit.PromptConfig(num_virtual_tokens=4), "LoRA adapters only, and this one is PROMPT_TUNING",
     "peftkit generate"),
])
def test_what_vllm_refuses_is_named_with_its_fix(tmp_path, capsys, config, problem, fix):
    folder = saved(tmp_path, tiny_llama(hidden_size=256), config)
    assert main(["info", folder, "--serve", "vllm"]) == 1
    out = capsys.readouterr().out
    assert "vLLM: would refuse this adapter" in out and problem in out and fix in out


def test_a_raised_max_lora_rank_takes_the_adapter(tmp_path, capsys):
    folder = saved(tmp_path, tiny_llama(hidden_size=256), peftkit.LoraConfig(r=32, alpha=32))
    assert main(["info", folder, "--serve", "vllm", "--max-lora-rank", "32"]) == 0
    assert "--max-lora-rank 32" in capsys.readouterr().out
    assert main(["info", folder, "--serve", "vllm", "--max-lora-rank", "20"]) == 2
    assert "not a rank vLLM takes" in capsys.readouterr().err


def test_a_classifier_head_trained_in_full_is_refused(tmp_path, capsys):
    folder = saved(tmp_path, tiny_bert_classifier(), peftkit.LoraConfig(r=4, target_modules=["query", "value"]))
    assert main(["info", folder, "--serve", "vllm"]) == 1
    assert "modules_to_save" in capsys.readouterr().out


def test_serve_on_a_model_folder_is_refused(tmp_path, capsys):
    model = tiny_llama(hidden_size=256)
    model.save_pretrained(tmp_path / "model")
    assert main(["info", str(tmp_path / "model"), "--serve", "vllm"]) == 2
    assert "--serve checks an adapter folder" in capsys.readouterr().err
