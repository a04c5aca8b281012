"""LoRA layers: h = W x + b + s · B A x, with A (r, in), B (out, r) and s = alpha / r.

``LoraLinear`` wraps an ``nn.Linear`` or a GPT-2 style ``Conv1D`` (whose weight is stored
transposed, ``fan_in_fan_out=True``); ``LoraEmbedding`` wraps an ``nn.Embedding``. Each
keeps the original module inside as ``base_layer`` so that ``unwrap()`` gives it back.

Training goes through ``LoraFunction``, a hand-written autograd function: the base weight
is frozen, so its gradient (an (out, in) matrix per layer, as large as the weight) is
never formed, and the backward keeps only what it needs.

A mixed batch (``row_adapters`` set, inference only) computes the base output of the whole
batch once and adds each adapter's s · B A x to its own rows only.
"""

from __future__ import annotations

import math
import warnings
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ..config import lora_scaling
from .base import AdapterModule, RowAdapters, add_to_rows, take_rows


class LoraFunction(torch.autograd.Function):
    """y = x W_io + b + s · (d(x) Aᵀ) Bᵀ, never forming the gradient of W.

    Shapes: x (..., in), W_io (in, out) — the base weight in input-major layout, so
    ``Linear.weight.t()`` or ``Conv1D.weight`` as stored — b (out,), A (r, in),
    B (out, r), y (..., out). ``d`` is dropout on the LoRA path, given as a boolean keep
    mask (..., in) and a keep probability; W_io and b may be None (then y is only the
    LoRA term, used for a second active adapter).

    Saved for backward: x (the layer input, usually shared with the sibling q/k/v
    projections, so it costs nothing extra), the keep mask as booleans (1 byte per
    element instead of a 4-byte dropped copy of x, and only when dropout > 0) and
    s·u, u = d(x) Aᵀ (N, r). u is r/in the size of x — 1.6% for r = 8, in = 512 — while
    recomputing it would cost a second (N, in) × (in, r) product in every backward, so
    keeping it is the cheaper choice. Gradients:
        grad_x = g W_ioᵀ + s · d(g B A)      grad_A = s · (g B)ᵀ d(x)
        grad_B = s · gᵀ u                    grad_b = Σ g     grad_W: never
    Each large output (y, grad_x) starts as its rank-r term and the large product is
    accumulated into it (``addmm_``, beta = 1), so the rank-r term costs no pass of its own
    over the (N, out) or (N, in) result.
    """

    @staticmethod
    def forward(ctx, x, weight_io, bias, lora_a, lora_b, scaling: float, keep_mask, keep_prob: float):
        in_features = lora_a.shape[1]
        x2d = x.reshape(-1, in_features)
        mask2d = None if keep_mask is None else keep_mask.reshape(-1, in_features)
        dropped = x2d if mask2d is None else x2d * mask2d / keep_prob
        scaled_u = (dropped @ lora_a.t()).mul_(scaling)  # s·u (N, r): s applied to the small side
        # The rank-r term first, then the large product accumulated into it (addmm_ with
        # beta = 1, which BLAS does inside the product's own output pass): adding the rank-r
        # term after the large product would read and write all of y once more.
        y = torch.mm(scaled_u, lora_b.t()) if bias is None else torch.addmm(bias, scaled_u, lora_b.t())
        if weight_io is not None:
            y.addmm_(x2d, weight_io)
        ctx.save_for_backward(x2d, weight_io, lora_a, lora_b, scaled_u, mask2d)
        ctx.scaling, ctx.keep_prob, ctx.x_shape = scaling, keep_prob, x.shape
        ctx.has_bias = bias is not None
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    @once_differentiable  # the backward below is not itself differentiable: double backward is refused
    def backward(ctx, grad_out):
        x2d, weight_io, lora_a, lora_b, scaled_u, mask2d = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1])
        need_x, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
        if need_w:
            raise RuntimeError("LoraFunction never computes the base weight's gradient; freeze it.")
        grad_x = grad_bias = grad_a = grad_bb = None
        # Products are taken in the orientation whose operands are contiguous: for tall-skinny
        # matrices (N tokens x r) CPU BLAS is 2-6x slower on gᵀ u or g B than on uᵀ g or Bᵀ gᵀ.
        # s is applied once, to the small (r, N) = s·(g B)ᵀ shared by grad_x and grad_A.
        scaled_g_b_t = (lora_b.t() @ g.t()).mul_(ctx.scaling) if (need_x or need_a) else None
        if need_x:
            # As in forward: the rank-r term first, the large g W_ioᵀ accumulated into it.
            grad_x = scaled_g_b_t.t() @ lora_a
            if mask2d is not None:
                grad_x.mul_(mask2d).div_(ctx.keep_prob)
            if weight_io is not None:
                grad_x.addmm_(g, weight_io.t())
            grad_x = grad_x.view(ctx.x_shape)
        if need_a:
            dropped = x2d if mask2d is None else x2d * mask2d / ctx.keep_prob
            grad_a = scaled_g_b_t @ dropped
        if need_bb:
            grad_bb = (scaled_u.t() @ g).t()
        if ctx.has_bias and need_b:
            grad_bias = g.sum(0)
        return grad_x, None, grad_bias, grad_a, grad_bb, None, None, None


def lora_linear(x, weight_io, bias, lora_a, lora_b, scaling: float, keep_mask, keep_prob: float) -> torch.Tensor:
    """``LoraFunction`` in one compute dtype: the autocast dtype when ``torch.autocast`` is on
    for x's device (bf16 or fp16), else x's own. Every operand is cast to it before the
    function runs, with autocast off inside, and autograd casts each gradient back to its
    operand's dtype (float32 adapters keep float32 gradients). Autocast cannot see into a
    custom Function, and its backward runs outside autocast, so without this a bf16 forward
    met float32 weights in backward; ``.to`` of a tensor already in that dtype is free."""
    device = x.device.type
    autocast = torch.is_autocast_enabled(device)
    dtype = torch.get_autocast_dtype(device) if autocast else x.dtype
    if not autocast and lora_a.dtype == dtype and (weight_io is None or weight_io.dtype == dtype):
        return LoraFunction.apply(x, weight_io, bias, lora_a, lora_b, scaling, keep_mask, keep_prob)  # one dtype
    cast = [None if t is None else t.to(dtype) for t in (x, weight_io, bias, lora_a, lora_b)]
    with torch.autocast(device, enabled=False):
        return LoraFunction.apply(cast[0], cast[1], cast[2], cast[3], cast[4], scaling, keep_mask, keep_prob)


STACKED_UP_TO = 1 << 16
"""A mixed batch takes ``_add_stacked`` up to this many tokens x (in + out) of a layer."""


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``, without a call when it already is (a decode step counts calls)."""
    return t if t.dtype == dtype else t.to(dtype)


class LoraLayer(AdapterModule):
    """State shared by every LoRA layer: named adapters, their scaling and dropout, which are
    active and which are merged into the base weight."""

    adapter_settings = ("scaling", "dropout")
    mixes_rows = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.scaling: dict[str, float] = {}
        self.dropout: dict[str, float] = {}
        self.merged_adapters: list[str] = []

    # -- adapter protocol -------------------------------------------------
    def set_active_adapters(self, names: list[str]) -> None:
        if self.merged_adapters and set(names) != set(self.merged_adapters):
            raise RuntimeError(
                f"adapters {self.merged_adapters} are merged into the weights; unmerge() "
                "before changing which adapters are active."
            )
        super().set_active_adapters(names)

    def _check_deletable(self, name: str) -> None:
        if name in self.merged_adapters:
            raise RuntimeError(f"adapter {name!r} is merged into the weights; unmerge() before deleting it.")

    # -- merging ----------------------------------------------------------
    def delta_weight(self, name: str) -> torch.Tensor:
        """s · B A in the layout of ``base_layer.weight``."""
        raise NotImplementedError

    def _fold(self, names: list[str], sign: float) -> None:
        """W ← W + sign · s · B A for each adapter in ``names`` (and its bias change, if any)."""
        if getattr(self.base_layer, "quantized", False):
            # Adding s·B A to 4-bit codes would round it away; the merge goes into Ŵ made plain.
            raise RuntimeError("this LoRA layer's base is quantized (NF4): merge with PeftModel.merge_and_unload(dtype=...), "
                               "which merges into the dequantized weights.")
        with torch.no_grad():
            for name in names:
                self.base_layer.weight.add_(self.delta_weight(name), alpha=sign)

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def merge(self) -> None:
        """Fold every active adapter into the base weight: W ← W + s · B A."""
        if self.merged:
            warnings.warn("LoRA layer is already merged; merge() did nothing.", stacklevel=3)
            return
        self._fold(self.active_adapters, 1.0)
        self.merged_adapters = list(self.active_adapters)

    def unmerge(self) -> None:
        """Undo ``merge``: W ← W − s · B A (exact up to float rounding)."""
        if not self.merged:
            warnings.warn("LoRA layer is not merged; unmerge() did nothing.", stacklevel=3)
            return
        self._fold(self.merged_adapters, -1.0)
        self.merged_adapters = []

    def unwrap(self) -> nn.Module:
        """The original module (with whatever is merged into it)."""
        return self.base_layer

    def _lora_active(self) -> bool:
        return bool(self.active_adapters) and not self.merged


class LoraLinear(LoraLayer):
    """LoRA around ``nn.Linear`` (weight (out, in)) or GPT-2 ``Conv1D`` (weight (in, out)).

    With ``train_bias`` (LoRA's ``bias="lora_only"``) an adapter also learns a change
    Δb (out,) to the layer's bias, b + Δb, kept apart from b so that the base layer stays
    the base model's and two adapters never share one bias. Files hold b + Δb under
    ``base_layer.bias``, Hugging Face PEFT's key for the trained bias.

    Args:
        base_layer: the wrapped module; its weight is used, never copied.
        fan_in_fan_out: True when the weight is stored (in, out), as in ``Conv1D``.
    """

    adapter_tables = {"lora_A": "lora_A", "lora_B": "lora_B", "lora_bias": "bias"}

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = fan_in_fan_out
        if getattr(base_layer, "quantized", False):  # its weight property would dequantize it
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        else:
            weight = base_layer.weight
            self.in_features, self.out_features = (
                weight.shape if fan_in_fan_out else (weight.shape[1], weight.shape[0])
            )
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_bias = nn.ParameterDict()

    def add_adapter(self, name: str, r: int, alpha: float, dropout: float = 0.0,
                    use_rslora: bool = False, train_bias: bool = False) -> None:
        """Create adapter ``name``: A Kaiming-uniform, B zero, so B A = 0 at init (M2), and
        a zero bias change when ``train_bias`` and the layer has a bias."""
        base = self.base_layer
        if getattr(base, "quantized", False):
            device, dtype = base.weight_4bit.device, base.compute_dtype
        else:
            device, dtype = base.weight.device, base.weight.dtype
        lora_a = torch.empty(r, self.in_features, device=device, dtype=dtype)
        # Same init as nn.Linear's weight (and Hugging Face PEFT's A).
        nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5))
        self.lora_A[name] = nn.Parameter(lora_a)
        self.lora_B[name] = nn.Parameter(torch.zeros(self.out_features, r, device=device, dtype=dtype))
        bias = self.base_layer.bias
        if train_bias and bias is not None:
            self.lora_bias[name] = nn.Parameter(torch.zeros_like(bias))
        self.scaling[name] = lora_scaling(alpha, r, use_rslora)
        self.dropout[name] = float(dropout)

    def _base_bias(self) -> torch.Tensor | None:
        """The base model's own bias b, without any merged bias change."""
        bias = self.base_layer.bias
        if bias is None:
            return None
        return bias - sum(self.lora_bias[n] for n in self.merged_adapters if n in self.lora_bias)

    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        tensors = {"lora_A.weight": self.lora_A[name], "lora_B.weight": self.lora_B[name]}
        if name in self.lora_bias:
            tensors["base_layer.bias"] = (self._base_bias() + self.lora_bias[name]).detach()
        return tensors

    def load_adapter_state_dict(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.lora_A[name].copy_(tensors["lora_A.weight"])
            self.lora_B[name].copy_(tensors["lora_B.weight"])
            if name in self.lora_bias:
                self.lora_bias[name].copy_(tensors["base_layer.bias"].to(self.lora_bias[name]) - self._base_bias())

    def delta_weight(self, name: str) -> torch.Tensor:
        delta = (self.lora_B[name] @ self.lora_A[name]) * self.scaling[name]  # (out, in)
        return delta.t() if self.fan_in_fan_out else delta

    def _fold(self, names: list[str], sign: float) -> None:
        super()._fold(names, sign)
        with torch.no_grad():
            for name in names:
                if name in self.lora_bias:
                    self.base_layer.bias.add_(self.lora_bias[name], alpha=sign)

    def _weight_io(self) -> torch.Tensor:
        weight = self.base_layer.weight
        return weight if self.fan_in_fan_out else weight.t()

    def _keep_mask(self, x: torch.Tensor, name: str) -> torch.Tensor | None:
        p = self.dropout[name]
        if p == 0.0 or not self.training:
            return None
        return torch.rand_like(x) >= p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.row_adapters is not None:
            return self._forward_rows(x, self.row_adapters)
        if not self._lora_active():
            return self.base_layer(x)
        if getattr(self.base_layer, "quantized", False):
            return self._forward_on_quantized(x)
        if self.base_layer.weight.requires_grad and torch.is_grad_enabled():
            raise RuntimeError(
                "the base weight of a LoRA layer requires grad (mistake M1: base weights left "
                "trainable). LoRA trains only A and B; call peftkit.attach() again or set "
                "requires_grad=False on the base weights."
            )
        bias = self.base_layer.bias
        changes = [self.lora_bias[n] for n in self.active_adapters if n in self.lora_bias]
        if changes:
            bias = bias + sum(changes)
        first, *others = self.active_adapters
        y = self._apply(x, first, self._weight_io(), bias)
        for name in others:
            y = y + self._apply(x, name, None, None)
        return y

    def _forward_on_quantized(self, x: torch.Tensor) -> torch.Tensor:
        """A quantized base (``nf4.Nf4Linear``) computes W x + b itself, dequantizing
        inside its own matmul and keeping only the 4-bit weight for backward; each adapter adds
        s · B A x (and its bias change) through ``LoraFunction`` without a base weight."""
        y = self.base_layer(x)
        for name in self.active_adapters:
            y = y + self._apply(x, name, None, None).to(y.dtype)
            if name in self.lora_bias:
                y = y + self.lora_bias[name].to(y.dtype)
        return y

    def _forward_rows(self, x: torch.Tensor, rows: RowAdapters) -> torch.Tensor:
        """W x + b for the whole batch (B, ..., in) in one product, then s · B A x_g + Δb added
        to the rows x_g of each adapter g, in the same compute dtype as ``lora_linear``."""
        y = self.base_layer(x)
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        groups = [(name, where) for name, where in rows.groups(x.shape[0], x.device) if name in self.lora_A]
        in_place = y.dtype == dtype and y.is_contiguous()  # then a view of y's rows takes an addmm_
        if (in_place and len(groups) > 1 and not any(n in self.lora_bias for n, _ in groups)
                and x.numel() // self.in_features * (self.in_features + self.out_features) <= STACKED_UP_TO):
            self._add_stacked(x, y, rows, [name for name, _ in groups], dtype)
            return y
        for name, where in groups:
            u = _as(take_rows(x, where).reshape(-1, self.in_features), dtype) @ _as(self.lora_A[name], dtype).t()
            b_t, s, bias = _as(self.lora_B[name], dtype).t(), self.scaling[name], self.lora_bias.get(name)
            if isinstance(where, slice) and in_place:
                y[where].view(-1, self.out_features).addmm_(u, b_t, alpha=s)
                if bias is not None:
                    y[where].add_(bias)
            elif bias is None:
                add_to_rows(y, where, u @ b_t, alpha=s)
            else:
                add_to_rows(y, where, torch.addmm(_as(bias, dtype), u, b_t, alpha=s))
        return y

    def _add_stacked(self, x: torch.Tensor, y: torch.Tensor, rows: RowAdapters, names: list[str],
                     dtype: torch.dtype) -> None:
        """The same sum for a batch of few tokens (a decode step), where calls, not arithmetic, cost:
        every adapter's A on every row in one product (N, T, ΣR), each row's columns weighted by its
        own adapter's s and the others' by 0, then one product with the B's side by side."""
        a, b = rows.stacked(self, names, lambda: (  # once per call: a decode step would redo it
            torch.cat([_as(self.lora_A[n], dtype) for n in names]),             # (ΣR, in)
            torch.cat([_as(self.lora_B[n], dtype) for n in names], dim=1)))     # (out, ΣR)
        columns = tuple((n, self.lora_A[n].shape[0], self.scaling[n]) for n in names)
        u = _as(x.reshape(x.shape[0], -1, self.in_features), dtype) @ a.t()
        u.mul_(rows.column_weights(columns, x.shape[0], x.device, dtype)[:, None, :])
        y.view(-1, self.out_features).addmm_(u.view(-1, a.shape[0]), b.t())

    def _apply(self, x, name, weight_io, bias):
        p = self.dropout[name]
        return lora_linear(x, weight_io, bias, self.lora_A[name], self.lora_B[name],
                           self.scaling[name], self._keep_mask(x, name), 1.0 - p)

    def extra_repr(self) -> str:
        ranks = {n: self.lora_A[n].shape[0] for n in self.adapter_names}
        return f"in={self.in_features}, out={self.out_features}, ranks={ranks}, fan_in_fan_out={self.fan_in_fan_out}"


class LoraEmbedding(LoraLayer):
    """LoRA around ``nn.Embedding``: E[i] + s · (B A)ᵀ[i], with A (r, num), B (dim, r).

    Following Hugging Face PEFT, A starts at zero and B random (the product is still
    zero at init), and there is no dropout on an index lookup.
    """

    adapter_tables = {"lora_embedding_A": "lora_embedding_A", "lora_embedding_B": "lora_embedding_B"}

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__(base_layer)
        self.num_embeddings, self.embedding_dim = base_layer.weight.shape
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    def add_adapter(self, name: str, r: int, alpha: float, dropout: float = 0.0,
                    use_rslora: bool = False, train_bias: bool = False) -> None:
        weight = self.base_layer.weight
        self.lora_embedding_A[name] = nn.Parameter(
            torch.zeros(r, self.num_embeddings, device=weight.device, dtype=weight.dtype)
        )
        lora_b = torch.empty(self.embedding_dim, r, device=weight.device, dtype=weight.dtype)
        nn.init.normal_(lora_b)
        self.lora_embedding_B[name] = nn.Parameter(lora_b)
        self.scaling[name] = lora_scaling(alpha, r, use_rslora)
        self.dropout[name] = 0.0

    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        return {"lora_embedding_A": self.lora_embedding_A[name],
                "lora_embedding_B": self.lora_embedding_B[name]}

    def load_adapter_state_dict(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.lora_embedding_A[name].copy_(tensors["lora_embedding_A"])
            self.lora_embedding_B[name].copy_(tensors["lora_embedding_B"])

    def delta_weight(self, name: str) -> torch.Tensor:
        # (dim, r) @ (r, num) -> (dim, num); the embedding table is (num, dim).
        return (self.lora_embedding_B[name] @ self.lora_embedding_A[name]).t() * self.scaling[name]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(ids)
        if self.row_adapters is not None:
            for name, where in self.row_adapters.groups(ids.shape[0], ids.device):
                if name in self.lora_embedding_A:
                    add_to_rows(y, where, self._delta(take_rows(ids, where), name, y.dtype))
            return y
        if not self._lora_active():
            return y
        for name in self.active_adapters:
            y = y + self._delta(ids, name, y.dtype)
        return y

    def _delta(self, ids: torch.Tensor, name: str, dtype: torch.dtype) -> torch.Tensor:
        """s · (B A)ᵀ[ids], (..., dim), in ``dtype``, the table's: float32 factors on a
        bfloat16 table must not turn every later activation into float32."""
        base = self.base_layer
        after_a = F.embedding(ids, self.lora_embedding_A[name].t(), base.padding_idx,
                              base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse)
        return ((after_a @ self.lora_embedding_B[name].t()) * self.scaling[name]).to(dtype)
