"""Method configurations: one dataclass per method, validated on construction.

A config says *what* to attach; it never touches a model. Validation that needs the
model (does a target exist, is the rank below the layer's size) happens in
``targets.py`` when the config is attached.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

TargetSpec = list[str] | str | None
"""A list of module names (exact or dotted suffix), one regex string (full match),
a preset (``"attention"``, ``"all-linear"``), or None for the architecture default."""

BIAS_MODES = ("none", "lora_only")


@dataclass
class LoraConfig:
    """Low-rank adaptation: h = W x + s · B A x with s = alpha / r (alpha / sqrt(r) with rsLoRA).

    Args:
        r: rank of the update; A is (r, in), B is (out, r).
        alpha: numerator of the scaling s.
        dropout: dropout probability on the LoRA input path only (W x never sees it).
        target_modules: which modules get LoRA; see ``TargetSpec``.
        use_rslora: scale by alpha / sqrt(r) (rank-stabilised LoRA, Kalajdzievski 2023),
            which keeps the update's magnitude steady as r grows.
        bias: ``"none"`` keeps every bias frozen; ``"lora_only"`` trains the biases of
            the targeted layers (they are then saved with the adapter).
        base_model_name_or_path, task_type: recorded in the adapter file for the reader.
    """

    peft_type: ClassVar[str] = "LORA"

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: TargetSpec = None
    use_rslora: bool = False
    bias: str = "none"
    base_model_name_or_path: str | None = None
    task_type: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoraConfig.r must be a positive integer, got {self.r!r}.")
        if not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise ValueError(
                f"LoraConfig.alpha must be a positive number, got {self.alpha!r} "
                "(a common choice is alpha = 2 * r)."
            )
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout!r}.")
        if self.bias not in BIAS_MODES:
            raise ValueError(
                f"LoraConfig.bias must be one of {BIAS_MODES}, got {self.bias!r}."
            )
        if isinstance(self.target_modules, (tuple, set)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.target_modules, list):
            if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
                raise ValueError(
                    "LoraConfig.target_modules must be a non-empty list of module names, a "
                    f"regex string, a preset or None; got {self.target_modules!r}."
                )
        elif self.target_modules is not None and not isinstance(self.target_modules, str):
            raise ValueError(f"LoraConfig.target_modules has an unsupported type: {self.target_modules!r}.")

    @property
    def scaling(self) -> float:
        """The factor s in h = W x + s · B A x."""
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def to_dict(self) -> dict[str, Any]:
        return {"peft_type": self.peft_type, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LoraConfig":
        """Inverse of ``to_dict``; an unknown field is an error, not silently dropped."""
        data = dict(data)
        peft_type = data.pop("peft_type", cls.peft_type)
        if peft_type != cls.peft_type:
            raise ValueError(f"expected peft_type {cls.peft_type!r}, got {peft_type!r}.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown {cls.__name__} field(s) {unknown}; known fields are {sorted(known)}."
            )
        return cls(**data)


PeftConfig = LoraConfig
"""The union of method configs; grows as methods are added."""

CONFIG_TYPES: dict[str, type] = {LoraConfig.peft_type: LoraConfig}


def config_from_dict(data: dict[str, Any]) -> PeftConfig:
    """Build the right config class from a dict that names its ``peft_type``."""
    peft_type = data.get("peft_type")
    if peft_type not in CONFIG_TYPES:
        raise ValueError(
            f"unknown peft_type {peft_type!r}; peftkit reads {sorted(CONFIG_TYPES)}."
        )
    return CONFIG_TYPES[peft_type].from_dict(data)


__all__ = ["LoraConfig", "PeftConfig", "TargetSpec", "config_from_dict", "CONFIG_TYPES"]
