"""The optimiser's settings when the user gives none: each method's learning rate (M9), LoRA+
groups for LoRA (B faster than A), a rate of its own for modules trained in full, and the
warm-up-then-cosine schedule. ``train`` uses them; so can your own loop
(``torch.optim.AdamW(default_parameter_groups(pm))``)."""

from __future__ import annotations

import math

import torch

from . import registry
from .config import PeftConfig
from .model import PeftModel
from .validate import number


def default_learning_rate(config: PeftConfig, model: torch.nn.Module | None = None) -> float:
    """The learning rate a method trains well with when the user gives none (M9): its
    record's, or what its record computes from ``model`` (LoRA's depends on the width)."""
    method = registry.method_for(config)
    if method.rate_for_model is None or model is None:
        return method.learning_rate
    return method.rate_for_model(model.base_model if isinstance(model, PeftModel) else model)


# Modules trained in full beside an adapter (modules_to_save: a fresh classifier, BERT's
# pooler) get a rate of their own, 1e-3, the usual rate of a linear probe. The adapter's rate
# is wrong for them both ways: a prompt's 3e-2 throws a pretrained layer around (a tanh
# pooler saturates), and a bottleneck adapter's 1e-4 barely moves a fresh head in a short run.
TRAINED_COPY_LEARNING_RATE = 1e-3


# LoRA+ (Hayou, Ghosh & Yu 2024): B starts at zero, and in a wide layer it grows too slowly
# for B A to learn new features when A and B share one rate. They train B at 2^4 = 16 times
# A's rate and advise A at about half a plain LoRA rate, so the default groups put A at half
# the rate above and B at 8 times it. Chosen on a validation split carved from the training
# reviews (bench/defaults_study.py --study lora), never on bench/quality.py's held-out split.
# Embedding LoRA keeps the plain rate: there A is the factor that starts at zero.
LORA_PLUS_RATIO = 16.0


# Role -> (group kind, factor of the method's rate) under LoRA+: A and a trained bias at half
# the rate, B at half times the ratio; anything else LoRA trains (embedding LoRA) at the rate.
_LORA_PLUS_SPLIT = {"lora_A": ("lora_A", 0.5), "bias": ("lora_A", 0.5), "lora_B": ("lora_B", None)}


def _rate_groups(name: str, params: list[tuple[str, torch.nn.Parameter]], rate: float,
                 ratio: float) -> list[dict]:
    """Adapter ``name``'s (role, parameter) pairs as AdamW groups: modules trained in full
    (role ``full``) at 1e-3; with a LoRA B among them and ``ratio`` != 1, the LoRA+ split
    above; else everything at the method's ``rate``."""
    lora_plus = ratio != 1 and any(role == "lora_B" for role, _ in params)
    kinds: dict[str, tuple[list, float]] = {}
    for role, param in params:
        if role == "full":
            kind, lr = "modules_to_save", TRAINED_COPY_LEARNING_RATE
        elif lora_plus and role in _LORA_PLUS_SPLIT:
            kind, factor = _LORA_PLUS_SPLIT[role]
            lr = rate * (0.5 * ratio if factor is None else factor)
        else:
            kind, lr = "adapter", rate
        kinds.setdefault(kind, ([], lr))[0].append(param)
    order = ("lora_A", "lora_B", "adapter", "modules_to_save")
    return [{"params": ps, "lr": lr, "adapter": name, "kind": kind,
             **({} if kind == "modules_to_save" else {"base_lr": rate})}
            for kind in order if kind in kinds for ps, lr in [kinds[kind]]]


def default_parameter_groups(model: PeftModel, lora_plus_ratio: float = LORA_PLUS_RATIO) -> list[dict]:
    """The AdamW groups ``train`` builds when given no lr (M9): per active adapter, its own
    parameters at its method's default rate (``kind="adapter"``) and the modules it trains in
    full (``kind="modules_to_save"``) at 1e-3. A LoRA adapter is split LoRA+ style (see
    LORA_PLUS_RATIO) into ``kind="lora_A"`` at half its rate and ``kind="lora_B"`` at
    ``lora_plus_ratio`` times that; ``lora_plus_ratio=1`` trains A and B at the plain rate.
    Each group also names its ``adapter`` and its method's rate (``base_lr``); use them in
    your own loop as ``torch.optim.AdamW(default_parameter_groups(pm))``."""
    number("default_parameter_groups", "lora_plus_ratio", lora_plus_ratio, at_least=1,
           hint=" (B's rate over A's, so at least 1; 1 turns LoRA+ off)")
    groups = []
    for name, params in model.parameter_groups():
        rate = default_learning_rate(model.configs[name], model)
        groups.extend(_rate_groups(name, params, rate, lora_plus_ratio))
    return groups


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from 0 to the base rate, then cosine decay to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
