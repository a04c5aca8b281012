"""Which modules get a LoRA adapter (mistakes M4 and M5). Bottleneck adapter sites and the
modules trained in full are in ``sites.py``.

Targets are data: per-architecture tables of module-name suffixes, two presets, the
matching rules, and a {module type: LoRA wrapper} table (``lora_layer_types``): an
``nn.Linear``, a transformers ``Conv1D`` or an ``nn.Embedding`` (embeddings only when
named explicitly).

Matching rules for ``target_modules``:
- a list of names: each entry matches a module whose dotted path equals it or ends with
  ``"." + entry`` (``"q_proj"`` and ``"self_attn.q_proj"`` both match
  ``model.layers.0.self_attn.q_proj``); an entry that matches nothing is an error (M4);
- a string: ``"attention"`` / ``"all-linear"`` presets, otherwise a regular expression
  that must match a module's full dotted path (as in Hugging Face PEFT);
- None: the architecture's default (q and v projections, as in the LoRA paper).
"""

from __future__ import annotations

import functools
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from . import integrations
from .config import TargetSpec
from .methods.base import AdapterModule
from .methods.lora import LoraEmbedding, LoraLayer, LoraLinear
from .nf4 import Nf4Linear

# LoRA paper (Hu et al. 2021, sec. 7.1): adapting W_q and W_v gives the best result for a
# fixed parameter budget; PEFT's per-architecture defaults follow the same choice.
DEFAULT_TARGETS: dict[str, list[str]] = {
    **{t: ["q_proj", "v_proj"] for t in (
        "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "gemma", "gemma2",
        "gemma3_text", "olmo", "olmo2", "phi", "opt", "granite")},
    "gpt2": ["c_attn"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
}

ATTENTION_TARGETS: dict[str, list[str]] = {
    **{t: ["q_proj", "k_proj", "v_proj", "o_proj"] for t in (
        "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "gemma", "gemma2",
        "gemma3_text", "olmo", "olmo2", "granite")},
    "gpt2": ["attn.c_attn", "attn.c_proj"],
    "bert": ["query", "key", "value", "attention.output.dense"],
    "roberta": ["query", "key", "value", "attention.output.dense"],
    "xlm-roberta": ["query", "key", "value", "attention.output.dense"],
    "distilbert": ["q_lin", "k_lin", "v_lin", "out_lin"],
}

PRESETS = ("attention", "all-linear")

# Names of classification / language-model heads, excluded from "all-linear" like the
# output embedding: they map to labels or the vocabulary and are trained in full if at all.
HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs", "cls")


@dataclass(frozen=True)
class LayerType:
    """What LoRA does with one module type: its kind (for messages), the wrapper that puts
    LoRA around it, and its (in, out) sizes from its weight."""

    kind: str
    wrap: Callable[[nn.Module], LoraLayer]
    sizes: Callable[[torch.Tensor], tuple[int, int]]


_LINEAR = LayerType("linear", LoraLinear, lambda w: (w.shape[1], w.shape[0]))
_EMBEDDING = LayerType("embedding", LoraEmbedding, lambda w: (w.shape[0], w.shape[1]))
_CONV1D = LayerType("conv1d", functools.partial(LoraLinear, fan_in_fan_out=True), lambda w: (w.shape[0], w.shape[1]))


def lora_layer_types() -> dict[type, LayerType]:
    """Module type -> LayerType, for exactly these types (a subclass may compute anything).
    transformers' GPT-2 ``Conv1D`` stores its weight (in, out), so its wrapper is told so;
    it is looked up each time, as it exists only once transformers is loaded. A 4-bit base
    layer (``nf4.Nf4Linear``, weight (out, in) once dequantized) is a linear one."""
    conv1d = integrations.conv1d_type()
    return {nn.Linear: _LINEAR, Nf4Linear: _LINEAR, nn.Embedding: _EMBEDDING,
            **({conv1d: _CONV1D} if conv1d is not None else {})}


@dataclass(frozen=True)
class Target:
    """One module chosen for LoRA: its path, kind and (in, out) sizes, and its wrapper."""

    path: str
    kind: str  # "linear", "conv1d" or "embedding"
    in_features: int
    out_features: int
    wrap: Callable[[nn.Module], LoraLayer] = field(compare=False, repr=False, default=LoraLinear)


def describe(module: nn.Module, path: str = "") -> Target | None:
    """The LoRA-relevant facts of a module, or None when LoRA cannot wrap it."""
    if isinstance(module, AdapterModule):
        if not isinstance(module, LoraLayer):
            return None  # another method's wrapper: LoRA inside it would nest two wrappers
        module = module.base_layer
    layer_type = lora_layer_types().get(type(module))
    if layer_type is None:
        return None
    # A 4-bit layer gives its shape without dequantizing (its weight property would).
    weight = (torch.empty(module.out_features, module.in_features, device="meta") if layer_type.kind == "linear"
              and getattr(module, "quantized", False) else module.weight)
    in_features, out_features = layer_type.sizes(weight)
    return Target(path, layer_type.kind, in_features, out_features, layer_type.wrap)


def modules_outside_adapters(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(path, module) for every module of ``model`` but the root, not descending into
    adapter modules: their insides are peftkit's, not the user's, and an adapter module
    stands for the module it wraps."""
    inside: list[str] = []
    for path, module in model.named_modules():
        if not path or any(path.startswith(p + ".") for p in inside):
            continue
        if isinstance(module, AdapterModule):
            inside.append(path)
        yield path, module


def wrappable_modules(model: nn.Module) -> dict[str, Target]:
    """Path -> Target for every module LoRA could wrap (skipping modules inside adapters)."""
    return {path: target for path, module in modules_outside_adapters(model)
            if (target := describe(module, path)) is not None}


def _matches(path: str, name: str) -> bool:
    return path == name or path.endswith("." + name)


def _head_paths(model: nn.Module, candidates: dict[str, Target]) -> set[str]:
    head = integrations.output_head(model)
    heads = {p for p, m in model.named_modules() if head is not None and m is head}
    heads |= {p for p in candidates if p.rsplit(".", 1)[-1] in HEAD_NAMES}
    return heads


def _architecture_names(model: nn.Module, table: dict[str, list[str]], attribute: str) -> list[str] | None:
    declared = getattr(model, attribute, None)
    if declared:
        return list(declared)
    return table.get(integrations.model_type(model) or "")


def _candidate_hint(candidates: dict[str, Target]) -> str:
    leaves = sorted({p.rsplit(".", 1)[-1] for p, t in candidates.items() if t.kind != "embedding"})
    return f"module names that LoRA can target in this model: {leaves}"


def find_targets(model: nn.Module, spec: TargetSpec, trained_in_full: Sequence[str] = ()) -> list[Target]:
    """Resolve ``spec`` against ``model``; raise ValueError naming anything that matches nothing.

    Layers inside ``trained_in_full`` (the adapter's ``modules_to_save``) are never chosen:
    they train in full already, so LoRA beside them would only add a second update path.
    """
    wrappable = wrappable_modules(model)
    candidates = {p: t for p, t in wrappable.items()
                  if not any(p == q or p.startswith(q + ".") for q in trained_in_full)}
    linear_like = {p: t for p, t in candidates.items() if t.kind != "embedding"}
    arch = integrations.model_type(model) or type(model).__name__

    if spec is None:
        names = _architecture_names(model, DEFAULT_TARGETS, "peft_default_targets")
        if names is None:
            raise ValueError(
                f"peftkit has no default LoRA targets for architecture {arch!r}; pass "
                f"target_modules=[...] or a preset {PRESETS}. {_candidate_hint(candidates)}"
            )
        spec = names
    elif spec == "all-linear":
        heads = _head_paths(model, linear_like)
        chosen = [t for p, t in linear_like.items() if p not in heads]
        if not chosen:
            raise ValueError(f"'all-linear' found no Linear/Conv1D layer in {arch!r}.")
        return chosen
    elif spec == "attention":
        names = _architecture_names(model, ATTENTION_TARGETS, "peft_attention_targets")
        if names is None:
            raise ValueError(
                f"peftkit does not know the attention projections of {arch!r}; pass their "
                f"names in target_modules. {_candidate_hint(candidates)}"
            )
        spec = names

    if isinstance(spec, str):
        chosen = [t for p, t in candidates.items() if re.fullmatch(spec, p)]
        if not chosen:
            raise ValueError(
                f"target_modules regex {spec!r} matches no module path (it must match the whole "
                f"dotted path, e.g. 'model\\.layers\\.\\d+\\.self_attn\\.q_proj'; pass a list for "
                f"plain names). {_candidate_hint(candidates)}"
            )
        return chosen

    chosen_paths: set[str] = set()
    for name in spec:
        hits = [t for p, t in candidates.items() if _matches(p, name)]
        if not hits and any(_matches(p, name) for p in wrappable):
            raise ValueError(
                f"target_modules entry {name!r} names layers inside modules_to_save {list(trained_in_full)}, "
                "which train in full; a module is either adapted or trained in full. Drop it from "
                "target_modules, or pass modules_to_save without it."
            )
        if not hits:
            unwrappable = [type(m).__name__ for p, m in model.named_modules() if _matches(p, name)]
            why = (f"it names modules of type {sorted(set(unwrappable))}, which LoRA cannot wrap"
                   if unwrappable else "it matches no module")
            raise ValueError(
                f"target_modules entry {name!r}: {why} (mistake M4: LoRA on the wrong or "
                f"non-existent layers). {_candidate_hint(candidates)}"
            )
        chosen_paths.update(t.path for t in hits)
    return [t for p, t in candidates.items() if p in chosen_paths]  # in model order


def check_rank(targets: list[Target], r: int, *, share_warning: float = 0.5) -> None:
    """Mistake M5: a rank at or above min(in, out) is no longer low-rank, so it is an error;
    LoRA parameters above ``share_warning`` of a layer's own parameters earn a warning."""
    for t in targets:
        limit = min(t.in_features, t.out_features)
        if r >= limit:
            raise ValueError(
                f"LoRA rank r={r} is too high for {t.path!r} ({t.kind}, in={t.in_features}, "
                f"out={t.out_features}): r must be below min(in, out) = {limit} (mistake M5). "
                f"Use r <= {max(1, limit // 4)} or leave this layer out."
            )
    heavy = [t for t in targets if r * (t.in_features + t.out_features) > share_warning * t.in_features * t.out_features]
    if heavy:
        names = ", ".join(t.path for t in heavy[:3]) + (" ..." if len(heavy) > 3 else "")
        warnings.warn(
            f"LoRA rank r={r} gives {len(heavy)} layer(s) ({names}) more adapter parameters than "
            f"{share_warning:.0%} of the layer itself (mistake M5); a smaller r trains as well "
            "and keeps the adapter small.",
            UserWarning,
            stacklevel=3,
        )


def minimal_names(model: nn.Module, paths: list[str]) -> list[str]:
    """The shortest dotted suffixes that select exactly ``paths`` among wrappable modules.

    Written to adapter files so that another loader (Hugging Face PEFT, which matches by
    suffix) picks the very same modules: ``c_proj`` alone would also catch GPT-2's MLP.
    """
    candidates = list(wrappable_modules(model))
    chosen = set(paths)
    names: set[str] = set()
    for path in paths:
        parts = path.split(".")
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            if all(p in chosen for p in candidates if _matches(p, suffix)):
                names.add(suffix)
                break
    return sorted(names)


# -- the same rules, for checking a model set up elsewhere (the doctor) -----------------------
def matches_target(path: str, name: str) -> bool:
    """Whether the ``target_modules`` entry ``name`` selects the module at ``path``: the
    path equals it or ends with ``"." + name`` (the rule above, and Hugging Face PEFT's)."""
    return _matches(path, name)


def architecture_targets(model: nn.Module, table: dict[str, list[str]], attribute: str) -> list[str] | None:
    """The target names of the first module in ``model`` (itself, or a model it wraps, as a
    PEFT or peftkit wrapper does) that declares ``attribute`` or whose architecture
    ``table`` lists."""
    for module in model.modules():
        names = _architecture_names(module, table, attribute)
        if names:
            return names
    return None
