"""The adapters of a model as the checks see them, whatever wrote them: ``LoraView`` (a
LoRA layer and its adapters, ``LoraPair``), ``BottleneckView``, ``ConfigView``, and the
``Inventory`` that holds them with what each adapter parameter belongs to.

LoRA in one formula, for every origin: h = W x + s · B A x, with W (out, in), A (r, in),
B (out, r) and s = alpha / r (alpha / sqrt(r) with rsLoRA); an embedding looks its ids
up in A's columns instead of multiplying.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class LoraPair:
    """One LoRA adapter of a layer, by the local names of its tensors inside the layer.

    ``transposed``: stored the x A B way, A (in, r) and B (r, out). ``scaling`` is the s
    the layer uses, None when the layer does not say (hand-made code without alpha or r).
    ``expected_scaling`` is what the layer's own alpha and r make s (alpha/r, or
    alpha/sqrt(r) with rsLoRA) where it stores them beside ``scaling`` (Hugging Face
    PEFT's layers do); None otherwise. ``variant`` names a PEFT variant (DoRA) whose
    output is not W x + s B A x.
    """

    adapter: str
    a_name: str
    b_name: str
    b_bias_name: str | None
    transposed: bool
    scaling: float | None
    active: bool
    variant: str | None = None
    expected_scaling: float | None = None


@dataclass
class LoraView:
    """A LoRA layer of any origin ("peftkit", "peft" or "hand-made"), seen the same way.

    ``base_name`` is the local name of the wrapped layer; "" when W is the module's own
    ``weight``. ``kind`` is "linear" (input (..., in)) or "embedding" (input: ids).
    """

    path: str
    module: nn.Module
    source: str
    kind: str
    base_name: str
    in_features: int
    out_features: int
    pairs: list[LoraPair]
    merged: bool

    def active_pairs(self) -> list[LoraPair]:
        return [] if self.merged else [p for p in self.pairs if p.active]

    def matrices(self, module: nn.Module, pair: LoraPair) -> tuple[Tensor, Tensor, Tensor | None]:
        """A (r, in), B (out, r) and B's bias of ``pair`` in ``module`` (the layer or a copy)."""
        a, b = module.get_parameter(pair.a_name), module.get_parameter(pair.b_name)
        bias = module.get_parameter(pair.b_bias_name) if pair.b_bias_name else None
        return (a.t(), b.t(), bias) if pair.transposed else (a, b, bias)

    def rank(self, pair: LoraPair) -> int:
        return self.matrices(self.module, pair)[0].shape[0]

    def base_output(self, x: Tensor) -> Tensor:
        """What the layer computes with every adapter off: W x + b (or the embedding lookup)."""
        if self.base_name:
            return self.module.get_submodule(self.base_name)(x)
        if self.kind == "embedding":
            return F.embedding(x, self.module.weight)
        bias = getattr(self.module, "bias", None)
        return F.linear(x, self.module.weight, bias if isinstance(bias, Tensor) and bias.dim() == 1 else None)

    def lora_term(self, module: nn.Module, pair: LoraPair, x: Tensor) -> Tensor:
        """s · B A x of ``pair`` (s = the pair's scaling), from ``module``'s tensors, in float32
        at least (float32 factors on a bfloat16 layer are common: the formula is the reference)."""
        a, b, bias = self.matrices(module, pair)
        wide = torch.promote_types(a.dtype, torch.float32)
        a, b = a.to(wide), b.to(wide)
        bias = None if bias is None else bias.to(wide)
        if self.kind == "embedding":
            term = F.embedding(x, a.t()) @ b.t()
        else:
            term = x.to(wide) @ a.t() @ b.t()
        if bias is not None:
            term = term + bias
        return term * pair.scaling

    def base_weight(self) -> Tensor:
        """W, the wrapped layer's weight."""
        return (self.module.get_submodule(self.base_name) if self.base_name else self.module).weight

    def compute_dtype(self) -> torch.dtype:
        """The coarser of W's and A's dtypes: what the layer's output is rounded to."""
        a = self.module.get_parameter(self.pairs[0].a_name).dtype
        w = self.base_weight().dtype
        return w if torch.finfo(w).eps > torch.finfo(a).eps else a

    def probe_input(self, generator: torch.Generator) -> Tensor:
        """5 random ids for an embedding, else 3 random rows (3, in) in W's dtype (the layer's
        input in the model)."""
        weight = self.base_weight()
        if self.kind == "embedding":
            return torch.randint(0, self.in_features, (5,), generator=generator).to(weight.device)
        return torch.randn(3, self.in_features, generator=generator).to(weight.device, weight.dtype)


@dataclass
class BottleneckView:
    """A bottleneck adapter: ``down`` (hidden -> b) and ``up`` (b -> hidden) children."""

    path: str
    module: nn.Module
    down: str
    up: str
    hidden: int

    def params(self) -> list[nn.Parameter]:
        return [*self.module.get_submodule(self.down).parameters(), *self.module.get_submodule(self.up).parameters()]

    def with_up_zeroed(self) -> nn.Module:
        """A copy of the adapter whose up-projection (weight and bias) is zero."""
        clone = copy.deepcopy(self.module)
        with torch.no_grad():
            for param in clone.get_submodule(self.up).parameters():
                param.zero_()
        return clone

    def probe_input(self, generator: torch.Generator) -> Tensor:
        """Random hidden states (2, 3, hidden)."""
        weight = self.module.get_submodule(self.down).weight
        return torch.randn(2, 3, self.hidden, generator=generator).to(weight.device, weight.dtype)


@dataclass
class ConfigView:
    """An adapter config the model carries (peftkit's or PEFT's)."""

    source: str
    name: str
    peft_type: str
    target_modules: Any


@dataclass
class SequenceProbe:
    """One forward on random token ids, watched from inside.

    ``seq`` is what the transformer received as input embeddings (B, L, d) and ``tokens``
    the embeddings of the ids alone (B, T, d); L > T means positions were added.
    ``cache_length`` is the length of a key/value cache handed to the model before its
    first token (a prefix), 0 when there was none.
    """

    ids: Tensor
    seq: Tensor | None
    tokens: Tensor | None
    output: Tensor | None
    cache_length: int


@dataclass
class Inventory:
    """Every adapter found in a model, and what each adapter parameter belongs to.

    ``names`` and ``params`` cover every parameter of the model, by id; ``methods`` maps
    the id of each adapter parameter to its method (a PEFT type name, see ``kinds``);
    ``file_keys`` are tensor names an adapter file holds beyond parameter names.
    """

    names: dict[int, str]
    params: dict[int, nn.Parameter]
    methods: dict[int, str] = field(default_factory=dict)
    lora: list[LoraView] = field(default_factory=list)
    bottlenecks: list[BottleneckView] = field(default_factory=list)
    configs: list[ConfigView] = field(default_factory=list)
    adapter_names: set[str] = field(default_factory=set)
    file_keys: set[str] = field(default_factory=set)
    embedding: nn.Module | None = None
    sequence: SequenceProbe | None = None

    def claim(self, param: nn.Parameter, method: str) -> None:
        """Record ``param`` as an adapter parameter of ``method``; the first claim wins."""
        self.methods.setdefault(id(param), method)

    def is_adapter(self, param: nn.Parameter) -> bool:
        return id(param) in self.methods

    def name(self, param: nn.Parameter) -> str:
        return self.names.get(id(param), f"<unnamed {tuple(param.shape)}>")

    def params_of(self, *methods: str) -> list[nn.Parameter]:
        return [self.params[i] for i, m in self.methods.items() if m in methods and i in self.params]

    def declares(self, *methods: str) -> bool:
        return any(c.peft_type in methods for c in self.configs) or bool(self.params_of(*methods))
