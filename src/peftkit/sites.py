"""Where the layer-side modules other than LoRA go: bottleneck adapter sites
(``adapter_sites``), and the modules an adapter trains in full (``trained_copy_paths``,
Hugging Face PEFT's ``modules_to_save``). LoRA's targets are in ``targets.py``, whose
matching rules (a name matches a path or a dotted suffix of it) these share.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from . import integrations
from .methods.adapter import AdapterWrapper
from .methods.base import AdapterModule
from .targets import HEAD_NAMES, describe, matches_target, modules_outside_adapters

if TYPE_CHECKING:  # the adapter declaration imports this module
    from .specs.adapter import AdapterConfig


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
        hits = [p for p in modules if matches_target(p, name)]
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
            hits = [p for p in candidates if matches_target(p, name)]
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
