"""Conversations on a real instruct model: SmolLM2-135M-Instruct's own chat template (it
ships in the GGUF file) masks exactly the assistant's tokens, and a short `run_training` on
Rotten Tomatoes conversations learns and saves that template with the adapter."""

from __future__ import annotations

import pytest

from chat_templates import CONVERSATION, expected_positions, trained
from peftkit.chat import ChatRenderer

pytest.importorskip("transformers")


def test_smollm2_template_masks_exactly_the_assistant_turns(_smollm2_loaded):
    tokenizer = _smollm2_loaded.tokenizer
    for train_on in ("assistant", "last"):
        ids, labels = ChatRenderer(tokenizer, train_on).render(CONVERSATION, "test")
        positions = expected_positions(tokenizer, ids, "<|im_start|>assistant\n", "<|im_end|>", train_on)
        assert trained(labels) == positions
        replies = "Yes.<|im_end|>Green, mostly.<|im_end|>" if train_on == "assistant" else "Green, mostly.<|im_end|>"
        assert tokenizer.decode([ids[p] for p in positions]) == replies
    # Without a system turn the template writes its own default system prompt: never trained.
    chat = CONVERSATION[1:3]
    ids, labels = ChatRenderer(tokenizer).render(chat, "test")
    assert "You are a helpful AI assistant named SmolLM" in tokenizer.decode(ids)
    assert tokenizer.decode([ids[p] for p in trained(labels)]) == "Yes.<|im_end|>"
    # SmolLM2's pad token is its EOS token, <|im_end|>: the reply's EOS is still trained.
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == ids[trained(labels)[-1]]


def test_smollm2_trains_on_review_conversations_and_saves_its_template(smollm2, reviews, tmp_path):
    from bench import rotten_tomatoes as rt
    from helpers import write_jsonl
    from peftkit import LoraConfig
    from peftkit.formats.adapter_folder import read_chat_template
    from peftkit.runs import RunOptions, run_training

    train, test = reviews
    write_jsonl(tmp_path / "train.jsonl", rt.messages_records(train[:24]))
    write_jsonl(tmp_path / "test.jsonl", rt.messages_records(test[:8]))
    options = RunOptions(steps=4, batch_size=6, eval_data=str(tmp_path / "test.jsonl"), checkpoint_every=0,
                         max_length=160)
    summary = run_training(smollm2, tmp_path / "train.jsonl", LoraConfig(), tmp_path / "run", options,
                           progress=False)
    assert summary.eval_after["loss"] < summary.eval_before["loss"] - 0.1, (summary.eval_before, summary.eval_after)
    assert read_chat_template(summary.adapter_dir) == smollm2.tokenizer.chat_template
