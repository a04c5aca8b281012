"""The optimizer's learning rates against each method's floor (M9, ``peftkit.registry``)."""

from __future__ import annotations

from ... import registry
from ..inventory import is_number
from ..probe import Context
from ..report import Finding, listing, many


def check_m9(ctx: Context) -> list[Finding]:
    """Optimizer groups that train adapter parameters below the method's learning-rate floor."""
    if ctx.optimizer is None:
        return []
    findings = []
    for index, group in enumerate(ctx.optimizer.param_groups):
        lr = group.get("initial_lr", group.get("lr"))  # a scheduler's warm-up starts low on purpose
        if not is_number(lr):
            continue
        low: dict[str, list[str]] = {}
        for param in group["params"]:
            method = ctx.inv.methods.get(id(param))
            floor = registry.learning_rate_floor(method) if method else None
            if floor is not None and lr < floor:
                low.setdefault(method, []).append(ctx.inv.name(param))
        for method, names in low.items():
            floor = registry.learning_rate_floor(method)
            findings.append(Finding(
                "M9", "warning", f"optimizer group {index}: {listing(names)}",
                f"optimizer group {index} trains {registry.method_label(method)} parameters "
                f"({many(len(names), 'tensor')}, e.g. {names[0]}) at lr {lr:g}, below {floor:g}, the lowest rate "
                "this method is known to train well with: adapters start at or near zero and need larger steps "
                "than full fine-tuning (whose 1e-5 to 5e-5 is the usual slip).",
                f"raise the learning rate for these parameters to at least {floor:g} "
                "(LoRA ~2e-4, prompt tuning ~1e-2 or more, prefix ~1e-3 to 1e-2, adapters ~1e-4 to 1e-3)."))
    return findings
