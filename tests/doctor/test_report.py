"""The doctor's report (text, JSON, ids), its registry of checks by mistake id, its public
names, and the command line that prints it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import save_transformers_folder, tiny_llama
from doctor_setups import adamw, hand_lora_model

import peftkit
from peftkit.doctor import CHECKS, MISTAKES, DoctorReport, Finding, doctor


def test_report_ok_table_and_json_round_trip():
    model = hand_lora_model(scale=False)
    report = doctor(model, adamw(model))
    assert not report.ok and "M3" in report.ids("error")
    text = str(report)
    assert text.startswith("peftkit doctor: 1 error")
    assert "M3" in text and "layers.0.attn.q" in text and "fix" in text
    data = json.loads(report.to_json())
    assert data["ok"] is False and {f["id"] for f in data["findings"]} == report.ids()
    assert DoctorReport.from_json(report.to_json()) == report
    assert DoctorReport().ok and "no mistake found" in str(DoctorReport())
    with pytest.raises(ValueError):
        Finding("M13", "error", "x", "y", "z")




def test_checks_are_registered_by_mistake_id_in_order():
    assert list(CHECKS) == [f"M{i}" for i in range(1, 13)] == list(MISTAKES)
    assert all(callable(check) for check in CHECKS.values())
    assert CHECKS["M10"].__name__ == "check_m10"


def test_public_names_are_the_function_and_the_report_types():
    assert peftkit.doctor is doctor
    assert peftkit.DoctorReport is DoctorReport and peftkit.Finding is Finding


# -- the command line -------------------------------------------------------------------
def test_cli_doctor_on_a_saved_llama_with_adapter_and_planted_checkpoint(tmp_path, capsys):
    from safetensors.torch import save_file

    from peftkit.cli import main

    folder = save_transformers_folder(tiny_llama(), tmp_path / "llama")
    pm = peftkit.attach(tiny_llama(), peftkit.LoraConfig(r=4))
    pm.save(tmp_path / "adapter")
    full = tmp_path / "full.safetensors"
    save_file({k: v.contiguous() for k, v in pm.state_dict().items()}, str(full))
    capsys.readouterr()

    assert main(["doctor", "--model", str(folder), "--adapter", str(tmp_path / "adapter")]) == 0
    assert capsys.readouterr().out.startswith("peftkit doctor: 0 errors")
    assert main(["doctor", "--model", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    # The real entry point, once: a planted whole-model checkpoint is an error, exit code 1.
    planted = subprocess.run([sys.executable, "-m", "peftkit", "doctor", "--model", str(folder), "--adapter",
                              str(tmp_path / "adapter"), "--checkpoint", str(full), "--json"],
                             capture_output=True, text=True, timeout=300)
    assert planted.returncode == 1, planted.stderr
    data = json.loads(planted.stdout)
    assert data["ok"] is False and "M10" in {f["id"] for f in data["findings"] if f["severity"] == "error"}
