"""Method configs: validated on construction, JSON round trip, one record per method."""

from __future__ import annotations

import math

import pytest

import peftkit
from peftkit import registry
from peftkit import AdapterConfig, LoraConfig, PrefixConfig, PromptConfig
from peftkit.config import lora_scaling


@pytest.mark.parametrize("config", [
    LoraConfig(r=4, alpha=8, dropout=0.1, target_modules=["q_proj", "v_proj"], use_rslora=True, bias="lora_only"),
    AdapterConfig(bottleneck=16, placement="parallel", activation="gelu", scaling=2.0),
    PrefixConfig(num_virtual_tokens=5, projection_dim=32),
    PromptConfig(num_virtual_tokens=7, init="vocab"),
])
def test_every_config_survives_a_json_round_trip(config):
    again = peftkit.config_from_dict(config.to_dict())
    assert type(again) is type(config) and again == config


@pytest.mark.parametrize("make", [
    lambda: LoraConfig(alpha=float("nan")),
    lambda: LoraConfig(alpha=float("inf")),
    lambda: LoraConfig(alpha=0),
    lambda: LoraConfig(alpha="16"),
    lambda: LoraConfig(r=0),
    lambda: LoraConfig(r=True),
    lambda: LoraConfig(dropout=float("nan")),
    lambda: LoraConfig(dropout="0.1"),
    lambda: LoraConfig(use_rslora="false"),
    lambda: LoraConfig(target_modules=""),
    lambda: LoraConfig(target_modules="   "),
    lambda: LoraConfig(target_modules=[]),
    lambda: AdapterConfig(scaling=float("nan")),
    lambda: AdapterConfig(scaling=float("-inf")),
    lambda: AdapterConfig(scaling="x"),
    lambda: AdapterConfig(dropout=1.0),
    lambda: PrefixConfig(num_virtual_tokens=0),
    lambda: PromptConfig(num_virtual_tokens=-1),
])
def test_numbers_that_would_train_a_wrong_adapter_are_refused(make):
    with pytest.raises(ValueError):
        make()


def test_unknown_field_and_unknown_type_are_named():
    with pytest.raises(ValueError, match="unknown LoraConfig field"):
        LoraConfig.from_dict({"peft_type": "LORA", "rank": 8})
    with pytest.raises(ValueError, match="unknown peft_type 'DORA'"):
        peftkit.config_from_dict({"peft_type": "DORA"})


@pytest.mark.parametrize("r,alpha,rslora", [(8, 16, False), (16, 8, True), (3, 7.5, False)])
def test_scaling_is_alpha_over_r_or_over_sqrt_r(r, alpha, rslora):
    expected = alpha / math.sqrt(r) if rslora else alpha / r
    assert lora_scaling(alpha, r, rslora) == pytest.approx(expected)
    assert LoraConfig(r=r, alpha=alpha, use_rslora=rslora).scaling == pytest.approx(expected)


def test_each_method_is_one_record_that_names_its_config_and_rates():
    names = [m.name for m in registry.METHODS]
    types = [m.peft_type for m in registry.METHODS]
    assert len(set(names)) == len(names) == len(set(types)) == 4
    for method in registry.METHODS:
        assert registry.method_named(method.name) is method
        assert registry.method_of_type(method.peft_type) is method
        assert registry.method_for(method.config_class()) is method
        assert 0 < method.learning_rate_floor <= method.learning_rate
        assert set(method.cli_options.values()) <= {f for f in method.config_class.__dataclass_fields__}
    assert [m.name for m in registry.METHODS if m.mergeable] == ["lora"]
    assert {m.name for m in registry.METHODS if m.input_side} == {"prefix", "prompt"}


def test_command_line_offers_exactly_the_registered_methods():
    from peftkit.cli import build_parser

    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    method = next(a for a in train._actions if a.dest == "method")
    assert list(method.choices) == [m.name for m in registry.METHODS]
    dests = {a.dest for a in train._actions}
    for m in registry.METHODS:
        assert set(m.cli_options) <= dests, m.name
