"""Conversations: the three line formats, rendered by real chat templates, with the loss on
exactly the assistant's tokens (content and end-of-turn token), and the bad inputs."""

from __future__ import annotations

import json

import pytest

from chat_templates import (CHATML_SPECIALS, CONVERSATION, DROPS_THINKING_TEMPLATE, byte_tokenizer,
                            expected_positions, llama3_tokenizer, qwen25_tokenizer, trained)
from helpers import write_jsonl
from peftkit import data
from peftkit.chat import ChatRenderer

TEMPLATES = {
    "llama3": (llama3_tokenizer, "<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>"),
    "qwen2.5": (qwen25_tokenizer, "<|im_start|>assistant\n", "<|im_end|>"),
}


@pytest.mark.parametrize("name", TEMPLATES)
@pytest.mark.parametrize("train_on", ["assistant", "last"])
def test_the_loss_is_on_exactly_the_assistant_tokens(name, train_on):
    make, header, end = TEMPLATES[name]
    tokenizer = make()
    ids, labels = ChatRenderer(tokenizer, train_on).render(CONVERSATION, "test")
    assert ids == tokenizer(tokenizer.apply_chat_template(CONVERSATION, tokenize=False),
                            add_special_tokens=False)["input_ids"]
    positions = expected_positions(tokenizer, ids, header, end, train_on)
    assert trained(labels) == positions
    assert all(labels[p] == ids[p] for p in positions)
    decoded = tokenizer.decode([ids[p] for p in positions])
    assert decoded == (f"Yes.{end}Green, mostly.{end}" if train_on == "assistant" else f"Green, mostly.{end}")


@pytest.mark.parametrize("name", TEMPLATES)
def test_train_on_all_trains_every_token(name):
    tokenizer = TEMPLATES[name][0]()
    ids, labels = ChatRenderer(tokenizer, "all").render(CONVERSATION, "test")
    assert labels == ids


def test_llama3_renders_one_bos_token():
    tokenizer = llama3_tokenizer()
    ids, _ = ChatRenderer(tokenizer).render(CONVERSATION, "test")
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id


def test_a_template_that_rewrites_earlier_turns_is_refused_for_every_turn_but_works_for_the_last():
    tokenizer = byte_tokenizer(CHATML_SPECIALS, eos="<|im_end|>", template=DROPS_THINKING_TEMPLATE)
    chat = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<think>easy</think> 4"},
            {"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "<think>also</think> 6"}]
    with pytest.raises(ValueError, match="renders turn 2 differently.*--train-on last"):
        ChatRenderer(tokenizer, "assistant").render(chat, "f.jsonl, line 1")
    ids, labels = ChatRenderer(tokenizer, "last").render(chat, "f.jsonl, line 1")
    assert tokenizer.decode([ids[p] for p in trained(labels)]) == "<think>also</think> 6<|im_end|>"


def rows_in_three_formats():
    messages = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Do it\n\nnow"},
                             {"role": "assistant", "content": "Done"}]}
    sharegpt = {"system": "S", "conversations": [{"from": "human", "value": "Do it\n\nnow"},
                                                 {"from": "gpt", "value": "Done"}]}
    alpaca = {"system": "S", "instruction": "Do it", "input": "now", "output": "Done"}
    return messages, sharegpt, alpaca


def build(tmp_path, rows, tokenizer, **kwargs):
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    fmt, records = data.read_jsonl(path)
    kwargs = {"eos_id": tokenizer.eos_token_id, "max_length": 512, **kwargs}
    return fmt, data.build_dataset(fmt, records, lambda text: tokenizer(text)["input_ids"], tokenizer=tokenizer,
                                   **kwargs)


def test_sharegpt_and_alpaca_give_the_examples_of_the_same_messages(tmp_path):
    tokenizer = qwen25_tokenizer()
    built = [build(tmp_path, [row], tokenizer) for row in rows_in_three_formats()]
    assert [fmt for fmt, _ in built] == ["messages", "sharegpt", "alpaca"]
    first = built[0][1].examples[0]
    for _, dataset in built[1:]:
        assert dataset.examples[0] == first
        assert dataset.chat_template == tokenizer.chat_template


def test_a_conversation_cut_before_every_assistant_turn_is_left_out_with_its_line(tmp_path):
    tokenizer = qwen25_tokenizer()
    long = {"messages": [{"role": "user", "content": "x" * 300}, {"role": "assistant", "content": "ok"}]}
    short = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}
    with pytest.warns(UserWarning, match=r"line 1: max_length=200 cuts off every trained assistant turn"):
        _, dataset = build(tmp_path, [long, short], tokenizer, max_length=200)
    assert len(dataset) == 1 and dataset.dropped == 1
    with pytest.raises(data.DataError, match="line 1: max_length=200 cuts off"):
        build(tmp_path, [long], tokenizer, max_length=200)


@pytest.mark.parametrize("row, message", [
    ({"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "ok"}]},
     r"line 2: \"messages\"\[0\] has the role 'robot'; use one of \['assistant', 'system', 'user'\]"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "anyone?"}]},
     "line 2: the conversation has no assistant turn"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ["ok"]}]},
     r"line 2: \"messages\"\[1\]\[\"content\"\] must be a string, got an array"),
    ({"messages": []}, r"line 2: \"messages\" must be a non-empty array of turns"),
    ({"conversations": [{"from": "bot", "value": "hi"}]}, r"line 2: \"conversations\"\[0\] has the from 'bot'"),
    ({"instruction": "do", "output": 3}, r"line 2: \"output\" must be a string, got a number"),
])
def test_bad_conversations_name_the_line_and_the_turn(tmp_path, row, message):
    good = rows_in_three_formats()[0] if "messages" in row else (
        rows_in_three_formats()[1] if "conversations" in row else rows_in_three_formats()[2])
    path = write_jsonl(tmp_path / "bad.jsonl", [good, row])
    with pytest.raises(data.DataError, match=message):
        data.read_jsonl(path)


def test_messages_without_a_chat_template_are_refused_with_the_fix(tmp_path):
    tokenizer = qwen25_tokenizer()
    tokenizer.chat_template = None
    with pytest.raises(data.DataError, match="line 1: conversations are rendered with the tokenizer's chat "
                                             "template, and the tokenizer of the model has none"):
        build(tmp_path, [rows_in_three_formats()[0]], tokenizer)


def test_text_and_completions_end_with_eos_unless_turned_off(tmp_path):
    tokenizer = qwen25_tokenizer()
    eos = tokenizer.eos_token_id
    for row in ({"text": "hello"}, {"prompt": "say", "completion": " hello"}):
        _, with_eos = build(tmp_path, [row], tokenizer)
        _, without = build(tmp_path, [row], tokenizer, eos_id=None)
        assert with_eos.examples[0].input_ids[-1] == eos == with_eos.examples[0].labels[-1]
        assert with_eos.examples[0].input_ids[:-1] == without.examples[0].input_ids
        assert eos not in without.examples[0].input_ids


def test_eos_positions_are_trained_when_the_pad_token_is_the_eos_token(tmp_path):
    tokenizer = byte_tokenizer(CHATML_SPECIALS, eos="<|im_end|>", pad="<|im_end|>",
                               template=qwen25_tokenizer().chat_template)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    _, dataset = build(tmp_path, [rows_in_three_formats()[0], {"messages": [
        {"role": "user", "content": "a much longer question than the first one"},
        {"role": "assistant", "content": "and a longer answer"}]}], tokenizer)
    batch = data.collate(dataset.examples, pad_id=tokenizer.pad_token_id)
    eos = tokenizer.eos_token_id
    short = len(dataset.examples[0].input_ids)
    labels, mask = batch["labels"][0], batch["attention_mask"][0]
    assert batch["input_ids"].shape[1] > short  # the first row is padded with the EOS id
    real_eos = [i for i in range(short) if dataset.examples[0].labels[i] == eos]
    assert real_eos and all(labels[i] == eos for i in real_eos)  # trained, not masked as padding
    assert (labels[short:] == -100).all() and (mask[short:] == 0).all()


def chat_model_folder(tmp_path):
    """A tiny random Llama with the Qwen2.5-template tokenizer, as a transformers folder."""
    from helpers import tiny_llama

    folder = tmp_path / "model"
    model = tiny_llama()
    model.resize_token_embeddings(len(qwen25_tokenizer()))
    model.save_pretrained(folder)
    qwen25_tokenizer().save_pretrained(folder)
    return folder, model


def test_peftkit_train_on_conversations_saves_the_template_with_the_adapter(tmp_path, capsys):
    from peftkit.cli import main

    folder, _ = chat_model_folder(tmp_path)
    rows = [{"messages": [{"role": "user", "content": f"What is {a}+{a}?"},
                          {"role": "assistant", "content": str(a + a)}]} for a in range(12)]
    write_jsonl(tmp_path / "chat.jsonl", rows)
    out = tmp_path / "run"
    code = main(["train", "--model", str(folder), "--data", str(tmp_path / "chat.jsonl"), "--out", str(out),
                 "--max-steps", "2", "--batch-size", "4", "--no-progress"])
    assert code == 0
    saved = (out / "adapter" / "chat_template.jinja").read_text()
    assert saved == qwen25_tokenizer().chat_template
    assert json.loads((out / "run.json").read_text())["options"]["train_on"] == "assistant"

    # Serving: --chat renders the prompt with the saved template and prints only the reply.
    code = main(["generate", "--model", str(folder), "--adapter", str(out / "adapter"), "--chat",
                 "--prompt", "What is 2+2?", "--max-new-tokens", "3"])
    assert code == 0 and "What is 2+2?" not in capsys.readouterr().out


def test_chat_prompts_use_the_template_saved_with_the_adapter():
    from peftkit.chat import prompt_ids

    tokenizer = qwen25_tokenizer()
    chat = [{"role": "user", "content": "Hi"}]
    own = tokenizer.decode(prompt_ids(tokenizer, chat))
    assert own.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    saved = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}[assistant] "
    assert tokenizer.decode(prompt_ids(tokenizer, chat, saved)) == "[user] Hi\n[assistant] "


def test_bad_conversation_data_writes_nothing_to_out(tmp_path, capsys):
    from peftkit.cli import main

    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]},
            {"messages": [{"role": "narrator", "content": "meanwhile"}, {"role": "assistant", "content": "ok"}]}]
    write_jsonl(tmp_path / "chat.jsonl", rows)
    out = tmp_path / "run"
    code = main(["train", "--model", "reference", "--data", str(tmp_path / "chat.jsonl"), "--out", str(out),
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "line 2" in err and "'narrator'" in err and "Traceback" not in err
    assert not out.exists()


def test_the_reference_decoder_has_no_chat_template_for_conversations(tmp_path, capsys):
    from peftkit.cli import main

    write_jsonl(tmp_path / "chat.jsonl", [rows_in_three_formats()[0]])
    out = tmp_path / "run"
    code = main(["train", "--model", "reference", "--data", str(tmp_path / "chat.jsonl"), "--out", str(out),
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "has none" in err and "chat.jsonl, line 1" in err
    assert not out.exists()


def test_a_conversation_that_opens_with_the_assistant_is_masked_or_refused_never_mistrained():
    tokenizer = qwen25_tokenizer()  # its template reads messages[0]: it cannot render an empty chat
    chat = [{"role": "assistant", "content": "Hello, how can I help?"}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Yes."}]
    with pytest.raises(ValueError, match="line 3: the conversation opens with an assistant turn"):
        ChatRenderer(tokenizer).render(chat, "f.jsonl, line 3")
    ids, labels = ChatRenderer(tokenizer, "last").render(chat, "f.jsonl, line 3")
    assert tokenizer.decode([ids[p] for p in trained(labels)]) == "Yes.<|im_end|>"


def test_extra_keys_on_a_conversation_line_are_ignored(tmp_path):
    row = dict(rows_in_three_formats()[0], id="conv-17", source="forum")
    fmt, records = data.read_jsonl(write_jsonl(tmp_path / "chat.jsonl", [row]))
    assert fmt == "messages" and records[0]["id"] == "conv-17"


def test_generate_chat_renders_with_the_saved_template_and_refuses_a_stray_system(tmp_path, capsys):
    import argparse

    from peftkit.cli import main
    from peftkit.cli.models import _chat_prompt
    from peftkit.loading import load_model

    folder, model = chat_model_folder(tmp_path)
    adapter = tmp_path / "adapter"
    import peftkit
    peftkit.attach(model, peftkit.LoraConfig()).save(adapter, chat_template="{% for m in messages %}<{{ m.role }}>"
                                                                           "{{ m.content }}{% endfor %}<assistant>")
    loaded = load_model(folder)
    args = argparse.Namespace(adapter=str(adapter), prompt="Hi", system="Be kind")
    assert loaded.tokenizer.decode(_chat_prompt(loaded, args)) == "<system>Be kind<user>Hi<assistant>"
    code = main(["generate", "--model", str(folder), "--prompt", "Hi", "--system", "Be kind"])
    assert code == 2 and "pass --chat too" in capsys.readouterr().err


def test_a_template_that_refuses_the_prompt_is_an_error_not_a_traceback():
    from peftkit.chat import ChatError, prompt_ids

    strict = ("{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system role') }}"
              "{% endif %}{{ m.content }}{% endfor %}")
    with pytest.raises(ChatError, match="refused the prompt: no system role"):
        prompt_ids(qwen25_tokenizer(), [{"role": "system", "content": "x"}, {"role": "user", "content": "y"}], strict)


def test_text_examples_keep_their_trained_eos_when_the_pad_token_is_the_eos_token(tmp_path):
    tokenizer = byte_tokenizer(CHATML_SPECIALS, eos="<|im_end|>", pad="<|im_end|>")
    _, dataset = build(tmp_path, [{"text": "short"}, {"text": "a longer text than that"}], tokenizer)
    batch = data.collate(dataset.examples, pad_id=tokenizer.pad_token_id)
    eos, n = tokenizer.eos_token_id, len(dataset.examples[0].input_ids)
    assert batch["input_ids"][0, n:].eq(eos).all()  # padded with the EOS id
    assert batch["labels"][0, n - 1] == eos and batch["labels"][0, n:].eq(-100).all()
