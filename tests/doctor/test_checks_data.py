"""What the model is trained on: D1 (no label to learn from), D2 (labels on padding), D3
(loss on user or system tokens), D4 (no EOS in the labels) and D5 (chat template differs from
the recorded one), each planted in a batch, a tokenizer or an adapter folder, beside clean
controls. The tokenizers are real transformers fast tokenizers built here (a byte-level BPE
with chat templates, ``chat_templates``); the batches are made by peftkit's own chat
renderer and collate, then spoiled the way hurried scripts spoil them."""

from __future__ import annotations

import json

import pytest
import torch
from chat_templates import (CHATML_SPECIALS, CONVERSATION, QWEN25_TEMPLATE, byte_tokenizer, llama3_tokenizer,
                            qwen25_tokenizer)
from doctor_setups import adamw, flagged
from helpers import tiny_bert_classifier, tiny_llama

import peftkit
from peftkit.chat import ChatRenderer
from peftkit.data import Example, collate
from peftkit.doctor import DATA_FINDINGS, DoctorReport, Finding, doctor
from peftkit.doctor.report import mistake_order
from peftkit.doctor.templates import turn_end, user_header

pytestmark = pytest.mark.usefixtures("one_thread")

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Two conversations of different lengths, so that the shorter one is padded.
CONVERSATIONS = [CONVERSATION, CONVERSATION[1:3]]


def chatml_tokenizer(eos="<|im_end|>", pad="<|endoftext|>", template=CHATML_TEMPLATE):
    return byte_tokenizer(CHATML_SPECIALS, eos=eos, pad=pad, template=template)


def lm_for(tokenizer):
    """A tiny Llama with LoRA that reads ``tokenizer``'s ids and agrees on its special ids."""
    model = tiny_llama()
    model.resize_token_embeddings(len(tokenizer))
    model.config.eos_token_id, model.config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return peftkit.attach(model, peftkit.LoraConfig(r=4))


@pytest.fixture(scope="module")
def chatml():
    tokenizer = chatml_tokenizer()
    return tokenizer, lm_for(tokenizer)


def chat_batch(tokenizer, train_on="assistant", conversations=CONVERSATIONS):
    """A right-padded batch as peftkit trains on it: rendered, masked, collated."""
    renderer = ChatRenderer(tokenizer, train_on)
    return collate([Example(*renderer.render(c, "test")) for c in conversations], tokenizer.pad_token_id)


def data_ids(report: DoctorReport) -> set[str]:
    return {i for i in report.ids() if i in DATA_FINDINGS}


def data_notes(report: DoctorReport) -> list[str]:
    return [n for n in report.notes if n[:2] in DATA_FINDINGS or n.startswith("D1-D4")]


# -- the ids ------------------------------------------------------------------------------
def test_data_findings_sort_after_the_twelve_and_print_with_their_titles():
    assert list(DATA_FINDINGS) == [f"D{i}" for i in range(1, 6)]
    order = sorted(["D2", "M12", "D1", "M2", "M10", "D5"], key=mistake_order)
    assert order == ["M2", "M10", "M12", "D1", "D2", "D5"]
    report = DoctorReport([Finding("D5", "error", "tokenizer", "differs.", "serve the recorded one.")])
    assert "D5 error: chat template differs from the recorded one" in str(report)
    assert DoctorReport.from_json(report.to_json()) == report
    with pytest.raises(ValueError):
        Finding("D6", "error", "x", "y", "z")
    assert "M1-M12 and D1-D5" in str(DoctorReport())


def test_train_on_must_be_a_known_intent(chatml):
    with pytest.raises(ValueError, match="train_on"):
        doctor(chatml[1], train_on="assistants")


# -- D1 -----------------------------------------------------------------------------------
def test_d1_batch_in_which_every_label_is_masked(chatml):
    tokenizer, model = chatml
    batch = chat_batch(tokenizer)
    batch["labels"] = torch.full_like(batch["labels"], -100)
    errors = flagged(doctor(model, batch=batch, tokenizer=tokenizer), "D1", "error")
    assert errors and "every label in the batch is -100" in errors[0].message and "NaN" in errors[0].message
    # The first position's label is never used by a causal LM (it shifts): still nothing to learn.
    batch["labels"][:, 0] = batch["input_ids"][:, 0]
    assert flagged(doctor(model, batch=batch, tokenizer=tokenizer), "D1", "error")


def test_d1_rows_without_a_label_are_a_warning(chatml):
    tokenizer, model = chatml
    batch = chat_batch(tokenizer)
    batch["labels"][1] = -100
    findings = flagged(doctor(model, batch=batch, tokenizer=tokenizer), "D1")
    assert [f.severity for f in findings] == ["warning"] and "row 1" in findings[0].where


def test_d1_not_flagged_on_trained_labels_or_class_labels(chatml):
    tokenizer, model = chatml
    report = doctor(model, batch=chat_batch(tokenizer), tokenizer=tokenizer, train_on="assistant")
    assert not data_ids(report) and not data_notes(report), str(report)
    classifier = peftkit.attach(tiny_bert_classifier(), peftkit.LoraConfig(r=4))
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1])}
    report = doctor(classifier, batch=batch)
    assert not data_ids(report) and not data_notes(report), str(report)


# -- D2 -----------------------------------------------------------------------------------
def test_d2_labels_copied_from_padded_input_ids(chatml):
    tokenizer, model = chatml
    batch = chat_batch(tokenizer)
    assert not batch["attention_mask"][1].all()  # the second conversation is padded
    batch["labels"] = batch["input_ids"].clone()  # the classic: padding copied into the labels
    errors = flagged(doctor(model, batch=batch, tokenizer=tokenizer, train_on="all"), "D2", "error")
    assert errors and errors[0].where == "batch labels, row 1" and "attention_mask" in errors[0].fix
    assert "pad == eos" not in errors[0].fix  # here pad and EOS are different tokens


def test_d2_pad_equal_to_eos_keeps_the_real_eos_trained():
    # SmolLM2's choice: the padding token is the EOS token. The reply's EOS is attended and
    # trained, which is right; only labels where attention_mask is 0 are padding.
    tokenizer = chatml_tokenizer(pad="<|im_end|>")
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    model = lm_for(tokenizer)
    batch = chat_batch(tokenizer)
    eos = tokenizer.eos_token_id
    assert ((batch["labels"] == eos) & (batch["attention_mask"] == 1)).any()
    assert ((batch["input_ids"] == eos) & (batch["attention_mask"] == 0)).any()
    report = doctor(model, batch=batch, tokenizer=tokenizer, train_on="assistant")
    assert not data_ids(report), str(report)

    spoiled = dict(batch, labels=batch["input_ids"].clone())
    errors = flagged(doctor(model, batch=spoiled, tokenizer=tokenizer, train_on="all"), "D2", "error")
    assert errors and "padding token is the EOS token" in errors[0].fix
    # The opposite slip, masking by token id: no padding is labelled, but no EOS is either.
    masked = dict(batch, labels=batch["labels"].masked_fill(batch["input_ids"] == tokenizer.pad_token_id, -100))
    report = doctor(model, batch=masked, tokenizer=tokenizer, train_on="assistant")
    assert not flagged(report, "D2")
    warnings = flagged(report, "D4", "warning")
    assert warnings and "pad == eos" in warnings[0].message


def test_d2_not_checked_without_an_attention_mask(chatml):
    tokenizer, model = chatml
    batch = chat_batch(tokenizer)
    packed = {"input_ids": batch["input_ids"], "labels": batch["input_ids"].clone()}  # no mask: packed rows
    assert not flagged(doctor(model, batch=packed, tokenizer=tokenizer, train_on="all"), "D2")


# -- D3 -----------------------------------------------------------------------------------
TEMPLATES = {
    "chatml": (chatml_tokenizer, "<|im_start|>user\n"),
    # A default system prompt comes first: the header shared by first and later user turns
    # starts at the end of the turn before.
    "qwen2.5": (qwen25_tokenizer, "<|im_end|>\n<|im_start|>user\n"),
    "llama3": (llama3_tokenizer, "<|start_header_id|>user<|end_header_id|>\n\n"),
}


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_d3_user_header_is_read_from_the_template(name):
    make, header = TEMPLATES[name]
    tokenizer = make()
    assert tokenizer.decode(user_header(tokenizer)) == header
    end = {"chatml": "<|im_end|>", "qwen2.5": "<|im_end|>", "llama3": "<|eot_id|>"}[name]
    assert turn_end(tokenizer) == tokenizer.convert_tokens_to_ids(end)


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_d3_loss_on_user_turns_when_assistant_only_was_meant(name):
    tokenizer = TEMPLATES[name][0]()
    model = lm_for(tokenizer)
    everything = chat_batch(tokenizer, train_on="all")  # every token labelled, padding excepted
    for intent in ("assistant", "last"):
        errors = flagged(doctor(model, batch=everything, tokenizer=tokenizer, train_on=intent), "D3", "error")
        assert errors and "user turn's header" in errors[0].message and f"train_on={intent!r}" in errors[0].message
        assert errors[0].where == "batch labels, rows 0, 1"
    unknown = flagged(doctor(model, batch=everything, tokenizer=tokenizer), "D3")
    assert [f.severity for f in unknown] == ["warning"] and "train_on='all'" in unknown[0].fix
    assert not flagged(doctor(model, batch=everything, tokenizer=tokenizer, train_on="all"), "D3")


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_d3_not_flagged_on_assistant_only_masks(name):
    tokenizer = TEMPLATES[name][0]()
    model = lm_for(tokenizer)
    for train_on in ("assistant", "last"):
        report = doctor(model, batch=chat_batch(tokenizer, train_on), tokenizer=tokenizer, train_on=train_on)
        assert not data_ids(report) and not data_notes(report), str(report)
    report = doctor(model, batch=chat_batch(tokenizer), tokenizer=tokenizer)  # intent unknown: still clean
    assert not data_ids(report), str(report)


def test_d3_says_so_when_the_tokenizer_has_no_template(chatml):
    tokenizer, model = chatml
    batch = chat_batch(tokenizer, train_on="all")
    plain = chatml_tokenizer(template=None)
    report = doctor(model, batch=batch, tokenizer=plain, train_on="assistant")
    assert not flagged(report, "D3") and any(n.startswith("D3 not checked") for n in report.notes)


# -- D4 -----------------------------------------------------------------------------------
def test_d4_no_eos_in_any_label(chatml):
    tokenizer, model = chatml
    batch = chat_batch(tokenizer)
    batch["labels"][batch["labels"] == tokenizer.eos_token_id] = -100  # replies that never end
    warnings = flagged(doctor(model, batch=batch, tokenizer=tokenizer, train_on="assistant"), "D4", "warning")
    assert warnings and "never learns to stop" in warnings[0].message
    assert str(tokenizer.eos_token_id) in warnings[0].message and "pad == eos" not in warnings[0].message
    # Plain text, tokenized without an EOS at its end.
    ids = torch.tensor([tokenizer("the sky is blue", add_special_tokens=False)["input_ids"]])
    text = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    assert flagged(doctor(model, batch=text, tokenizer=tokenizer), "D4", "warning")


def test_d4_the_templates_end_of_turn_token_counts_as_eos():
    # A base model's tokenizer: EOS is <|endoftext|>, but chats end each turn with <|im_end|>,
    # which is what the model learns to stop with (and what servers stop at).
    tokenizer = chatml_tokenizer(eos="<|endoftext|>", pad="<|endoftext|>")
    model = lm_for(tokenizer)
    report = doctor(model, batch=chat_batch(tokenizer), tokenizer=tokenizer, train_on="assistant")
    assert not data_ids(report), str(report)


def test_d4_not_checked_without_a_tokenizer(chatml):
    # Without one, a batch may be random ids for M12's backward, which have no EOS to find.
    tokenizer, model = chatml
    batch = chat_batch(tokenizer)
    batch["labels"][batch["labels"] == tokenizer.eos_token_id] = -100
    report = doctor(model, batch=batch)
    assert not flagged(report, "D4") and not data_notes(report)


# -- D5 -----------------------------------------------------------------------------------
def test_d5_tokenizer_template_differs_from_the_recorded_one(chatml):
    tokenizer, model = chatml
    errors = flagged(doctor(model, tokenizer=tokenizer, chat_template=QWEN25_TEMPLATE), "D5", "error")
    assert errors and "differs from the one recorded" in errors[0].message and "first at line" in errors[0].message
    assert "chat_template.jinja" in errors[0].fix and "retrain" in errors[0].fix
    assert "tokenizer.chat_template" in errors[0].where and "recorded" in errors[0].where
    plain = chatml_tokenizer(template=None)
    errors = flagged(doctor(model, tokenizer=plain, chat_template=CHATML_TEMPLATE), "D5", "error")
    assert errors and "has no chat template" in errors[0].message


def test_d5_not_flagged_on_the_recorded_template(chatml):
    tokenizer, model = chatml
    assert not flagged(doctor(model, tokenizer=tokenizer, chat_template=CHATML_TEMPLATE + "\n"), "D5")
    assert not flagged(doctor(model, tokenizer=tokenizer), "D5")  # nothing recorded: nothing to compare
    report = doctor(model, chat_template=CHATML_TEMPLATE)
    assert not flagged(report, "D5") and any(n.startswith("D5 not checked") for n in report.notes)


def test_d5_cli_doctor_on_an_adapter_trained_with_another_template(tmp_path, capsys):
    from peftkit.cli import main
    from peftkit.formats.adapter_folder import CHAT_TEMPLATE_NAME

    tokenizer = chatml_tokenizer()
    model = lm_for(tokenizer)
    model.base_model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    model.save(tmp_path / "adapter")
    (tmp_path / "adapter" / CHAT_TEMPLATE_NAME).write_text(QWEN25_TEMPLATE)
    capsys.readouterr()
    args = ["doctor", "--model", str(tmp_path / "model"), "--adapter", str(tmp_path / "adapter"), "--json"]
    assert main(args) == 1
    findings = json.loads(capsys.readouterr().out)["findings"]
    assert [f["severity"] for f in findings if f["id"] == "D5"] == ["error"]
    (tmp_path / "adapter" / CHAT_TEMPLATE_NAME).write_text(CHATML_TEMPLATE)
    assert main(args) == 0
    assert "D5" not in {f["id"] for f in json.loads(capsys.readouterr().out)["findings"]}


# -- the pre-flight of peftkit train -------------------------------------------------------
def test_preflight_stops_a_run_whose_loss_is_on_user_turns(chatml):
    from peftkit.cli.training import PreflightFailed, _doctor_preflight

    tokenizer, model = chatml
    optimizer = adamw(model)
    everything = chat_batch(tokenizer, train_on="all")
    with pytest.raises(PreflightFailed, match="D3"):
        _doctor_preflight(model, optimizer, everything, tokenizer=tokenizer, train_on="assistant")
    _doctor_preflight(model, optimizer, everything, tokenizer=tokenizer, train_on="all")
    _doctor_preflight(model, optimizer, chat_batch(tokenizer), tokenizer=tokenizer, train_on="assistant")


def test_train_on_conversations_passes_the_doctor(tmp_path, capsys):
    from helpers import write_jsonl

    from peftkit.cli import main

    tokenizer = chatml_tokenizer()
    base = tiny_llama()
    base.resize_token_embeddings(len(tokenizer))
    base.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in CONVERSATIONS * 4])
    code = main(["train", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "chat.jsonl"),
                 "--out", str(tmp_path / "run"), "--steps", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert not any(f"doctor warning D{i}" in err or f"doctor note: D{i}" in err for i in range(1, 6)), err

