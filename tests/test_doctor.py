"""peftkit.doctor: for every mistake M1-M12 a setup that has it (flagged with its id) and a
correct one (not flagged), on peftkit, Hugging Face PEFT and hand-written plain-torch
models; the doctor leaves everything as it found it; the report and the command line."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import randomize_adapters, save_transformers_folder, tiny_llama, tiny_reference
from torch import nn

import peftkit
from peftkit.doctor import DoctorReport, Finding, doctor

peft = pytest.importorskip("peft")


# -- setups, the way tutorials and hurried scripts write them ------------------------------
class HandLora(nn.Module):
    """Frozen W plus trainable A, B; ``alpha`` and ``r`` are stored, and knobs plant mistakes."""

    def __init__(self, linear: nn.Linear, r: int, alpha: float, *, zero_b=True, scale=True, freeze=True):
        super().__init__()
        self.linear = linear.requires_grad_(not freeze)
        self.A = nn.Parameter(torch.randn(r, linear.in_features) / math.sqrt(linear.in_features))
        self.B = nn.Parameter(torch.zeros(linear.out_features, r) if zero_b else torch.randn(linear.out_features, r))
        self.alpha, self.r, self.scale = alpha, r, scale

    def forward(self, x):
        s = self.alpha / self.r if self.scale else 1.0  # scale=False: alpha is stored but ignored
        return self.linear(x) + s * (x @ self.A.t() @ self.B.t())


def hand_lora_model(**knobs) -> nn.Module:
    model = tiny_reference().requires_grad_(False)
    for layer in model.layers:
        layer.attn.q = HandLora(layer.attn.q, 4, 8, **knobs)
        layer.attn.v = HandLora(layer.attn.v, 4, 8, **knobs)
    return model


class HandAdapter(nn.Module):
    """A bottleneck adapter; ``residual=False`` is the mistake: up(relu(down(h))) alone."""

    def __init__(self, hidden: int, bottleneck: int, residual: bool):
        super().__init__()
        self.down, self.up, self.residual = nn.Linear(hidden, bottleneck), nn.Linear(bottleneck, hidden), residual
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h):
        delta = self.up(torch.relu(self.down(h)))
        return h + delta if self.residual else delta


def hand_adapter_model(residual: bool) -> nn.Module:
    model = tiny_reference().requires_grad_(False)
    for layer in model.layers:
        layer.mlp = nn.Sequential(layer.mlp, HandAdapter(64, 8, residual))
    return model


class HandPrompt(nn.Module):
    """Soft prompt around a decoder; ``place="end"`` and ``mask_value=0`` plant M7."""

    def __init__(self, lm: nn.Module, n: int = 4, place: str = "front", mask_value: int = 1):
        super().__init__()
        self.lm = lm.requires_grad_(False)
        self.prompt = nn.Parameter(torch.randn(n, 64) * 0.02)
        self.place, self.mask_value = place, mask_value

    def forward(self, input_ids, attention_mask=None):
        embeds = self.lm.embed_tokens(input_ids)
        batch, n = input_ids.shape[0], self.prompt.shape[0]
        prompt = self.prompt.expand(batch, -1, -1)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        prompt_mask = torch.full((batch, n), self.mask_value, dtype=mask.dtype)
        if self.place == "front":
            embeds, mask = torch.cat([prompt, embeds], 1), torch.cat([prompt_mask, mask], 1)
        else:
            embeds, mask = torch.cat([embeds, prompt], 1), torch.cat([mask, prompt_mask], 1)
        return self.lm(inputs_embeds=embeds, attention_mask=mask)


class HandPrefix(nn.Module):
    """Prefix keys/values handed to the reference decoder as its cache; ``mask_at="end"``
    extends the attention mask at the wrong end (M11)."""

    def __init__(self, lm: nn.Module, n: int = 3, mask_at: str = "front"):
        super().__init__()
        self.lm = lm.requires_grad_(False)
        config = lm.config
        self.prefix = nn.Parameter(torch.randn(config.num_layers, 2, config.num_heads, n, config.head_dim))
        self.mask_at = mask_at

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        batch, n = input_ids.shape[0], self.prefix.shape[3]
        past = tuple((kv[0].expand(batch, -1, -1, -1), kv[1].expand(batch, -1, -1, -1)) for kv in self.prefix)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        ones = torch.ones(batch, n, dtype=mask.dtype)
        mask = torch.cat([ones, mask], 1) if self.mask_at == "front" else torch.cat([mask, ones], 1)
        return self.lm(input_ids=input_ids, attention_mask=mask, past_key_values=past, position_ids=position_ids)


def peft_lora(targets=("q_proj", "v_proj"), r=8, **kwargs):
    config = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), **kwargs)
    return peft.get_peft_model(tiny_llama(), config)


def adamw(model: nn.Module, lr: float = 2e-4) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)


def lm_batch(vocab: int = 128) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def flagged(report: DoctorReport, mistake: str, *severities: str) -> list[Finding]:
    return [f for f in report.findings if f.id == mistake and (not severities or f.severity in severities)]


# -- the reference case: a correct Hugging Face PEFT LoRA ---------------------------------------
def test_correct_peft_lora_with_optimizer_and_batch_has_no_errors_or_warnings():
    model = peft_lora()
    report = doctor(model, adamw(model), lm_batch())
    assert report.ok
    assert not report.errors and not report.warnings, str(report)
    assert report.ids() <= {"M6"}  # unmerged while training: worth knowing, nothing more
    assert not report.notes, report.notes


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    """Everything the doctor must leave alone, copied."""
    clone = lambda t: None if t is None else t.detach().clone()  # noqa: E731
    state = {} if optimizer is None else optimizer.state_dict()
    return {
        "params": {n: clone(p) for n, p in model.named_parameters()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "grads": {n: clone(p.grad) for n, p in model.named_parameters()},
        "buffers": {n: clone(b) for n, b in model.named_buffers()},
        "modes": {n: m.training for n, m in model.named_modules()},
        "optimizer": {k: {n: clone(v) if torch.is_tensor(v) else v for n, v in s.items()}
                      for k, s in state.get("state", {}).items()},
        "groups": state.get("param_groups"),
        "rng": torch.get_rng_state(),
    }


def assert_same(before: dict, after: dict) -> None:
    for key in ("requires_grad", "modes", "groups"):
        assert before[key] == after[key], key
    for key in ("params", "grads", "buffers"):
        assert before[key].keys() == after[key].keys()
        for name, tensor in before[key].items():
            other = after[key][name]
            assert (tensor is None) == (other is None), (key, name)
            assert tensor is None or torch.equal(tensor, other), (key, name)
    assert before["optimizer"].keys() == after["optimizer"].keys()
    for index, state in before["optimizer"].items():
        for name, value in state.items():
            other = after["optimizer"][index][name]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other
    assert torch.equal(before["rng"], after["rng"])


def test_doctor_leaves_model_grads_and_optimizer_state_as_they_were():
    model = peft_lora()
    model.train()
    optimizer = adamw(model)
    batch = lm_batch()
    model(**batch).loss.backward()
    optimizer.step()  # state to keep
    model(**batch).loss.backward()  # .grad to keep
    model.base_model.model.lm_head.weight.grad = torch.ones_like(model.base_model.model.lm_head.weight)  # stale
    before = snapshot(model, optimizer)
    report = doctor(model, optimizer, batch)
    assert_same(before, snapshot(model, optimizer))
    assert flagged(report, "M12", "warning")  # the stale .grad it saw, and left in place


@pytest.mark.parametrize("setup", ["prompt", "prefix", "hand-made"])
def test_doctor_leaves_prompt_prefix_and_hand_made_models_as_they_were(setup):
    if setup == "hand-made":
        model = hand_lora_model(zero_b=False)
    else:
        config = (peft.PromptTuningConfig if setup == "prompt" else peft.PrefixTuningConfig)(
            task_type="CAUSAL_LM", num_virtual_tokens=3)
        model = peft.get_peft_model(tiny_llama(), config)
    before = snapshot(model, None)
    doctor(model, batch=lm_batch())
    assert_same(before, snapshot(model, None))


# -- the report -------------------------------------------------------------------------
def test_report_ok_table_and_json_round_trip():
    model = hand_lora_model(scale=False)
    report = doctor(model, adamw(model))
    assert not report.ok and "M3" in report.ids("error")
    text = str(report)
    assert text.startswith("peftkit doctor: 1 error")
    assert "M3" in text and "layers.0.attn.q" in text and "fix" in text
    data = json.loads(report.to_json())
    assert data["ok"] is False and {f["id"] for f in data["findings"]} == report.ids()
    assert DoctorReport.from_json(report.to_json()) == report
    assert DoctorReport().ok and "no mistake found" in str(DoctorReport())
    with pytest.raises(ValueError):
        Finding("M13", "error", "x", "y", "z")


# -- M1 ---------------------------------------------------------------------------------
def test_m1_peft_model_with_its_base_unfrozen():
    model = peft_lora()
    for param in model.parameters():
        param.requires_grad_(True)
    findings = flagged(doctor(model, adamw(model)), "M1", "error")
    assert findings and "embed_tokens.weight" in findings[0].where
    assert "freeze" in findings[0].fix


def test_m1_frozen_parameters_in_the_optimizer():
    model = peft_lora()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-4)  # every parameter, frozen ones too
    findings = flagged(doctor(model, optimizer), "M1")
    assert [f.severity for f in findings] == ["warning"]
    assert "requires_grad" in findings[0].fix


def test_m1_not_flagged_on_peftkit_and_hand_made_setups():
    pm = peftkit.attach(tiny_reference(), peftkit.LoraConfig(r=4))
    assert not flagged(doctor(pm, adamw(pm)), "M1")
    assert not flagged(doctor(hand_lora_model()), "M1")
    assert not flagged(doctor(HandPrompt(tiny_reference())), "M1")  # the prompt is found as an adapter


# -- M2 ---------------------------------------------------------------------------------
def test_m2_hand_made_lora_with_random_b():
    model = hand_lora_model(zero_b=False)
    errors = flagged(doctor(model, adamw(model)), "M2", "error")  # no step yet: certain
    assert errors and "layers.0.attn.q" in errors[0].message and "zeros_(B)" in errors[0].fix
    assert flagged(doctor(model), "M2", "warning")  # no optimizer: cannot know it is untrained


def test_m2_not_flagged_when_b_is_zero_or_the_adapter_is_trained():
    model = hand_lora_model()
    assert not flagged(doctor(model, adamw(model)), "M2")
    pm = peftkit.attach(tiny_reference(), peftkit.LoraConfig(r=4))
    optimizer = adamw(pm)
    batch = lm_batch(260)
    pm(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    randomize_adapters(pm)  # trained: B is no longer zero, and that is right
    assert not flagged(doctor(pm, optimizer), "M2")


def test_m2_bottleneck_with_nonzero_up():
    model = hand_adapter_model(residual=True)
    nn.init.normal_(model.layers[1].mlp[1].up.weight)
    errors = flagged(doctor(model, adamw(model, 1e-3)), "M2", "error")
    assert errors and "layers.1.mlp.1" in errors[0].where


# -- M3 ---------------------------------------------------------------------------------
def test_m3_hand_made_lora_without_scaling():
    model = hand_lora_model(scale=False)
    errors = flagged(doctor(model, adamw(model)), "M3", "error")
    assert errors and "layers.0.attn.q" in errors[0].message
    assert "alpha / r" in errors[0].fix


def test_m3_not_flagged_on_correct_scaling_peftkit_peft_and_rslora():
    assert not flagged(doctor(hand_lora_model()), "M3")
    assert not flagged(doctor(peft_lora(use_rslora=True)), "M3")
    config = peftkit.LoraConfig(r=4, alpha=32, use_rslora=True, target_modules="all-linear")
    pm = peftkit.attach(tiny_reference(), config)
    assert not flagged(doctor(pm), "M3")


class TutorialLora(nn.Module):
    """Another tutorial layout: the frozen weight is the module's own, h = W x + s · x A B."""

    def __init__(self, features: int, r: int, alpha: float):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(features, features), requires_grad=False)
        self.lora_a = nn.Parameter(torch.randn(features, r))
        self.lora_b = nn.Parameter(torch.zeros(r, features))
        self.scaling = alpha / r

    def forward(self, x):
        return x @ self.weight.t() + self.scaling * (x @ self.lora_a @ self.lora_b)


def test_m3_hand_made_lora_in_x_a_b_layout_is_found_and_checked():
    model = nn.Sequential(TutorialLora(32, 4, 8))
    report = doctor(model, adamw(model))
    assert report.ok and report.ids() == {"M4", "M6"}  # found as LoRA (on no attention layer), correct
    model[0].scaling = 1.0  # the layer now says s = 1 but computes 2: still the formula's check
    model[0].forward = lambda x, m=model[0]: x @ m.weight.t() + 2.0 * (x @ m.lora_a @ m.lora_b)
    assert flagged(doctor(model, adamw(model)), "M3", "error")


def test_m3_hand_made_lora_that_does_not_say_its_scaling_is_info():
    model = hand_lora_model()
    for layer in model.layers:
        for name in ("q", "v"):
            del getattr(layer.attn, name).alpha
    info = flagged(doctor(model), "M3")
    assert [f.severity for f in info] == ["info"] and "cannot verify" in info[0].message


# -- M4 ---------------------------------------------------------------------------------
def test_m4_lora_only_on_output_projections():
    findings = flagged(doctor(peft_lora(targets=["o_proj"])), "M4")
    assert [f.severity for f in findings] == ["warning"] and "output projections" in findings[0].message


def test_m4_config_naming_modules_that_match_nothing():
    errors = flagged(doctor(peft_lora(targets=["q_proj", "query"])), "M4", "error")
    assert errors and "'query'" in errors[0].message and "q_proj" in errors[0].fix


def test_m4_not_flagged_on_query_and_value():
    assert not flagged(doctor(peft_lora()), "M4")
    assert not flagged(doctor(hand_lora_model()), "M4")


# -- M5 ---------------------------------------------------------------------------------
def test_m5_rank_at_layer_size_and_rank_too_large_a_share():
    hand = nn.Sequential(HandLora(nn.Linear(16, 16), r=16, alpha=32))
    errors = flagged(doctor(hand), "M5", "error")
    assert errors and "r=16" in errors[0].message and errors[0].where == "0"
    warnings_ = flagged(doctor(peft_lora(targets=["q_proj"], r=40)), "M5")
    assert [f.severity for f in warnings_] == ["warning"]


def test_m5_not_flagged_on_a_small_rank():
    assert not flagged(doctor(peft_lora(r=8)), "M5")


# -- M6 ---------------------------------------------------------------------------------
def test_m6_unmerged_lora_in_an_inference_model():
    pm = peftkit.attach(tiny_reference(), peftkit.LoraConfig(r=4)).eval()
    findings = flagged(doctor(pm), "M6")
    assert [f.severity for f in findings] == ["warning"] and "merge_and_unload" in findings[0].fix
    pm.train()
    assert [f.severity for f in flagged(doctor(pm, adamw(pm)), "M6")] == ["info"]


def test_m6_not_flagged_once_merged():
    pm = peftkit.attach(tiny_reference(), peftkit.LoraConfig(r=4)).eval()
    randomize_adapters(pm)
    pm.merge()
    assert not flagged(doctor(pm), "M6")


# -- M7 ---------------------------------------------------------------------------------
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


# -- M8 ---------------------------------------------------------------------------------
def test_m8_adapter_without_residual():
    errors = flagged(doctor(hand_adapter_model(residual=False)), "M8", "error")
    assert errors and "layers.0.mlp.1" in errors[0].where and "h + up" in errors[0].fix


def test_m8_not_flagged_on_residual_adapters():
    assert not flagged(doctor(hand_adapter_model(residual=True)), "M8")
    pm = peftkit.attach(tiny_reference(), peftkit.AdapterConfig(bottleneck=8))
    assert not doctor(pm, adamw(pm, 1e-3)).errors


# -- M9 ---------------------------------------------------------------------------------
def test_m9_learning_rate_below_the_methods_floor():
    model = peft_lora()
    findings = flagged(doctor(model, adamw(model, lr=1e-5)), "M9")
    assert [f.severity for f in findings] == ["warning"] and "1e-05" in findings[0].message
    prompt = HandPrompt(tiny_reference())
    assert flagged(doctor(prompt, adamw(prompt, lr=2e-4)), "M9")  # fine for LoRA, low for a prompt


def test_m9_not_flagged_at_method_rates():
    model = peft_lora()
    assert not flagged(doctor(model, adamw(model, lr=2e-4)), "M9")


# -- M10 --------------------------------------------------------------------------------
def test_m10_checkpoint_that_holds_the_base_model(tmp_path):
    from safetensors.torch import save_file

    pm = peftkit.attach(tiny_llama(), peftkit.LoraConfig(r=4))
    full = tmp_path / "full.safetensors"
    save_file({k: v.contiguous() for k, v in pm.state_dict().items()}, str(full))
    errors = flagged(doctor(pm, checkpoint=full), "M10", "error")
    assert errors and "base-model tensors" in errors[0].message and "pm.save" in errors[0].fix
    legacy = tmp_path / "model.bin"
    torch.save(pm.base_model.state_dict(), legacy)  # read with weights_only=True
    assert flagged(doctor(pm, checkpoint=legacy), "M10", "error")


def test_m10_not_flagged_on_adapter_files(tmp_path):
    pm = peftkit.attach(tiny_llama(), peftkit.LoraConfig(r=4))
    pm.save(tmp_path / "ours")
    report = doctor(pm, checkpoint=tmp_path / "ours" / "adapter_model.safetensors")
    assert not flagged(report, "M10") and any("no base weights" in n for n in report.notes)
    model = peft_lora()
    model.save_pretrained(tmp_path / "theirs")
    assert not flagged(doctor(model, checkpoint=tmp_path / "theirs" / "adapter_model.safetensors"), "M10")
    with pytest.raises(FileNotFoundError):
        doctor(model, checkpoint=tmp_path / "missing.safetensors")


# -- M11 --------------------------------------------------------------------------------
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


# -- M12 --------------------------------------------------------------------------------
def test_m12_gradients_for_weights_no_optimizer_updates():
    model = hand_lora_model(freeze=False)  # "frozen" only by leaving W out of the optimizer
    optimizer = torch.optim.AdamW([p for n, p in model.named_parameters() if n.endswith((".A", ".B"))], lr=2e-4)
    errors = flagged(doctor(model, optimizer, lm_batch(260)), "M12", "error")
    assert errors and "no optimizer group holds them" in errors[0].message
    assert "layers.0.attn.q.linear.weight" in errors[0].where


class Checkpointed(nn.Module):
    """A block run under reentrant activation checkpointing."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, *args):
        return torch.utils.checkpoint.checkpoint(self.block, *args, use_reentrant=True)


def test_m12_gradient_checkpointing_that_cuts_the_graph():
    model = hand_lora_model()
    model.layers[0] = Checkpointed(model.layers[0])
    errors = flagged(doctor(model, adamw(model), lm_batch(260)), "M12", "error")
    assert errors and "layers.0.block.attn.q.A" in errors[0].where and "use_reentrant=False" in errors[0].fix


def test_m12_not_flagged_on_correct_setups():
    model = hand_lora_model()
    assert not flagged(doctor(model, adamw(model), lm_batch(260)), "M12")
    pm = peftkit.attach(tiny_reference(), peftkit.LoraConfig(r=4, target_modules="all-linear"))
    assert not flagged(doctor(pm, adamw(pm)), "M12")


# -- the command line -------------------------------------------------------------------
def test_cli_doctor_on_a_saved_llama_with_adapter_and_planted_checkpoint(tmp_path, capsys):
    from safetensors.torch import save_file

    from peftkit.cli import main

    folder = save_transformers_folder(tiny_llama(), tmp_path / "llama")
    pm = peftkit.attach(tiny_llama(), peftkit.LoraConfig(r=4))
    pm.save(tmp_path / "adapter")
    full = tmp_path / "full.safetensors"
    save_file({k: v.contiguous() for k, v in pm.state_dict().items()}, str(full))
    capsys.readouterr()

    assert main(["doctor", "--model", str(folder), "--adapter", str(tmp_path / "adapter")]) == 0
    assert capsys.readouterr().out.startswith("peftkit doctor: 0 errors")
    assert main(["doctor", "--model", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    # The real entry point, once: a planted whole-model checkpoint is an error, exit code 1.
    planted = subprocess.run([sys.executable, "-m", "peftkit", "doctor", "--model", str(folder), "--adapter",
                              str(tmp_path / "adapter"), "--checkpoint", str(full), "--json"],
                             capture_output=True, text=True, timeout=300)
    assert planted.returncode == 1, planted.stderr
    data = json.loads(planted.stdout)
    assert data["ok"] is False and "M10" in {f["id"] for f in data["findings"] if f["severity"] == "error"}
