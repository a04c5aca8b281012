"""Crash safety of written files: after a failure or a ``kill -9`` at any step, a folder holds
its old set of files or its new one (once a peftkit reader has looked), never a mix."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import peftkit
from peftkit.formats import atomic

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
OLD = {CONFIG_NAME: b'{"old": 1}', WEIGHTS_NAME: b"old weights"}
NEW = {CONFIG_NAME: b'{"new": 2}', WEIGHTS_NAME: b"new weights, longer"}
# The os functions the protocol calls at each of its steps: a failure (or a kill) is tried
# at every call of any of them.
STEPS = ("mkdir", "fsync", "replace", "rename", "rmdir", "unlink")


def contents(directory: Path) -> dict[str, bytes]:
    """The files a peftkit reader sees (after it completed any interrupted write)."""
    atomic.recover_folder(directory)
    return {p.name: p.read_bytes() for p in directory.iterdir() if not p.name.startswith(".")}


def fail_at(monkeypatch, call: int) -> None:
    """Make the ``call``-th use of any of the STEPS raise OSError."""
    calls = {"n": 0}

    def wrap(real):
        def flaky(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == call:
                raise OSError(f"simulated failure at step {call}")
            return real(*args, **kwargs)
        return flaky

    for name in STEPS:
        monkeypatch.setattr(atomic.os, name, wrap(getattr(os, name)))


def test_a_new_folder_appears_whole_with_the_usual_modes(tmp_path):
    atomic.write_folder(tmp_path / "runs" / "adapter", NEW)
    assert contents(tmp_path / "runs" / "adapter") == NEW
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["adapter"]
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "runs" / "adapter").stat().st_mode & 0o777 == 0o777 & ~umask
    assert (tmp_path / "runs" / "adapter" / CONFIG_NAME).stat().st_mode & 0o777 == 0o666 & ~umask


def test_replacing_keeps_the_other_files_and_leaves_nothing_behind(tmp_path):
    atomic.write_folder(tmp_path / "adapter", OLD)
    (tmp_path / "adapter" / "README.md").write_text("my notes")
    atomic.write_folder(tmp_path / "adapter", NEW)
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["README.md", CONFIG_NAME, WEIGHTS_NAME]
    assert contents(tmp_path / "adapter") == {**NEW, "README.md": b"my notes"}


def test_a_failure_at_any_step_of_a_replacement_leaves_the_old_or_the_new_set(tmp_path, monkeypatch):
    outcomes = []
    for call in range(1, 100):
        directory = tmp_path / f"try-{call}"
        atomic.write_folder(directory, OLD)
        (directory / "README.md").write_text("my notes")
        fail_at(monkeypatch, call)
        try:
            atomic.write_folder(directory, NEW)
            finished = True
        except OSError as e:
            assert "simulated" in str(e)
            finished = False
        monkeypatch.undo()
        seen = contents(directory)
        assert seen.pop("README.md") == b"my notes"
        assert seen in (OLD, NEW), (call, seen)
        outcomes.append("new" if seen == NEW else "old")
        atomic.write_folder(directory, NEW)  # the next write clears what the failed one left
        assert sorted(p.name for p in directory.iterdir()) == ["README.md", CONFIG_NAME, WEIGHTS_NAME]
        if finished:
            break
    assert "old" in outcomes and "new" in outcomes[:-1], outcomes  # failures fell on both sides of the commit


def test_a_failure_at_any_step_of_a_new_folder_leaves_nothing_or_the_whole_folder(tmp_path, monkeypatch):
    for call in range(1, 100):
        parent = tmp_path / f"try-{call}"
        parent.mkdir()
        fail_at(monkeypatch, call)
        try:
            atomic.write_folder(parent / "adapter", NEW)
            finished = True
        except OSError:
            finished = False
        monkeypatch.undo()
        names = [p.name for p in parent.iterdir()]
        assert names in ([], ["adapter"]), (call, names)
        if names:
            assert contents(parent / "adapter") == NEW
        if finished:
            break


def test_replacing_a_single_file(tmp_path):
    path = tmp_path / "out.gguf"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic.replacing(path) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("the writer failed")
    assert [p.name for p in tmp_path.iterdir()] == ["out.gguf"] and path.read_bytes() == b"old"
    with atomic.replacing(path) as tmp:
        tmp.write_bytes(b"new")
    assert [p.name for p in tmp_path.iterdir()] == ["out.gguf"] and path.read_bytes() == b"new"


# -- kill -9 at every step, then peftkit.load --------------------------------------------
# The child loads atomic.py alone (it imports nothing from peftkit), so that each of the
# dozen runs costs milliseconds rather than the seconds of importing torch.
_CHILD = """
import importlib.util, os, signal, sys
spec = importlib.util.spec_from_file_location("atomic", sys.argv[1])
atomic = importlib.util.module_from_spec(spec)
spec.loader.exec_module(atomic)
source, target, kill_at = sys.argv[2], sys.argv[3], int(sys.argv[4])
files = {name: open(os.path.join(source, name), "rb").read() for name in sys.argv[5:]}
calls = 0

def dying(real):
    def step(*args, **kwargs):
        global calls
        calls += 1
        if calls == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    return step

for name in {steps!r}:
    setattr(os, name, dying(getattr(os, name)))
atomic.write_folder(target, files)
"""


IDS = torch.arange(10)[None]


def _adapter(tmp_path: Path, name: str, seed: int, **config) -> tuple[Path, torch.Tensor]:
    """An adapter folder with random weights and the output it gives on a fresh model."""
    from helpers import randomize_adapters, tiny_llama

    pm = peftkit.attach(tiny_llama(), peftkit.LoraConfig(**config))
    randomize_adapters(pm, seed)
    pm.save(tmp_path / name)
    with torch.no_grad():
        return tmp_path / name, pm(input_ids=IDS).logits


@pytest.mark.usefixtures("one_thread")
def test_a_kill_at_any_step_leaves_the_old_or_the_new_adapter(tmp_path):
    pytest.importorskip("transformers")
    from helpers import tiny_llama

    # Another rank and other layers: a mix of the two could not load.
    old, old_out = _adapter(tmp_path, "old", 1, r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    new, new_out = _adapter(tmp_path, "new", 2, r=2, alpha=2, target_modules=["k_proj", "o_proj"])
    script = _CHILD.replace("{steps!r}", repr(STEPS))
    seen = []
    for kill_at in range(1, 100):
        target = tmp_path / f"kill-{kill_at}"
        target.mkdir()
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            (target / name).write_bytes((old / name).read_bytes())
        (target / "README.md").write_text("my notes")
        done = subprocess.run([sys.executable, "-c", script, atomic.__file__, str(new), str(target),
                               str(kill_at), CONFIG_NAME, WEIGHTS_NAME], capture_output=True, text=True)
        assert done.returncode in (0, -signal.SIGKILL), done.stderr
        with torch.no_grad():
            out = peftkit.load(tiny_llama(), target)(input_ids=IDS).logits
        assert torch.equal(out, old_out) or torch.equal(out, new_out), f"killed at step {kill_at}"
        seen.append("new" if torch.equal(out, new_out) else "old")
        assert (target / "README.md").read_text() == "my notes"
        assert json.loads((target / CONFIG_NAME).read_text())["r"] == (2 if seen[-1] == "new" else 4)
        if done.returncode == 0:
            break
    assert seen[-1] == "new" and "old" in seen and "new" in seen[:-1], seen
