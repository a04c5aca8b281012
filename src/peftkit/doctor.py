"""``peftkit.doctor``: find the twelve classic PEFT mistakes (M1-M12) in a live model.

    report = peftkit.doctor(model, optimizer=None, batch=None, checkpoint=None)
    print(report)          # a table: id, severity, where; then what is wrong and how to fix it
    report.ok              # False when any finding is an error
    report.to_json()

The model may be set up by peftkit, by Hugging Face PEFT or by hand in plain torch.
Adapters are found by structure, never by a name substring alone:

- peftkit modules declare their parameters (``adapter_parameters()``);
- Hugging Face PEFT's LoRA layers, prompt encoders and saved-module wrappers are
  recognised by class, looked up only when PEFT is already imported (a PEFT model cannot
  exist otherwise);
- hand-made LoRA: a module whose weight W (out, in) — its own ``weight`` or a child
  ``nn.Linear`` — sits beside two matrices that chain with it, A (r, in) and B (out, r)
  (or x A B layout: (in, r) and (r, out)), trainable and with r < min(in, out); names
  such as ``A``/``lora_B`` break ties and also admit a frozen pair or a rank that is too
  high (M5);
- a bottleneck adapter: a module with exactly two ``nn.Linear`` children h -> b -> h
  (b < h) that maps (..., h) to (..., h);
- a soft prompt or a prefix: parameters that feed extra input positions, or a key/value
  cache handed to the model before its first token (found by one probe forward).

Most checks probe behaviour rather than read names: the output of a layer against the
LoRA formula (M3), identity at init (M2, M8), padded rows against rows alone (M11),
where gradients land (M12). Checks that read files or settings (M4, M5, M9, M10) apply
the same rules peftkit applies when it attaches an adapter.

The doctor changes nothing it is given. Probes run in eval mode under ``torch.no_grad()``,
on copies of single layers (the frozen weight is shared, not copied) or through
``torch.func.functional_call`` with replaced tensors; the one backward (M12) saves every
``.grad`` first and puts it back; module modes and the random-number generator state are
restored on exit; the optimizer is only read. When a probe cannot run, the report says
so in ``notes`` rather than passing silently.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import sys
import textwrap
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import integrations, targets
from .methods.base import adapter_modules
from .methods.lora import LoraEmbedding, LoraLayer
from .model import PeftModel

SEVERITIES = ("error", "warning", "info")

MISTAKES: dict[str, str] = {
    "M1": "base weights left trainable",
    "M2": "adapter not zero at init",
    "M3": "missing alpha/r scaling",
    "M4": "LoRA on the wrong layers",
    "M5": "rank too high",
    "M6": "not merged for inference",
    "M7": "soft prompt not at the input embeddings",
    "M8": "adapter without residual",
    "M9": "learning rate too low for PEFT",
    "M10": "checkpoint holds the whole model",
    "M11": "prefix attention mask not extended",
    "M12": "gradients in the wrong places",
}

LORA, PROMPT, P_TUNING, PREFIX, BOTTLENECK = (
    "LORA", "PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "BOTTLENECK_ADAPTER")
PROMPT_METHODS = (PROMPT, P_TUNING)
METHOD_NAMES = {LORA: "LoRA", PROMPT: "prompt-tuning", P_TUNING: "p-tuning", PREFIX: "prefix-tuning",
                BOTTLENECK: "bottleneck-adapter"}

# M9: the lowest learning rate each method is known to train well with. Below it the
# adapter barely moves in a normal run (full fine-tuning rates, 1e-5 to 5e-5, are the
# classic slip).
# - LoRA: Hu et al. 2021 train GPT-2 with 2e-4 and RoBERTa with 4e-4 to 5e-4; QLoRA
#   (Dettmers et al. 2023) uses 1e-4 to 2e-4; Hugging Face PEFT's LoRA guides use 1e-4
#   to 3e-4. The floor is half the lowest of these.
# - Prompt tuning: Lester et al. 2021 train the prompt with 0.3 (Adafactor); PEFT's
#   prompt-tuning guide uses 3e-2. 1e-3 is thirty times below the guide.
# - Prefix tuning: Li & Liang 2021 train the prefix (through their MLP reparameterisation)
#   with 5e-5 and up; PEFT's prefix-tuning guide uses 1e-2. The floor is the paper's rate.
# - Bottleneck adapters: Houlsby et al. 2019 sweep rates up to 3e-3; AdapterHub's training
#   examples and Pfeiffer et al. 2021 (AdapterFusion) use 1e-4.
LEARNING_RATE_FLOORS: dict[str, float] = {
    LORA: 5e-5, PROMPT: 1e-3, P_TUNING: 1e-3, PREFIX: 5e-5, BOTTLENECK: 1e-4,
}

# Probe sizes: 2 rows (so batch effects show) of 6 tokens, 2 of them left padding in M11.
_ROWS, _TOKENS, _PADDING = 2, 6, 2
_CACHE_KEYWORDS = ("past_key_values", "past_key_value", "cache", "prefix_key_values")


# -- the report -----------------------------------------------------------------------
@dataclass(frozen=True)
class Finding:
    """One mistake found in the model.

    ``id`` is "M1" .. "M12"; ``severity`` is "error" (training or inference goes wrong),
    "warning" (it works, badly or wastefully) or "info" (fine now, worth knowing);
    ``where`` names the modules and parameters; ``message`` says what is wrong and why it
    matters; ``fix`` says what to do.
    """

    id: str
    severity: str
    where: str
    message: str
    fix: str

    def __post_init__(self) -> None:
        if self.id not in MISTAKES:
            raise ValueError(f"unknown mistake id {self.id!r}; ids are {list(MISTAKES)}.")
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {SEVERITIES}, got {self.severity!r}.")


@dataclass
class DoctorReport:
    """What ``doctor`` found: ``findings`` (ordered by id) and ``notes`` (checks that could
    not run, and why)."""

    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no finding is an error."""
        return not self.errors

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    def ids(self, *severities: str) -> set[str]:
        """The ids found, optionally only those of the given severities."""
        return {f.id for f in self.findings if not severities or f.severity in severities}

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "findings": [asdict(f) for f in self.findings], "notes": list(self.notes)}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> DoctorReport:
        data = json.loads(text)
        return cls([Finding(**f) for f in data["findings"]], list(data.get("notes", [])))

    def __str__(self) -> str:
        counts = [_count(len([f for f in self.findings if f.severity == s]), s) for s in SEVERITIES]
        lines = [f"peftkit doctor: {', '.join(counts)}" + ("" if self.ok else "  (not ok)")]
        if not self.findings:
            lines.append("  no mistake found among M1-M12.")
        else:
            lines += _summary_table(self.findings)
            for f in self.findings:
                lines += ["", f"{f.id} {f.severity}: {MISTAKES[f.id]}"]
                lines += _wrapped("where", f.where) + _wrapped("problem", f.message) + _wrapped("fix", f.fix)
        if self.notes:
            lines += ["", "notes:"] + [line for note in self.notes for line in _wrapped("-", note, width=2)]
        return "\n".join(lines)


def _count(n: int, severity: str) -> str:
    return f"{n} {severity}" + ("s" if n != 1 and severity != "info" else "")


def _summary_table(findings: list[Finding]) -> list[str]:
    rows = [("id", "severity", "mistake", "where")] + [
        (f.id, f.severity, MISTAKES[f.id], _shorten(f.where, 60)) for f in findings]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths)) + "  " + row[3] for row in rows]


def _wrapped(label: str, text: str, width: int = 8) -> list[str]:
    """``text`` wrapped at 100 columns behind a ``label`` column of ``width``."""
    indent = f"  {label:<{width}} "
    return textwrap.wrap(text, width=100, initial_indent=indent, subsequent_indent=" " * len(indent)) or [indent]


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _many(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _names(names: Iterable[str], limit: int = 4) -> str:
    """'a, b, c, d and 7 more' — enough to find them, short enough to read."""
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


# -- what the model holds -------------------------------------------------------------------
@dataclass
class LoraPair:
    """One LoRA adapter of a layer, by the local names of its tensors inside the layer.

    ``transposed``: stored the x A B way, A (in, r) and B (r, out). ``scaling`` is None
    when the layer does not say what it should be (hand-made code without alpha or r).
    ``variant`` names a PEFT variant (DoRA) whose output is not W x + s B A x.
    """

    adapter: str
    a_name: str
    b_name: str
    b_bias_name: str | None
    transposed: bool
    scaling: float | None
    active: bool
    variant: str | None = None


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

    def base_output(self, x: Tensor) -> Tensor:
        """What the layer computes with every adapter off: W x + b (or the embedding lookup)."""
        if self.base_name:
            return self.module.get_submodule(self.base_name)(x)
        if self.kind == "embedding":
            return F.embedding(x, self.module.weight)
        bias = getattr(self.module, "bias", None)
        return F.linear(x, self.module.weight, bias if isinstance(bias, Tensor) and bias.dim() == 1 else None)

    def lora_term(self, module: nn.Module, pair: LoraPair, x: Tensor) -> Tensor:
        """s · B A x of ``pair`` (s = the pair's scaling), from ``module``'s tensors."""
        a, b, bias = self.matrices(module, pair)
        if self.kind == "embedding":
            term = F.embedding(x, a.t()) @ b.t()
        else:
            term = x @ a.t() @ b.t()
        if bias is not None:
            term = term + bias
        return term * pair.scaling

    def probe_input(self, generator: torch.Generator) -> Tensor:
        weight = self.module.get_parameter(self.pairs[0].a_name)
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
    """Every adapter found in a model, and what each adapter parameter belongs to."""

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
        self.methods.setdefault(id(param), method)

    def is_adapter(self, param: nn.Parameter) -> bool:
        return id(param) in self.methods

    def name(self, param: nn.Parameter) -> str:
        return self.names.get(id(param), f"<unnamed {tuple(param.shape)}>")

    def params_of(self, *methods: str) -> list[nn.Parameter]:
        return [self.params[i] for i, m in self.methods.items() if m in methods and i in self.params]

    def declares(self, *methods: str) -> bool:
        return any(c.peft_type in methods for c in self.configs) or bool(self.params_of(*methods))


def _find_adapters(model: nn.Module) -> Inventory:
    """Every adapter in ``model``, found by structure (see the module docstring).

    Runs small probes (bottleneck input/output shapes), so call it inside ``_untouched``.
    """
    named = {id(p): (n, p) for n, p in model.named_parameters()}
    inv = Inventory(names={i: n for i, (n, _) in named.items()}, params={i: p for i, (_, p) in named.items()})
    _find_peftkit(model, inv)
    _find_peft(model, inv)
    for path, module in model.named_modules():
        view = _hand_lora_view(path, module, inv)
        if view is not None:
            inv.lora.append(view)
            for pair in view.pairs:
                for local in (pair.a_name, pair.b_name, pair.b_bias_name):
                    if local:
                        inv.claim(module.get_parameter(local), LORA)
    for path, module in model.named_modules():
        view = _bottleneck_view(path, module, inv)
        if view is not None:
            inv.bottlenecks.append(view)
            for param in view.params():
                inv.claim(param, BOTTLENECK)
    inv.embedding = _input_embedding(model)
    return inv


# peftkit ------------------------------------------------------------------------------
def _find_peftkit(model: nn.Module, inv: Inventory) -> None:
    methods: dict[str, str] = {}
    for module in model.modules():
        if isinstance(module, PeftModel):
            for name, config in module.configs.items():
                methods[name] = config.peft_type
                targets_ = getattr(config, "target_modules", None)
                inv.configs.append(ConfigView("peftkit", name, config.peft_type, targets_))
                inv.file_keys.update(module.adapter_tensors(name))
    for path, module in adapter_modules(model):
        inv.adapter_names.update(module.adapter_names)
        for adapter in module.adapter_names:
            method = methods.get(adapter, LORA if isinstance(module, LoraLayer) else type(module).__name__)
            for _, param in module.adapter_parameters(adapter):
                inv.claim(param, method)
        if isinstance(module, LoraLayer):
            inv.lora.append(_peftkit_lora_view(path, module))


def _peftkit_lora_view(path: str, layer: LoraLayer) -> LoraView:
    embedding = isinstance(layer, LoraEmbedding)
    a_table, b_table = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B")
    pairs = [LoraPair(n, f"{a_table}.{n}", f"{b_table}.{n}", None, False, layer.scaling[n],
                      n in layer.active_adapters) for n in layer.adapter_names]
    sizes = (layer.num_embeddings, layer.embedding_dim) if embedding else (layer.in_features, layer.out_features)
    return LoraView(path, layer, "peftkit", "embedding" if embedding else "linear", "base_layer",
                    *sizes, pairs, layer.merged)


# Hugging Face PEFT ----------------------------------------------------------------------
def _peft_class(module_name: str, class_name: str) -> type | None:
    """A PEFT class if PEFT is already imported (a PEFT model cannot exist otherwise)."""
    return getattr(sys.modules.get(module_name), class_name, None)


def _find_peft(model: nn.Module, inv: Inventory) -> None:
    peft_model = _peft_class("peft.peft_model", "PeftModel")
    lora_layer = _peft_class("peft.tuners.lora.layer", "LoraLayer")
    # AuxiliaryTrainingWrapper since PEFT 0.15; ModulesToSaveWrapper alone before.
    auxiliary = (_peft_class("peft.utils.other", "AuxiliaryTrainingWrapper")
                 or _peft_class("peft.utils.other", "ModulesToSaveWrapper"))
    wrappers = []
    for path, module in model.named_modules():
        if peft_model is not None and isinstance(module, peft_model):
            wrappers.append(module)
            _peft_model_adapters(module, inv)
        elif lora_layer is not None and isinstance(module, lora_layer):
            for param in _params_outside(module, module.get_base_layer()):
                inv.claim(param, LORA)
            view = _peft_lora_view(path, module)
            if view is not None:
                inv.lora.append(view)
        elif auxiliary is not None and isinstance(module, auxiliary):
            # modules_to_save / trainable tokens: trained copies PEFT saves with the adapter.
            for param in _params_outside(module, getattr(module, "original_module", None)):
                inv.claim(param, "MODULES_TO_SAVE")
    for wrapper in wrappers:  # after the loop: "lora_only" needs every LoRA layer found
        for config in wrapper.peft_config.values():
            _claim_peft_biases(wrapper, config, inv)


def _peft_model_adapters(model: nn.Module, inv: Inventory) -> None:
    for name, config in model.peft_config.items():
        peft_type = str(getattr(config.peft_type, "value", config.peft_type))
        inv.configs.append(ConfigView("peft", name, peft_type, getattr(config, "target_modules", None)))
        inv.adapter_names.add(name)
        if getattr(config, "is_prompt_learning", False) and name in model.prompt_encoder:
            inv.file_keys.add("prompt_embeddings")
            for param in model.prompt_encoder[name].parameters():
                inv.claim(param, peft_type)


def _claim_peft_biases(model: nn.Module, config: Any, inv: Inventory) -> None:
    """PEFT's ``bias="all"`` trains every bias, chosen by PEFT's own rule (a name holding
    "bias"); ``"lora_only"`` the biases of LoRA layers. Those are meant to train."""
    bias = getattr(config, "bias", "none")
    if bias == "all":
        for name, param in model.named_parameters():
            if "bias" in name and param.requires_grad:
                inv.claim(param, "BIAS")
    elif bias == "lora_only":
        for view in inv.lora:
            base_bias = getattr(view.module.get_submodule(view.base_name), "bias", None) if view.base_name else None
            if isinstance(base_bias, nn.Parameter):
                inv.claim(base_bias, "BIAS")


def _params_outside(module: nn.Module, inner: nn.Module | None) -> list[nn.Parameter]:
    excluded = {id(p) for p in inner.parameters()} if inner is not None else set()
    return [p for p in module.parameters() if id(p) not in excluded]


def _peft_lora_view(path: str, layer: nn.Module) -> LoraView | None:
    active = set() if layer.disable_adapters else set(layer.active_adapters)
    use_dora = getattr(layer, "use_dora", {})
    pairs, kind = [], "linear"
    for n in layer.lora_A:
        a, b = layer.lora_A[n], layer.lora_B[n]
        if type(a) is nn.Linear and type(b) is nn.Linear:  # conv LoRA has another formula
            pairs.append(LoraPair(n, f"lora_A.{n}.weight", f"lora_B.{n}.weight",
                                  f"lora_B.{n}.bias" if b.bias is not None else None, False,
                                  layer.scaling[n], n in active, "DoRA" if use_dora.get(n) else None))
    if not pairs:
        kind = "embedding"
        pairs = [LoraPair(n, f"lora_embedding_A.{n}", f"lora_embedding_B.{n}", None, False, layer.scaling[n],
                          n in active, "DoRA" if use_dora.get(n) else None) for n in layer.lora_embedding_A]
    if not pairs:
        return None
    a, b = layer.get_parameter(pairs[0].a_name), layer.get_parameter(pairs[0].b_name)
    return LoraView(path, layer, "peft", kind, "base_layer", a.shape[1], b.shape[0], pairs, bool(layer.merged))


# hand-made LoRA -------------------------------------------------------------------------
_A_NAMES = {"a", "lora_a", "lora_down", "w_a"}
_B_NAMES = {"b", "lora_b", "lora_up", "w_b"}


def _matrix_pool(module: nn.Module) -> dict[str, tuple[Tensor, str | None, bool]]:
    """Local name -> (2-D tensor, local name of its bias or None, belongs to a child Linear)."""
    pool: dict[str, tuple[Tensor, str | None, bool]] = {}
    for name, param in module.named_parameters(recurse=False):
        if param.dim() == 2:
            pool[name] = (param, None, False)
    for name, child in module.named_children():
        if type(child) is nn.Linear:
            pool[f"{name}.weight"] = (child.weight, f"{name}.bias" if child.bias is not None else None, True)
    return pool


def _hinted(key: str, names: set[str]) -> bool:
    return key.removesuffix(".weight").lower() in names


def _hand_lora_view(path: str, module: nn.Module, inv: Inventory) -> LoraView | None:
    """A LoRA written by hand: W (out, in) beside A (r, in) and B (out, r) that chain with it
    (see the module docstring); the best-named, torch-layout candidate wins."""
    pool = _matrix_pool(module)
    if len(pool) < 3 or any(inv.is_adapter(t) for t, _, _ in pool.values()):
        return None
    best: tuple[tuple[bool, bool], LoraView] | None = None
    for base in (k for k, (_, _, linear) in pool.items() if linear or k == "weight"):
        out_f, in_f = pool[base][0].shape
        for a_key, b_key in itertools.permutations([k for k in pool if k != base], 2):
            both_params = not pool[a_key][2] and not pool[b_key][2]
            for transposed in (False, True) if both_params else (False,):
                a, b = pool[a_key][0], pool[b_key][0]
                a, b = (a.t(), b.t()) if transposed else (a, b)
                if a.shape[1] != in_f or b.shape[0] != out_f or a.shape[0] != b.shape[1]:
                    continue
                hinted = _hinted(a_key, _A_NAMES) and _hinted(b_key, _B_NAMES)
                # Unnamed, a pair must be low-rank and trained: base models hold low-rank
                # pairs of their own (e.g. DeepSeek's q_a_proj/q_b_proj), frozen.
                trained = pool[a_key][0].requires_grad or pool[b_key][0].requires_grad
                low_rank = a.shape[0] < min(in_f, out_f) and trained
                if not (hinted or low_rank):
                    continue
                score = (hinted, not transposed)
                if best is None or score > best[0]:
                    pair = LoraPair("", a_key, b_key, pool[b_key][1], transposed,
                                    _declared_scaling(module, a.shape[0]), True)
                    best = (score, LoraView(path, module, "hand-made", "linear", base.removesuffix(".weight")
                                            if pool[base][2] else "", in_f, out_f, [pair], False))
    return None if best is None else best[1]


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _declared_scaling(module: nn.Module, r: int) -> float | None:
    """The s a hand-made layer means to use: its ``scaling``, else alpha / r from its
    ``alpha``/``lora_alpha`` and ``r``/``rank`` (r from A's shape when not stored)."""
    scaling = getattr(module, "scaling", None)
    if _number(scaling):
        return float(scaling)
    alpha = next((getattr(module, k) for k in ("alpha", "lora_alpha") if _number(getattr(module, k, None))), None)
    if alpha is None:
        return None
    rank = next((getattr(module, k) for k in ("r", "rank") if _number(getattr(module, k, None))), r)
    return alpha / rank


# bottleneck adapters -----------------------------------------------------------------------
def _bottleneck_view(path: str, module: nn.Module, inv: Inventory) -> BottleneckView | None:
    """Two Linear children h -> b -> h (b < h) in a module that maps (..., h) to (..., h);
    adapter parameters (claimed by peftkit) or all trainable (hand-made)."""
    linears = [(n, c) for n, c in module.named_children() if type(c) is nn.Linear]
    if len(linears) != 2:
        return None
    for (down_name, down), (up_name, up) in (linears, linears[::-1]):
        hidden, inner = down.in_features, down.out_features
        if not (inner < hidden and up.in_features == inner and up.out_features == hidden):
            continue
        params = [*down.parameters(), *up.parameters()]
        claimed = all(inv.is_adapter(p) for p in params)
        if not (claimed or all(p.requires_grad and not inv.is_adapter(p) for p in params)):
            continue
        view = BottleneckView(path, module, down_name, up_name, hidden)
        if _maps_hidden_to_hidden(view):
            return view
    return None


def _maps_hidden_to_hidden(view: BottleneckView) -> bool:
    x = view.probe_input(torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            y = view.module(x)
    except Exception:  # not callable on (..., hidden): a block that only looks like one
        return False
    return isinstance(y, Tensor) and y.shape == x.shape


def _input_embedding(model: nn.Module) -> nn.Module | None:
    """The module that turns token ids into input embeddings, if the model has one."""
    for module in model.modules():
        getter = getattr(module, "get_input_embeddings", None)
        if callable(getter):
            try:
                embedding = getter()
            except (NotImplementedError, AttributeError):
                continue
            if isinstance(embedding, nn.Module):
                return embedding
    return next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)


def _embedding_weight(embedding: nn.Module) -> Tensor:
    weight = getattr(embedding, "weight", None)
    return weight if isinstance(weight, Tensor) else embedding.base_layer.weight


# -- probing without changing anything ----------------------------------------------------------
@contextlib.contextmanager
def _untouched(model: nn.Module) -> Iterator[None]:
    """Eval mode, the RNG forked and warnings from the probes kept quiet; every module's
    mode comes back on exit."""
    modes = [(m, m.training) for m in model.modules()]
    devices = sorted({p.device.index for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.eval()
        try:
            yield
        finally:
            for module, training in modes:
                module.training = training


@contextlib.contextmanager
def _training_mode(model: nn.Module) -> Iterator[None]:
    """Train mode (gradient checkpointing only runs in it), except modules with running
    statistics, which would update them."""
    modes = [(m, m.training) for m in model.modules()]
    for module in model.modules():
        module.training = not getattr(module, "track_running_stats", False)
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _call(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _output_tensors(output: Any) -> list[Tensor]:
    """The tensors a model returned: itself, a mapping's or dataclass's values, a tuple's items."""
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, Mapping):
        values = list(output.values())
    elif is_dataclass(output):
        values = [getattr(output, f.name) for f in fields(output)]
    else:
        values = list(output) if isinstance(output, (tuple, list)) else []
    return [v for v in values if isinstance(v, Tensor)]


def _main_tensor(output: Any) -> Tensor | None:
    """Logits (or the first tensor) of a model output."""
    for key in ("logits", "last_hidden_state"):
        value = output.get(key) if isinstance(output, Mapping) else getattr(output, key, None)
        if isinstance(value, Tensor):
            return value
    return next(iter(_output_tensors(output)), None)


def _scalar_loss(output: Any) -> Tensor:
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    if isinstance(loss, Tensor):
        return loss
    # No loss: every floating output counts (a pooler output as much as the hidden states),
    # so that no adapter looks unused only because the doctor ignored what it feeds.
    tensors = [t for t in _output_tensors(output) if t.is_floating_point()]
    if not tensors:
        raise TypeError(f"the model returned {type(output).__name__}, with no loss and no tensor to differentiate.")
    return sum(t.float().mean() for t in tensors)


def _tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance of a probe comparison in ``dtype``."""
    return 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2


def _differs(a: Tensor, b: Tensor, scale: Tensor | None = None) -> bool:
    scale = (b if scale is None else scale).detach().float().abs().max().clamp_min(1e-6)
    return bool((a.detach().float() - b.detach().float()).abs().max() > _tolerance(a.dtype) * scale)


def _copy_sharing_frozen(module: nn.Module, adapter: set[int]) -> nn.Module:
    """A deep copy of ``module`` that shares (does not copy) its non-adapter tensors."""
    memo = {id(t): t for t in itertools.chain(module.parameters(), module.buffers()) if id(t) not in adapter}
    return copy.deepcopy(module, memo)


class _Watcher:
    """Hooks that watch one forward: the input embeddings the transformer received, the
    token embeddings, and a key/value cache handed in before the first token."""

    def __init__(self) -> None:
        self.inputs_embeds: Tensor | None = None
        self.embedded: Tensor | None = None
        self.cache_seen = False
        self.cache_length = 0
        self.cache_tensors: list[Tensor] = []

    def before(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.inputs_embeds is None and isinstance(kwargs.get("inputs_embeds"), Tensor):
            self.inputs_embeds = kwargs["inputs_embeds"]
        # Only the first module handed a cache counts: a model may make its own empty cache
        # and pass it down, and later layers see it filled by earlier ones.
        cache = next((kwargs[k] for k in _CACHE_KEYWORDS if kwargs.get(k) is not None), None)
        if cache is not None and not self.cache_seen:
            self.cache_seen = True
            self.cache_tensors = _tensors_in(cache)
            self.cache_length = max((t.shape[-2] for t in self.cache_tensors if t.dim() >= 3), default=0)

    def after_embedding(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self.embedded is None and isinstance(output, Tensor):
            self.embedded = output

    @contextlib.contextmanager
    def watching(self, model: nn.Module, embedding: nn.Module) -> Iterator[None]:
        handles = [m.register_forward_pre_hook(self.before, with_kwargs=True) for m in model.modules()]
        handles.append(embedding.register_forward_hook(self.after_embedding))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


def _tensors_in(obj: Any, depth: int = 0) -> list[Tensor]:
    """The tensors inside a cache: tuples of (key, value), or a transformers Cache object."""
    if isinstance(obj, Tensor):
        return [obj]
    if depth > 4:
        return []
    if isinstance(obj, (tuple, list)):
        return [t for item in obj for t in _tensors_in(item, depth + 1)]
    if isinstance(obj, Mapping):
        return [t for item in obj.values() for t in _tensors_in(item, depth + 1)]
    if hasattr(obj, "layers"):  # transformers >= 4.56: Cache.layers[i].keys / .values
        return [t for layer in obj.layers for t in _tensors_in([getattr(layer, "keys", None),
                                                               getattr(layer, "values", None)], depth + 1)]
    if hasattr(obj, "key_cache"):
        return _tensors_in([obj.key_cache, obj.value_cache], depth + 1)
    return []


def _lm_inputs(inv: Inventory, rows: int = _ROWS, tokens: int = _TOKENS) -> dict[str, Tensor]:
    weight = _embedding_weight(inv.embedding)
    ids = torch.randint(0, weight.shape[0], (rows, tokens), generator=torch.Generator().manual_seed(0))
    ids = ids.to(weight.device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _probe_sequence(model: nn.Module, inv: Inventory, notes: list[str]) -> SequenceProbe | None:
    """Run the model once on random ids, watching its input side; parameters nobody claimed
    that feed added input positions (a soft prompt) or a cache handed in (a prefix) are
    claimed as prompt or prefix parameters."""
    if inv.embedding is None:
        return None
    inputs = _lm_inputs(inv)
    embedding_params = {id(p) for p in inv.embedding.parameters()}
    unclaimed = [p for i, p in inv.params.items()
                 if p.requires_grad and not inv.is_adapter(p) and i not in embedding_params]
    failures = []
    for with_grad in ([True, False] if unclaimed else [False]):
        watcher = _Watcher()
        try:
            with torch.set_grad_enabled(with_grad), watcher.watching(model, inv.embedding):
                output = _call(model, inputs)
        except Exception as e:  # the model may not take input_ids; say so, never guess
            failures.append(f"{type(e).__name__}: {e}")
            continue
        seq = watcher.inputs_embeds if watcher.inputs_embeds is not None else watcher.embedded
        if with_grad:
            _claim_feeders(inv, unclaimed, seq, watcher.cache_tensors, inputs["input_ids"].shape[1])
        main = _main_tensor(output)
        return SequenceProbe(inputs["input_ids"], None if seq is None else seq.detach(),
                             None if watcher.embedded is None else watcher.embedded.detach(),
                             None if main is None else main.detach(), watcher.cache_length)
    if unclaimed or inv.declares(*PROMPT_METHODS, PREFIX):  # else nothing needed the probe
        notes.append(f"the model could not be run on input_ids, so prompts and prefixes (M7, M11) were not "
                     f"probed ({failures[-1]}).")
    return None


def _claim_feeders(inv: Inventory, candidates: list[nn.Parameter], seq: Tensor | None,
                   cache: list[Tensor], tokens: int) -> None:
    if seq is not None and seq.requires_grad and seq.shape[1] > tokens:
        for param in _feeding([seq], candidates):
            inv.claim(param, PROMPT)
    for param in _feeding([t for t in cache if t.requires_grad], candidates):
        inv.claim(param, PREFIX)


def _feeding(outputs: list[Tensor], candidates: list[nn.Parameter]) -> list[nn.Parameter]:
    """The candidates that ``outputs`` depend on (through autograd)."""
    outputs = [t for t in outputs if t.requires_grad]
    if not outputs or not candidates:
        return []
    with torch.enable_grad():
        total = sum(t.float().sum() for t in outputs)
        grads = torch.autograd.grad(total, candidates, allow_unused=True, retain_graph=True)
    return [p for p, g in zip(candidates, grads) if g is not None]


# -- the checks ------------------------------------------------------------------------------
@dataclass
class _Context:
    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    batch: Any
    checkpoint: Path | None
    inv: Inventory
    notes: list[str]
    training: bool  # the model's mode as given (probes run in eval mode)

    def optimizer_params(self) -> dict[int, nn.Parameter]:
        if self.optimizer is None:
            return {}
        return {id(p): p for group in self.optimizer.param_groups for p in group["params"]}

    def training_state(self, params: list[nn.Parameter]) -> str:
        """'trained' (the optimizer has stepped them), 'untrained' (it has not) or
        'unknown' (no optimizer, or one that keeps no state, like SGD without momentum)."""
        if self.optimizer is None:
            return "unknown"
        if any(self.optimizer.state.get(p) for p in params):
            return "trained"
        stateless = isinstance(self.optimizer, torch.optim.SGD) and all(
            not g.get("momentum") for g in self.optimizer.param_groups)
        held = self.optimizer_params()
        return "unknown" if stateless or not any(id(p) in held for p in params) else "untrained"


def _attempt(ctx: _Context, what: str, probe: Callable[[], Any]) -> Any:
    """``probe()``, or None with a note when the model cannot run it (a layer that takes
    another input than the doctor gives it, say): a check that could not run is reported,
    never passed."""
    try:
        return probe()
    except Exception as e:
        ctx.notes.append(f"{what} could not be probed ({type(e).__name__}: {e}).")
        return None


def check_m1(ctx: _Context) -> list[Finding]:
    """Trainable parameters outside adapters; frozen parameters in optimizer groups."""
    inv, findings = ctx.inv, []
    outside = [p for p in inv.params.values() if p.requires_grad and not inv.is_adapter(p)]
    if outside and inv.methods:
        count = sum(p.numel() for p in outside)
        share = count / max(1, sum(p.numel() for p in inv.params.values()))
        names = [inv.name(p) for p in outside]
        findings.append(Finding(
            "M1", "error", _names(names),
            f"parameters outside any adapter require grad: {_many(len(outside), 'parameter')}, {count:,} values, "
            f"{share:.1%} of the model (e.g. {names[0]}). An optimizer holding them rewrites the base "
            "model and stores optimizer state for every one of them; left out of the optimizer they still "
            "get gradients (M12).",
            "freeze every base parameter: model.requires_grad_(False) before adding the adapters, then "
            "train only the adapter parameters (peftkit.attach does both; with Hugging Face PEFT, do not "
            "re-enable base weights after get_peft_model)."))
    frozen = [p for p in ctx.optimizer_params().values() if not p.requires_grad]
    if frozen:
        findings.append(Finding(
            "M1", "warning", _names(inv.name(p) for p in frozen),
            f"the optimizer holds {_many(len(frozen), 'frozen parameter')}, e.g. {inv.name(frozen[0])}: they "
            "never get a gradient, so they only cost bookkeeping now, and they start training silently if anything "
            "unfreezes them.",
            "build the optimizer from the trainable parameters only: "
            "torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=...)."))
    if not inv.methods:
        ctx.notes.append("no adapter found (peftkit, Hugging Face PEFT or hand-made LoRA, bottleneck, prompt "
                         "or prefix), so M1-M3, M5, M6, M8 and M12's adapter checks had nothing to check.")
    return findings


def check_m2(ctx: _Context) -> list[Finding]:
    """An adapter that changes the output before any training step."""
    generator = torch.Generator().manual_seed(2)
    untrained, unknown = [], []
    for view in ctx.inv.lora:
        for pair in view.active_pairs():  # one by one: a trained adapter beside a new one is fine
            params = [view.module.get_parameter(n) for n in (pair.a_name, pair.b_name)]
            if _changes_before_training(ctx, params):
                x = view.probe_input(generator)
                without = _attempt(ctx, f"M2 at {view.path}", lambda: _without_b(view, pair, ctx.inv)(x))
                if without is not None and _differs(view.module(x), without):
                    (untrained if ctx.training_state(params) == "untrained" else unknown).append(view.path)
    for view in ctx.inv.bottlenecks:
        if _changes_before_training(ctx, view.params()):
            x = view.probe_input(generator)
            without = _attempt(ctx, f"M2 at {view.path}", lambda: view.with_up_zeroed()(x))
            if without is not None and _differs(view.module(x), without, scale=x):
                (untrained if ctx.training_state(view.params()) == "untrained" else unknown).append(view.path)
    return [f for f in (_m2_finding(untrained, "error"), _m2_finding(unknown, "warning")) if f]


def _without_b(view: LoraView, pair: LoraPair, inv: Inventory) -> nn.Module:
    """A copy of the layer in which ``pair``'s B is zero: its output without that adapter."""
    clone = _copy_sharing_frozen(view.module, set(inv.methods))
    with torch.no_grad():
        for local in (pair.b_name, pair.b_bias_name):
            if local:
                clone.get_parameter(local).zero_()
    return clone


def _changes_before_training(ctx: _Context, params: list[nn.Parameter]) -> bool:
    """Whether an adapter could still be untrained: the optimizer has not stepped it, or
    there is no optimizer and it is trainable (a frozen adapter was loaded, so trained)."""
    state = ctx.training_state(params)
    return state == "untrained" or (state == "unknown" and any(p.requires_grad for p in params))


def _m2_finding(paths: list[str], severity: str) -> Finding | None:
    if not paths:
        return None
    when = ("no optimizer step has run yet" if severity == "error"
            else "if no training step has run yet (pass the optimizer to tell)")
    return Finding(
        "M2", severity, _names(paths),
        f"adapters already change their layer's output ({_many(len(paths), 'layer')}: {_names(paths, 2)}), "
        f"and {when}: the up-projection (LoRA's B, an adapter's up) is not zero, so the untrained model is not "
        "the pretrained one and training starts from noise.",
        "initialise the up-projection to zero and the down-projection randomly: for LoRA, "
        "nn.init.zeros_(B) and nn.init.kaiming_uniform_(A, a=math.sqrt(5)); for adapters, zero up.weight "
        "and up.bias (peftkit does this in attach).")


def check_m3(ctx: _Context) -> list[Finding]:
    """A LoRA layer whose output differs from W x + s · B A x (s = alpha / r) on a probe."""
    generator = torch.Generator().manual_seed(3)
    wrong, unverifiable = [], []
    for view in ctx.inv.lora:
        pairs = view.active_pairs()
        if not pairs or any(p.variant for p in pairs):
            continue
        if any(p.scaling is None for p in pairs):
            unverifiable.append(view.path)
            continue
        error = _attempt(ctx, f"M3 at {view.path}", lambda: _formula_error(view, pairs, ctx.inv, generator))
        if error is not None and error > _tolerance(view.module.get_parameter(pairs[0].a_name).dtype) * 10:
            wrong.append((view, error))
    findings = []
    if wrong:
        view, error = wrong[0]
        scaling = ", ".join(f"{p.scaling:g}" for p in view.active_pairs())
        findings.append(Finding(
            "M3", "error", _names(v.path for v, _ in wrong),
            f"LoRA layers do not compute W x + s·B A x with their own s = alpha/r ({_many(len(wrong), 'layer')}): "
            f"{view.path} ({view.source}, s = {scaling}) is off by {error:.0%} of the LoRA term on a probe "
            "with random A and B. Without the alpha/r factor the update's size changes with r, so the "
            "learning rate and alpha tuned for one rank are wrong for another.",
            "multiply the LoRA path by scaling = alpha / r (alpha / sqrt(r) for rsLoRA) inside the "
            "layer's forward: h = W x + (alpha / r) · B(A(x)); peftkit's layers do this."))
    if unverifiable:
        findings.append(Finding(
            "M3", "info", _names(unverifiable),
            f"hand-made LoRA layers that do not say their alpha or scaling ({_many(len(unverifiable), 'layer')}: "
            f"{_names(unverifiable, 2)}): the doctor cannot verify that their forward applies alpha/r.",
            "store the factor on the module (self.scaling = alpha / r, or self.alpha and self.r) so it can "
            "be checked, and apply it in forward."))
    return findings


def _formula_error(view: LoraView, pairs: list[LoraPair], inv: Inventory, generator: torch.Generator) -> float:
    """max |layer(x) - base(x) - Σ s·B A x| / max |Σ s·B A x| on a copy of the layer whose
    A and B are random (at init B = 0, which would hide any scaling)."""
    clone = _copy_sharing_frozen(view.module, set(inv.methods))
    with torch.no_grad():
        for pair in pairs:
            for local in (pair.a_name, pair.b_name):
                param = clone.get_parameter(local)
                param.copy_(torch.randn(param.shape, generator=generator) / param.shape[-1] ** 0.5)
    x = view.probe_input(generator)
    expected = sum(view.lora_term(clone, pair, x) for pair in pairs)
    actual = clone(x) - view.base_output(x)
    return float((actual.float() - expected.float()).abs().max() / expected.float().abs().max().clamp_min(1e-12))


# Names of attention projections when the architecture is not in peftkit's tables.
_ATTENTION_INPUT_NAMES = ("q_proj", "k_proj", "v_proj", "qkv_proj", "query", "key", "value", "query_key_value",
                          "Wqkv", "c_attn", "q_lin", "k_lin", "v_lin", "in_proj", "wq", "wk", "wv")
_ATTENTION_OUTPUT_NAMES = ("o_proj", "out_proj", "out_lin", "wo", "attention.output.dense", "attn.c_proj")


def _architecture_names(model: nn.Module, attribute: str, table: dict[str, list[str]]) -> list[str] | None:
    """Module names the model declares (``attribute``) or peftkit's table has for its type."""
    for module in model.modules():
        declared = getattr(module, attribute, None)
        names = list(declared) if declared else table.get(integrations.model_type(module) or "")
        if names:
            return names
    return None


def _attention_projections(model: nn.Module) -> tuple[list[str], list[str]]:
    """(input projection names, output projection names); in peftkit's tables the last
    attention entry is the output projection."""
    names = _architecture_names(model, "peft_attention_targets", targets.ATTENTION_TARGETS)
    if names:
        return names[:-1], names[-1:]
    return list(_ATTENTION_INPUT_NAMES), list(_ATTENTION_OUTPUT_NAMES)


def _matches(path: str, name: str) -> bool:
    """A target name selects a module whose path equals it or ends with ``.name`` (the rule
    of peftkit's targets and of Hugging Face PEFT)."""
    return path == name or path.endswith("." + name)


def check_m4(ctx: _Context) -> list[Finding]:
    """Config entries that match no module; LoRA only on output projections or on none."""
    findings = _targets_matching_nothing(ctx)
    paths = [v.path for v in ctx.inv.lora]
    if not paths:
        return findings
    inputs, outputs = _attention_projections(ctx.model)
    on_input = [p for p in paths if any(_matches(p, n) for n in inputs)]
    on_output = [p for p in paths if any(_matches(p, n) for n in outputs)]
    if on_input:
        return findings
    placement = "only on attention output projections" if len(on_output) == len(paths) else (
        "on no attention projection" if not on_output else "on attention output projections but no query/key/value")
    defaults = _architecture_names(ctx.model, "peft_default_targets", targets.DEFAULT_TARGETS) or ["q_proj", "v_proj"]
    findings.append(Finding(
        "M4", "warning", _names(paths),
        f"LoRA sits {placement} ({_names(sorted({p.rsplit('.', 1)[-1] for p in paths}))}). Hu et al. 2021 (sec. 7.1) "
        "found the query and value projections the most effective place for a fixed parameter budget; "
        "without them the adapter learns less per parameter.",
        f"target the attention projections: target_modules={defaults} (peftkit's default for this model), "
        "the 'attention' preset, or 'all-linear'."))
    return findings


def _targets_matching_nothing(ctx: _Context) -> list[Finding]:
    paths = [p for p, _ in ctx.model.named_modules()]
    findings = []
    for config in ctx.inv.configs:
        names = config.target_modules
        if not isinstance(names, (list, tuple, set, frozenset)):
            continue  # a regex, a preset or the default: resolved against the model when attached
        missing = sorted(n for n in names if not any(_matches(p, n) for p in paths))
        if missing:
            leaves = sorted({p.removesuffix(".base_layer").rsplit(".", 1)[-1] for p, m in ctx.model.named_modules()
                             if type(m) is nn.Linear and not ctx.inv.is_adapter(m.weight)})
            findings.append(Finding(
                "M4", "error", f"{config.source} adapter {config.name!r}: target_modules",
                f"target_modules entries {missing} match no module of this model, so they train nothing "
                "(names from another architecture, e.g. BERT's 'query' on a Llama, are the usual cause).",
                f"use names that exist here; Linear layers in this model are named {_names(leaves, 12)}."))
    return findings


def check_m5(ctx: _Context) -> list[Finding]:
    """Rank against layer size, by the rule ``targets.check_rank`` applies at attach."""
    found: dict[str, list[tuple[str, str]]] = {"error": [], "warning": []}
    for view in ctx.inv.lora:
        for pair in view.pairs:
            r = view.module.get_parameter(pair.a_name).shape[1 if pair.transposed else 0]
            target = targets.Target(view.path, view.kind, view.in_features, view.out_features)
            problem = _rank_problem(target, r)
            if problem:
                found[problem[0]].append((view.path, problem[1]))
    return [Finding("M5", severity, _names(p for p, _ in items),
                    items[0][1] + (f" ({len(items)} layers in all.)" if len(items) > 1 else ""),
                    "lower r (8 to 64 covers most uses), or leave the small layers out of target_modules.")
            for severity, items in found.items() if items]


def _rank_problem(target: targets.Target, r: int) -> tuple[str, str] | None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            targets.check_rank([target], r)
        except ValueError as e:
            return "error", str(e)
    return ("warning", str(caught[0].message)) if caught else None


def check_m6(ctx: _Context) -> list[Finding]:
    """Unmerged LoRA in a model set up for inference (info while training)."""
    unmerged = [v for v in ctx.inv.lora if v.active_pairs()]
    if not unmerged:
        return []
    inference = not ctx.training and ctx.optimizer is None
    state = "is in eval mode with no optimizer (set up for inference or export)" if inference else "is training"
    return [Finding(
        "M6", "warning" if inference else "info", _names(v.path for v in unmerged),
        f"LoRA layers are unmerged ({_many(len(unmerged), 'layer')}: {_names((v.path for v in unmerged), 2)}) "
        f"and the model {state}: each runs an extra "
        "B(A x) product per call, and an exported state dict holds LoRA keys a plain model cannot load.",
        "merge before inference or export: pm.merge_and_unload() (peftkit), model.merge_and_unload() "
        "(Hugging Face PEFT), or fold W += (alpha/r)·B A by hand; merged outputs equal unmerged ones.")]


def check_m7(ctx: _Context) -> list[Finding]:
    """A soft prompt that is not the first positions of the input embeddings, or that the
    first real token cannot see."""
    # Only where a prompt is known (a config, or trainable parameters that feed added input
    # positions): some models add positions of their own.
    if not ctx.inv.declares(*PROMPT_METHODS):
        return []
    probe = ctx.inv.sequence
    if probe is None or probe.seq is None:
        ctx.notes.append("M7 not probed: the input embeddings the model received could not be observed.")
        return []
    tokens, length = probe.ids.shape[1], probe.seq.shape[1]
    where = _names(ctx.inv.name(p) for p in ctx.inv.params_of(*PROMPT_METHODS)) or "the model's input embeddings"
    if length == tokens:
        return [_m7_finding(where, "the transformer received exactly the input tokens: the soft prompt never "
                                   "reaches the input embeddings (injected later or not at all)")]
    offset = _token_offset(probe)
    virtual = length - tokens
    if offset is None:
        problem = (f"the transformer received {length} positions for {tokens} tokens, but the token embeddings "
                   "are not among them unchanged: the prompt was mixed into them instead of prepended")
    elif offset != virtual:
        problem = (f"the tokens start at position {offset} of {length}: the {virtual} prompt positions come "
                   f"{'after' if offset == 0 else 'around'} the input instead of before it")
    elif _prompt_reaches_first_token(ctx, probe, virtual) is False:
        problem = ("the prompt is in front, but changing it leaves the first real token's output unchanged: "
                   "the attention mask hides the prompt positions")
    else:
        return []
    return [_m7_finding(where, problem)]


def _m7_finding(where: str, problem: str) -> Finding:
    return Finding(
        "M7", "error", where,
        f"soft prompt {where}: {problem}. Prompt tuning (Lester et al. 2021) learns N embeddings that every "
        "token must be able to attend to from the first layer on; anywhere else the prompt trains little or "
        "nothing.",
        "concatenate at the input embeddings, prompt first: inputs_embeds = cat([prompt, embed(ids)], dim=1), "
        "attention_mask = cat([ones(B, N), mask], dim=1), labels = cat([full((B, N), -100), labels], dim=1) "
        "(peftkit's prompt tuning does this in masks.py).")


def _token_offset(probe: SequenceProbe) -> int | None:
    """Where the token embeddings sit among the positions the transformer received."""
    seq, tokens = probe.seq, probe.tokens
    count = probe.ids.shape[1]
    if tokens is None or tokens.shape[1] != count:
        return None
    for offset in range(seq.shape[1] - count + 1):
        if not _differs(seq[:, offset:offset + count], tokens):
            return offset
    return None


def _prompt_reaches_first_token(ctx: _Context, probe: SequenceProbe, virtual: int) -> bool | None:
    """Whether replacing the prompt changes the output at the first real token; None when
    it cannot be tested (no known prompt parameter, or no per-position output)."""
    params = ctx.inv.params_of(*PROMPT_METHODS)
    output = probe.output
    if not params or output is None or output.dim() < 2:
        return None
    index = {probe.seq.shape[1]: virtual, probe.ids.shape[1]: 0}.get(output.shape[1])
    if index is None:
        return None
    generator = torch.Generator().manual_seed(7)
    replaced = {}
    for param in params:  # another prompt of the same scale, given to a functional call
        noise = torch.randn(param.shape, generator=generator).to(param)
        replaced[ctx.inv.name(param)] = param.detach() + noise * (param.detach().float().std() + 0.1)
    try:
        changed = torch.func.functional_call(ctx.model, replaced, (), _lm_inputs(ctx.inv), strict=False)
    except Exception as e:
        ctx.notes.append(f"M7: could not rerun the model with another prompt ({type(e).__name__}: {e}).")
        return None
    changed = _main_tensor(changed)
    return _differs(changed[:, index], output[:, index], scale=output)


def check_m8(ctx: _Context) -> list[Finding]:
    """A bottleneck adapter that is not the identity when its up-projection is zero."""
    generator = torch.Generator().manual_seed(8)
    broken = []
    for view in ctx.inv.bottlenecks:
        x = view.probe_input(generator)
        if _attempt(ctx, f"M8 at {view.path}", lambda: _differs(view.with_up_zeroed()(x), x)):
            broken.append(view.path)
    if not broken:
        return []
    return [Finding(
        "M8", "error", _names(broken),
        f"bottleneck adapters are not the identity when their up-projection is zero "
        f"({_many(len(broken), 'adapter')}: {_names(broken, 2)}): they return up(act(down(h))) without adding "
        "h back, so the hidden state is replaced rather than adjusted and the untrained model loses the "
        "block the adapter follows.",
        "return h + up(act(down(h))) (Houlsby et al. 2019); peftkit's AdapterConfig does. (An adapter run "
        "in parallel to a block, whose output is added beside it, belongs in placement='parallel'.)")]


def check_m9(ctx: _Context) -> list[Finding]:
    """Optimizer groups that train adapter parameters below the method's learning-rate floor."""
    if ctx.optimizer is None:
        return []
    findings = []
    for index, group in enumerate(ctx.optimizer.param_groups):
        lr = group.get("initial_lr", group.get("lr"))  # a scheduler's warm-up starts low on purpose
        if not _number(lr):
            continue
        low: dict[str, list[str]] = {}
        for param in group["params"]:
            method = ctx.inv.methods.get(id(param))
            if method in LEARNING_RATE_FLOORS and lr < LEARNING_RATE_FLOORS[method]:
                low.setdefault(method, []).append(ctx.inv.name(param))
        for method, names in low.items():
            floor = LEARNING_RATE_FLOORS[method]
            findings.append(Finding(
                "M9", "warning", f"optimizer group {index}: {_names(names)}",
                f"optimizer group {index} trains {METHOD_NAMES.get(method, method)} parameters "
                f"({_many(len(names), 'tensor')}, e.g. {names[0]}) at lr {lr:g}, below {floor:g}, the lowest rate "
                "this method is known to train well with: adapters start at or near zero and need larger steps "
                "than full fine-tuning (whose 1e-5 to 5e-5 is the usual slip).",
                f"raise the learning rate for these parameters to at least {floor:g} "
                "(LoRA ~2e-4, prompt tuning ~1e-2 or more, prefix ~1e-3 to 1e-2, adapters ~1e-4 to 1e-3)."))
    return findings


def check_m10(ctx: _Context) -> list[Finding]:
    """A checkpoint file that holds base-model weights, not just the adapter."""
    if ctx.checkpoint is None:
        return []
    entries = _read_checkpoint(ctx.checkpoint)
    classes = _classify_keys(ctx.model, ctx.inv, entries)
    sizes = {kind: sum(entries[k][1] for k in keys) for kind, keys in classes.items()}
    adapter_only = _nbytes(ctx.inv.params_of(*set(ctx.inv.methods.values())))
    file_size = ctx.checkpoint.stat().st_size
    base = classes["base"]
    if base:
        ratio = f", {file_size / adapter_only:.0f}x the adapter-only size ({_bytes(adapter_only)})" \
            if adapter_only else ""
        return [Finding(
            "M10", "error", f"{ctx.checkpoint}: {_names(base, 3)}",
            f"{ctx.checkpoint.name} holds {_many(len(base), 'base-model tensor')} ({_bytes(sizes['base'])}) besides "
            f"{_many(len(classes['adapter']), 'adapter tensor')} ({_bytes(sizes['adapter'])}); the file is "
            f"{_bytes(file_size)}{ratio}. The base weights are already on every user's disk: each saved run "
            "copies the whole model again.",
            "save the adapter only: pm.save(folder) (peftkit) or model.save_pretrained(folder) on the PEFT model; "
            "by hand, save {n: p for n, p in model.named_parameters() if p.requires_grad}.")]
    unknown = classes["unknown"]
    if unknown and adapter_only and sizes["unknown"] > 10 * adapter_only:
        return [Finding(
            "M10", "warning", f"{ctx.checkpoint}: {_names(unknown, 3)}",
            f"{ctx.checkpoint.name} holds tensors that match no parameter of this model "
            f"({_many(len(unknown), 'tensor')}, {_bytes(sizes['unknown'])}): more than 10x its adapter "
            f"({_bytes(adapter_only)}). Is it a whole model?",
            "save the adapter only (pm.save(folder) / save_pretrained on the PEFT model).")]
    adapter = _many(len(classes["adapter"]), "adapter tensor")
    ctx.notes.append(f"M10: {ctx.checkpoint.name} is {_bytes(file_size)}: {adapter}, {len(unknown)} unmatched, "
                     "no base weights.")
    return []


def _read_checkpoint(path: str | Path) -> dict[str, tuple[tuple[int, ...], int]]:
    """Key -> (shape, bytes) of a checkpoint, without unpickling anything: safetensors
    headers are read without the data; .bin/.pt/.pth go through torch.load(weights_only=True)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: _entry(f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in f.keys()}
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path} is not a readable safetensors file ({e}).") from e
    if path.suffix in (".bin", ".pt", ".pth"):
        return {k: (tuple(t.shape), t.numel() * t.element_size()) for k, t in _flatten(_torch_load(path)).items()}
    raise ValueError(f"{path}: unknown checkpoint type {path.suffix!r}; the doctor reads .safetensors, "
                     ".bin, .pt and .pth.")


# Bytes per element by safetensors dtype name; the rest (8-bit floats, ints, bool) take one.
_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2}


def _entry(shape: list[int], dtype: str) -> tuple[tuple[int, ...], int]:
    numel = 1
    for size in shape:
        numel *= size
    return tuple(shape), numel * _DTYPE_BYTES.get(dtype, 1)


def _torch_load(path: Path) -> Any:
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as e:
        raise ValueError(f"{path} was refused: it is corrupt or holds objects other than tensors, and the doctor "
                         f"never unpickles arbitrary objects ({type(e).__name__}: {e}).") from e


def _flatten(obj: Any, prefix: str = "") -> dict[str, Tensor]:
    if isinstance(obj, Tensor):
        return {prefix.rstrip("."): obj}
    if isinstance(obj, Mapping):
        return {k: t for key, value in obj.items() for k, t in _flatten(value, f"{prefix}{key}.").items()}
    return {}


# Wrapper levels that differ between the places a key can be written from.
_WRAPPER_SEGMENTS = {"base_model", "model", "module", "base_layer", "_orig_mod", "state_dict", "model_state_dict"}


def _canonical(key: str, drop: set[str]) -> str:
    return ".".join(s for s in key.split(".") if s not in drop)


def _classify_keys(model: nn.Module, inv: Inventory, entries: dict) -> dict[str, list[str]]:
    """Split checkpoint keys into "adapter", "base" (a base-model tensor of the same shape)
    and "unknown", matching names across wrapper levels (base_model.model., module., adapter
    names) and by dotted suffix."""
    drop = _WRAPPER_SEGMENTS | inv.adapter_names
    index: dict[str, tuple[str, tuple[int, ...] | None]] = {}
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, tensor in named:
        kind = "adapter" if isinstance(tensor, nn.Parameter) and inv.is_adapter(tensor) else "base"
        parts = _canonical(name, drop).split(".")
        for start in range(len(parts) - 1):  # every dotted suffix of two or more parts
            index.setdefault(".".join(parts[start:]), (kind, tuple(tensor.shape)))
    for key in inv.file_keys:
        index[_canonical(key, drop)] = ("adapter", None)
    classes: dict[str, list[str]] = {"adapter": [], "base": [], "unknown": []}
    for key, (shape, _) in entries.items():
        parts = _canonical(key, drop).split(".")
        hit = next((index[".".join(parts[i:])] for i in range(len(parts)) if ".".join(parts[i:]) in index), None)
        kind = "unknown" if hit is None or (hit[1] is not None and hit[1] != shape) else hit[0]
        classes[kind].append(key)
    return classes


def _nbytes(tensors: list[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def check_m11(ctx: _Context) -> list[Finding]:
    """A prefix-tuned model whose rows inside a left-padded batch differ from the rows alone."""
    probe = ctx.inv.sequence
    if not (ctx.inv.declares(PREFIX) or (probe is not None and probe.cache_length > 0)):
        return []
    if ctx.inv.embedding is None or probe is None:
        ctx.notes.append("M11 not probed: the prefix-tuned model could not be run on input_ids.")
        return []
    try:
        gap, scale = _padding_gap(ctx)
    except Exception as e:
        ctx.notes.append(f"M11 not probed: the padded batch could not be run ({type(e).__name__}: {e}).")
        return []
    if gap <= _tolerance(torch.float32) * 10 * scale:
        return []
    where = _names(ctx.inv.name(p) for p in ctx.inv.params_of(PREFIX)) or "the key/value prefix handed to the model"
    return [Finding(
        "M11", "error", where,
        f"with the prefix ({where}), a row inside a left-padded batch gives other outputs than the same row alone "
        f"(max |difference| {gap:.3g} on real tokens, outputs up to {scale:.3g}): the attention mask was not "
        "extended for the prefix, or was extended at the wrong end, so the model masks prefix positions or "
        "attends to padding.",
        "put N ones for the prefix in front of the mask: attention_mask = cat([ones(B, N), mask], dim=1), "
        "keep padding at 0 and take positions from the real tokens (peftkit's masks.py does this).")]


def _padding_gap(ctx: _Context) -> tuple[float, float]:
    """(max |padded - alone| on real tokens, max |output|) for a left-padded batch."""
    inputs = _lm_inputs(ctx.inv)
    ids, mask = inputs["input_ids"].clone(), inputs["attention_mask"].clone()
    mask[0, :_PADDING] = 0
    ids[0, :_PADDING] = 0
    call = _lm_caller(ctx.model)
    batch = call(ids, mask)
    gap, scale = 0.0, float(batch.float().abs().max())
    for row in range(ids.shape[0]):
        real = ids[row][mask[row].bool()][None]
        alone = call(real, torch.ones_like(real))
        n = real.shape[1]
        gap = max(gap, float((batch[row, -n:].float() - alone[0, -n:].float()).abs().max()))
    return gap, scale


def _lm_caller(model: nn.Module) -> Callable[[Tensor, Tensor], Tensor]:
    """Call the model with ids and mask, and positions counted over real tokens when it
    takes them (otherwise a left-padded row sits at other positions than alone, which is
    the model's rule, not the prefix's)."""
    use_positions = [True]

    def call(ids: Tensor, mask: Tensor) -> Tensor:
        kwargs = {"input_ids": ids, "attention_mask": mask}
        if use_positions[0]:
            try:
                return _main_tensor(model(**kwargs, position_ids=(mask.long().cumsum(-1) - 1).clamp(min=0)))
            except TypeError:
                use_positions[0] = False
        return _main_tensor(model(**kwargs))

    return call


def check_m12(ctx: _Context) -> list[Finding]:
    """After one backward: gradients no optimizer uses, stale gradients on frozen
    parameters, adapter parameters without a gradient. Every .grad is restored."""
    params = list(ctx.model.parameters())
    if not any(p.requires_grad for p in params):
        ctx.notes.append("M12 not probed: no parameter requires grad (an inference setup).")
        return []
    batch = ctx.batch if ctx.batch is not None else _synthetic_batch(ctx)
    if batch is None:
        ctx.notes.append("M12 not probed: pass batch=... (the model does not take token ids).")
        return []
    saved = [p.grad for p in params]
    findings = _stale_gradients(ctx, params, saved)
    try:
        for param in params:
            param.grad = None
        with _training_mode(ctx.model), torch.enable_grad():
            _scalar_loss(_call(ctx.model, batch)).backward()
        received = [p for p in params if p.grad is not None]
    except Exception as e:
        ctx.notes.append(f"M12 not probed: forward + backward on the batch failed ({type(e).__name__}: {e}).")
        return findings
    finally:
        for param, grad in zip(params, saved):
            param.grad = grad
    return findings + _gradient_findings(ctx, params, received)


def _synthetic_batch(ctx: _Context) -> Any:
    if ctx.inv.embedding is not None:
        return _lm_inputs(ctx.inv)
    first = next((m for m in ctx.model.modules() if type(m) is nn.Linear), None)
    if first is None:
        return None
    return torch.randn(_ROWS, first.in_features, generator=torch.Generator().manual_seed(12)).to(first.weight)


def _stale_gradients(ctx: _Context, params: list[nn.Parameter], saved: list[Tensor | None]) -> list[Finding]:
    stale = [p for p, g in zip(params, saved) if g is not None and not p.requires_grad]
    if not stale:
        return []
    return [Finding(
        "M12", "warning", _names(ctx.inv.name(p) for p in stale),
        f"frozen parameters still hold a .grad ({_many(len(stale), 'parameter')}, {_bytes(_nbytes(stale))}), "
        "left from before they were frozen: memory as large as those weights, and an optimizer that holds "
        "them would apply it.",
        "set their .grad to None (optimizer.zero_grad(set_to_none=True), or p.grad = None for each).")]


def _gradient_findings(ctx: _Context, params: list[nn.Parameter], received: list[nn.Parameter]) -> list[Finding]:
    inv, findings = ctx.inv, []
    held = ctx.optimizer_params()
    got = {id(p) for p in received}
    if ctx.optimizer is not None:
        unused = [p for p in received if id(p) not in held]
        whom = "no optimizer group holds them"
    else:
        unused = [p for p in received if not inv.is_adapter(p)] if inv.methods else []
        whom = "they are not adapter parameters"
    if unused:
        findings.append(Finding(
            "M12", "error", _names(inv.name(p) for p in unused),
            f"parameters received gradients in one backward but {whom} ({_many(len(unused), 'parameter')}, "
            f"{_bytes(_nbytes(unused))} of gradients, e.g. {inv.name(unused[0])}): "
            "backward computes and stores weight-sized gradients that no step uses.",
            "freeze them with requires_grad_(False) (leaving them out of the optimizer is not enough), or add "
            "them to the optimizer if they are meant to train."))
    missing = [p for p in params if p.requires_grad and inv.is_adapter(p) and id(p) not in got]
    if missing:
        findings.append(Finding(
            "M12", "error", _names(inv.name(p) for p in missing),
            f"trainable adapter parameters got no gradient from a backward on the batch "
            f"({_many(len(missing), 'parameter')}, e.g. {inv.name(missing[0])}): they never train. The usual "
            "causes are gradient checkpointing with use_reentrant=True on inputs that do not require grad, "
            "a detach() or no_grad() in the forward, "
            "or an adapter that is not active.",
            "with gradient checkpointing, use use_reentrant=False or call model.enable_input_require_grads(); "
            "remove detach()/no_grad() from the adapter path; make sure the adapter is active."))
    return findings


CHECKS: tuple[Callable[[_Context], list[Finding]], ...] = (
    check_m1, check_m2, check_m3, check_m4, check_m5, check_m6,
    check_m7, check_m8, check_m9, check_m10, check_m11, check_m12,
)


def doctor(model: nn.Module, optimizer: torch.optim.Optimizer | None = None, batch: Any = None,
           checkpoint: str | Path | None = None) -> DoctorReport:
    """Check ``model`` for the twelve classic PEFT mistakes and return a report.

    Args:
        model: any nn.Module: a peftkit ``PeftModel``, a Hugging Face PEFT model, or a
            plain model with hand-written adapters.
        optimizer: the optimizer that will train it; enables the checks on its groups
            (M1, M9, M12) and tells whether a step has run (M2).
        batch: one training batch: a dict of keyword arguments (with ``labels`` to get the
            model's own loss), a tuple of positional ones, or a tensor; used for the
            backward of M12. Without it, random token ids are used.
        checkpoint: a saved file (.safetensors, or .bin/.pt/.pth read with weights_only)
            to check for base-model weights (M10).

    Nothing given is changed: see the module docstring.

    Raises:
        FileNotFoundError: ``checkpoint`` does not exist.
        ValueError: ``checkpoint`` cannot be read without unpickling, or is no checkpoint.
    """
    checkpoint = None if checkpoint is None else Path(checkpoint)
    if checkpoint is not None and not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist.")
    notes: list[str] = []
    training = model.training
    with _untouched(model), torch.no_grad():
        inv = _find_adapters(model)
        inv.sequence = _probe_sequence(model, inv, notes)
        ctx = _Context(model, optimizer, batch, checkpoint, inv, notes, training)
        findings = [f for check in CHECKS for f in check(ctx)]
    findings.sort(key=lambda f: (int(f.id[1:]), SEVERITIES.index(f.severity)))
    return DoctorReport(findings, notes)
