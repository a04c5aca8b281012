"""`peftkit train --config FILE`: a YAML or JSON file of train options, read into argparse
defaults, so that every flag on the command line overrides the file.

A file is a mapping whose keys are the options of ``peftkit train`` spelled with underscores
(``max_steps: 200``, ``no_eos: true``) or their argparse dests (``steps``, ``add_eos: false``),
plus the two sections of a finished run's ``run.json``: ``config``, a PEFT config dict
(``to_dict``), the base of the method config whose fields options override, and ``options``,
``RunOptions`` fields. So ``peftkit train --config OUT/run.json --out OUT2`` is the same run
(the same run.json and adapter). A value is given once: two keys for one option, or an option
beside the ``config`` field it sets, are errors.

A value is checked as its flag would be: a flag takes true or false, an integer option an
integer (never a bool), a path or a name a string, a choice one of its choices, null only an
option whose default is "none given". Ranges are checked where they always are (RunOptions,
the method config), whose messages name the key and line through ``set_by``. Errors are
``ConfigError``, one line naming the file and line. Relative paths are read from the current
folder, as typed on the command line (and as a run.json's were).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SECTIONS = ("config", "options")
# What a run.json records beside the options, derived from them: read back, it sets nothing.
RECORDED = ("global_batch_size",)  # an FSDP2 run's batch size x ranks
LISTS = {"targets": ","}  # options whose flag takes a comma-separated list; a file may give a list
# Names other trainers' configs use (Hugging Face TrainingArguments and PEFT, axolotl), which
# no spelling distance leads to: learning_rate is closest to warmup_ratio by letters.
OTHER_NAMES = {
    "learning_rate": "lr", "num_train_epochs": "epochs", "num_epochs": "epochs", "output_dir": "out",
    "per_device_train_batch_size": "batch_size", "micro_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum", "max_seq_length": "max_length", "sequence_len": "max_length",
    "lora_r": "r", "rank": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "target_modules": "targets",
    "lora_target_modules": "targets", "num_virtual_tokens": "virtual_tokens", "base_model": "model",
    "model_name_or_path": "model", "dataset": "data", "train_file": "data", "save_steps": "checkpoint_every",
}
_UNSET = object()  # the default of every train option while the command line is parsed


class ConfigError(ValueError):
    """A --config file that cannot be used; the message names the file and the line."""


@dataclass
class RunConfig:
    """What a --config file says, ready for the parser."""

    values: dict[str, Any]  # argparse dest -> the value its flag would have set
    sources: dict[str, str]  # dest, or "config.<field>", -> "batch_size at run.yaml:3"
    method_config: dict[str, Any] | None  # the `config` section: a PEFT config dict


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """``parser.parse_args(argv)``; for ``train --config FILE`` the file fills in every option the
    command line leaves out (the train options' defaults in ``parser`` are changed for that).
    Sets ``method_config`` (the file's PEFT config dict) and ``option_sources`` (where each
    value from the file was written) on the namespace."""
    argv = sys.argv[1:] if argv is None else list(argv)
    path = _config_path(argv)
    if path is None:
        args = parser.parse_args(argv)
        if getattr(args, "command", None) == "train" and args.config is not None:
            raise ConfigError(f"write --config in full to read {args.config} (an abbreviation is not read).")
        return args
    # argparse has no public way to reach a subcommand's parser
    train = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["train"]
    run = read(path, train)
    # Every default is _UNSET while parsing, so what the command line gave is known exactly,
    # even a value equal to the default; the file and the defaults are filled in after.
    defaults = {}
    for action in _options(train):
        defaults[action.dest] = action.default
        action.default = _UNSET
        if action.dest in run.values:
            action.required = False
    args = parser.parse_args(argv)
    given = {dest for dest in defaults if getattr(args, dest) is not _UNSET}
    overridden = set(given)
    for group in train._mutually_exclusive_groups:  # --epochs on the command line replaces the file's max_steps
        members = {action.dest for action in group._group_actions}
        if members & given:
            overridden |= members
    for dest, default in defaults.items():
        if dest not in given:
            setattr(args, dest, default if dest in overridden else run.values.get(dest, default))
    args.method_config = run.method_config
    args.option_sources = {key: where for key, where in run.sources.items() if key not in overridden}
    return args


def set_by(args: argparse.Namespace, dest: str) -> str:
    """Where the value of option ``dest`` came from, for an error message: its key and line in
    the --config file, or its flag."""
    where = (getattr(args, "option_sources", None) or {}).get(dest)
    return where or "--" + ("max-steps" if dest == "steps" else dest.replace("_", "-"))


def read(path: str, train: argparse.ArgumentParser) -> RunConfig:
    """The values of the config file ``path`` for the options of the ``train`` parser."""
    data, lines = _load(path)

    def at(*keys: str) -> str:
        return f"{path}:{lines.get(keys) or lines.get(keys[:1], 1)}"

    actions = {action.dest: action for action in _options(train)}
    keys = _keys(actions.values())
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    located: dict[str, str] = {}  # dest -> "run.yaml:3"

    def put(dest: str, value: Any, *key: str) -> None:
        if dest in values:
            raise ConfigError(f"{at(*key)}: {'.'.join(key)} sets the same option as {sources[dest]}; keep one.")
        values[dest], located[dest] = value, at(*key)
        sources[dest] = f"{'.'.join(key)} at {located[dest]}"

    for key, value in data.items():
        if key in SECTIONS or key in RECORDED:
            continue
        if key not in keys:
            raise ConfigError(f"{at(key)}: unknown key {key!r}; {_closest(key, [*keys, *SECTIONS])}")
        action, as_option = keys[key]
        put(action.dest, _value(action, value, as_option, f"{at(key)}: {key}"), key)

    if "options" in data:
        from ..runs import RunOptions

        fields = [f.name for f in dataclasses.fields(RunOptions) if f.name in actions]
        section = _section(data, "options", at)
        for key, value in section.items():
            if key not in fields:
                raise ConfigError(f"{at('options', key)}: unknown key {'options.' + key!r} (its keys are "
                                  f"RunOptions fields); {_closest(key, fields)}")
            checked = _value(actions[key], value, False, f"{at('options', key)}: options.{key}")
            # A run.json records the step count its epochs gave: from the epochs it is the same count
            # for the same data, and the right one for other data or another batch size.
            if not (key == "steps" and section.get("epochs") is not None):
                put(key, checked, "options", key)

    for group in train._mutually_exclusive_groups:
        both = [a.dest for a in group._group_actions if values.get(a.dest) is not None]
        if len(both) > 1:
            raise ConfigError(f"{located[both[1]]}: {' and '.join(sources[d] for d in both)} "
                              "cannot both be given; keep one.")

    method_config = None
    if "config" in data:
        method_config = _method_section(data, at, values, sources, put)
    return RunConfig(values, sources, method_config)


def _method_section(data: dict, at, values: dict, sources: dict, put) -> dict[str, Any]:
    """The ``config`` section, checked: a known ``peft_type``, only that config's fields, none
    also set by an option of the file, and the file's method if it names one."""
    from .. import registry

    section = _section(data, "config", at)
    if "peft_type" not in section:
        raise ConfigError(f"{at('config')}: config needs a peft_type, one of "
                          f"{', '.join(repr(m.peft_type) for m in registry.METHODS)}.")
    try:
        method = registry.method_of_type(section["peft_type"])
    except ValueError as e:
        raise ConfigError(f"{at('config', 'peft_type')}: config.peft_type: {e}") from None
    fields = ["peft_type", *(f.name for f in dataclasses.fields(method.config_class) if f.name != "tokenizer")]
    for key in section:
        if key not in fields:
            raise ConfigError(f"{at('config', key)}: unknown key {'config.' + key!r} for {method.peft_type}; "
                              f"{_closest(key, fields)}")
        sources[f"config.{key}"] = f"config.{key} at {at('config', key)}"
    for dest, field in method.cli_options.items():
        if dest in values and field in section:
            raise ConfigError(f"{at('config', field)}: config.{field} sets the same as {sources[dest]}; keep one.")
    if values.get("method", method.name) != method.name:
        raise ConfigError(f"{at('config', 'peft_type')}: config.peft_type {method.peft_type!r} is not "
                          f"the {sources['method']} ({values['method']!r}); keep one.")
    if "method" not in values:
        put("method", method.name, "config", "peft_type")
    config = dict(section)
    # run_training filled it in from the model; left out, it follows --model when that changes.
    base, model = config.get("base_model_name_or_path"), data.get("model")
    if base is not None and model is not None and _same_path(base, model):
        del config["base_model_name_or_path"]
    return config


def _same_path(a: str, b: str) -> bool:
    """True when two --model values name one model (run.json keeps the folder resolved)."""
    from pathlib import Path

    return a == b or (Path(a).exists() and Path(a).resolve() == Path(b).resolve())


# -- what each option takes ----------------------------------------------------------------
def _options(train: argparse.ArgumentParser) -> list[argparse.Action]:
    """The train options a file may set (all but --help and --config)."""
    return [a for a in train._actions if a.option_strings and a.dest not in ("help", "config")]


def _keys(actions) -> dict[str, tuple[argparse.Action, bool]]:
    """File key -> (the action it sets, True when the key is a flag's name rather than the dest):
    ``no_eos: true`` is the flag --no-eos, ``add_eos: false`` the value it stores."""
    keys: dict[str, tuple[argparse.Action, bool]] = {}
    for action in actions:
        for option in action.option_strings:
            if option.startswith("--"):
                keys[option[2:].replace("-", "_")] = (action, True)
    for action in actions:
        keys.setdefault(action.dest, (action, False))
    return keys


def _allowed(action: argparse.Action) -> str:
    if action.nargs == 0:
        return "true or false"
    if action.choices is not None:
        what = "one of " + ", ".join(json.dumps(c) for c in action.choices)
    elif action.type is int:
        what = "an integer"
    elif action.type is float:
        what = "a number"
    elif action.dest in LISTS:
        what = "a string or a list of strings"
    else:
        what = "a string"
    return what + (" or null" if action.default is None and not action.required else "")


def _value(action: argparse.Action, value: Any, as_option: bool, where: str) -> Any:
    """``value`` as the option's flag would have set it; a ConfigError saying what the option
    takes otherwise. ``where`` is "run.yaml:3: batch_size"."""
    def refuse():
        return ConfigError(f"{where} must be {_allowed(action)}, got {_show(value)}.")

    if action.nargs == 0:  # a flag (store_true, store_false): the key's value says whether it is given
        if not isinstance(value, bool):
            raise refuse()
        return (action.const if value else action.default) if as_option else value
    if value is None:
        if action.default is None and not action.required:
            return None
        raise refuse()
    if action.type is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise refuse()
    elif action.type is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise refuse()
        try:
            value = float(value)  # what the flag gives: run.json then records 1.0 either way
        except OverflowError:
            raise refuse() from None
    elif action.type is None:
        if action.dest in LISTS and isinstance(value, list) and value and all(
                isinstance(v, str) and v and LISTS[action.dest] not in v for v in value):
            value = LISTS[action.dest].join(value)
        if not isinstance(value, str):
            raise refuse()
    else:
        raise AssertionError(f"no file rule for the type of --{action.dest}")
    if action.choices is not None and value not in action.choices:
        raise refuse()
    return value


def _show(value: Any) -> str:
    """A value as the file spells it (true, null, "eight")."""
    return json.dumps(value, default=repr)


def _closest(key: str, valid: list[str]) -> str:
    close = [OTHER_NAMES[key]] if OTHER_NAMES.get(key) in valid else difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if close:
        return f"did you mean {close[0]!r}?"
    nearest = difflib.get_close_matches(key, valid, n=1, cutoff=0.0)
    return (f"the closest valid key is {nearest[0]!r} (the keys are the options of `peftkit train --help`, "
            "with underscores).")


def _section(data: dict, name: str, at) -> dict:
    if not isinstance(data[name], dict):
        raise ConfigError(f"{at(name)}: {name} must be a mapping, got {_show(data[name])}.")
    return data[name]


def _config_path(argv: list[str]) -> str | None:
    """The FILE of ``train ... --config FILE`` (the last one, as argparse takes), or None."""
    if not argv or argv[0] != "train":
        return None
    path = None
    for i, token in enumerate(argv):
        if token == "--":
            break
        if token == "--config" and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            path = argv[i + 1]
        elif token.startswith("--config="):
            path = token[len("--config="):]
    return path


# -- reading the file, with the line of every key ------------------------------------------
def _load(path: str) -> tuple[dict, dict[tuple[str, ...], int]]:
    """The file's mapping and {key path: line} for the keys of it and of its nested mappings."""
    file = Path(path)
    suffix = file.suffix.lower()
    if suffix not in (".yaml", ".yml", ".json"):
        raise ConfigError(f"--config {path}: expected a .yaml, .yml or .json file.")
    try:
        text = file.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file.") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--config {path}: cannot be read ({getattr(e, 'strerror', None) or e}).") from None
    data, lines = _read_json(text, path) if suffix == ".json" else _read_yaml(text, path)
    if not isinstance(data, dict):
        kind = "nothing" if data is None else f"a {'list' if isinstance(data, list) else type(data).__name__}"
        raise ConfigError(f"{path}:1: a run config is a mapping of option: value (max_steps: 200), got {kind}.")
    return data, lines


@functools.cache
def _yaml_loader():
    import yaml

    class Loader(yaml.SafeLoader):
        """PyYAML's safe loader, reading 1e-4 as a number as YAML 1.2 and JSON do (YAML 1.1 wants 1.0e-4)."""

    Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                                 re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))
    return Loader


def _read_yaml(text: str, path: str) -> tuple[Any, dict[tuple[str, ...], int]]:
    import yaml

    loader = _yaml_loader()
    try:
        node = yaml.compose(text, Loader=loader)
        if node is None:
            return None, {}
        lines: dict[tuple[str, ...], int] = {}
        constructor = loader("")
        _yaml_lines(node, (), lines, path, constructor.construct_object)  # before merge keys are expanded
        return constructor.construct_document(node), lines
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        what = ", ".join(part for part in (e.context, e.problem) if part)
        raise ConfigError(f"{path}:{mark.line + 1}: not valid YAML: {what}.") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}.") from None


def _yaml_lines(node, prefix: tuple[str, ...], lines: dict, path: str, construct) -> None:
    import yaml

    if not isinstance(node, yaml.MappingNode):
        return
    for key_node, value_node in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: its keys take the line of the <<
            continue
        key, line = construct(key_node), key_node.start_mark.line + 1
        _record(key, line, prefix, lines, path)
        _yaml_lines(value_node, prefix + (key,), lines, path, construct)


def _record(key: Any, line: int, prefix: tuple[str, ...], lines: dict, path: str) -> None:
    if not isinstance(key, str):
        raise ConfigError(f"{path}:{line}: a key must be a name, got {_show(key)}.")
    if prefix + (key,) in lines:
        raise ConfigError(f"{path}:{line}: {'.'.join(prefix + (key,))} is given twice (also on line "
                          f"{lines[prefix + (key,)]}); keep one.")
    lines[prefix + (key,)] = line


_JSON = json.JSONDecoder()
_SPACE = json.decoder.WHITESPACE


def _read_json(text: str, path: str) -> tuple[Any, dict[tuple[str, ...], int]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}: not valid JSON: {e.msg} (column {e.colno}).") from None
    lines: dict[tuple[str, ...], int] = {}
    _json_lines(text, _SPACE.match(text, 0).end(), (), lines, path)
    return data, lines


def _json_lines(text: str, pos: int, prefix: tuple[str, ...], lines: dict, path: str) -> int:
    """Walk the JSON value at ``pos`` (already valid: json.loads read it), recording the line
    of every object key; return where the value ends. Strings are scanned by json's own
    ``scanstring`` and other values by its decoder, so escapes are read exactly as json reads them."""
    if not text.startswith("{", pos):
        return _JSON.raw_decode(text, pos)[1]
    pos = _SPACE.match(text, pos + 1).end()
    if text.startswith("}", pos):
        return pos + 1
    while True:
        line = text.count("\n", 0, pos) + 1
        key, pos = json.decoder.scanstring(text, pos + 1)
        _record(key, line, prefix, lines, path)
        pos = _SPACE.match(text, pos).end() + 1  # past the ':'
        pos = _json_lines(text, _SPACE.match(text, pos).end(), prefix + (key,), lines, path)
        pos = _SPACE.match(text, pos).end()
        if text.startswith("}", pos):
            return pos + 1
        pos = _SPACE.match(text, pos + 1).end()  # past the ','
