"""Finding adapters by structure: peftkit's, Hugging Face PEFT's and hand-made ones are
seen as the same views, and a correct PEFT setup raises nothing."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_reference
from doctor_setups import adamw, hand_adapter_model, hand_lora_model, lm_batch, peft_lora

import peftkit
from peftkit.doctor import doctor
from peftkit.doctor.inventory import find_adapters
from peftkit.doctor.probe import untouched


# -- the reference case: a correct Hugging Face PEFT LoRA ---------------------------------------
def test_correct_peft_lora_with_optimizer_and_batch_has_no_errors_or_warnings():
    model = peft_lora()
    report = doctor(model, adamw(model), lm_batch())
    assert report.ok
    assert not report.errors and not report.warnings, str(report)
    assert report.ids() <= {"M6"}  # unmerged while training: worth knowing, nothing more
    assert not report.notes, report.notes




@pytest.mark.parametrize("source", ["peftkit", "peft", "hand-made"])
def test_lora_of_every_origin_is_found_as_the_same_view(source):
    model = {"peftkit": lambda: peftkit.attach(tiny_reference(), peftkit.LoraConfig(r=4, alpha=8)),
             "peft": lambda: peft_lora(r=4), "hand-made": hand_lora_model}[source]()
    with untouched(model), torch.no_grad():
        inv = find_adapters(model)
    assert [v.source for v in inv.lora] == [source] * 4  # q and v of two layers
    for view in inv.lora:
        (pair,) = view.pairs
        a, b, _ = view.matrices(view.module, pair)
        assert a.shape == (4, view.in_features) and b.shape == (view.out_features, 4)
        assert pair.scaling == 2.0 and pair.expected_scaling == (2.0 if source == "peft" else None)
        assert all(inv.is_adapter(view.module.get_parameter(n)) for n in (pair.a_name, pair.b_name))
    assert not inv.bottlenecks


def test_bottleneck_adapters_are_found_by_shape():
    model = hand_adapter_model(residual=True)
    with untouched(model), torch.no_grad():
        inv = find_adapters(model)
    assert [(v.path, v.down, v.up, v.hidden) for v in inv.bottlenecks] == [
        ("layers.0.mlp.1", "down", "up", 64), ("layers.1.mlp.1", "down", "up", 64)]
    assert not inv.lora
