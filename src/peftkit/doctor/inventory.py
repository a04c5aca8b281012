"""Finding the adapters in a model, by structure, never by a name substring alone:

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
  (b < h) that maps (..., h) to (..., h).

Soft prompts and prefixes are found by a probe forward instead (``probe.probe_sequence``).
"""

from __future__ import annotations

import itertools
import math
import sys
from typing import Any

import torch
from torch import Tensor, nn

from .. import adapter_files
from ..methods.base import adapter_modules
from ..methods.lora import LoraEmbedding, LoraLayer
from ..model import PeftModel
from .kinds import BOTTLENECK, LORA
from .views import BottleneckView, ConfigView, Inventory, LoraPair, LoraView


def find_adapters(model: nn.Module) -> Inventory:
    """Every adapter in ``model``, found by structure (see the module docstring).

    Runs small probes (bottleneck input/output shapes), so call it inside ``probe.untouched``.
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


def is_number(value: Any) -> bool:
    """An int or a float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# peftkit ------------------------------------------------------------------------------
def _find_peftkit(model: nn.Module, inv: Inventory) -> None:
    methods: dict[str, str] = {}
    for module in model.modules():
        if isinstance(module, PeftModel):
            for name, config in module.configs.items():
                methods[name] = config.peft_type
                targets_ = getattr(config, "target_modules", None)
                inv.configs.append(ConfigView("peftkit", name, config.peft_type, targets_))
                inv.file_keys.update(adapter_files.adapter_tensors(module, name))
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


def _alpha_scaling(layer: nn.Module, name: str) -> float | None:
    """alpha / r (alpha / sqrt(r) with rsLoRA) from what PEFT's layer stores for ``name``;
    None where it does not store all three (PEFT releases before ``use_rslora`` was kept
    per layer)."""
    alpha, r = getattr(layer, "lora_alpha", {}).get(name), getattr(layer, "r", {}).get(name)
    rslora = getattr(layer, "use_rslora", {}).get(name)
    if rslora is None or not (is_number(alpha) and is_number(r) and r > 0):
        return None
    return alpha / (math.sqrt(r) if rslora else r)


def _peft_lora_view(path: str, layer: nn.Module) -> LoraView | None:
    active = set() if layer.disable_adapters else set(layer.active_adapters)
    use_dora = getattr(layer, "use_dora", {})

    def pair(n: str, a_name: str, b_name: str, b_bias_name: str | None) -> LoraPair:
        return LoraPair(n, a_name, b_name, b_bias_name, False, layer.scaling[n], n in active,
                        "DoRA" if use_dora.get(n) else None, _alpha_scaling(layer, n))

    pairs, kind = [], "linear"
    for n in layer.lora_A:
        a, b = layer.lora_A[n], layer.lora_B[n]
        if type(a) is nn.Linear and type(b) is nn.Linear:  # conv LoRA has another formula
            pairs.append(pair(n, f"lora_A.{n}.weight", f"lora_B.{n}.weight",
                              f"lora_B.{n}.bias" if b.bias is not None else None))
    if not pairs:
        kind = "embedding"
        pairs = [pair(n, f"lora_embedding_A.{n}", f"lora_embedding_B.{n}", None) for n in layer.lora_embedding_A]
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


def _declared_scaling(module: nn.Module, r: int) -> float | None:
    """The s a hand-made layer means to use: its ``scaling``, else alpha / r from its
    ``alpha``/``lora_alpha`` and ``r``/``rank`` (r from A's shape when not stored)."""
    scaling = getattr(module, "scaling", None)
    if is_number(scaling):
        return float(scaling)
    alpha = next((getattr(module, k) for k in ("alpha", "lora_alpha") if is_number(getattr(module, k, None))), None)
    if alpha is None:
        return None
    rank = next((getattr(module, k) for k in ("r", "rank") if is_number(getattr(module, k, None))), r)
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


# the input embedding ----------------------------------------------------------------------
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


def embedding_weight(embedding: nn.Module) -> Tensor:
    """The (vocab, d) table of an input embedding, a LoRA-wrapped one too."""
    weight = getattr(embedding, "weight", None)
    return weight if isinstance(weight, Tensor) else embedding.base_layer.weight
