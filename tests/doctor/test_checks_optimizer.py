"""The optimizer's learning rates: M9 (learning rate too low for PEFT)."""

from __future__ import annotations

from helpers import tiny_reference
from doctor_setups import HandPrompt, adamw, flagged, peft_lora

from peftkit.doctor import doctor


# -- M9 -----------------------------------------------------------------------------------
def test_m9_learning_rate_below_the_methods_floor():
    model = peft_lora()
    findings = flagged(doctor(model, adamw(model, lr=1e-5)), "M9")
    assert [f.severity for f in findings] == ["warning"] and "1e-05" in findings[0].message
    prompt = HandPrompt(tiny_reference())
    assert flagged(doctor(prompt, adamw(prompt, lr=2e-4)), "M9")  # fine for LoRA, low for a prompt


def test_m9_not_flagged_at_method_rates():
    model = peft_lora()
    assert not flagged(doctor(model, adamw(model, lr=2e-4)), "M9")
