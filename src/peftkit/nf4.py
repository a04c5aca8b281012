"""The 4-bit NF4 layer (QLoRA, Dettmers et al. 2023) and its library: each linear weight of a
frozen base kept as NF4 codes and dequantized inside every matmul, with the adapters trained
on top in their own precision. ``quantize.py`` turns a model's layers into it.

NF4 stores a weight W (out, in) as one 4-bit index per value into 16 levels placed at the
quantiles of a normal distribution, with one absmax scale per block of 64 values; the scales
are themselves stored in 8 bits ("double quantization"). That is 4.13 bits a weight, 0.26 of
bfloat16's bytes, and a relative error ||Ŵ − W|| / ||W|| of about 9% on a normal weight
(bench/results/nf4_choice.md).

The library is bitsandbytes, the field's standard for NF4 (transformers' and PEFT's QLoRA):
on this project's CPU its 4-bit matmul with its backward costs 1.0–1.6x a plain one against
torchao's 1.1–4.0x, at the same bytes and error, its state is plain tensors, and it has fused
CUDA kernels (measured in bench/nf4_choice.py). Its ``matmul_4bit`` keeps only the 4-bit
weight for backward and never forms W's gradient.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

SCHEMES = ("nf4",)
BLOCK_SIZE = 64  # values per absmax scale, QLoRA's and bitsandbytes' default


class QuantizeError(ValueError):
    """Quantization that cannot be done here: its library is missing, or nothing to quantize."""


def bitsandbytes() -> Any:
    """The bitsandbytes module, or QuantizeError naming what to install."""
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional  # noqa: F401  (quantize_4bit, dequantize_4bit)
    except ImportError:
        raise QuantizeError("--quantize nf4 needs bitsandbytes, the library transformers and PEFT use for NF4: "
                            "pip install 'peftkit[quantize]' (or pip install bitsandbytes).") from None
    except Exception as e:  # a broken install fails on import with its own errors
        raise QuantizeError(f"bitsandbytes is installed but does not load ({type(e).__name__}: {e}); "
                            "reinstall it: pip install --force-reinstall bitsandbytes.") from e
    return bnb


def check_scheme(scheme: str) -> None:
    """Refuse an unknown scheme or a missing library before any model is loaded."""
    if scheme not in SCHEMES:
        raise QuantizeError(f"quantization {scheme!r} is not one of {SCHEMES}; pass --quantize nf4.")
    bitsandbytes()


class Nf4Linear(nn.Module):
    """y = x Ŵᵀ + b, with Ŵ (out, in) the NF4 dequantization of the weight it was built from.

    ``weight_4bit`` holds the codes (uint8, two per byte) as a buffer, so ``.to(device)``
    moves it and a dtype cast leaves it alone; the scales travel in bitsandbytes' QuantState,
    moved with it. ``weight`` dequantizes on each read (for shapes and the doctor's probes);
    the forward never does it outside the matmul. The bias stays a frozen float tensor.
    """

    quantized = True

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, conv1d: bool = False) -> None:
        super().__init__()
        self.conv1d = conv1d  # built from a GPT-2 Conv1D: made plain, it is one again
        bnb = bitsandbytes()
        self.out_features, self.in_features = weight.shape
        codes, state = bnb.functional.quantize_4bit(weight.detach().contiguous(), blocksize=BLOCK_SIZE,
                                                    quant_type="nf4", compress_statistics=True)
        self.register_buffer("weight_4bit", codes)
        self.quant_state = state
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, layer: nn.Module) -> "Nf4Linear":
        """From an ``nn.Linear`` (weight (out, in)) or a GPT-2 ``Conv1D`` (weight (in, out))."""
        conv1d = not isinstance(layer, nn.Linear)
        return cls(layer.weight.t() if conv1d else layer.weight, layer.bias, conv1d)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the weight was quantized from, and dequantizes to."""
        return self.quant_state.dtype

    @property
    def weight(self) -> torch.Tensor:
        """Ŵ (out, in) in ``compute_dtype``: a fresh tensor on every read."""
        return bitsandbytes().functional.dequantize_4bit(self.weight_4bit, self.quant_state)

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        self.quant_state.to(self.weight_4bit.device)  # moves the scales in place
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return bitsandbytes().matmul_4bit(x, self.weight_4bit.t(), quant_state=self.quant_state, bias=bias)

    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Module:
        """The plain layer it was built from, holding Ŵ in ``dtype`` (default ``compute_dtype``):
        an ``nn.Linear``, or a ``Conv1D`` with Ŵᵀ (its (in, out) layout) for a GPT-2 layer."""
        dtype = dtype or self.compute_dtype
        device = self.weight_4bit.device
        if self.conv1d:
            from . import integrations

            layer = integrations.conv1d_type()(self.out_features, self.in_features).to(device, dtype)
            weight = self.weight.t()
        else:
            layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                              device=device, dtype=dtype)
            weight = self.weight
        with torch.no_grad():
            layer.weight.copy_(weight)
            if self.bias is not None:
                layer.bias.copy_(self.bias)
        layer.requires_grad_(False)
        return layer

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, nf4, blocks of {BLOCK_SIZE}"


def is_quantized(module: nn.Module) -> bool:
    return getattr(module, "quantized", False) is True
