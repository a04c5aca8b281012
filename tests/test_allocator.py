"""``peftkit.allocator``: glibc set for training keeps a freed activation buffer for the next
step instead of unmapping it, so a repeated step stops page-faulting; the user's own glibc
settings, or PEFTKIT_MALLOC=default, leave it alone; ``peftkit train`` sets it."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="the settings are glibc's")

# One "step": a 64 MB buffer allocated, written and freed, as an activation is; the page
# faults of each of 8 steps, in a fresh process whose allocator is set by the first argument.
STEPS = '''
import resource, sys, torch
from peftkit.allocator import tune_for_training
tuned = tune_for_training() if sys.argv[1] == "tune" else False
def step():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buffer = torch.empty(64 << 20, dtype=torch.uint8)
    buffer.fill_(1)
    del buffer
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(tuned, *[step() for _ in range(8)])
'''
PAGES = (64 << 20) // os.sysconf("SC_PAGE_SIZE")


def faults(how: str, **env) -> tuple[bool, list[int]]:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("MALLOC_") and k not in ("PEFTKIT_MALLOC", "GLIBC_TUNABLES")}
    out = subprocess.run([sys.executable, "-c", STEPS, how], capture_output=True, text=True, check=True,
                         env={**clean, **env}).stdout.split()
    return out[0] == "True", [int(n) for n in out[1:]]


def test_tuned_glibc_stops_faulting_in_a_freed_buffer_every_step():
    tuned, steps = faults("tune")
    assert tuned
    default_was, default = faults("leave")
    assert not default_was
    assert min(default[4:]) > PAGES * 0.9  # glibc's default: mapped afresh, every page faulted, every step
    assert sum(steps[4:]) < PAGES * 0.1  # tuned: once the heap has grown, the same pages again


def test_the_users_own_glibc_settings_or_the_opt_out_are_left_alone():
    assert faults("tune", MALLOC_MMAP_THRESHOLD_="1048576")[0] is False
    assert faults("tune", GLIBC_TUNABLES="glibc.malloc.trim_threshold=1000000")[0] is False
    assert faults("tune", PEFTKIT_MALLOC="default")[0] is False
    assert faults("tune", MALLOC_ARENA_MAX="2")[0] is True  # another glibc setting: not the user's choice of these


def test_peftkit_train_sets_it_for_its_own_process_once_the_model_is_loaded(monkeypatch, tmp_path):
    from helpers import tiny_reference, write_jsonl

    from peftkit import allocator
    from peftkit.cli import main

    folder, data = tmp_path / "reference", tmp_path / "train.jsonl"
    tiny_reference().save_pretrained(folder)
    write_jsonl(data, [{"text": "ab ab ab"}] * 4)
    calls = []
    monkeypatch.setattr(allocator, "tune_for_training", lambda: calls.append(1) or True)
    monkeypatch.setattr("peftkit.runs.run_training", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):  # stopped where training would start
        main(["train", "--model", str(folder), "--data", str(data), "--out", str(folder / "out")])
    assert calls == [1]
