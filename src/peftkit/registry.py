"""The methods peftkit implements: one record each, listed once, read by everything else.

A record (``specs.common.Method``) says what a method is (its config class and PEFT type
name), how it is put on a model, whether it works at the input side (virtual tokens in
front of the input) and whether it folds into the weights, the learning rate it trains well
with and the doctor's too-low floor (M9), its adapter-file fields and its command-line
options. Each method declares its record in its own module in ``specs/``, beside its config
class, its attacher and its file fields, with the sources of its rates. ``model.py``, the
file format, the training loop, the doctor and the command line ask this module; none of
them lists the methods.

A new method is: its nn.Module in ``methods/``, its declaration in ``specs/`` ending in a
``METHOD = Method(...)``, and one line in ``METHODS`` below.
"""

from __future__ import annotations

from typing import Any

from .config import MethodConfig
from .specs import adapter, lora, prefix, prompt
from .specs.common import Method

METHODS: tuple[Method, ...] = (
    lora.METHOD,
    adapter.METHOD,
    prefix.METHOD,
    prompt.METHOD,
)

# Hugging Face PEFT methods peftkit does not implement but the doctor recognises in a PEFT
# model: PEFT type -> (label, learning-rate floor). P-tuning (Liu et al. 2021) is prompt-side:
# its floor is prompt tuning's, 1e-3.
OTHER_PEFT_METHODS: dict[str, tuple[str, float]] = {"P_TUNING": ("p-tuning", 1e-3)}


def method_named(name: str) -> Method:
    """The record whose ``--method`` name is ``name``."""
    for method in METHODS:
        if method.name == name:
            return method
    raise ValueError(f"unknown method {name!r}; peftkit has {[m.name for m in METHODS]}.")


def method_of_type(peft_type: str) -> Method:
    """The record of PEFT type ``peft_type`` (``"LORA"``, ``"PREFIX_TUNING"``, ...)."""
    for method in METHODS:
        if method.peft_type == peft_type:
            return method
    raise ValueError(f"unknown peft_type {peft_type!r}; peftkit reads {sorted(m.peft_type for m in METHODS)}.")


def method_for(config: Any) -> Method:
    """The record of ``config``'s class; a TypeError for anything that is not a method config."""
    for method in METHODS:
        if type(config) is method.config_class:
            return method
    raise TypeError(f"unsupported config type {type(config).__name__}; "
                    f"peftkit attaches {[m.config_class.__name__ for m in METHODS]}.")


def config_from_dict(data: dict[str, Any]) -> MethodConfig:
    """Build the right config class from a dict that names its ``peft_type``."""
    return method_of_type(data.get("peft_type")).config_class.from_dict(data)


def method_label(peft_type: str) -> str:
    """How reports name the method of ``peft_type`` (peftkit's or another PEFT method)."""
    if peft_type in OTHER_PEFT_METHODS:
        return OTHER_PEFT_METHODS[peft_type][0]
    return method_of_type(peft_type).label


def learning_rate_floor(peft_type: str) -> float | None:
    """The doctor's M9 floor for ``peft_type``; None for a type it knows no floor for."""
    if peft_type in OTHER_PEFT_METHODS:
        return OTHER_PEFT_METHODS[peft_type][1]
    try:
        return method_of_type(peft_type).learning_rate_floor
    except ValueError:
        return None
