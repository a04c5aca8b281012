"""A new method needs its own module and one registration line, nothing else.

This file is that module for a toy method, an (IA)³-style learned output scale
(Liu et al. 2022: h = l ⊙ W x, l (out,) starting at ones): its nn.Module, its config, its
attacher, its file fields and its record, then one line that adds the record to
``registry.METHODS``. Attaching, the trainable set, the default learning rate, the doctor,
saving and loading then work with no change anywhere in peftkit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from torch import nn

import peftkit
from peftkit import learning_rates, registry
from peftkit.config import MethodConfig
from peftkit.formats import peft_config as files
from peftkit.methods.base import AdapterModule
from peftkit.specs.common import Method
from helpers import model_output, tiny_llama


class ScaleLinear(AdapterModule):
    """y = l ⊙ (W x + b) per active adapter; l (out,) starts at ones, so the layer is unchanged."""

    adapter_tables = {"scales": "scale"}
    method_label = "scale"

    def __init__(self, base_layer: nn.Linear) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.scales = nn.ParameterDict()

    def add_adapter(self, name: str) -> None:
        self.scales[name] = nn.Parameter(torch.ones(self.base_layer.out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        for name in self.active_adapters:
            y = y * self.scales[name]
        return y

    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        return {"ia3_l": self.scales[name].detach()}

    def load_adapter_state_dict(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.scales[name].copy_(tensors["ia3_l"])

    def unwrap(self) -> nn.Module:
        return self.base_layer


@dataclass
class ScaleConfig(MethodConfig):
    peft_type: ClassVar[str] = "TOY_SCALE"

    target_modules: list[str] | None = None
    modules_to_save: list[str] | None = None
    base_model_name_or_path: str | None = None
    task_type: str | None = None

    def __post_init__(self) -> None:
        self._check_modules_to_save()
        self.target_modules = self.target_modules or ["down_proj"]


def attach(peft_model: Any, config: ScaleConfig, name: str, trained_in_full: list[str]) -> list[str]:
    model = peft_model.base_model
    paths = [p for p, m in model.named_modules()
             if isinstance(m, (nn.Linear, ScaleLinear)) and p.split(".")[-1] in config.target_modules]
    for path in paths:
        layer = model.get_submodule(path)
        if not isinstance(layer, ScaleLinear):
            layer = ScaleLinear(layer)
            model.set_submodule(path, layer)
        layer.add_adapter(name)
    return paths


def to_file(config: ScaleConfig, facts: files.ModelFacts) -> dict[str, Any]:
    return {**config.to_dict(), **files.common_fields(config, facts)}


def from_file(data: dict[str, Any], path: Path) -> ScaleConfig:
    return ScaleConfig.from_dict({**data, "modules_to_save": files.read_modules_to_save(data.get("modules_to_save"))})


METHOD = Method("scale", "toy-scale", ScaleConfig, attach, input_side=False, mergeable=False,
                learning_rate=3e-3, learning_rate_floor=1e-4, cli_options={"targets": "target_modules"},
                to_file=to_file, from_file=from_file)


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setattr(registry, "METHODS", (*registry.METHODS, METHOD))  # the one registration line


def test_a_registered_method_attaches_trains_saves_and_loads(registered, tmp_path):
    torch.manual_seed(0)
    base = tiny_llama()
    ids = torch.randint(0, base.config.vocab_size, (2, 7))
    before = model_output(base, ids)
    pm = peftkit.attach(base, ScaleConfig())

    # Unchanged at init, and only the scales train (M1, M2).
    torch.testing.assert_close(model_output(pm, ids), before)
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith("scales.default") for n in trainable)
    assert learning_rates.default_learning_rate(pm.configs["default"], pm) == 3e-3

    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.uniform_(0.5, 1.5)
    changed = model_output(pm, ids)
    assert not torch.allclose(changed, before)
    folder = pm.save(tmp_path / "adapter")
    assert peftkit.config_from_dict({"peft_type": "TOY_SCALE"}) == ScaleConfig()

    torch.manual_seed(0)
    again = peftkit.load(tiny_llama(), folder)
    torch.testing.assert_close(model_output(again, ids), changed)
    assert isinstance(again.configs["default"], ScaleConfig)
    with again.disable_adapter():
        torch.testing.assert_close(model_output(again, ids), before)


def test_the_doctor_reads_a_registered_methods_floor(registered):
    pm = peftkit.attach(tiny_llama(), ScaleConfig())
    optimizer = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-6)
    report = peftkit.doctor(pm, optimizer=optimizer)
    assert "M9" in {f.id for f in report.errors + report.warnings}, report.text()
