"""The command line through its real entry points."""

from __future__ import annotations

import subprocess
import sys


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "peftkit", *args], capture_output=True, text=True, timeout=600)


def test_demo_runs_end_to_end_and_reports(tmp_path):
    out = tmp_path / "demo"
    proc = run_cli("demo", "--steps", "40", "--base-steps", "60", "--no-progress", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    for line in ("trainable parameters", "task B held-out loss", "adapter on disk", "merged vs unmerged"):
        assert line in text
    assert "OK: the adapter reloads and merges" in text
    before, after = text.split("task B held-out loss")[1].split("nats")[0].split("->")
    assert float(after) < float(before)  # the adapter learned task B
    assert sorted(p.name for p in (out / "adapter").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


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
