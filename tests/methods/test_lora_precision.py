"""LoRA under mixed precision: ``torch.autocast`` in bfloat16 on the CPU, checked against
the plain formula y = x Wᵀ + b + s · B A x computed in float64 from the same weights.

Tolerance: bfloat16 keeps 8 bits of mantissa (relative rounding 2⁻⁸ ≈ 0.4% per value);
after the sums of a small layer the relative error of a whole output or gradient stays a few
times that, so 3% of its norm is a bound that bf16 meets and a wrong formula does not.
"""

from __future__ import annotations

import torch
from torch import nn

import peftkit

TOLERANCE = 3e-2


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected).norm() / expected.norm())


def _layer(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(48, 40))
    pm = peftkit.attach(model, peftkit.LoraConfig(r=4, alpha=8, target_modules=["0"]))
    layer = pm.base_model[0]
    with torch.no_grad():
        layer.lora_B["default"].normal_(0, 0.2)
    return pm, layer


def test_lora_trains_under_bf16_autocast_and_matches_the_float64_formula():
    pm, layer = _layer()
    x = torch.randn(6, 48, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = pm(x)
    assert y.dtype == torch.bfloat16
    y.float().pow(2).sum().backward()  # crashed before: "BFloat16 and Float" in backward

    a, b = layer.lora_A["default"], layer.lora_B["default"]
    w, bias = layer.base_layer.weight, layer.base_layer.bias
    x64 = x.detach().double().requires_grad_()
    a64, b64 = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    y64 = x64 @ w.double().t() + bias.double() + 2.0 * (x64 @ a64.t()) @ b64.t()
    y64.pow(2).sum().backward()

    assert _relative_error(y.detach(), y64.detach()) < TOLERANCE
    assert a.grad.dtype == b.grad.dtype == torch.float32  # the adapters' own dtype
    assert _relative_error(a.grad, a64.grad) < TOLERANCE
    assert _relative_error(b.grad, b64.grad) < TOLERANCE
    assert _relative_error(x.grad, x64.grad) < TOLERANCE
    assert w.grad is None  # M12 still holds


def test_outside_autocast_the_float32_path_is_unchanged():
    pm, layer = _layer()
    x = torch.randn(5, 48)
    expected = layer.base_layer(x) + 2.0 * (x @ layer.lora_A["default"].t()) @ layer.lora_B["default"].t()
    torch.testing.assert_close(pm(x), expected)
