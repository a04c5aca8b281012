"""LoRA on a float32 (or float64) base with the adapter folded into the step's products.

``LoraFunction`` computes y = x W_io + s · (x Aᵀ) Bᵀ as one large product and four skinny
ones per step (x Aᵀ, then · Bᵀ into y; g B, then · A into grad_x). A skinny product
(N, in) × (in, r) with r = 8 runs at a fraction of a CPU's speed for large ones and reads or
writes a whole (N, in) or (N, out) activation, so on the CPU those four cost more than LoRA's
arithmetic suggests (about 15% on top of a frozen projection's forward and backward, against
the 3% its FLOPs count). ``FoldedLoraFunction`` instead folds the adapter into the weight for
the length of one product and lets the other skinny product ride along as r extra columns:

    forward    [y | u] = x [W'_io | Aᵀ]          W'_io = W_io + s Aᵀ Bᵀ   (in, out)
    backward   [grad_x | g B] = g [W'_ioᵀ | B]   grad_A = s (g B)ᵀ x,   grad_B = s gᵀ u

Shapes: x (N, in), W_io (in, out), A (r, in), B (out, r), u = x Aᵀ (N, r), g (N, out).
The two stacked operands, (in, out + r) and (out, in + r), are built afresh in forward and in
backward (one pass over the weight each) and never kept: keeping W' for backward would hold
a second copy of every adapted weight through the whole forward.

The math is that of ``LoraFunction``; only where the rounding falls moves. W' is rounded
once to the base's dtype, which in float32 is an error of 2⁻²⁴ |W| per entry, the size of
the product's own rounding; A's and B's gradients do not go through W' at all. In bfloat16
or float16 that rounding (2⁻⁸ |W|) would swallow a young adapter's s B A whole, so
``folds`` never takes those dtypes. Building W' costs a pass over the weight and saves two
over the activations, so it pays from about as many tokens as the weight has rows and
columns together: N (in + out) ≥ in · out.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

FOLDED_DTYPES = (torch.float32, torch.float64)
"""Compute dtypes whose rounding of W + s B A is as fine as a product's own (see the module)."""


def folds(x: torch.Tensor, weight_io: torch.Tensor | None, lora_a: torch.Tensor,
          keep_mask: torch.Tensor | None) -> bool:
    """Whether ``FoldedLoraFunction`` applies and pays: a plain weight in a float32/float64
    step, the same input on both paths (no dropout), and at least as many activation entries
    as weight entries (N (in + out) ≥ in · out)."""
    if weight_io is None or keep_mask is not None or x.dtype not in FOLDED_DTYPES:
        return False
    if not (weight_io.dtype == lora_a.dtype == x.dtype):
        return False
    if not (weight_io.is_contiguous() or weight_io.t().is_contiguous()):
        return False
    in_features, out_features = weight_io.shape
    tokens = x.numel() // in_features
    return tokens * (in_features + out_features) >= in_features * out_features


def _stack(base: torch.Tensor, left: torch.Tensor, right: torch.Tensor, scaling: float,
           extra: torch.Tensor, dim: int) -> torch.Tensor:
    """[base + scaling · left right, extra] joined along ``dim`` (0: extra rows, 1: extra
    columns), written once into a new contiguous tensor."""
    rows, cols = base.shape
    shape = (rows + extra.shape[0], cols) if dim == 0 else (rows, cols + extra.shape[1])
    stacked = base.new_empty(shape)
    torch.addmm(base, left, right, alpha=scaling, out=stacked.narrow(dim, 0, base.shape[dim]))
    stacked.narrow(dim, base.shape[dim], extra.shape[dim]).copy_(extra)
    return stacked


def folded_weight_io(weight_io: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
                     extra_io: torch.Tensor, dim: int) -> torch.Tensor:
    """[W_io + s Aᵀ Bᵀ, extra_io] joined along ``dim``, (in, out) plus extra_io, laid out in
    the weight's own memory order so that W is read straight: an ``nn.Linear`` weight is
    stored (out, in), and W_io is its transpose."""
    if weight_io.is_contiguous():  # Conv1D: stored (in, out)
        return _stack(weight_io, lora_a.t(), lora_b.t(), scaling, extra_io, dim)
    return _stack(weight_io.t(), lora_b, lora_a, scaling, extra_io.t(), 1 - dim).t()


class FoldedLoraFunction(torch.autograd.Function):
    """y = x W_io + b + s · (x Aᵀ) Bᵀ through W' = W_io + s Aᵀ Bᵀ (see the module).

    Arguments as ``LoraFunction``'s without the dropout mask: x (..., in), W_io (in, out),
    b (out,) or None, A (r, in), B (out, r). Saved for backward: x, W_io, A, B and u (N, r),
    as ``LoraFunction``. y is returned contiguous, like an ``nn.Linear``'s output.
    """

    @staticmethod
    def forward(ctx, x, weight_io, bias, lora_a, lora_b, scaling: float):
        in_features, out_features = weight_io.shape
        x2d = x.reshape(-1, in_features)
        stacked = folded_weight_io(weight_io, lora_a, lora_b, scaling, lora_a.t(), dim=1)  # (in, out + r)
        if bias is None:
            y_and_u = x2d @ stacked
        else:
            y_and_u = torch.addmm(torch.cat([bias, bias.new_zeros(lora_a.shape[0])]), x2d, stacked)
        y = y_and_u[:, :out_features].contiguous()  # as an nn.Linear's: user code may .view() it
        u = y_and_u[:, out_features:].contiguous()  # its own small tensor: a view would keep y_and_u alive
        ctx.save_for_backward(x2d, weight_io, lora_a, lora_b, u)
        ctx.scaling, ctx.x_shape, ctx.has_bias = scaling, x.shape, bias is not None
        return y.view(*x.shape[:-1], out_features)

    @staticmethod
    @once_differentiable  # as LoraFunction: double backward is refused
    def backward(ctx, grad_out):
        x2d, weight_io, lora_a, lora_b, u = ctx.saved_tensors
        s = ctx.scaling
        in_features = weight_io.shape[0]
        g = grad_out.reshape(-1, grad_out.shape[-1])
        need_x, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
        if need_w:
            raise RuntimeError("LoraFunction never computes the base weight's gradient; freeze it.")
        grad_x = grad_bias = grad_a = grad_bb = None
        if need_x:
            stacked = folded_weight_io(weight_io, lora_a, lora_b, s, lora_b.t(), dim=0)  # (in + r, out)
            grad_x_and_g_b = g @ stacked.t()
            grad_x = grad_x_and_g_b[:, :in_features].view(ctx.x_shape)  # a strided view; autograd takes it as is
            g_b_t = grad_x_and_g_b[:, in_features:].t()  # (r, N)
        else:
            g_b_t = lora_b.t() @ g.t() if need_a else None
        if need_a:
            grad_a = (g_b_t @ x2d).mul_(s)
        if need_bb:
            grad_bb = (u.t() @ g).t().mul_(s)
        if ctx.has_bias and need_b:
            grad_bias = g.sum(0)
        return grad_x, None, grad_bias, grad_a, grad_bb, None
