"""Identity at init: an untrained adapter must leave its layer's output as it was (M2:
LoRA's B and an adapter's up-projection start at zero), and a bottleneck adapter with
up = 0 must be the identity, h + up(act(down(h))) (M8)."""

from __future__ import annotations

import torch
from torch import nn

from ..probe import Context, attempt, copy_sharing_frozen, differs
from ..report import Finding, listing, many
from ..views import Inventory, LoraPair, LoraView


def check_m2(ctx: Context) -> list[Finding]:
    """An adapter that changes the output before any training step."""
    generator = torch.Generator().manual_seed(2)
    untrained, unknown = [], []
    for view in ctx.inv.lora:
        for pair in view.active_pairs():  # one by one: a trained adapter beside a new one is fine
            params = [view.module.get_parameter(n) for n in (pair.a_name, pair.b_name)]
            if _changes_before_training(ctx, params):
                x = view.probe_input(generator)
                without = attempt(ctx, f"M2 at {view.path}", lambda: _without_b(view, pair, ctx.inv)(x))
                if without is not None and differs(view.module(x), without):
                    (untrained if ctx.training_state(params) == "untrained" else unknown).append(view.path)
    for view in ctx.inv.bottlenecks:
        if _changes_before_training(ctx, view.params()):
            x = view.probe_input(generator)
            without = attempt(ctx, f"M2 at {view.path}", lambda: view.with_up_zeroed()(x))
            if without is not None and differs(view.module(x), without, scale=x):
                (untrained if ctx.training_state(view.params()) == "untrained" else unknown).append(view.path)
    return [f for f in (_m2_finding(untrained, "error"), _m2_finding(unknown, "warning")) if f]


def _without_b(view: LoraView, pair: LoraPair, inv: Inventory) -> nn.Module:
    """A copy of the layer in which ``pair``'s B is zero: its output without that adapter."""
    clone = copy_sharing_frozen(view.module, set(inv.methods))
    with torch.no_grad():
        for local in (pair.b_name, pair.b_bias_name):
            if local:
                clone.get_parameter(local).zero_()
    return clone


def _changes_before_training(ctx: Context, params: list[nn.Parameter]) -> bool:
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
        "M2", severity, listing(paths),
        f"adapters already change their layer's output ({many(len(paths), 'layer')}: {listing(paths, 2)}), "
        f"and {when}: the up-projection (LoRA's B, an adapter's up) is not zero, so the untrained model is not "
        "the pretrained one and training starts from noise.",
        "initialise the up-projection to zero and the down-projection randomly: for LoRA, "
        "nn.init.zeros_(B) and nn.init.kaiming_uniform_(A, a=math.sqrt(5)); for adapters, zero up.weight "
        "and up.bias (peftkit does this in attach).")


def check_m8(ctx: Context) -> list[Finding]:
    """A bottleneck adapter that is not the identity when its up-projection is zero."""
    generator = torch.Generator().manual_seed(8)
    broken = []
    for view in ctx.inv.bottlenecks:
        x = view.probe_input(generator)
        if attempt(ctx, f"M8 at {view.path}", lambda: differs(view.with_up_zeroed()(x), x)):
            broken.append(view.path)
    if not broken:
        return []
    return [Finding(
        "M8", "error", listing(broken),
        f"bottleneck adapters are not the identity when their up-projection is zero "
        f"({many(len(broken), 'adapter')}: {listing(broken, 2)}): they return up(act(down(h))) without adding "
        "h back, so the hidden state is replaced rather than adjusted and the untrained model loses the "
        "block the adapter follows.",
        "return h + up(act(down(h))) (Houlsby et al. 2019); peftkit's AdapterConfig does. (An adapter run "
        "in parallel to a block, whose output is added beside it, belongs in placement='parallel'.)")]
