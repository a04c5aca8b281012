"""What every method config shares: the JSON round trip, ``modules_to_save``, the value
checks, and the LoRA scaling formula.

Each method's own config class lives with the rest of that method's declaration in
``specs/`` (``specs.lora.LoraConfig`` and so on; ``peftkit.LoraConfig`` is the public name).
A config says *what* to attach; it never touches a model. Validation that needs the model
(does a target exist, is the rank below the layer's size) happens in ``targets.py`` when
the config is attached.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

from . import validate

TargetSpec = list[str] | str | None
"""A list of module names (exact or dotted suffix), one regex string (full match),
a preset (``"attention"``, ``"all-linear"``), or None for the architecture default."""


def lora_scaling(alpha: float, r: int, use_rslora: bool = False) -> float:
    """The factor s in h = W x + s · B A x: alpha / r, or alpha / sqrt(r) with rsLoRA
    (Kalajdzievski 2023). The one place the formula is written."""
    return alpha / (math.sqrt(r) if use_rslora else r)


class MethodConfig:
    """The base of every method config (a dataclass each): a JSON round trip in which
    unknown fields are errors, and the checks of the fields they all have.

    Every method config has ``modules_to_save``: modules trained in full and saved with the
    adapter (Hugging Face PEFT's name). None picks the classification head (``classifier``
    or ``score``, with BERT's ``pooler`` or DistilBERT's ``pre_classifier`` that feeds it)
    of a sequence-classification model and nothing otherwise; ``[]`` trains no module in
    full. ``base_model_name_or_path`` and ``task_type`` are recorded in the adapter file
    for its reader.
    """

    peft_type: ClassVar[str]

    def _check_modules_to_save(self) -> None:
        names = self.modules_to_save
        if isinstance(names, (tuple, set)):
            self.modules_to_save = names = sorted(names)
        if names is not None and (not isinstance(names, list)
                                  or not all(isinstance(n, str) and n for n in names)):
            raise validate.InvalidValue(type(self).__name__, "modules_to_save",
                                        "None or a list of module names", names)
        for field in ("base_model_name_or_path", "task_type"):
            value = getattr(self, field)
            if value is not None and not isinstance(value, str):
                raise validate.InvalidValue(type(self).__name__, field, "None or a string", value)

    def _check_dropout(self) -> None:
        validate.number(type(self).__name__, "dropout", self.dropout, at_least=0.0, below=1.0)

    def to_dict(self) -> dict[str, Any]:
        data = {"peft_type": self.peft_type, **dataclasses.asdict(self)}
        data.pop("tokenizer", None)  # an object, not data: used once at init, never saved
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        data = dict(data)
        peft_type = data.pop("peft_type", cls.peft_type)
        if peft_type != cls.peft_type:
            raise ValueError(f"expected peft_type {cls.peft_type!r}, got {peft_type!r}.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; known fields are {sorted(known)}.")
        return cls(**data)


PeftConfig = MethodConfig
"""Any method config (the annotation used across peftkit)."""

__all__ = ["MethodConfig", "PeftConfig", "TargetSpec", "lora_scaling"]
