"""LoRA, declared: its config, how it is put on a model, its adapter_config.json fields,
its learning rate, and its record.

Learning rate, with sources: Hu et al. (2021) fine-tune RoBERTa-base (hidden 768) with 4e-4
to 5e-4, RoBERTa-large (1024) with 3e-4 to 4e-4 and GPT-2 with 2e-4; QLoRA (Dettmers et al.
2023) uses 2e-4 for 7B and 13B models and 1e-4 for 33B and 65B; Hugging Face PEFT's guides
use 1e-4 to 3e-4. Default 2e-4 at hidden size 4096, scaled with the width
(``rate_for_model``); the doctor's floor 5e-5, half the lowest of these (full fine-tuning's
1e-5 to 5e-5 is the classic slip, M9).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from .. import integrations, targets, validate
from ..config import MethodConfig, TargetSpec, lora_scaling
from ..formats import peft_config as files
from ..formats.adapter_folder import AdapterFileError
from ..methods.lora import LoraLayer
from .common import Method

BIAS_MODES = ("none", "lora_only")


@dataclass
class LoraConfig(MethodConfig):
    """Low-rank adaptation: h = W x + s · B A x with s = alpha / r (alpha / sqrt(r) with rsLoRA).

    Args:
        r: rank of the update; A is (r, in), B is (out, r).
        alpha: numerator of the scaling s.
        dropout: dropout probability on the LoRA input path only (W x never sees it).
        target_modules: which modules get LoRA; see ``TargetSpec``.
        use_rslora: scale by alpha / sqrt(r) (rank-stabilised LoRA, Kalajdzievski 2023),
            which keeps the update's magnitude steady as r grows.
        bias: ``"none"`` keeps every bias frozen; ``"lora_only"`` trains a bias delta on
            the targeted layers (saved with the adapter; the base bias stays as it was).
        modules_to_save, base_model_name_or_path, task_type: see ``MethodConfig``.
    """

    peft_type: ClassVar[str] = "LORA"

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: TargetSpec = None
    use_rslora: bool = False
    bias: str = "none"
    modules_to_save: list[str] | None = None
    base_model_name_or_path: str | None = None
    task_type: str | None = None

    def __post_init__(self) -> None:
        self._check_modules_to_save()
        validate.positive_int("LoraConfig", "r", self.r)
        validate.number("LoraConfig", "alpha", self.alpha, above=0,
                        hint=" (a common choice is alpha = 2 * r)")
        self._check_dropout()
        validate.flag("LoraConfig", "use_rslora", self.use_rslora)
        validate.one_of("LoraConfig", "bias", self.bias, BIAS_MODES)
        if isinstance(self.target_modules, (tuple, set)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.target_modules, list):
            if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
                raise ValueError(
                    "LoraConfig.target_modules must be a non-empty list of module names, a "
                    f"regex string, a preset or None; got {self.target_modules!r}."
                )
        elif isinstance(self.target_modules, str):
            if not self.target_modules.strip():
                raise ValueError("LoraConfig.target_modules is an empty string; pass module names, a regex, "
                                 "a preset ('attention', 'all-linear') or None for the architecture's default.")
        elif self.target_modules is not None:
            raise ValueError(f"LoraConfig.target_modules has an unsupported type: {self.target_modules!r}.")

    @property
    def scaling(self) -> float:
        """The factor s in h = W x + s · B A x."""
        return lora_scaling(self.alpha, self.r, self.use_rslora)


def attach(peft_model: Any, config: LoraConfig, name: str, trained_in_full: list[str]) -> list[str]:
    """Wrap every targeted layer (or add to its existing LoRA wrapper) outside the modules
    ``trained_in_full``; return their paths."""
    model = peft_model.base_model
    chosen = targets.find_targets(model, config.target_modules, trained_in_full)
    targets.check_rank(chosen, config.r)
    for target in chosen:
        layer = model.get_submodule(target.path)
        if not isinstance(layer, LoraLayer):
            layer = target.wrap(layer)
            model.set_submodule(target.path, layer)
        layer.add_adapter(name, config.r, config.alpha, config.dropout, config.use_rslora,
                          train_bias=config.bias == "lora_only")
    return [t.path for t in chosen]


DEFAULT_RATE = 2e-4
REFERENCE_WIDTH = 4096  # the hidden size at which the default is DEFAULT_RATE
RATE_RANGE = (1e-4, 1e-3)


def rate_for_model(model: nn.Module) -> float:
    """2e-4 · sqrt(4096 / d) for a model of width d (its config's hidden size), clamped to
    [1e-4, 1e-3]: narrower models take larger steps, as the sources above do (RoBERTa-base
    4e-4 to 5e-4, 7B models 2e-4). 2e-4 when the width is unknown."""
    width = integrations.config_value(model, "hidden_size", "n_embd", "d_model")
    if not width:
        return DEFAULT_RATE
    low, high = RATE_RANGE
    return min(max(DEFAULT_RATE * math.sqrt(REFERENCE_WIDTH / width), low), high)


# -- adapter_config.json: Hugging Face PEFT's LoraConfig ------------------------------------
# peftkit field <-> Hugging Face PEFT field.
_FIELDS = {
    "r": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "target_modules": "target_modules",
    "use_rslora": "use_rslora", "bias": "bias",
    "base_model_name_or_path": "base_model_name_or_path", "task_type": "task_type",
    "modules_to_save": "modules_to_save",
}
# PEFT fields that only describe the file or the initialisation (loaded weights replace it).
_INFORMATIONAL = {
    "peft_type", "auto_mapping", "peft_version", "revision", "inference_mode", "fan_in_fan_out",
    "init_lora_weights", "megatron_core", "runtime_config", "qalora_group_size",
    "ensure_weight_tying",
}
# PEFT features peftkit does not implement: accepted only when switched off.
_UNSUPPORTED = {
    "exclude_modules", "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern",
    "megatron_config", "trainable_token_indices", "loftq_config", "eva_config", "corda_config",
    "lora_ga_config", "use_dora", "velora_config", "alora_invocation_tokens", "use_qalora",
    "monteclora_config", "layer_replication", "lora_bias", "target_parameters", "use_bdlora",
    "arrow_config", "kasa_config",
}


def to_file(config: LoraConfig, facts: files.ModelFacts) -> dict[str, Any]:
    """PEFT's fields; ``target_modules`` names exactly the adapted layers."""
    return {
        **{peft: getattr(config, ours) for ours, peft in _FIELDS.items()}, **files.common_fields(config, facts),
        "peft_type": "LORA", "target_modules": list(facts.target_names),
        "fan_in_fan_out": facts.fan_in_fan_out, "inference_mode": True, "init_lora_weights": True,
    }


def from_file(data: dict[str, Any], path: Path) -> LoraConfig:
    ours = {v: k for k, v in _FIELDS.items()}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key == "modules_to_save":
            kwargs[key] = files.read_modules_to_save(value)
        elif key in ours:
            kwargs[ours[key]] = value
        elif key in _UNSUPPORTED:
            if value not in (None, False, {}, []):
                raise AdapterFileError(
                    f"{path}: field {key}={value!r} asks for a Hugging Face PEFT feature that "
                    "peftkit does not implement; load this adapter with PEFT instead."
                )
        elif key not in _INFORMATIONAL:
            raise AdapterFileError(f"{path}: unknown config field {key!r}; the file is not a LoRA adapter config peftkit knows.")
    if "lora_alpha" not in data or "r" not in data:
        raise AdapterFileError(f"{path}: a LoRA config needs 'r' and 'lora_alpha'.")
    kwargs.setdefault("modules_to_save", [])
    return LoraConfig(**kwargs)


METHOD = Method(
    "lora", "LoRA", LoraConfig, attach, input_side=False, mergeable=True,
    learning_rate=DEFAULT_RATE, learning_rate_floor=5e-5, rate_for_model=rate_for_model,
    cli_options={"r": "r", "alpha": "alpha", "dropout": "dropout", "targets": "target_modules",
                 "rslora": "use_rslora"},
    to_file=to_file, from_file=from_file,
)
