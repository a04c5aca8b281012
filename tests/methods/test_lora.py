"""LoRA layers: the formula, the autograd function, merging, dropout, Conv1D and Embedding."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from peftkit.methods.lora import LoraEmbedding, LoraFunction, LoraLinear


def plain_lora(x, weight, bias, lora_a, lora_b, scaling):
    """The textbook formula h = W x + b + s · B A x, with ordinary autograd."""
    out = x @ weight.t() + s_bias(bias) + scaling * (x @ lora_a.t() @ lora_b.t())
    return out


def s_bias(bias):
    return 0.0 if bias is None else bias


def make_linear_lora(in_f=12, out_f=10, r=3, alpha=6.0, seed=0, **kwargs):
    torch.manual_seed(seed)
    layer = LoraLinear(nn.Linear(in_f, out_f))
    layer.add_adapter("default", r=r, alpha=alpha, **kwargs)
    layer.set_active_adapters(["default"])
    layer.base_layer.requires_grad_(False)
    return layer


def test_init_is_identity_and_b_is_zero():
    layer = make_linear_lora()
    x = torch.randn(4, 12)
    assert torch.equal(layer.lora_B["default"], torch.zeros(10, 3))
    assert layer.lora_A["default"].abs().sum() > 0
    torch.testing.assert_close(layer(x), layer.base_layer(x), rtol=0, atol=0)


@pytest.mark.parametrize("use_rslora,expected", [(False, 6.0 / 4), (True, 6.0 / 2)])
def test_scaling_alpha_over_r_or_sqrt_r(use_rslora, expected):
    layer = make_linear_lora(r=4, alpha=6.0, use_rslora=use_rslora)
    assert layer.scaling["default"] == pytest.approx(expected)
    nn.init.normal_(layer.lora_B["default"])
    x = torch.randn(2, 5, 12)
    w, b = layer.base_layer.weight, layer.base_layer.bias
    ref = plain_lora(x, w, b, layer.lora_A["default"], layer.lora_B["default"], expected)
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)


def test_gradcheck_float64_all_inputs():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, dtype=torch.double, requires_grad=True)
    w_io = torch.randn(5, 4, dtype=torch.double)  # frozen base weight, (in, out)
    bias = torch.randn(4, dtype=torch.double, requires_grad=True)
    a = torch.randn(2, 5, dtype=torch.double, requires_grad=True)
    b = torch.randn(4, 2, dtype=torch.double, requires_grad=True)
    fn = lambda x, bias, a, b: LoraFunction.apply(x, w_io, bias, a, b, 0.7, None, 1.0)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, bias, a, b))


def test_gradcheck_float64_with_dropout_mask_and_delta_only():
    torch.manual_seed(0)
    x = torch.randn(6, 5, dtype=torch.double, requires_grad=True)
    a = torch.randn(2, 5, dtype=torch.double, requires_grad=True)
    b = torch.randn(4, 2, dtype=torch.double, requires_grad=True)
    keep = torch.rand(6, 5) >= 0.3
    w_io = torch.randn(5, 4, dtype=torch.double)
    with_base = lambda x, a, b: LoraFunction.apply(x, w_io, None, a, b, 1.5, keep, 0.7)  # noqa: E731
    delta_only = lambda x, a, b: LoraFunction.apply(x, None, None, a, b, 1.5, keep, 0.7)  # noqa: E731
    assert torch.autograd.gradcheck(with_base, (x, a, b))
    assert torch.autograd.gradcheck(delta_only, (x, a, b))
    # and the dropout is on the LoRA path only: W x sees the undropped input.
    expected = x @ w_io + 1.5 * ((x * keep / 0.7) @ a.t() @ b.t())
    torch.testing.assert_close(with_base(x, a, b), expected)


def test_gradients_match_plain_formula_and_weight_grad_never_formed():
    layer = make_linear_lora(r=4)
    nn.init.normal_(layer.lora_B["default"])
    x = torch.randn(3, 7, 12, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    a_ref = layer.lora_A["default"].detach().clone().requires_grad_(True)
    b_ref = layer.lora_B["default"].detach().clone().requires_grad_(True)

    layer(x).pow(2).sum().backward()
    w, bias = layer.base_layer.weight, layer.base_layer.bias
    plain_lora(x_ref, w, bias, a_ref, b_ref, layer.scaling["default"]).pow(2).sum().backward()

    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_A["default"].grad, a_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_B["default"].grad, b_ref.grad, rtol=1e-5, atol=1e-5)
    assert w.grad is None and bias.grad is None


def test_backward_saves_input_once_and_no_dropout_copy():
    """Saved tensors: x (shared with the caller), the small u = x Aᵀ, no dropout tensor."""
    layer = make_linear_lora(in_f=64, out_f=64, r=4)
    x = torch.randn(8, 64, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    big = [t for t in saved if t.numel() >= x.numel() and t.data_ptr() != layer.base_layer.weight.data_ptr()]
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr()  # the input itself, no copy
    assert all(t.dtype != torch.bool for t in saved)  # no mask without dropout
    small = [t for t in saved if t.shape == (8, 4)]
    assert len(small) == 1  # u = x Aᵀ
    y.sum().backward()


def test_base_weight_requiring_grad_is_refused():
    layer = make_linear_lora()
    layer.base_layer.weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match="M1"):
        layer(torch.randn(2, 12))


def test_dropout_only_on_lora_path_and_off_in_eval():
    layer = make_linear_lora(dropout=0.5)
    nn.init.normal_(layer.lora_B["default"])
    x = torch.randn(64, 12)
    layer.eval()
    w, bias = layer.base_layer.weight, layer.base_layer.bias
    expected = plain_lora(x, w, bias, layer.lora_A["default"], layer.lora_B["default"], layer.scaling["default"])
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    layer.train()
    torch.manual_seed(3)
    y_train = layer(x)
    assert not torch.allclose(y_train, expected)
    # With B = 0 dropout can change nothing: the base path never sees it.
    nn.init.zeros_(layer.lora_B["default"])
    torch.testing.assert_close(layer(x), layer.base_layer(x), rtol=0, atol=0)


def test_merge_equals_unmerged_and_unmerge_restores_weight():
    layer = make_linear_lora(in_f=32, out_f=48, r=4)
    nn.init.normal_(layer.lora_B["default"])
    x = torch.randn(5, 32)
    before = layer(x)
    w0 = layer.base_layer.weight.detach().clone()
    layer.merge()
    merged = layer(x)
    torch.testing.assert_close(merged, before, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.base_layer(x), before, rtol=1e-5, atol=1e-6)
    with pytest.warns(UserWarning, match="already merged"):
        layer.merge()
    torch.testing.assert_close(layer(x), merged, rtol=0, atol=0)  # merging twice is a no-op
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, w0, rtol=1e-6, atol=1e-6)


def test_conv1d_fan_in_fan_out_matches_linear():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(10, 12)  # nf=out=10, nx=in=12; weight (12, 10)
    linear = nn.Linear(12, 10)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.t())
        linear.bias.copy_(conv.bias)
    lora_conv, lora_lin = LoraLinear(conv, fan_in_fan_out=True), LoraLinear(linear)
    for layer in (lora_conv, lora_lin):
        layer.add_adapter("default", r=3, alpha=6)
        layer.set_active_adapters(["default"])
        layer.base_layer.requires_grad_(False)
    with torch.no_grad():
        lora_lin.lora_A["default"].copy_(lora_conv.lora_A["default"])
        lora_conv.lora_B["default"].normal_()
        lora_lin.lora_B["default"].copy_(lora_conv.lora_B["default"])
    assert (lora_conv.in_features, lora_conv.out_features) == (12, 10)
    x = torch.randn(2, 4, 12)
    torch.testing.assert_close(lora_conv(x), lora_lin(x), rtol=1e-5, atol=1e-6)
    lora_conv.merge()
    torch.testing.assert_close(lora_conv(x), lora_lin(x), rtol=1e-5, atol=1e-5)


def test_embedding_lora_formula_and_merge():
    torch.manual_seed(0)
    layer = LoraEmbedding(nn.Embedding(20, 8))
    layer.add_adapter("default", r=2, alpha=4)
    layer.set_active_adapters(["default"])
    ids = torch.tensor([[1, 5, 19], [0, 0, 3]])
    torch.testing.assert_close(layer(ids), layer.base_layer(ids), rtol=0, atol=0)  # A = 0 at init
    nn.init.normal_(layer.lora_embedding_A["default"])
    a, b = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
    table = layer.base_layer.weight + 2.0 * (b @ a).t()  # s = 4 / 2
    torch.testing.assert_close(layer(ids), table[ids], rtol=1e-5, atol=1e-5)
    layer.merge()
    torch.testing.assert_close(layer(ids), table[ids], rtol=1e-5, atol=1e-5)


def test_two_active_adapters_add_up():
    layer = make_linear_lora(r=2)
    layer.add_adapter("second", r=4, alpha=2.0)
    nn.init.normal_(layer.lora_B["default"])
    nn.init.normal_(layer.lora_B["second"])
    layer.set_active_adapters(["default", "second"])
    x = torch.randn(3, 12)
    w, bias = layer.base_layer.weight, layer.base_layer.bias
    expected = (plain_lora(x, w, bias, layer.lora_A["default"], layer.lora_B["default"], layer.scaling["default"])
                + 0.5 * x @ layer.lora_A["second"].t() @ layer.lora_B["second"].t())
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert math.isclose(layer.scaling["second"], 0.5)


def test_double_backward_is_refused_not_silently_wrong():
    """LoraFunction's backward is written by hand and is not itself differentiable: a second
    derivative through it would be wrong, so asking for one is an error."""
    torch.manual_seed(0)
    x = torch.randn(3, 5, dtype=torch.double, requires_grad=True)
    w_io = torch.randn(5, 4, dtype=torch.double)
    a = torch.randn(2, 5, dtype=torch.double, requires_grad=True)
    b = torch.randn(4, 2, dtype=torch.double, requires_grad=True)
    y = LoraFunction.apply(x, w_io, None, a, b, 0.7, None, 1.0)
    (grad_x,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|double backward|twice"):
        grad_x.sum().backward()
