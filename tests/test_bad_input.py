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

import argparse

import pytest

import peftkit
from peftkit import cli, registry
from peftkit.adapter_files import read_config
from peftkit.formats.adapter_folder import AdapterFileError
from helpers import reference_run_inputs, tiny_llama

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


# -- the command line: every numeric option of `peftkit train` ---------------------------------
BAD_TEXT = {int: ["0", "-1", "2.5", "x", "nan"], float: ["nan", "inf", "-inf", "-1", "x", "1e400"]}
# Values of that list an option accepts on purpose.
ACCEPTED = {"--checkpoint-every": {"0"}, "--seed": {"0"}}


def _train_actions() -> list[argparse.Action]:
    parser = cli.build_parser()
    train = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["train"]
    return [a for a in train._actions if a.type in (int, float)]


def _method_of(dest: str) -> str | None:
    """The --method a method option belongs to (the first that declares it), None for a run option."""
    return next((m.name for m in registry.METHODS if dest in m.cli_options), None)


CLI_CASES = [pytest.param(action.option_strings[0], _method_of(action.dest), value,
                          id=f"{action.option_strings[0]}={value}")
             for action in _train_actions() for value in BAD_TEXT[action.type]
             if value not in ACCEPTED.get(action.option_strings[0], set())]


def test_every_numeric_train_option_is_driven():
    options = {c.values[0] for c in CLI_CASES}
    assert {"--lr", "--max-steps", "--max-grad-norm", "--epochs", "--grad-accum", "--lora-plus-ratio", "--r", "--alpha",
            "--dropout", "--bottleneck", "--virtual-tokens", "--projection-dim"} <= options
    assert options == {a.option_strings[0] for a in _train_actions()}


@pytest.fixture(scope="module")
def run_inputs(tmp_path_factory):
    return reference_run_inputs(tmp_path_factory.mktemp("bad-cli"))


@pytest.mark.parametrize("option, method, value", CLI_CASES)
def test_a_bad_train_option_exits_2_with_one_line_naming_it(option, method, value, run_inputs, tmp_path, capsys):
    model, data = run_inputs
    out = tmp_path / "run"
    argv = ["train", "--model", str(model), "--data", str(data), "--out", str(out), "--no-progress",
            "--steps", "1", *(["--method", method] if method else []), f"{option}={value}"]
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse refusing a value that is not a number
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(("error:", "peftkit train: error:")), err
    assert option in last, err
    assert not out.exists()


def test_token_ids_outside_the_vocabulary_stop_train_at_the_line(run_inputs, tmp_path, capsys):
    """Checked when the data is read, against the model's own vocabulary (ids the model
    has no row for would index past its embedding)."""
    model, _ = run_inputs
    data = tmp_path / "ids.jsonl"
    data.write_text('{"input_ids": [1, 2, 3, 4]}\n' * 5 + '{"input_ids": [1, 2, 99999, 4]}\n')
    out = tmp_path / "run"
    code = cli.main(["train", "--model", str(model), "--data", str(data), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and "line 6" in err and "99999" in err
    assert not out.exists()


def test_compare_counts_prefix_tuning_on_a_model_folder(run_inputs, capsys):
    model, _ = run_inputs
    assert cli.main(["compare", "--model", str(model)]) == 0
    prefix_row = next(line for line in capsys.readouterr().out.splitlines() if "prefix" in line)
    assert "n/a" not in prefix_row


@pytest.mark.parametrize("options, option", [
    (["--max-new-tokens", "-1"], "--max-new-tokens"), (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--max-new-tokens", "100000000"], "--max-new-tokens"), (["--sample", "--temperature", "0"], "--temperature"),
    (["--temperature", "nan"], "--temperature"), (["--seed", "-3"], "--seed"),
])
def test_a_bad_generate_option_is_one_error_line(options, option, run_inputs, capsys):
    model, _ = run_inputs
    code = cli.main(["generate", "--model", str(model), "--prompt", "one plus one is", *options])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and option in err
