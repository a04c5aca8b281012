"""bench/gpu_check.py on the CPU: its --dry-run runs every stage at toy sizes (the plain
configuration is measured on both sides; any other either measured or skipped with its
reason), a spent budget skips every stage and says so, and a dry run never writes to
bench/results."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import gpu_check, harness

REPO = Path(__file__).resolve().parents[1]


def dry_run(out: Path, *extra: str) -> dict:
    cmd = [sys.executable, "-m", "bench.gpu_check", "--dry-run", "--out", str(out), *extra]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert (out / "gpu_check.md").read_text().startswith("# GPU check (dry run")
    return json.loads((out / "gpu_check.json").read_text())


def results_stamp():
    path = harness.RESULTS_DIR / "gpu_check.json"
    return path.stat().st_mtime_ns if path.exists() else None


def test_dry_run_measures_plain_and_gives_a_reason_for_anything_skipped(tmp_path):
    before = results_stamp()
    report = dry_run(tmp_path)
    assert results_stamp() == before  # bench/results untouched
    assert report["dry_run"] is True and report["setup"]["batch"] == 2 and report["setup"]["seq"] == 32
    rows = {row["config"]: row for row in report["configurations"]}
    assert list(rows) == list(gpu_check.CONFIGS)
    for name, row in rows.items():
        if row["status"] == "measured":
            for side in gpu_check.SIDES:
                cell = row["sides"][side]
                assert cell["tokens_per_s"] > 0 and cell["peak_mem_mib"] > 0, (name, side)
                assert cell["memory_measure"] == "VmHWM" and cell["adapter_dtypes"] == ["torch.float32"]
            assert row["tokens_per_s_ratio"] > 0 and row["peak_mem_ratio"] > 0
            assert set(row["targets"].values()) <= {True, False}
        else:
            assert row["status"] in ("skipped", "error") and row["reason"], name
    plain = rows["plain"]
    assert plain["status"] == "measured", plain.get("reason")
    assert plain["sides"]["peftkit"]["trainable_params"] == plain["sides"]["peft"]["trainable_params"] > 0
    assert "left out of a dry run" in report["tests"]["reason"]
    assert report["targets"].startswith(("met", "not met"))


def test_a_spent_budget_starts_nothing_and_says_what_was_skipped(tmp_path):
    report = dry_run(tmp_path, "--budget-s", "0")
    for row in report["configurations"]:
        assert row["status"] == "skipped" and "budget" in row["reason"], row
    assert "not measured: " + ", ".join(gpu_check.CONFIGS) in report["targets"]


def test_a_dry_run_refuses_to_write_to_bench_results():
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--dry-run", "--out", str(harness.RESULTS_DIR)])


def test_junit_counts(tmp_path):
    path = tmp_path / "junit.xml"
    path.write_text('<?xml version="1.0"?><testsuites><testsuite name="pytest" errors="1" failures="2" '
                    'skipped="3" tests="10"></testsuite></testsuites>')
    assert gpu_check.parse_junit(path) == {"passed": 4, "failed": 2, "errors": 1, "skipped": 3, "total": 10}
