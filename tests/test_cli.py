"""The command line through its real entry points."""

from __future__ import annotations

import subprocess
import sys

import pytest


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "peftkit", *args], capture_output=True, text=True, timeout=600)


def test_demo_runs_end_to_end_and_reports(tmp_path):
    out = tmp_path / "demo"
    proc = run_cli("demo", "--steps", "12", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    # Every phase that takes time shows a progress bar, and no dependency warns on the screen.
    for phase in ("base model: held-out task B", "base model: task A", "LoRA r=8 all-linear: held-out task B",
                  "prompt 10 tokens: task A (forgetting)", "LoRA: reload, merge, save, read back"):
        assert phase in proc.stderr, phase
    assert "Warning" not in proc.stderr, proc.stderr
    text = proc.stdout
    for method in ("full fine-tuning", "LoRA r=8 all-linear", "adapter pfeiffer", "prefix 10 tokens", "prompt 10 tokens"):
        assert method in text
    for column in ("trainable", "peak RSS", "B acc before -> after", "A acc after", "on disk"):
        assert column in text
    assert "OK: the adapter reloads and merges" in text
    lora_row = next(line for line in text.splitlines() if "LoRA r=8 all-linear" in line)
    before, after = _accuracies(lora_row)
    assert after > before  # LoRA learned task B within the budget
    lora_folder = next(p for p in out.iterdir() if p.name.startswith("case-1"))
    assert sorted(p.name for p in lora_folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def _accuracies(row: str) -> tuple[float, float]:
    before, after = row.split("->")
    return float(before.split()[-1].rstrip("%")), float(after.split()[0].rstrip("%"))


def test_demo_refuses_a_non_empty_out_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("user data")
    proc = run_cli("demo", "--steps", "1", "--out", str(tmp_path))
    assert proc.returncode == 2
    assert "not empty" in proc.stderr
    assert (tmp_path / "keep.txt").read_text() == "user data"


def test_unknown_command_and_flag_fail_clearly():
    proc = run_cli("tune")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr
    proc = run_cli("demo", "--rank", "8")
    assert proc.returncode == 2 and "unrecognized arguments: --rank" in proc.stderr


def test_console_script_and_module_entry_points_agree():
    from pathlib import Path

    script = Path(sys.executable).parent / "peftkit"
    assert script.exists(), "the peftkit console script is installed by `pip install -e .`"
    by_script = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    by_module = run_cli("--help")
    assert by_script.returncode == by_module.returncode == 0
    assert by_script.stdout.replace("peftkit", "") == by_module.stdout.replace("peftkit", "")
    assert "demo" in by_script.stdout


def test_init_options_reach_the_prompt_and_the_prefix():
    """--init/--init-text set how a prompt or a prefix starts (--prompt-init is the old name);
    a prefix left alone is decided when attached (tests/methods/test_prefix.py)."""
    from peftkit.cli import build_parser
    from peftkit.cli.training import _method_config

    class Tokenizer:
        def encode(self, text):
            return [1, 2, 3]

    def config(*argv):
        args = build_parser().parse_args(["train", "--model", "m", "--data", "d", "--out", "o", *argv])
        return _method_config(args, Tokenizer())

    prefix = config("--method", "prefix", "--init", "text", "--init-text", "Review sentiment:")
    assert (prefix.init, prefix.init_text) == ("text", "Review sentiment:") and prefix.tokenizer is not None
    assert config("--method", "prefix").init is None  # decided by the model when attached
    assert config("--method", "prefix", "--projection-dim", "8").init == "random"
    assert config("--method", "prompt", "--prompt-init", "vocab").init == "vocab"
    with pytest.raises(ValueError, match="--init-text do\\(es\\) not apply to --method lora"):
        config("--method", "lora", "--init-text", "x")


def test_building_the_reference_base_shows_its_progress(tmp_path, monkeypatch, capsys):
    from peftkit import loading, pretrain

    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path))
    monkeypatch.setattr(pretrain, "BASE_STEPS", 2)
    folder = loading.reference_base(progress=True)
    assert (folder / "model.safetensors").is_file()
    assert "base model (task A)" in capsys.readouterr().err


def test_train_preflight_prints_the_doctors_notes(capsys, monkeypatch):
    """A probe the doctor could not run is said on screen, not passed over in silence."""
    from peftkit.cli import training
    from peftkit.doctor import DoctorReport

    # peftkit.doctor is both the package and, on peftkit, the function: patch the package's.
    monkeypatch.setattr(sys.modules["peftkit.doctor"], "doctor",
                        lambda *a, **k: DoctorReport([], ["M11 probe could not run: no mask"]))
    training._doctor_preflight(object(), None, None)
    assert "doctor note: M11 probe could not run: no mask" in capsys.readouterr().err


def test_merge_exits_non_zero_when_the_merged_model_differs(tmp_path, monkeypatch, capsys):
    """`peftkit merge` checks its own output; a merged model that computes something else is
    an error (exit 1), not a line of numbers and exit 0."""
    import torch

    from peftkit import cli
    from peftkit.model import PeftModel

    adapter = tmp_path / "adapter"
    assert cli.main(["train", "--model", "reference", "--data", str(_tiny_data(tmp_path)), "--steps", "1",
                     "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    adapter = tmp_path / "run" / "adapter"
    real_merge = PeftModel.merge_and_unload

    def broken_merge(self, dtype=None):
        model = real_merge(self, dtype)
        with torch.no_grad():
            next(model.parameters()).add_(0.5)  # what a wrong merge would do
        return model

    monkeypatch.setattr(PeftModel, "merge_and_unload", broken_merge)
    code = cli.main(["merge", "--model", "reference", "--adapter", str(adapter), "--out", str(tmp_path / "merged")])
    assert code == 1
    assert "differ from the adapter's" in capsys.readouterr().err


def _tiny_data(folder):
    path = folder / "data.jsonl"
    path.write_text("".join('{"text": "ada has %d cups."}\n' % i for i in range(16)))
    return path
