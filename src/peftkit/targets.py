"""Which modules get a LoRA adapter (mistakes M4 and M5), and where bottleneck adapters go
(``adapter_sites``, at the end of this file).

Targets are data: per-architecture tables of module-name suffixes, two presets, and the
matching rules. A module can be targeted when it is an ``nn.Linear``, a transformers
``Conv1D`` or an ``nn.Embedding`` (embeddings only when named explicitly).

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
from .config import AdapterConfig, TargetSpec
from .methods.adapter import AdapterWrapper
from .methods.base import AdapterModule
from .methods.lora import LoraEmbedding, LoraLayer, LoraLinear

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
    it is looked up each time, as it exists only once transformers is loaded."""
    conv1d = integrations.conv1d_type()
    return {nn.Linear: _LINEAR, nn.Embedding: _EMBEDDING, **({conv1d: _CONV1D} if conv1d is not None else {})}


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
    in_features, out_features = layer_type.sizes(module.weight)
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


# The heads Hugging Face PEFT trains in full for every sequence-classification model.
CLASSIFIER_HEADS = ("classifier", "score")
# The layer between the encoder and those heads that nothing but the head reads (BERT's
# and ALBERT's pooler, DistilBERT's pre_classifier). RoBERTa's and ELECTRA's heads hold
# that dense layer inside "classifier"; for BERT-style models it is trained with the head
# too, because a fresh classifier learns little through a frozen layer that pretraining
# left near its init (all-MiniLM-L6-v2's pooler weights have std 0.009, and a MiniLM
# classifier behind it stays at the majority class in bench/quality.py).
CLASSIFIER_INPUTS = ("pooler", "pre_classifier")


def trained_copy_paths(model: nn.Module, names: list[str] | None) -> list[str]:
    """Paths of the modules to train in full (``modules_to_save``), in model order.

    None picks the classification head of a sequence-classification model (``classifier``
    or ``score``, with the ``pooler`` or ``pre_classifier`` layer that feeds it where the
    model has one), and nothing for any other model. A listed name matches a module by its
    path or a dotted suffix of it; one that matches nothing is an error, except a
    classifier-head name when the other one is found (PEFT lists both by default).
    """
    if names is None:
        if not integrations.is_sequence_classifier(model):
            return []
        names = [*CLASSIFIER_INPUTS, *CLASSIFIER_HEADS]
        lenient = set(names)
    else:
        lenient = set(CLASSIFIER_HEADS) if set(CLASSIFIER_HEADS) <= set(names) else set()
    modules = [path for path, _ in modules_outside_adapters(model)]
    chosen: list[str] = []
    for name in names:
        hits = [p for p in modules if _matches(p, name)]
        if not hits and name not in lenient:
            heads = sorted(p for p in modules if p.rsplit(".", 1)[-1] in HEAD_NAMES)
            raise ValueError(
                f"modules_to_save entry {name!r} matches no module of {type(model).__name__} "
                f"(mistake M4). Its head modules are {heads or 'none'}; pass their names, or [] to "
                "train no module in full."
            )
        chosen.extend(p for p in hits if p not in chosen)
    if names and not chosen:
        raise ValueError(f"modules_to_save={names} matches no module of {type(model).__name__}.")
    nested = [p for p in chosen if any(p.startswith(q + ".") for q in chosen)]
    if nested:
        raise ValueError(f"modules_to_save names {nested}, which sit inside other listed modules; list "
                         "the outer module only.")
    order = list(modules)
    return sorted(chosen, key=order.index)


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


# -- bottleneck adapter sites ---------------------------------------------------------
# Where bottleneck adapters go, per architecture, as regular expressions matched against
# the end of a module path at a dot boundary:
#   attention_output  the attention output projection (houlsby's first site);
#   ffn_output        the serial site after the feed-forward (houlsby, pfeiffer);
#   ffn               a feed-forward block f(x) that returns the FFN output: a parallel
#                     adapter runs beside it, reading x;
#   ffn_residual      instead of ``ffn``, a post-LayerNorm output module norm(f(h) + r)
#                     called as (h, r), as in BERT: the parallel adapter reads r.
# The attention site is the projection, not the attention block, because attention blocks
# return tuples and take many arguments. The decoders' feed-forward site is the whole
# block (whose output is the down projection's, after GPT-2's dropout): then one wrapper
# serves serial and parallel adapters together and no adapter sits inside another.
_DECODER_SITES = {"attention_output": r"self_attn\.o_proj", "ffn_output": "mlp", "ffn": "mlp"}
_BERT_SITES = {"attention_output": r"attention\.output\.dense", "ffn_output": r"\d+\.output\.dense",
               "ffn_residual": r"\d+\.output"}
ADAPTER_SITES: dict[str, dict[str, str]] = {
    **{t: _DECODER_SITES for t in (
        "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo", "olmo2",
        "granite")},
    "gpt2": {"attention_output": r"attn\.c_proj", "ffn_output": "mlp", "ffn": "mlp"},
    **{t: _BERT_SITES for t in ("bert", "roberta", "xlm-roberta")},
}

PLACEMENT_SITES: dict[str, tuple[str, ...]] = {
    "houlsby": ("attention_output", "ffn_output"),
    "pfeiffer": ("ffn_output",),
    "parallel": ("ffn",),
}


@dataclass(frozen=True)
class AdapterSite:
    """One module that gets a bottleneck adapter: its path, the adapter's mode
    (``"serial"``, ``"parallel"`` or ``"residual"``, see ``methods/adapter.py``) and the
    hidden width the adapter works in."""

    path: str
    mode: str
    width: int


def _ends_with(path: str, pattern: str) -> bool:
    return re.search(rf"(?:^|\.)(?:{pattern})$", path) is not None


def _io_widths(module: nn.Module) -> tuple[int, int] | None:
    """(input, output) width of a module: its own for a Linear/Conv1D, else the input of the
    first and the output of the last Linear/Conv1D inside it (a block's projections)."""
    if isinstance(module, AdapterModule):
        module = module.unwrap()
    layers = [t for m in module.modules() if (t := describe(m)) is not None and t.kind != "embedding"]
    if not layers:
        return None
    return layers[0].in_features, layers[-1].out_features


def _names_hint(candidates: dict[str, nn.Module]) -> str:
    names = sorted({p.rsplit(".", 1)[-1] for p in candidates if not p.rsplit(".", 1)[-1].isdigit()})
    nested = (" (modules inside an existing adapter are not counted: adapters do not nest)"
              if any(isinstance(m, AdapterModule) for m in candidates.values()) else "")
    return f"module names in this model{nested}: {names}"


def adapter_sites(model: nn.Module, config: AdapterConfig) -> list[AdapterSite]:
    """The modules that get a bottleneck adapter for ``config``, in model order.

    With ``config.target_modules`` each name matches like a LoRA target (the whole path or
    a dotted suffix); serial placements put the adapter after each named module, parallel
    beside it. Without, the architecture's sites for ``config.placement`` are used (the
    table above, or a ``peft_adapter_sites`` dict the model declares). Raises ValueError
    for an unknown architecture, a name that matches nothing, a module that cannot host an
    adapter, or a site that would nest with another adapter.
    """
    candidates = dict(modules_outside_adapters(model))
    arch = integrations.model_type(model) or type(model).__name__
    chosen: dict[str, str] = {}  # path -> mode
    if config.target_modules is not None:
        mode = "parallel" if config.placement == "parallel" else "serial"
        for name in config.target_modules:
            hits = [p for p in candidates if _matches(p, name)]
            if not hits:
                raise ValueError(f"AdapterConfig.target_modules entry {name!r} matches no module. "
                                 f"{_names_hint(candidates)}")
            chosen.update((p, mode) for p in hits)
    else:
        sites = getattr(model, "peft_adapter_sites", None) or ADAPTER_SITES.get(arch)
        if sites is None:
            raise ValueError(
                f"peftkit does not know where bottleneck adapters go in {arch!r}; pass "
                "AdapterConfig(target_modules=[...]) naming the modules to put adapters after "
                "(the attention output projection, the feed-forward block), or declare "
                f"peft_adapter_sites on the model. {_names_hint(candidates)}"
            )
        for key in PLACEMENT_SITES[config.placement]:
            mode = "parallel" if key == "ffn" else "serial"
            if key == "ffn" and "ffn_residual" in sites:
                key, mode = "ffn_residual", "residual"
            pattern = sites.get(key)
            hits = [] if pattern is None else [p for p in candidates if _ends_with(p, pattern)]
            if not hits:
                raise ValueError(
                    f"the {config.placement} adapter site {key!r} ({pattern!r}) of {arch!r} matches "
                    f"no module; pass AdapterConfig(target_modules=[...]). {_names_hint(candidates)}"
                )
            chosen.update((p, mode) for p in hits)
    return [_check_site(candidates[p], p, chosen[p], chosen) for p in candidates if p in chosen]


def _check_site(module: nn.Module, path: str, mode: str, chosen: dict[str, str]) -> AdapterSite:
    if isinstance(module, AdapterModule) and not isinstance(module, AdapterWrapper):
        raise ValueError(f"{path!r} already carries a {type(module).__name__}; a bottleneck adapter "
                         "cannot wrap another method's adapter module.")
    inner = [p for p, m in module.named_modules(prefix=path)
             if p != path and (p in chosen or isinstance(m, AdapterModule))]
    if inner:
        raise ValueError(f"a bottleneck adapter at {path!r} would contain the adapter site or module "
                         f"{inner[0]!r}; adapters do not nest, choose one of the two.")
    if type(module).forward is nn.Module.forward:
        raise ValueError(f"{path!r} is a {type(module).__name__}, which has no forward of its own; name "
                         "the modules it holds instead.")
    widths = _io_widths(module)
    if widths is None:
        raise ValueError(f"{path!r} ({type(module).__name__}) holds no Linear/Conv1D layer, so its hidden "
                         "width is unknown; put the adapter after a projection or a block that has one.")
    width_in, width_out = widths
    if mode == "parallel" and width_in != width_out:
        raise ValueError(f"a parallel adapter beside {path!r} needs equal input and output widths, found "
                         f"{width_in} -> {width_out}; name the feed-forward block, not one projection.")
    return AdapterSite(path, mode, width_out)


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
