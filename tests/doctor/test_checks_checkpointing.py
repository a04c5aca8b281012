"""M12 under gradient checkpointing: the classic failure (reentrant mode on frozen inputs,
so no gradient reaches LoRA) is named with its cause and fix; non-reentrant checkpointing,
peftkit's, is clean."""

from __future__ import annotations

import pytest
from doctor_setups import adamw, flagged, lm_batch, peft_lora
from helpers import tiny_llama, tiny_reference

import peftkit
from peftkit.checkpointing import enable_gradient_checkpointing
from peftkit.doctor import doctor

pytestmark = pytest.mark.usefixtures("one_thread")


def reentrant_on_frozen_inputs(model):
    """What a script on transformers < 4.35 got from the plain switch: reentrant mode and no
    hook making the embeddings' output require grad (transformers 5 adds one itself)."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.disable_input_require_grads()
    return model


@pytest.mark.parametrize("batch", [None, lm_batch()], ids=["random ids", "given batch"])
def test_m12_names_reentrant_checkpointing_on_frozen_inputs(batch):
    model = tiny_llama()
    pm = peftkit.attach(model, peftkit.LoraConfig(r=4))
    reentrant_on_frozen_inputs(model)
    [finding] = flagged(doctor(pm, adamw(pm), batch), "M12")
    assert finding.severity == "error"
    assert "base_model.model.layers.0.self_attn.q_proj.lora_A.default" in finding.where
    assert "reentrant mode" in finding.message and "inputs need no grad" in finding.message
    assert "base_model.model.layers.0" in finding.message  # where checkpointing is on
    assert "use_reentrant=False" in finding.fix and "enable_input_require_grads()" in finding.fix
    assert "peftkit.enable_gradient_checkpointing" in finding.fix


def test_m12_names_it_on_a_hugging_face_peft_model():
    model = peft_lora()
    reentrant_on_frozen_inputs(model.get_base_model())
    [finding] = flagged(doctor(model, adamw(model)), "M12")
    assert "reentrant mode" in finding.message and "use_reentrant=False" in finding.fix


def test_m12_clean_with_non_reentrant_checkpointing():
    model = tiny_llama()
    pm = peftkit.attach(model, peftkit.LoraConfig(r=4))
    reentrant_on_frozen_inputs(model)
    enable_gradient_checkpointing(pm)  # the same model, switched to peftkit's mode
    assert not flagged(doctor(pm, adamw(pm), lm_batch()), "M12")


def test_m12_clean_with_reentrant_checkpointing_once_the_inputs_need_grad():
    model = tiny_llama()
    pm = peftkit.attach(model, peftkit.LoraConfig(r=4))
    reentrant_on_frozen_inputs(model).enable_input_require_grads()
    assert not flagged(doctor(pm, adamw(pm)), "M12")


@pytest.mark.parametrize("config", [peftkit.LoraConfig(r=4), peftkit.PromptConfig(num_virtual_tokens=3),
                                    peftkit.PrefixConfig(num_virtual_tokens=3)], ids=["lora", "prompt", "prefix"])
def test_m12_clean_on_the_checkpointed_reference_decoder(config):
    pm = peftkit.attach(tiny_reference(), config)
    enable_gradient_checkpointing(pm)
    report = doctor(pm, adamw(pm))
    assert not flagged(report, "M12")
    assert not any("M12" in note for note in report.notes)
