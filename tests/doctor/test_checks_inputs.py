"""The input side of prompts and prefixes: M7 (soft prompt not at the input embeddings)
and M11 (prefix attention mask not extended)."""

from __future__ import annotations

import pytest
from helpers import tiny_llama, tiny_reference
from doctor_setups import HandPrefix, HandPrompt, adamw, flagged, lm_batch, peft

import peftkit
from peftkit.doctor import doctor


# -- M7 -----------------------------------------------------------------------------------
@pytest.mark.parametrize("place, mask_value, words", [("end", 1, "after the input"), ("front", 0, "mask hides")])
def test_m7_prompt_after_the_tokens_or_hidden_by_the_mask(place, mask_value, words):
    model = HandPrompt(tiny_reference(), place=place, mask_value=mask_value)
    errors = flagged(doctor(model), "M7", "error")
    assert errors and words in errors[0].message and errors[0].where == "prompt"


def test_m7_not_flagged_on_correct_prompts():
    assert not flagged(doctor(HandPrompt(tiny_reference())), "M7")
    model = peft.get_peft_model(tiny_llama(), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    report = doctor(model, adamw(model, 1e-2), lm_batch())
    assert not report.findings, str(report)
    pm = peftkit.attach(tiny_reference(), peftkit.PromptConfig(num_virtual_tokens=4))
    assert not flagged(doctor(pm), "M7")


# -- M11 ----------------------------------------------------------------------------------
def test_m11_prefix_mask_extended_at_the_wrong_end():
    errors = flagged(doctor(HandPrefix(tiny_reference(), mask_at="end")), "M11", "error")
    assert errors and errors[0].where == "prefix" and "cat([ones(B, N), mask]" in errors[0].fix


def test_m11_not_flagged_on_correct_prefixes():
    report = doctor(HandPrefix(tiny_reference()))
    assert not report.errors and not report.warnings, str(report)  # its prefix is found as an adapter (M1)
    model = peft.get_peft_model(tiny_llama(), peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    report = doctor(model, adamw(model, 1e-2), lm_batch())
    assert not report.findings and not report.notes, str(report)
    pm = peftkit.attach(tiny_reference(), peftkit.PrefixConfig(num_virtual_tokens=4))
    assert not flagged(doctor(pm), "M11")
