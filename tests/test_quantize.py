"""A 4-bit NF4 base (issue 17, item 3) on the CPU: the quantized weight against an NF4
written here in float64, LoRA on top against the plain formula, training, saving and
reloading, merging into the dequantized weights, and the missing library.

Tolerances: NF4 itself moves a normal weight by ~9% of its norm (||Ŵ − W|| / ||W||); the
library's Ŵ must sit much closer than that to the float64 NF4 of the same weight (its scales
are stored in 8 bits, "double quantization": 3% allowed). LoRA on Ŵ is compared with the
float64 formula from the same Ŵ, so there only float32 rounding is left (1e-4 of the norm).
"""

from __future__ import annotations

import sys
import warnings

import pytest
import torch
from helpers import reference_run_inputs, tiny_llama, tiny_reference

import peftkit

pytest.importorskip("bitsandbytes")

from peftkit.precision import place  # noqa: E402
from peftkit.quantize import Nf4Linear, QuantizeError, check_scheme, quantize_base  # noqa: E402
from peftkit.train import train  # noqa: E402

# The 16 NF4 levels: quantiles of N(0, 1) scaled to [-1, 1] (Dettmers et al. 2023, appendix E).
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], dtype=torch.float64)


def nf4_float64(weight: torch.Tensor, block: int = 64) -> torch.Tensor:
    """NF4 quantize-then-dequantize by the paper: per block of 64 values, absmax scale, each
    value to the nearest level; all in float64, scales kept exactly."""
    flat = weight.double().reshape(-1, block)
    scale = flat.abs().amax(dim=1, keepdim=True)
    index = (flat / scale).unsqueeze(-1).sub(NF4_LEVELS).abs().argmin(-1)
    return (NF4_LEVELS[index] * scale).reshape(weight.shape)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_the_4bit_weight_is_nf4_and_a_quarter_of_bf16():
    torch.manual_seed(0)
    weight = torch.randn(96, 128) * 0.02
    layer = Nf4Linear(weight, None)
    dequantized = layer.weight
    assert dequantized.shape == (96, 128) and dequantized.dtype == torch.float32
    quantization_error = _relative(dequantized, weight)
    assert 0.05 < quantization_error < 0.12  # NF4's own ~9%: it really is 4-bit
    assert _relative(dequantized, nf4_float64(weight)) < 0.03  # and it is NF4, not another 4-bit code
    assert layer.weight_4bit.dtype == torch.uint8 and layer.weight_4bit.numel() == weight.numel() // 2


def test_lora_on_an_nf4_base_matches_the_float64_formula_and_never_forms_the_weights_gradient():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 64))
    quantize_base(model)
    pm = peftkit.attach(model, peftkit.LoraConfig(r=4, alpha=8, target_modules=["0"]))
    layer = pm.base_model[0]
    assert isinstance(layer.base_layer, Nf4Linear)
    with torch.no_grad():
        layer.lora_B["default"].normal_(0, 0.2)
    x = torch.randn(6, 128, requires_grad=True)
    y = pm(x)
    y.pow(2).sum().backward()
    a, b = layer.lora_A["default"], layer.lora_B["default"]
    w_hat, bias = layer.base_layer.weight.double(), layer.base_layer.bias.double()
    x64 = x.detach().double().requires_grad_()
    a64, b64 = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    y64 = x64 @ w_hat.t() + bias + 2.0 * (x64 @ a64.t()) @ b64.t()
    y64.pow(2).sum().backward()
    assert _relative(y.detach(), y64.detach()) < 1e-4
    assert _relative(a.grad, a64.grad) < 1e-4 and _relative(b.grad, b64.grad) < 1e-4
    assert _relative(x.grad, x64.grad) < 1e-4
    assert layer.base_layer.bias.grad is None and not layer.base_layer.weight_4bit.requires_grad


def test_quantize_base_keeps_the_head_and_embeddings_and_trains_in_bf16():
    model = place(tiny_llama(), torch.device("cpu"), torch.bfloat16)
    count = quantize_base(model)
    assert count == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers
    assert type(model.lm_head) is torch.nn.Linear and type(model.model.embed_tokens) is torch.nn.Embedding
    pm = peftkit.attach(model, peftkit.LoraConfig(r=4, target_modules="all-linear"))
    plain = peftkit.attach(tiny_llama(), peftkit.LoraConfig(r=4, target_modules="all-linear"))
    assert pm.parameter_counts() == plain.parameter_counts()  # 4-bit weights still count as weights
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    result = train(pm, [{"input_ids": ids, "labels": ids}], steps=8, lr=1e-2, progress=False)
    assert result.losses[-1] < result.losses[0]
    assert all(p.dtype == torch.float32 for p in pm.trainable_parameters().values())
    report = peftkit.doctor(pm, batch={"input_ids": ids, "labels": ids})
    assert report.ok and not report.notes, str(report)


def test_an_adapter_trained_on_nf4_reloads_onto_an_nf4_base_to_the_same_outputs(tmp_path):
    def base():
        model = tiny_reference()
        quantize_base(model)
        return model

    pm = peftkit.attach(base(), peftkit.LoraConfig(r=4, target_modules="all-linear"))
    ids = torch.randint(0, 200, (2, 10), generator=torch.Generator().manual_seed(1))
    train(pm, [{"input_ids": ids, "labels": ids}], steps=4, lr=1e-2, progress=False)
    pm.save(tmp_path / "adapter")
    again = peftkit.load(base(), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, pm(input_ids=ids).logits)


def test_merging_onto_nf4_goes_into_the_dequantized_weights_and_says_how_close():
    model = tiny_reference()
    quantize_base(model)
    pm = peftkit.attach(model, peftkit.LoraConfig(r=4, target_modules="all-linear"))
    from helpers import randomize_adapters
    randomize_adapters(pm)
    ids = torch.randint(0, 200, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        unmerged = pm(input_ids=ids).logits
    with pytest.raises(RuntimeError, match="quantized.*merge_and_unload"):
        pm.merge()  # in place into 4-bit codes would round the update away
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merged = pm.merge_and_unload(dtype=torch.bfloat16)
    message = " ".join(str(w.message) for w in caught)
    assert "NF4 base dequantized to bfloat16" in message and "not the original weights" in message
    assert not any(isinstance(m, Nf4Linear) for m in merged.modules())
    assert merged.layers[0].attn.q.weight.dtype == torch.bfloat16
    with torch.no_grad():
        logits = merged.float()(input_ids=ids).logits
    assert _relative(logits, unmerged) < 3e-2  # bf16 rounding of the merged weights


def test_a_missing_bitsandbytes_is_refused_with_the_fix(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError
    with pytest.raises(QuantizeError, match=r"pip install 'peftkit\[quantize\]'"):
        check_scheme("nf4")
    from peftkit import cli

    model, data = reference_run_inputs(tmp_path)
    out = tmp_path / "run"
    assert cli.main(["train", "--model", str(model), "--data", str(data), "--out", str(out),
                     "--quantize", "nf4", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "needs bitsandbytes" in err and "Traceback" not in err
    assert not out.exists()


def test_peftkit_train_with_an_nf4_base(tmp_path, capsys):
    from peftkit import cli

    model, data = reference_run_inputs(tmp_path)
    assert cli.main(["train", "--model", str(model), "--data", str(data), "--out", str(tmp_path / "run"),
                     "--quantize", "nf4", "--max-steps", "2", "--no-progress"]) == 0
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    assert "doctor note" not in capsys.readouterr().err


def test_peftkit_merge_of_an_nf4_adapter_writes_a_plain_model_of_the_4bit_base(tmp_path, capsys):
    from peftkit import cli
    from peftkit.loading import load_model

    model, data = reference_run_inputs(tmp_path)
    assert cli.main(["train", "--model", str(model), "--data", str(data), "--out", str(tmp_path / "run"),
                     "--quantize", "nf4", "--max-steps", "2", "--no-progress"]) == 0
    capsys.readouterr()
    out = tmp_path / "merged"
    with pytest.warns(UserWarning, match="NF4 base dequantized to bfloat16"):  # a line on stderr
        assert cli.main(["merge", "--model", str(model), "--adapter", str(tmp_path / "run" / "adapter"),
                         "--out", str(out), "--quantize", "nf4", "--dtype", "bfloat16"]) == 0
    assert "merged vs unmerged" in capsys.readouterr().out
    merged = load_model(out, progress=False).model
    assert not any(isinstance(m, Nf4Linear) for m in merged.modules())  # untargeted layers too
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}


def test_an_nf4_gpt2_merges_back_into_conv1d_layers_that_reload(tmp_path):
    """GPT-2 stores its linear weights (in, out) in Conv1D: quantized they are (out, in) NF4,
    and merged they must be Conv1D (in, out) again, or the saved model does not load."""
    from helpers import randomize_adapters, tiny_gpt2
    from transformers import GPT2LMHeadModel
    from transformers.pytorch_utils import Conv1D

    model = tiny_gpt2()
    quantize_base(model)
    pm = peftkit.attach(model, peftkit.LoraConfig(r=4, target_modules=["c_attn", "c_fc"]))
    randomize_adapters(pm)
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        unmerged = pm(input_ids=ids).logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = pm.merge_and_unload()
    assert {type(merged.transformer.h[0].attn.c_attn), type(merged.transformer.h[0].mlp.c_proj)} == {Conv1D}
    merged.save_pretrained(tmp_path / "merged")
    again = GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, unmerged, rtol=1e-4, atol=1e-4)


def test_a_classifiers_head_and_pooler_stay_plain_and_train_in_full():
    from helpers import tiny_bert_classifier

    model = tiny_bert_classifier()
    quantize_base(model)
    assert type(model.bert.pooler.dense) is torch.nn.Linear and type(model.classifier) is torch.nn.Linear
    assert isinstance(model.bert.encoder.layer[0].attention.self.query, Nf4Linear)
    pm = peftkit.attach(model, peftkit.LoraConfig(r=4))
    trained = pm.trainable_parameters()
    assert any("pooler" in n and n.endswith("dense.weight") for n in trained)  # a float weight that trains
    with pytest.raises(ValueError, match="quantized.*cannot train"):
        other = tiny_bert_classifier()
        quantize_base(other, trained_in_full=["classifier"])  # the pooler is quantized now
        peftkit.attach(other, peftkit.LoraConfig(r=4))
