"""Every number, flag and choice of every method config, from Python, an adapter file or the
command line, refused by one rule with a message that names the field: never replaced by
a default, never a NaN adapter, never a traceback.

The config cases are generated from the method records (each config's dataclass fields and
their types), so a new method's fields are driven too.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

import peftkit
from peftkit import registry
from peftkit.adapter_files import read_config
from peftkit.formats.adapter_folder import AdapterFileError
from helpers import tiny_llama

NAN, INF = math.nan, math.inf
# Bad values by the kind of field (from its annotation); None is bad unless the field is optional.
BAD_BY_KIND = {
    "int": [0, -1, 2.5, True, "8", NAN, 10 ** 30 * 1.0],
    "float": [NAN, INF, -INF, "0.1", True, [1.0]],
    "bool": ["false", "true", 1, 0, []],
    "str": [5, True, ["x"]],
    "list[str]": ["", [""], [5], 5],
    "TargetSpec": ["", "   ", [], [""], [5], 5],
}
# Field-specific ranges beyond the kind.
BAD_BY_FIELD = {
    "dropout": [-0.1, 1.0, 1e9],
    "alpha": [0, -16.0],
    "placement": ["nope"], "activation": ["tanh"], "bias": ["all"], "init": ["zeros"],
}


def _kind(field: dataclasses.Field) -> tuple[str, bool]:
    """(kind, optional) from a field's annotation string, e.g. ('int', True) for 'int | None'."""
    parts = [p.strip() for p in str(field.type).split("|")]
    return parts[0], "None" in parts


def _cases():
    for method in registry.METHODS:
        for field in dataclasses.fields(method.config_class):
            kind, optional = _kind(field)
            bad = list(BAD_BY_KIND.get(kind, [])) + BAD_BY_FIELD.get(field.name, [])
            if not optional and kind in ("int", "float", "bool"):
                bad.append(None)
            for value in bad:
                yield pytest.param(method.config_class, field.name, value,
                                   id=f"{method.name}-{field.name}-{value!r}")


CASES = list(_cases())


def test_every_config_field_is_driven():
    """The generated cases reach every numeric, flag and choice field of every method."""
    driven = {(c.values[0].__name__, c.values[1]) for c in CASES}
    for method in registry.METHODS:
        for field in dataclasses.fields(method.config_class):
            if _kind(field)[0] in ("int", "float", "bool") or field.name in BAD_BY_FIELD:
                assert (method.config_class.__name__, field.name) in driven, field.name
    assert len(CASES) > 100


@pytest.mark.parametrize("config_class, field, value", CASES)
def test_a_bad_config_value_is_refused_by_name(config_class, field, value):
    with pytest.raises(ValueError) as caught:
        config_class(**{field: value})
    message = str(caught.value)
    assert field in message and "\n" not in message


@pytest.mark.parametrize("config_class, field, value", CASES)
def test_a_bad_value_in_a_saved_config_is_refused_naming_the_file(config_class, field, value, tmp_path):
    """peftkit's own file layout for bottleneck adapters, and the same rule through PEFT's
    field names for LoRA: a hand-edited ``adapter_config.json`` meets the config's checks."""
    if config_class is peftkit.LoraConfig:
        peft_names = {"alpha": "lora_alpha", "dropout": "lora_dropout"}
        data = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, peft_names.get(field, field): value}
    elif config_class is peftkit.AdapterConfig:
        data = {**peftkit.AdapterConfig().to_dict(), field: value}
    else:
        data = {"peft_type": config_class.peft_type, "num_virtual_tokens": 4, field: value}
    if config_class is not peftkit.AdapterConfig and field in ("projection_dim", "init", "init_text", "tokenizer"):
        pytest.skip("a prompt-learning file records the init only for the reader: the saved tensor replaces it")
    try:
        text = json.dumps(data)
    except (TypeError, ValueError):
        pytest.skip("not representable in JSON")
    (tmp_path / "adapter_config.json").write_text(text)
    with pytest.raises(AdapterFileError) as caught:
        read_config(tmp_path)
    assert "adapter_config.json" in str(caught.value)


@pytest.mark.parametrize("config", [
    peftkit.PromptConfig(num_virtual_tokens=10 ** 9),
    peftkit.PrefixConfig(num_virtual_tokens=10 ** 6),
    peftkit.PrefixConfig(num_virtual_tokens=4, projection_dim=10 ** 9),
    peftkit.AdapterConfig(bottleneck=10 ** 9),
    peftkit.LoraConfig(r=10 ** 6),
], ids=["prompt-tokens", "prefix-tokens", "prefix-projection", "bottleneck", "lora-rank"])
def test_a_huge_size_is_refused_before_anything_is_allocated(config):
    """A typo such as 1000000000 virtual tokens is refused from the model's sizes, not
    allocated until memory runs out; the model is left as it was."""
    model = tiny_llama()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(ValueError) as caught:
        peftkit.attach(model, config)
    assert "\n" not in str(caught.value)
    assert {n for n in model.state_dict()} == set(before)
