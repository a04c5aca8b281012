"""`peftkit train | merge | info | generate` end to end through `python -m peftkit`, on a
reference-model folder and on random-weight transformers models saved to temporary folders."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import save_transformers_folder, tiny_bert, tiny_llama, tiny_reference, write_jsonl
from safetensors.torch import load_file

from peftkit.pretrain import task_lines

ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


def cli(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "peftkit", *map(str, args)], capture_output=True,
                          text=True, timeout=600, env=ENV)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tiny_reference().save_pretrained(root / "reference")
    save_transformers_folder(tiny_llama(), root / "llama")
    save_transformers_folder(tiny_bert(), root / "bert")
    completions = [{"prompt": line.rsplit(",", 1)[0] + ",", "completion": line.rsplit(",", 1)[1]}
                   for line in task_lines("B", 60, 0)]
    write_jsonl(root / "completion.jsonl", completions)
    write_jsonl(root / "text.jsonl", [{"text": line} for line in task_lines("A", 40, 0)])
    reviews = [{"text": f"the movie was {w}", "label": "fresh" if w == "good" else "rotten"}
               for w in ["good", "bad"] * 12]
    write_jsonl(root / "labels.jsonl", reviews)
    return root


def test_train_on_a_reference_folder_writes_run_log_and_adapter(folders, tmp_path):
    out = tmp_path / "run"
    proc = cli("train", "--model", folders / "reference", "--data", folders / "completion.jsonl",
               "--out", out, "--steps", 8, "--batch-size", 8, "--lr", 3e-3, "--checkpoint-every", 4,
               "--no-progress")
    assert "Training finished" in proc.stdout and "held-out accuracy" in proc.stdout
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 9))
    assert {"loss", "lr", "tokens", "seconds"} <= set(log[0])
    assert sorted(p.name for p in (out / "adapter").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(folders / "reference")
    # the same command again is refused; another run in the same folder is refused too
    again = cli("train", "--model", folders / "reference", "--data", folders / "completion.jsonl",
                "--out", out, "--steps", 8, "--batch-size", 8, "--lr", 3e-3, "--checkpoint-every", 4,
                "--no-progress", check=False)
    assert again.returncode == 2 and "--resume" in again.stderr
    other = cli("train", "--model", folders / "reference", "--data", folders / "text.jsonl",
                "--out", out, "--steps", 8, "--no-progress", check=False)
    assert other.returncode == 2 and "holds a different run" in other.stderr


def test_kill_9_and_resume_gives_the_uninterrupted_adapter(folders, tmp_path):
    args = ["--model", folders / "reference", "--data", folders / "completion.jsonl", "--steps", 30,
            "--batch-size", 4, "--lr", 3e-3, "--dropout", 0.1, "--checkpoint-every", 5, "--no-progress"]
    cli("train", *args, "--out", tmp_path / "whole")

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "peftkit", "train", *map(str, args), "--out", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    log = killed / "train_log.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:
        if log.is_file() and len(log.read_text().splitlines()) >= 13:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "adapter").exists()

    resumed = cli("train", *args, "--out", killed, "--resume")
    assert "resumed at step" in resumed.stdout
    whole = load_file(str(tmp_path / "whole" / "adapter" / "adapter_model.safetensors"))
    again = load_file(str(killed / "adapter" / "adapter_model.safetensors"))
    assert whole.keys() == again.keys()
    for key in whole:
        torch.testing.assert_close(again[key], whole[key], rtol=0, atol=0)
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert steps == list(range(1, 31))


def test_transformers_folder_train_merge_generate_info(folders, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "llama-run"
    cli("train", "--model", folders / "llama", "--data", folders / "text.jsonl", "--out", out,
        "--steps", 4, "--lr", 1e-2, "--no-progress")
    merged = tmp_path / "merged"
    proc = cli("merge", "--model", folders / "llama", "--adapter", out / "adapter", "--out", merged)
    assert "merged vs unmerged" in proc.stdout
    plain = AutoModelForCausalLM.from_pretrained(merged, local_files_only=True)
    assert not any("lora" in name for name, _ in plain.named_parameters())

    import peftkit
    from peftkit.loading import load_model

    loaded = load_model(folders / "llama")
    pm = peftkit.load(loaded.model, out / "adapter")
    ids = torch.tensor([loaded.encode("the movie was good")])
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, pm(input_ids=ids).logits, rtol=1e-5, atol=1e-5)

    gen = cli("generate", "--model", folders / "llama", "--adapter", out / "adapter", "--prompt", "the movie",
              "--max-new-tokens", 5)
    assert gen.stdout.startswith("the movie")
    info = cli("info", out / "adapter")
    assert "LORA" in info.stdout and "q_proj" in info.stdout and "parameters" in info.stdout


def test_merge_writes_bf16_shards_with_an_index_config_and_tokenizer(folders, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    cli("train", "--model", folders / "llama", "--data", folders / "text.jsonl", "--out", out,
        "--steps", 2, "--lr", 1e-2, "--no-progress")
    merged = tmp_path / "merged"
    proc = cli("merge", "--model", folders / "llama", "--adapter", out / "adapter", "--out", merged,
               "--dtype", "bf16", "--max-shard-size", "100KB")
    shards = sorted(merged.glob("model-*.safetensors"))
    assert len(shards) > 1 and f"{len(shards)} safetensors files" in proc.stdout and "bfloat16" in proc.stdout
    index = json.loads((merged / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    for shard in shards:
        assert shard.stat().st_size < 100_000 * 1.5  # one tensor may overshoot, not the whole model
        with safe_open(str(shard), "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert (merged / "config.json").is_file() and (merged / "tokenizer.json").is_file()
    plain = AutoModelForCausalLM.from_pretrained(merged, local_files_only=True)
    assert plain.dtype == torch.bfloat16
    bad = cli("merge", "--model", folders / "llama", "--adapter", out / "adapter", "--out", tmp_path / "m2",
              "--max-shard-size", "lots", check=False)
    assert bad.returncode == 2 and "lots" in bad.stderr and "Traceback" not in bad.stderr
    neither = cli("merge", "--model", folders / "llama", "--adapter", out / "adapter", check=False)
    assert neither.returncode == 2 and "--out NEW_FOLDER" in neither.stderr


def test_classification_reports_accuracy(folders, tmp_path):
    proc = cli("train", "--model", folders / "bert", "--data", folders / "labels.jsonl", "--out", tmp_path / "cls",
               "--steps", 3, "--eval-fraction", 0.25, "--no-progress")
    assert "classes ['fresh', 'rotten']" in proc.stdout and "held-out accuracy" in proc.stdout
    # The default LoRA rate of a 64-wide model (the 1e-3 cap), split LoRA+ style; the head at 1e-3.
    assert "at lr 0.001 (LoRA+: A 0.0005, B 0.008; trained in full 0.001)" in proc.stdout
    plain = cli("train", "--model", folders / "bert", "--data", folders / "labels.jsonl", "--out", tmp_path / "plain",
                "--steps", 1, "--lora-plus-ratio", 1, "--eval-limit", 2, "--no-progress")
    assert "at lr 0.001 (trained in full 0.001)" in plain.stdout
    assert "/ 2 held-out examples" in plain.stdout  # --eval-limit: the first 2 of the 6 held out
    assert "/ 6 held-out examples" in proc.stdout
    no_rows = cli("train", "--model", folders / "bert", "--data", folders / "labels.jsonl", "--out", tmp_path / "none",
                  "--eval-limit", 0, "--no-progress", check=False)
    assert no_rows.returncode == 2 and "(set by --eval-limit)" in no_rows.stderr and "positive integer" in no_rows.stderr
    refused = cli("train", "--model", folders / "bert", "--data", folders / "labels.jsonl", "--out", tmp_path / "no",
                  "--lora-plus-ratio", 0.5, "--no-progress", check=False)
    assert refused.returncode == 2 and "lora_plus_ratio must be a finite number >= 1" in refused.stderr
    assert "got 0.5" in refused.stderr and not (tmp_path / "no").exists()


def test_info_on_a_broken_folder_says_what_is_wrong(folders, tmp_path):
    out = tmp_path / "run"
    cli("train", "--model", folders / "reference", "--data", folders / "text.jsonl", "--out", out,
        "--steps", 1, "--no-progress")
    weights = out / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    proc = cli("info", out / "adapter", check=False)
    assert proc.returncode == 1 and "corrupt or truncated" in proc.stderr


@pytest.mark.parametrize("make,args,message", [
    (lambda d: None, ["--data", "{missing}"], "does not exist"),
    (lambda d: (d / "bad.jsonl").write_text('{"text": "a"}\n{"text": oops}\n'), ["--data", "{tmp}/bad.jsonl"], "line 2 is not valid JSON"),
    (lambda d: (d / "empty.jsonl").write_text("\n"), ["--data", "{tmp}/empty.jsonl"], "holds no examples"),
    (lambda d: (d / "nomodel").mkdir(), ["--model", "{tmp}/nomodel"], "no config.json"),
    (lambda d: None, ["--r", "4", "--method", "prompt"], "--r do(es) not apply to --method prompt"),
])
def test_bad_input_is_a_clear_error_and_writes_nothing(folders, tmp_path, make, args, message, capsys):
    from peftkit.cli import main

    make(tmp_path)
    base = {"--model": str(folders / "reference"), "--data": str(folders / "text.jsonl")}
    pairs = dict(zip(args[::2], args[1::2]))
    merged = {**base, **{k: v.format(tmp=tmp_path, missing=tmp_path / "missing.jsonl") for k, v in pairs.items()}}
    out = tmp_path / "out"
    flat = [x for kv in merged.items() for x in kv]
    try:  # in-process through the same main() the console script calls: five subprocesses cost 30 s
        code = main(["train", *flat, "--out", str(out), "--steps", "1", "--no-progress"])
    except SystemExit as e:
        code, message_out = e.code, str(e)
        assert message in message_out
    else:
        assert message in capsys.readouterr().err
    assert code not in (0, None)
    assert not out.exists()


def test_merge_refuses_a_folder_that_is_not_empty(folders, tmp_path):
    out = tmp_path / "run"
    cli("train", "--model", folders / "reference", "--data", folders / "text.jsonl", "--out", out,
        "--steps", 1, "--no-progress")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("x")
    proc = cli("merge", "--model", folders / "reference", "--adapter", out / "adapter", "--out", tmp_path / "taken", check=False)
    assert proc.returncode == 2 and "not empty" in proc.stderr
    assert (tmp_path / "taken" / "keep.txt").read_text() == "x"


def test_doctor_runs_before_the_first_step(folders, tmp_path):
    proc = cli("train", "--model", folders / "reference", "--data", folders / "text.jsonl", "--out", tmp_path / "low",
               "--steps", 1, "--lr", 1e-7, "--no-progress")
    assert "doctor warning M9" in proc.stderr  # a learning rate far below LoRA's floor


def test_doctor_error_stops_the_run_before_any_step(folders, tmp_path, capsys, monkeypatch):
    import peftkit.cli as cli_module
    from peftkit.doctor import DoctorReport, Finding

    planted = DoctorReport([Finding("M1", "error", "model.layers.0", "base weights are trainable.", "freeze them.")])
    # peftkit.doctor is the function (the public API); the module is in sys.modules.
    monkeypatch.setattr(sys.modules["peftkit.doctor"], "doctor", lambda *a, **k: planted)
    out = tmp_path / "stopped"
    code = cli_module.main(["train", "--model", str(folders / "reference"), "--data", str(folders / "text.jsonl"),
                            "--out", str(out), "--steps", "3", "--no-progress"])
    assert code == 1
    assert "stopped the run before the first step" in capsys.readouterr().err
    assert not (out / "adapter").exists() and (out / "train_log.jsonl").read_text() == ""


def test_compare_on_a_llama_7b_config_and_a_folder(folders, tmp_path, capsys):
    from transformers import LlamaConfig

    from peftkit.cli import main

    LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000).save_pretrained(tmp_path)
    assert main(["compare", "--config", str(tmp_path / "config.json")]) == 0
    lines = {line.split("  ")[1].strip(): line for line in capsys.readouterr().out.splitlines() if line.startswith("  ") and "  " in line[2:]}
    assert "4,194,304" in lines["LoRA r=8 (default targets)"]
    assert "2,621,440" in lines["prefix 10 tokens"]
    assert "81,920" in lines["prompt 20 tokens"]
    assert main(["compare", "--model", str(folders / "llama")]) == 0
    assert "adapter houlsby" in capsys.readouterr().out
    assert main(["compare", "--config", str(tmp_path / "nope.json")]) == 2


def test_merge_refuses_a_method_that_cannot_fold(folders, tmp_path):
    out = tmp_path / "prefix-run"
    cli("train", "--model", folders / "llama", "--data", folders / "text.jsonl", "--out", out, "--method", "prefix",
        "--virtual-tokens", 4, "--steps", 1, "--no-progress")
    proc = cli("merge", "--model", folders / "llama", "--adapter", out / "adapter", "--out", tmp_path / "m", check=False)
    assert proc.returncode == 2 and "only LoRA folds into the weights" in proc.stderr
    assert not (tmp_path / "m").exists()


def test_demo_on_your_own_model_and_data(folders, tmp_path):
    proc = cli("demo", "--model", folders / "llama", "--data", folders / "text.jsonl", "--steps", 2,
               "--out", tmp_path / "demo", "--no-progress")
    assert "LoRA r=8 all-linear" in proc.stdout and "A acc after" not in proc.stdout
    assert "OK: the adapter reloads and merges" in proc.stdout


def test_model_folder_without_weights_is_refused(folders, tmp_path, capsys):
    from peftkit.cli import main

    tiny_llama().config.save_pretrained(tmp_path / "noweights")
    code = main(["train", "--model", str(tmp_path / "noweights"), "--data", str(folders / "text.jsonl"),
                 "--out", str(tmp_path / "out"), "--steps", "1", "--no-progress"])
    assert code == 2 and "no weights" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_held_out_file_with_a_class_the_training_data_lacks(folders, tmp_path, capsys):
    """--eval-data replaces the random split; a label the model never trained on is named,
    and the run writes nothing."""
    from peftkit.cli import main

    held_out = write_jsonl(tmp_path / "held_out.jsonl", [{"text": "the movie was fine", "label": "fresh"},
                                                          {"text": "the movie was long", "label": "meh"}])
    args = ["train", "--model", str(folders / "bert"), "--data", str(folders / "labels.jsonl"),
            "--eval-data", str(held_out), "--out", str(tmp_path / "out"), "--steps", "1", "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "held-out file" in err and "labels ['meh'] are not among the classes ['fresh', 'rotten']" in err
    assert not (tmp_path / "out").exists()

    write_jsonl(held_out, [{"text": "the movie was fine", "label": "fresh"}])
    assert main(args) == 0
    assert "24 train / 1 held-out examples" in capsys.readouterr().out
