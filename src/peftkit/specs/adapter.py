"""Bottleneck adapters, declared: their config, how they are put on a model, their
adapter_config.json fields, their learning rate, and their record.

Learning rate, with sources: Pfeiffer et al. (2021, AdapterFusion) and AdapterHub train
adapters with 1e-4, Houlsby et al. (2019) sweep 3e-5 to 3e-3; a zero-initialised
up-projection, like LoRA's B, barely moves at a full fine-tuning rate. Default and the
doctor's floor 1e-4 (M9).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from .. import sites, validate
from ..config import MethodConfig
from ..formats import peft_config as files
from ..methods.adapter import AdapterWrapper
from .common import Method

PLACEMENTS = ("houlsby", "pfeiffer", "parallel")
ACTIVATIONS = ("relu", "gelu", "silu")


@dataclass
class AdapterConfig(MethodConfig):
    """Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020; He et al. 2022).

    Each adapter computes h + up(act(down(h))) (serial placements) with down (bottleneck,
    hidden) random and up (hidden, bottleneck) starting at zero, so the model is unchanged
    at init.

    Args:
        bottleneck: the adapter's inner size.
        placement: ``"houlsby"`` after the attention output projection and after the
            feed-forward output; ``"pfeiffer"`` after the feed-forward output only;
            ``"parallel"`` beside the feed-forward block, added with ``scaling``.
        activation: ``"relu"``, ``"gelu"`` or ``"silu"``.
        dropout: dropout inside the adapter, after the activation.
        scaling: factor on the parallel adapter's output (ignored by serial placements).
        target_modules: explicit module names to put adapters after (serial) or beside
            (parallel); None finds them from the architecture.
        modules_to_save, base_model_name_or_path, task_type: see ``MethodConfig``.
    """

    peft_type: ClassVar[str] = "BOTTLENECK_ADAPTER"

    bottleneck: int = 64
    placement: str = "pfeiffer"
    activation: str = "relu"
    dropout: float = 0.0
    scaling: float = 1.0
    target_modules: list[str] | None = None
    modules_to_save: list[str] | None = None
    base_model_name_or_path: str | None = None
    task_type: str | None = None

    def __post_init__(self) -> None:
        self._check_modules_to_save()
        validate.positive_int("AdapterConfig", "bottleneck", self.bottleneck)
        validate.one_of("AdapterConfig", "placement", self.placement, PLACEMENTS)
        validate.one_of("AdapterConfig", "activation", self.activation, ACTIVATIONS)
        self._check_dropout()
        validate.number("AdapterConfig", "scaling", self.scaling)
        if self.target_modules is not None and (
                not isinstance(self.target_modules, list) or not self.target_modules
                or not all(isinstance(t, str) and t for t in self.target_modules)):
            raise validate.InvalidValue("AdapterConfig", "target_modules",
                                        "None or a non-empty list of module names", self.target_modules)


def attach(peft_model: Any, config: AdapterConfig, name: str, trained_in_full: list[str]) -> list[str]:
    """Put a bottleneck adapter at every site of ``config.placement``; return their paths."""
    model = peft_model.base_model
    found = sites.adapter_sites(model, config)
    for site in found:  # before anything is allocated
        if config.bottleneck > site.width:
            raise ValueError(
                f"AdapterConfig.bottleneck={config.bottleneck} is wider than the hidden size {site.width} at "
                f"{site.path!r}: a bottleneck narrows the width (AdapterHub's reduction factor is at least "
                f"1); use at most {site.width}, typically {max(1, site.width // 16)} to {max(1, site.width // 2)}.")
    for site in found:
        wrapper = model.get_submodule(site.path)
        if not isinstance(wrapper, AdapterWrapper):
            wrapper = AdapterWrapper(wrapper)
            model.set_submodule(site.path, wrapper)
        wrapper.add_adapter(name, site.width, config.bottleneck, mode=site.mode,
                            activation=config.activation, dropout=config.dropout,
                            scaling=config.scaling)
    return [site.path for site in found]


# -- adapter_config.json: peftkit's own (PEFT lacks bottleneck adapters) ---------------------
def to_file(config: AdapterConfig, facts: files.ModelFacts) -> dict[str, Any]:
    """``AdapterConfig.to_dict()``, from which loading finds the same sites in the same architecture."""
    return {**config.to_dict(), **files.common_fields(config, facts)}


def from_file(data: dict[str, Any], path: Path) -> AdapterConfig:
    return AdapterConfig.from_dict({**data, "modules_to_save": files.read_modules_to_save(data.get("modules_to_save"))})


METHOD = Method(
    "adapter", "bottleneck-adapter", AdapterConfig, attach, input_side=False, mergeable=False,
    learning_rate=1e-4, learning_rate_floor=1e-4,
    cli_options={"bottleneck": "bottleneck", "placement": "placement", "activation": "activation",
                 "dropout": "dropout", "targets": "target_modules"},
    to_file=to_file, from_file=from_file,
)
