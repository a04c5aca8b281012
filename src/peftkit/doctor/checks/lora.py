"""Checks on LoRA layers, h = W x + s · B A x with s = alpha / r: the formula and its
factor (M3), where the layers sit (M4), their rank (M5) and whether they are merged (M6).
M4 and M5 apply the rules of ``peftkit.targets``, as ``attach`` does."""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from ... import targets
from ..probe import Context, attempt, copy_sharing_frozen, tolerance
from ..report import Finding, listing, many
from ..views import Inventory, LoraPair, LoraView

# Names of attention projections when the architecture is not in peftkit's tables.
_ATTENTION_INPUT_NAMES = ("q_proj", "k_proj", "v_proj", "qkv_proj", "query", "key", "value", "query_key_value",
                          "Wqkv", "c_attn", "q_lin", "k_lin", "v_lin", "in_proj", "wq", "wk", "wv")
_ATTENTION_OUTPUT_NAMES = ("o_proj", "out_proj", "out_lin", "wo", "attention.output.dense", "attn.c_proj")


# -- M3 -----------------------------------------------------------------------------------
def check_m3(ctx: Context) -> list[Finding]:
    """A LoRA layer whose output differs from W x + s · B A x on a probe, or whose s is not
    the alpha / r of its own alpha and r."""
    generator = torch.Generator().manual_seed(3)
    wrong, unverifiable = [], []
    for view in ctx.inv.lora:
        pairs = view.active_pairs()
        if not pairs or any(p.variant for p in pairs):
            continue
        if any(p.scaling is None for p in pairs):
            unverifiable.append(view.path)
            continue
        error = attempt(ctx, f"M3 at {view.path}", lambda: _formula_error(view, pairs, ctx.inv, generator))
        if error is not None and error > tolerance(view.compute_dtype()) * 10:
            wrong.append((view, error))
    findings = _misscaled(ctx.inv)
    if wrong:
        view, error = wrong[0]
        scaling = ", ".join(f"{p.scaling:g}" for p in view.active_pairs())
        findings.append(Finding(
            "M3", "error", listing(v.path for v, _ in wrong),
            f"LoRA layers do not compute W x + s·B A x with their own s = alpha/r ({many(len(wrong), 'layer')}): "
            f"{view.path} ({view.source}, s = {scaling}) is off by {error:.0%} of the LoRA term on a probe "
            "with random A and B. Without the alpha/r factor the update's size changes with r, so the "
            "learning rate and alpha tuned for one rank are wrong for another.",
            "multiply the LoRA path by scaling = alpha / r (alpha / sqrt(r) for rsLoRA) inside the "
            "layer's forward: h = W x + (alpha / r) · B(A(x)); peftkit's layers do this."))
    if unverifiable:
        findings.append(Finding(
            "M3", "info", listing(unverifiable),
            f"hand-made LoRA layers that do not say their alpha or scaling ({many(len(unverifiable), 'layer')}: "
            f"{listing(unverifiable, 2)}): the doctor cannot verify that their forward applies alpha/r.",
            "store the factor on the module (self.scaling = alpha / r, or self.alpha and self.r) so it can "
            "be checked, and apply it in forward."))
    return findings


def _misscaled(inv: Inventory) -> list[Finding]:
    """Layers that store alpha and r beside s (Hugging Face PEFT's) with s != alpha / r:
    their forward is W x + s·B A x, right by the probe, with the wrong s."""
    off = [(view, pair) for view in inv.lora for pair in view.pairs
           if pair.expected_scaling is not None and pair.scaling is not None
           and not math.isclose(pair.scaling, pair.expected_scaling, rel_tol=1e-6)]
    if not off:
        return []
    view, pair = off[0]
    return [Finding(
        "M3", "error", listing(f"{v.path} ({p.adapter})" for v, p in off),
        f"LoRA layers scale their update by an s that is not their own alpha/r ({many(len(off), 'adapter')} "
        f"in {many(len({v.path for v, _ in off}), 'layer')}): {view.path} ({view.source}, adapter "
        f"{pair.adapter!r}) uses s = {pair.scaling:g} where its lora_alpha and r give {pair.expected_scaling:g}. "
        "The update is then a different size from the one alpha and r promise, so rates and alpha tuned "
        "elsewhere do not carry over (a scaling changed on purpose, by set_scale or scale_layer, looks the same).",
        "leave the layer's scaling at lora_alpha / r (lora_alpha / sqrt(r) with use_rslora): do not assign "
        "layer.scaling[name] by hand; change lora_alpha in the config and recreate the adapter instead.")]


def _formula_error(view: LoraView, pairs: list[LoraPair], inv: Inventory, generator: torch.Generator) -> float:
    """max |layer(x) - base(x) - Σ s·B A x| / max |Σ s·B A x| on a copy of the layer whose
    A and B are random (at init B = 0, which would hide any scaling)."""
    clone = copy_sharing_frozen(view.module, set(inv.methods))
    with torch.no_grad():
        for pair in pairs:
            for local in (pair.a_name, pair.b_name):
                param = clone.get_parameter(local)
                param.copy_(torch.randn(param.shape, generator=generator) / param.shape[-1] ** 0.5)
    x = view.probe_input(generator)
    expected = sum(view.lora_term(clone, pair, x) for pair in pairs)
    actual = clone(x) - view.base_output(x)
    return float((actual.float() - expected.float()).abs().max() / expected.float().abs().max().clamp_min(1e-12))


# -- M4 -----------------------------------------------------------------------------------
def check_m4(ctx: Context) -> list[Finding]:
    """Config entries that match no module; LoRA only on output projections or on none."""
    findings = _targets_matching_nothing(ctx)
    paths = [v.path for v in ctx.inv.lora]
    if not paths:
        return findings
    inputs, outputs = _attention_projections(ctx.model)
    on_input = [p for p in paths if any(targets.matches_target(p, n) for n in inputs)]
    on_output = [p for p in paths if any(targets.matches_target(p, n) for n in outputs)]
    if on_input:
        return findings
    placement = "only on attention output projections" if len(on_output) == len(paths) else (
        "on no attention projection" if not on_output else "on attention output projections but no query/key/value")
    defaults = (targets.architecture_targets(ctx.model, targets.DEFAULT_TARGETS, "peft_default_targets")
                or ["q_proj", "v_proj"])
    findings.append(Finding(
        "M4", "warning", listing(paths),
        f"LoRA sits {placement} ({listing(sorted({p.rsplit('.', 1)[-1] for p in paths}))}). Hu et al. 2021 (sec. 7.1) "
        "found the query and value projections the most effective place for a fixed parameter budget; "
        "without them the adapter learns less per parameter.",
        f"target the attention projections: target_modules={defaults} (peftkit's default for this model), "
        "the 'attention' preset, or 'all-linear'."))
    return findings


def _attention_projections(model: nn.Module) -> tuple[list[str], list[str]]:
    """(input projection names, output projection names); in peftkit's tables the last
    attention entry is the output projection."""
    names = targets.architecture_targets(model, targets.ATTENTION_TARGETS, "peft_attention_targets")
    if names:
        return names[:-1], names[-1:]
    return list(_ATTENTION_INPUT_NAMES), list(_ATTENTION_OUTPUT_NAMES)


def _targets_matching_nothing(ctx: Context) -> list[Finding]:
    paths = [p for p, _ in ctx.model.named_modules()]
    findings = []
    for config in ctx.inv.configs:
        names = config.target_modules
        if not isinstance(names, (list, tuple, set, frozenset)):
            continue  # a regex, a preset or the default: resolved against the model when attached
        missing = sorted(n for n in names if not any(targets.matches_target(p, n) for p in paths))
        if missing:
            leaves = sorted({p.removesuffix(".base_layer").rsplit(".", 1)[-1] for p, m in ctx.model.named_modules()
                             if type(m) is nn.Linear and not ctx.inv.is_adapter(m.weight)})
            findings.append(Finding(
                "M4", "error", f"{config.source} adapter {config.name!r}: target_modules",
                f"target_modules entries {missing} match no module of this model, so they train nothing "
                "(names from another architecture, e.g. BERT's 'query' on a Llama, are the usual cause).",
                f"use names that exist here; Linear layers in this model are named {listing(leaves, 12)}."))
    return findings


# -- M5 -----------------------------------------------------------------------------------
def check_m5(ctx: Context) -> list[Finding]:
    """Rank against layer size, by the rule ``targets.check_rank`` applies at attach."""
    found: dict[str, list[tuple[str, str]]] = {"error": [], "warning": []}
    for view in ctx.inv.lora:
        for pair in view.pairs:
            target = targets.Target(view.path, view.kind, view.in_features, view.out_features)
            problem = _rank_problem(target, view.rank(pair))
            if problem:
                found[problem[0]].append((view.path, problem[1]))
    return [Finding("M5", severity, listing(p for p, _ in items),
                    items[0][1] + (f" ({len(items)} layers in all.)" if len(items) > 1 else ""),
                    "lower r (8 to 64 covers most uses), or leave the small layers out of target_modules.")
            for severity, items in found.items() if items]


def _rank_problem(target: targets.Target, r: int) -> tuple[str, str] | None:
    """("error" | "warning", message) from ``targets.check_rank``, or None."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            targets.check_rank([target], r)
        except ValueError as e:
            return "error", str(e)
    return ("warning", str(caught[0].message)) if caught else None


# -- M6 -----------------------------------------------------------------------------------
def check_m6(ctx: Context) -> list[Finding]:
    """Unmerged LoRA in a model set up for inference (info while training)."""
    unmerged = [v for v in ctx.inv.lora if v.active_pairs()]
    if not unmerged:
        return []
    inference = not ctx.training and ctx.optimizer is None
    state = "is in eval mode with no optimizer (set up for inference or export)" if inference else "is training"
    return [Finding(
        "M6", "warning" if inference else "info", listing(v.path for v in unmerged),
        f"LoRA layers are unmerged ({many(len(unmerged), 'layer')}: {listing((v.path for v in unmerged), 2)}) "
        f"and the model {state}: each runs an extra "
        "B(A x) product per call, and an exported state dict holds LoRA keys a plain model cannot load.",
        "merge before inference or export: pm.merge_and_unload() (peftkit), model.merge_and_unload() "
        "(Hugging Face PEFT), or fold W += (alpha/r)·B A by hand; merged outputs equal unmerged ones.")]
