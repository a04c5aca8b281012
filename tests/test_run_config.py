"""`peftkit train --config FILE`: YAML and JSON run configs, flags over the file, a run.json
as a config, and the file's mistakes as one error line naming the file and line."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from helpers import reference_run_inputs
from peftkit import cli
from peftkit.cli import build_parser
from peftkit.cli.run_config import ConfigError, parse_args


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("run-config")
    reference_run_inputs(root)
    return root


def train(capsys, *argv):
    """(exit code, captured stdout and stderr) of `peftkit train ARGV`, in this process."""
    code = cli.main(["train", *map(str, argv), "--no-progress"])
    return code, capsys.readouterr()


def identity(out):
    return json.loads((out / "run.json").read_text())


def same_adapter(a, b) -> bool:
    first, second = (load_file(out / "adapter" / "adapter_model.safetensors") for out in (a, b))
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def one_error(code: int, captured) -> str:
    """The single ``error:`` line of a refused run (exit 2, no traceback)."""
    err = captured.err
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


YAML_RUN = """\
# LoRA on the reference decoder
model: {model}
data: {data}
max_steps: 3
batch_size: 4
lr: 3e-3            # YAML 1.1 reads 3e-3 as a string; peftkit reads it as JSON does
r: 4
targets: [q, v]     # or "q,v", as the flag takes it
no_eos: true
train_on: last
checkpoint_every: 2
pack: true
"""


def json_run(folders) -> str:
    return json.dumps({
        "model": str(folders / "reference"), "data": str(folders / "data.jsonl"), "method": "prompt",
        "virtual_tokens": 4, "init": "text", "init_text": "ada had", "epochs": 1, "lr": 3e-3, "seed": 3,
        "pack": False, "eval_fraction": 0.2}, indent=2)


@pytest.fixture(scope="module")
def yaml_run(folders):
    """(the config file, the --out folder) of a finished run from a YAML config."""
    config = folders / "run.yaml"
    config.write_text(YAML_RUN.format(model=folders / "reference", data=folders / "data.jsonl"))
    assert cli.main(["train", "--config", str(config), "--out", str(folders / "yaml-run"), "--no-progress"]) == 0
    return config, folders / "yaml-run"


@pytest.fixture(scope="module")
def json_run_out(folders):
    config = folders / "run.json"
    config.write_text(json_run(folders))
    assert cli.main(["train", "--config", str(config), "--out", str(folders / "json-run"), "--no-progress"]) == 0
    return folders / "json-run"


def test_a_yaml_config_trains_the_run_it_describes(folders, yaml_run):
    run = identity(yaml_run[1])
    assert run["model"] == str(folders / "reference") and run["data"] == str(folders / "data.jsonl")
    assert (run["config"]["peft_type"], run["config"]["r"], run["config"]["target_modules"]) == ("LORA", 4, ["q", "v"])
    options = run["options"]
    assert (options["steps"], options["batch_size"], options["lr"]) == (3, 4, 3e-3)
    assert (options["add_eos"], options["train_on"], options["checkpoint_every"]) == (False, "last", 2)
    assert (yaml_run[1] / "adapter" / "adapter_model.safetensors").is_file()


def test_a_json_config_trains_the_run_it_describes(json_run_out):
    run = identity(json_run_out)
    assert run["config"]["peft_type"] == "PROMPT_TUNING"
    assert (run["config"]["num_virtual_tokens"], run["config"]["init"], run["config"]["init_text"]) == \
        (4, "text", "ada had")
    options = run["options"]
    assert (options["epochs"], options["lr"], options["seed"], options["pack"]) == (1.0, 3e-3, 3, False)
    assert options["eval_fraction"] == 0.2 and options["batch_size"] == 8  # the default
    assert (json_run_out / "adapter" / "adapter_model.safetensors").is_file()


def test_flags_on_the_command_line_override_the_file(yaml_run, tmp_path, capsys):
    out = tmp_path / "out"
    code, captured = train(capsys, "--config", yaml_run[0], "--out", out,
                           "--max-steps", 2, "--r", 2, "--lr", 1e-3, "--train-on", "assistant")
    assert code == 0, captured.err
    run, file_run = identity(out), identity(yaml_run[1])
    assert run["options"] == {**file_run["options"], "steps": 2, "lr": 1e-3, "train_on": "assistant"}
    assert run["config"] == {**file_run["config"], "r": 2}


def test_a_flag_equal_to_the_default_still_overrides_the_file(tmp_path):
    """--checkpoint-every 50 is the default, and still beats the file's 2; --epochs on the
    command line replaces the file's max_steps (the two exclude each other)."""
    path = tmp_path / "run.yaml"
    path.write_text("model: m\ndata: d\nout: o\nmax_steps: 3\ncheckpoint_every: 2\npack: true\nadd_eos: false\n")
    args = parse_args(build_parser(), ["train", "--config", str(path), "--checkpoint-every", "50", "--epochs", "2"])
    assert (args.checkpoint_every, args.epochs, args.steps) == (50, 2.0, None)
    assert (args.pack, args.add_eos, args.model, args.batch_size) == (True, False, "m", 8)
    assert args.option_sources["pack"] == f"pack at {path}:6"
    assert "checkpoint_every" not in args.option_sources and "steps" not in args.option_sources


@pytest.mark.parametrize("which", ["yaml-run", "json-run"])
def test_a_finished_runs_run_json_is_a_config_for_the_same_adapter(request, tmp_path, capsys, which):
    """LoRA for a number of steps, and a prompt initialised from text for one epoch (run.json
    records the steps that epoch took; the rerun takes the epoch again)."""
    first = request.getfixturevalue("yaml_run")[1] if which == "yaml-run" else request.getfixturevalue("json_run_out")
    second = tmp_path / "second"
    code, captured = train(capsys, "--config", first / "run.json", "--out", second)
    assert code == 0, captured.err
    assert identity(second) == identity(first)
    assert same_adapter(first, second)  # bit for bit
    assert json.loads((second / "adapter" / "adapter_config.json").read_text()) == \
        json.loads((first / "adapter" / "adapter_config.json").read_text())


def test_a_run_json_with_a_flag_is_that_run_changed_by_the_flag(json_run_out, tmp_path, capsys):
    code, captured = train(capsys, "--config", json_run_out / "run.json", "--out", tmp_path / "out",
                           "--virtual-tokens", 2, "--max-steps", 1)
    assert code == 0, captured.err
    before, after = identity(json_run_out), identity(tmp_path / "out")
    assert after["config"] == {**before["config"], "num_virtual_tokens": 2}
    assert after["options"] == {**before["options"], "steps": 1, "epochs": None}  # --max-steps replaces epochs


def test_config_with_resume_continues_the_same_run(yaml_run, tmp_path, capsys):
    """A run started from a config file resumes from it, and from its own run.json; both end
    with the adapter of the uninterrupted run."""
    config, finished = yaml_run
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    for source in (config, out / "run.json"):
        shutil.rmtree(out / "adapter")  # as if killed after the checkpoint of step 2
        code, captured = train(capsys, "--config", source, "--out", out, "--resume")
        assert code == 0, captured.err
        assert "(resumed at step 2)" in captured.out
        assert same_adapter(out, finished)
    shutil.rmtree(out / "adapter")
    error = one_error(*train(capsys, "--config", config, "--out", out, "--resume", "--batch-size", 2))
    assert "holds a different run" in error and "options" in error


# -- the file's mistakes ----------------------------------------------------------------------
@pytest.mark.parametrize("fmt,text,line,message", [
    ("yaml", "model: m\ndata: d\nbatchsize: 4\n", 3, "unknown key 'batchsize'; did you mean 'batch_size'?"),
    ("yaml", "model: m\n\nmax-steps: 4\n", 3, "unknown key 'max-steps'; did you mean 'max_steps'?"),
    ("yaml", "model: m\nzzqx: 1\n", 2, "unknown key 'zzqx'; the closest valid key is "),
    ("json", '{\n  "model": "m",\n  "learning_rate": 0.1\n}\n', 3, "unknown key 'learning_rate'; did you mean 'lr'?"),
    ("json", '{\n  "model": "m",\n\n  "bach_size": 1}', 4, "unknown key 'bach_size'; did you mean 'batch_size'?"),
    ("json", '{"model": "m",\n "options": {\n   "lr": 0.1,\n   "batchsize": 4}}', 4,
     "unknown key 'options.batchsize' (its keys are RunOptions fields); did you mean 'batch_size'?"),
    ("yaml", "model: m\nconfig:\n  peft_type: LORA\n  rank: 4\n", 4,
     "unknown key 'config.rank' for LORA; did you mean 'r'?"),
])
def test_an_unknown_key_names_itself_the_closest_key_and_its_line(tmp_path, capsys, fmt, text, line, message):
    path = tmp_path / f"run.{fmt}"
    path.write_text(text)
    out = tmp_path / "out"
    error = one_error(*train(capsys, "--config", path, "--out", out))
    assert error.startswith(f"error: {path}:{line}: {message}"), error
    assert not out.exists()


@pytest.mark.parametrize("text,message", [
    ('batch_size: "8"', 'batch_size must be an integer, got "8".'),
    ("batch_size: true", "batch_size must be an integer, got true."),
    ("batch_size: 8.0", "batch_size must be an integer, got 8.0."),
    ("batch_size: null", "batch_size must be an integer, got null."),
    ("lr: fast", 'lr must be a number or null, got "fast".'),
    ("lr: false", "lr must be a number or null, got false."),
    ("train_on: every", 'train_on must be one of "assistant", "last", "all", got "every".'),
    ("pack: yes please", 'pack must be true or false, got "yes please".'),
    ("no_eos: 1", "no_eos must be true or false, got 1."),
    ("out: 5", "out must be a string, got 5."),
    ("targets: [q, 3]", 'targets must be a string or a list of strings or null, got ["q", 3].'),
    ("method: lorax", 'method must be one of "lora", "adapter", "prefix", "prompt", got "lorax".'),
])
def test_a_value_of_the_wrong_type_names_the_key_its_line_and_what_it_takes(tmp_path, capsys, text, message):
    path = tmp_path / "run.yaml"
    path.write_text(f"model: m\ndata: d\n{text}\n")
    out = tmp_path / "out"
    error = one_error(*train(capsys, "--config", path, "--out", out))
    assert error == f"error: {path}:3: {message}"
    assert not out.exists()


def test_a_wrong_type_in_a_json_section_names_its_line(tmp_path, capsys):
    path = tmp_path / "run.json"
    path.write_text('{\n  "model": "m",\n  "options": {\n    "seed": 0,\n    "pack": "true"\n  }\n}\n')
    error = one_error(*train(capsys, "--config", path, "--out", tmp_path / "out"))
    assert error == f'error: {path}:5: options.pack must be true or false, got "true".'


def test_a_value_out_of_range_names_the_key_and_line_that_set_it(folders, tmp_path, capsys):
    path = tmp_path / "run.yaml"
    base = f"model: {folders / 'reference'}\ndata: {folders / 'data.jsonl'}\n"
    path.write_text(base + "max_steps: 0\n")
    error = one_error(*train(capsys, "--config", path, "--out", tmp_path / "out"))
    assert error.endswith(f"(set by max_steps at {path}:3)")
    path.write_text(base + "r: 0\n")
    error = one_error(*train(capsys, "--config", path, "--out", tmp_path / "out"))
    assert "LoraConfig.r must be a positive integer" in error and error.endswith(f"(set by r at {path}:3)")
    path.write_text(base + "method: prompt\nr: 4\n")
    error = one_error(*train(capsys, "--config", path, "--out", tmp_path / "out"))
    assert error == f"error: r at {path}:4 do(es) not apply to --method prompt."


@pytest.mark.parametrize("fmt,text,what", [
    ("yaml", "- model: m\n- data: d\n", "got a list"),
    ("yaml", "just words\n", "got a str"),
    ("yaml", "# only a comment\n", "got nothing"),
    ("json", "[1, 2]", "got a list"),
    ("json", '"model"', "got a str"),
])
def test_a_config_that_is_not_a_mapping_is_refused(tmp_path, capsys, fmt, text, what):
    path = tmp_path / f"run.{fmt}"
    path.write_text(text)
    error = one_error(*train(capsys, "--config", path, "--out", tmp_path / "out"))
    assert error == f"error: {path}:1: a run config is a mapping of option: value (max_steps: 200), {what}."


@pytest.mark.parametrize("name,text,message", [
    ("run.yaml", "model: m\nr: [4\n", ":3: not valid YAML: "),
    ("run.yaml", "model: m\n---\ndata: d\n", ":2: not valid YAML: expected a single document"),
    ("run.json", '{"model": "m",\n "r": 4,\n}', ":3: not valid JSON: "),
    ("run.yaml", "model: m\nr: 4\nr: 8\n", ":3: r is given twice (also on line 2); keep one."),
    ("run.json", '{"model": "m",\n "r": 4,\n "r": 8}', ":3: r is given twice (also on line 2); keep one."),
    ("run.yaml", "model: m\nsteps: 4\nmax_steps: 4\n", ":3: max_steps sets the same option as steps at "),
    ("run.yaml", "model: m\nmax_steps: 4\nepochs: 1\n", ":3: max_steps at "),
    ("run.yaml", "model: m\n1: 4\n", ":2: a key must be a name, got 1."),
    ("run.yaml", "model: m\nr: !!python/object:os.system x\n", ":2: not valid YAML: "),
    ("run.yaml", "model: m\nconfig:\n  r: 4\n", ":2: config needs a peft_type"),
    ("run.yaml", "model: m\nconfig:\n  peft_type: LORA\n  r: 4\nr: 8\n",
     ":4: config.r sets the same as r at "),
    ("run.yaml", "method: prompt\nconfig:\n  peft_type: LORA\n", ":3: config.peft_type 'LORA' is not the method at "),
    ("run.yaml", "model: m\noptions: 3\n", ":2: options must be a mapping, got 3."),
])
def test_a_malformed_file_is_one_error_line_with_the_file_and_line(tmp_path, capsys, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    out = tmp_path / "out"
    error = one_error(*train(capsys, "--config", path, "--out", out))
    assert error.startswith(f"error: {path}") and message in error, error
    assert not out.exists()


def test_a_missing_config_file_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    error = one_error(*train(capsys, "--config", tmp_path / "nope.yaml", "--out", out))
    assert error == f"error: --config {tmp_path / 'nope.yaml'}: no such file."
    error = one_error(*train(capsys, "--config", tmp_path, "--out", out))  # a folder
    assert error == f"error: --config {tmp_path}: expected a .yaml, .yml or .json file."
    (tmp_path / "run.toml").write_text("model = 'm'\n")
    error = one_error(*train(capsys, "--config", tmp_path / "run.toml", "--out", out))
    assert error == f"error: --config {tmp_path / 'run.toml'}: expected a .yaml, .yml or .json file."
    (tmp_path / "dir.yaml").mkdir()
    error = one_error(*train(capsys, "--config", tmp_path / "dir.yaml", "--out", out))
    assert error.startswith(f"error: --config {tmp_path / 'dir.yaml'}: cannot be read")
    assert not out.exists()


def test_options_the_file_does_not_give_are_still_required(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("model: m\ndata: d\n")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "--config", str(path)])
    assert exit_.value.code == 2
    assert "the following arguments are required: --out" in capsys.readouterr().err


def test_an_abbreviated_config_flag_is_refused_rather_than_ignored(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("batch_size: 4\n")
    with pytest.raises(ConfigError, match="write --config in full"):
        parse_args(build_parser(), ["train", "--model", "m", "--data", "d", "--out", "o", "--conf", str(path)])


def test_json_key_lines_are_exact_around_tricky_strings(tmp_path):
    """Braces, quotes, colons and escaped newlines inside strings do not move a key's line."""
    path = tmp_path / "run.json"
    path.write_text('{"init_text": "a {\\"b\\": [1,\\n2]} \\u00e9 }",\n'
                    '  "targets": "q,v", "data": "d:{x}",\n\n'
                    '  "config": {"peft_type": "PROMPT_TUNING",\n'
                    '     "num_virtual_tokens": 4, "modules_to_save": [{"a": 1}, "}"],\n'
                    '     "init": "text"}, "model": "m"}')
    args = parse_args(build_parser(), ["train", "--config", str(path), "--out", "o"])
    assert args.init_text == 'a {"b": [1,\n2]} \u00e9 }'
    assert args.option_sources["targets"] == f"targets at {path}:2"
    assert args.option_sources["data"] == f"data at {path}:2"
    assert args.option_sources["model"] == f"model at {path}:6"
    assert args.option_sources["config.num_virtual_tokens"] == f"config.num_virtual_tokens at {path}:5"
    assert args.option_sources["config.init"] == f"config.init at {path}:6"
    assert args.method == "prompt" and args.method_config["modules_to_save"] == [{"a": 1}, "}"]


def test_train_help_documents_the_config_file(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--config FILE" in text and "run.json is a config too" in text and "max_steps: 200" in text


def test_a_bad_field_in_the_config_section_names_its_line(folders, tmp_path, capsys):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"model": str(folders / "reference"), "data": str(folders / "data.jsonl")})[:-1]
                    + ',\n "config": {"peft_type": "LORA",\n   "bias": "all"}}')
    error = one_error(*train(capsys, "--config", path, "--out", tmp_path / "out"))
    assert "LoraConfig.bias must be one of" in error and error.endswith(f"(set by config.bias at {path}:3)")
    assert not (tmp_path / "out").exists()
