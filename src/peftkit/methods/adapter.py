"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020; He et al. 2022).

A bottleneck maps the hidden state h (..., C) through a narrow inner size b:

    delta(h) = up(dropout(act(down(h))))     down: (b, C) + bias, up: (C, b) + bias
    adapter(h) = h + delta(h)

The residual lives inside the adapter (M8), and ``up`` starts at zero, so every adapter
is exactly the identity until it is trained (M2).

``AdapterWrapper`` puts adapters at one module of the model (the *site*) and keeps the
original module inside as ``base_layer``. Each named adapter uses the site in one of
three modes:

- ``"serial"``: after the site's output y, before the block's residual add: y + delta(y).
- ``"parallel"``: beside the site, reading its input x: site(x) + s · delta(x).
- ``"residual"``: for sites that compute norm(f(h) + r) themselves from (h, r) — the
  post-LayerNorm output modules of BERT-style models — the adapter reads r, the block's
  input, and joins the sum: site(h, r + s · delta(r)) = norm(f(h) + s · delta(r) + r),
  which is the parallel adapter of the block added before its residual add.
"""

from __future__ import annotations


import torch
from torch import nn

from .base import AdapterModule

ACTIVATION_MODULES: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}
MODES = ("serial", "parallel", "residual")


class Bottleneck(nn.Module):
    """h + up(dropout(act(down(h)))): (..., hidden) -> (..., hidden), through ``bottleneck``.

    ``up``'s weight and bias start at zero, so the module is the identity at init (M2).
    ``down`` keeps ``nn.Linear``'s random init: with both at zero, neither would ever get a
    nonzero gradient; this way ``up`` learns from the first step and ``down`` follows.
    """

    def __init__(self, hidden: int, bottleneck: int, activation: str = "relu", dropout: float = 0.0,
                 *, device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if activation not in ACTIVATION_MODULES:
            raise ValueError(f"activation must be one of {sorted(ACTIVATION_MODULES)}, got {activation!r}.")
        self.down = nn.Linear(hidden, bottleneck, device=device, dtype=dtype)
        self.act = ACTIVATION_MODULES[activation]()
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(bottleneck, hidden, device=device, dtype=dtype)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def delta(self, h: torch.Tensor) -> torch.Tensor:
        """up(dropout(act(down(h)))), the adapter's contribution alone, in h's dtype. A float32
        adapter on a bfloat16 model computes in float32 (autocast, when on, casts the two
        matmuls to its dtype anyway) and hands back h's dtype, so the model stays in its own."""
        inner = self.down.weight.dtype
        return self.up(self.dropout(self.act(self.down(h.to(inner))))).to(h.dtype)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.delta(h)


class AdapterWrapper(AdapterModule):
    """A model module (``base_layer``) with named bottleneck adapters at its input or output.

    Args:
        base_layer: the module the adapters sit at; called, never copied.
    """

    adapter_tables = {"bottleneck": "bottleneck"}
    adapter_settings = ("modes", "scaling")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.bottleneck = nn.ModuleDict()
        self.modes: dict[str, str] = {}
        self.scaling: dict[str, float] = {}

    def add_adapter(self, name: str, hidden: int, bottleneck: int, *, mode: str, activation: str = "relu",
                    dropout: float = 0.0, scaling: float = 1.0) -> None:
        """Create adapter ``name`` of width ``hidden`` on the base layer's device and dtype."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
        reference = next(self.base_layer.parameters(), None)
        self.bottleneck[name] = Bottleneck(
            hidden, bottleneck, activation, dropout,
            device=None if reference is None else reference.device,
            dtype=None if reference is None else reference.dtype,
        )
        self.modes[name] = mode
        self.scaling[name] = float(scaling)

    # -- adapter protocol -------------------------------------------------
    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        module = self.bottleneck[name]
        return {f"adapter_{part}.{kind}": getattr(getattr(module, part), kind)
                for part in ("down", "up") for kind in ("weight", "bias")}

    def load_adapter_state_dict(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for key, param in self.adapter_state_dict(name).items():
                param.copy_(tensors[key])

    def unwrap(self) -> nn.Module:
        return self.base_layer

    # -- forward ------------------------------------------------------------
    def _active(self, mode: str) -> list[str]:
        return [n for n in self.active_adapters if self.modes[n] == mode]

    def _scaled_delta(self, names: list[str], h: torch.Tensor) -> torch.Tensor:
        return sum(self.scaling[n] * self.bottleneck[n].delta(h) for n in names)

    def forward(self, *args, **kwargs):
        """The base layer's call with the active adapters: residual-mode adapters join the
        residual argument, then parallel ones add s · delta(input) to the output, then serial
        ones follow one after another (each the identity at init)."""
        if not self.active_adapters:
            return self.base_layer(*args, **kwargs)
        residual = self._active("residual")
        if residual:
            if len(args) < 2:
                raise TypeError(
                    f"{type(self.base_layer).__name__} with a residual-mode adapter must be called "
                    "as (hidden_states, residual, ...) with both positional."
                )
            args = (args[0], args[1] + self._scaled_delta(residual, args[1]), *args[2:])
        y = self.base_layer(*args, **kwargs)
        parallel, serial = self._active("parallel"), self._active("serial")
        if (parallel or serial) and not isinstance(y, torch.Tensor):
            raise TypeError(
                f"{type(self.base_layer).__name__} returns {type(y).__name__}, not a tensor; a "
                "bottleneck adapter can only follow a module that returns the hidden states."
            )
        if parallel:
            if not args:
                raise TypeError(f"{type(self.base_layer).__name__} with a parallel adapter must get its "
                                "input positionally: the adapter reads it.")
            y = y + self._scaled_delta(parallel, args[0])
        for name in serial:
            y = self.bottleneck[name](y)
        return y

    def extra_repr(self) -> str:
        sizes = {n: (self.bottleneck[n].down.out_features, self.modes[n]) for n in self.adapter_names}
        return f"adapters={sizes}"
