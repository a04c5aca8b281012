"""The folded LoRA products (``peftkit.methods.lora_folded``): the same math as ``LoraFunction``,
as accurate in float32, taken exactly where it pays and never in a dtype that would round the
adapter away."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peftkit.methods.lora import LoraFunction, LoraLinear
from peftkit.methods.lora_folded import FoldedLoraFunction, folds


def weight_io_in(layout: str, weight_oi: torch.Tensor) -> torch.Tensor:
    """W_io (in, out) as the layer hands it over: a Linear's (out, in) weight transposed, or a
    Conv1D's weight stored (in, out)."""
    return weight_oi.t() if layout == "linear" else weight_oi.t().contiguous()


@pytest.mark.parametrize("layout", ["linear", "conv1d"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_gradcheck_float64(layout, with_bias):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, dtype=torch.double, requires_grad=True)
    w_io = weight_io_in(layout, torch.randn(4, 5, dtype=torch.double))
    bias = torch.randn(4, dtype=torch.double, requires_grad=True) if with_bias else None
    a = torch.randn(2, 5, dtype=torch.double, requires_grad=True)
    b = torch.randn(4, 2, dtype=torch.double, requires_grad=True)
    fn = lambda x, a, b, *bias: FoldedLoraFunction.apply(x, w_io, bias[0] if bias else None, a, b, 0.7)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, a, b) + ((bias,) if with_bias else ()))
    # and it is LoRA's formula, not some other function with correct derivatives
    expected = x @ w_io + (0 if bias is None else bias) + 0.7 * (x @ a.t() @ b.t())
    torch.testing.assert_close(fn(x, a, b, *(() if bias is None else (bias,))), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", ["linear", "conv1d"])
def test_float32_as_accurate_as_lora_function(layout):
    """Against the plain formula in float64, folding W + s B A into one float32 product errs no
    more than LoraFunction's separate products do, in y and in every gradient; an adapter far
    smaller than W (a young one) is not rounded away."""
    torch.manual_seed(1)
    n, d_in, d_out, r = 256, 64, 48, 4
    weight = torch.randn(d_out, d_in) / d_in ** 0.5
    x = torch.randn(n, d_in)
    a = torch.randn(r, d_in) / d_in ** 0.5
    g = torch.randn(n, d_out)
    for b_scale in (1e-4, 1e-1):  # young adapter, trained one
        b = torch.randn(d_out, r) * b_scale
        results = {}
        for name, dtype in (("reference", torch.float64), ("folded", torch.float32), ("separate", torch.float32)):
            leaves = [t.to(dtype, copy=True).requires_grad_() for t in (x, a, b)]
            w_io = weight_io_in(layout, weight.to(dtype))
            if name == "reference":
                y = leaves[0] @ w_io + 2.0 * (leaves[0] @ leaves[1].t() @ leaves[2].t())
            elif name == "folded":
                y = FoldedLoraFunction.apply(leaves[0], w_io, None, leaves[1], leaves[2], 2.0)
            else:
                y = LoraFunction.apply(leaves[0], w_io, None, leaves[1], leaves[2], 2.0, None, 1.0)
            y.backward(g.to(dtype))
            results[name] = [t.double() for t in (y.detach(), *(leaf.grad for leaf in leaves))]
        lora_term = (x.double() @ a.double().t() @ b.double().t() * 2.0).abs().max()
        for i, what in enumerate(["y", "grad_x", "grad_A", "grad_B"]):
            ref = results["reference"][i]
            err_folded = (results["folded"][i] - ref).abs().max()
            err_separate = (results["separate"][i] - ref).abs().max()
            scale = ref.abs().max()
            assert err_folded <= 4 * err_separate + 1e-6 * scale, (what, b_scale, err_folded, err_separate)
            assert err_folded <= 1e-5 * scale, (what, b_scale, err_folded)
        # the adapter's own term survives: y - x W_io is s B A x to float32 accuracy of y
        base = x.double() @ weight_io_in(layout, weight.double())
        lora_seen = results["folded"][0] - base
        assert (lora_seen - (results["reference"][0] - base)).abs().max() <= 1e-5 * results["reference"][0].abs().max()
        assert lora_seen.abs().max() == pytest.approx(float(lora_term), rel=0.05)


def test_gradients_without_input_gradient():
    """The first layer's input needs no gradient: A's and B's are still exact."""
    torch.manual_seed(2)
    x = torch.randn(64, 16, dtype=torch.double)
    w_io = torch.randn(12, 16, dtype=torch.double).t()
    a = torch.randn(3, 16, dtype=torch.double, requires_grad=True)
    b = torch.randn(12, 3, dtype=torch.double, requires_grad=True)
    FoldedLoraFunction.apply(x, w_io, None, a, b, 1.5).sum().backward()
    a2, b2 = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    (x @ w_io + 1.5 * (x @ a2.t() @ b2.t())).sum().backward()
    torch.testing.assert_close(a.grad, a2.grad)
    torch.testing.assert_close(b.grad, b2.grad)


def test_output_is_contiguous_like_a_linear():
    x = torch.randn(4, 32, 16)
    w_io = torch.randn(24, 16).t()
    y = FoldedLoraFunction.apply(x, w_io, torch.randn(24), torch.randn(2, 16), torch.randn(24, 2), 1.0)
    assert y.shape == (4, 32, 24) and y.is_contiguous()
    y.view(-1)  # what user code may do with a Linear's output


def test_folds_only_where_it_is_exact_and_pays():
    w_io = torch.randn(32, 16).t()  # in 16, out 32: pays from 16 * 32 / 48 = 10.7 tokens
    a = torch.randn(2, 16)
    many, few = torch.randn(2, 6, 16), torch.randn(1, 10, 16)
    assert folds(many, w_io, a, None)
    assert not folds(few, w_io, a, None)
    assert not folds(many, None, a, None)  # a second adapter: no base weight to fold into
    assert not folds(many, w_io, a, torch.ones(2, 6, 16, dtype=torch.bool))  # dropout: two inputs
    for dtype in (torch.bfloat16, torch.float16):  # W + s B A rounded to 8 bits would lose the adapter
        assert not folds(many.to(dtype), w_io.to(dtype), a.to(dtype), None)
    assert not folds(many, w_io[::2], a[:, ::2], None)  # a weight in neither memory order


def lora_layer(dropout=0.0, dtype=torch.float32):
    torch.manual_seed(3)
    layer = LoraLinear(nn.Linear(64, 48).to(dtype))
    layer.add_adapter("default", r=4, alpha=8.0, dropout=dropout)
    layer.set_active_adapters(["default"])
    layer.base_layer.requires_grad_(False)
    nn.init.normal_(layer.lora_B["default"], std=0.1)
    return layer


def test_lora_linear_takes_the_folded_path_for_a_float32_batch_and_agrees():
    layer = lora_layer()
    x = torch.randn(8, 32, 64, requires_grad=True)
    y = layer(x)
    assert type(y.grad_fn).__name__ == "FoldedLoraFunctionBackward"
    y.square().sum().backward()
    got = [x.grad, layer.lora_A["default"].grad, layer.lora_B["default"].grad]
    x2 = x.detach().clone().requires_grad_()
    a, b = (p.detach().clone().requires_grad_() for p in (layer.lora_A["default"], layer.lora_B["default"]))
    y2 = LoraFunction.apply(x2, layer.base_layer.weight.t(), layer.base_layer.bias, a, b, 2.0, None, 1.0)
    y2.square().sum().backward()
    torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-5)
    for mine, theirs in zip(got, [x2.grad, a.grad, b.grad]):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", ["dropout", "bfloat16", "one token"])
def test_lora_linear_keeps_lora_function_where_folding_does_not_apply(case):
    layer = lora_layer(dropout=0.1 if case == "dropout" else 0.0,
                       dtype=torch.bfloat16 if case == "bfloat16" else torch.float32)
    shape = (1, 1, 64) if case == "one token" else (8, 32, 64)
    x = torch.randn(*shape, dtype=layer.base_layer.weight.dtype, requires_grad=True)
    assert type(layer(x).grad_fn).__name__ == "LoraFunctionBackward"
