"""Running `peftkit train` on several ranks in the tests: torchrun in its own session, bounded
(a hang fails the test and kills the whole group), and a rank's worker found by its RANK."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
LIMIT = 240  # seconds any one launch may take before the test fails (a hang)


def torchrun_command(ranks: int, *args) -> list[str]:
    """``python -m torch.distributed.run ... -m peftkit train ARGS`` on ``ranks`` local ranks, no restarts."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
            "--max-restarts", "0", "-m", "peftkit", "train", *map(str, args)]


def start(command: list[str], env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env or ENV, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = LIMIT) -> subprocess.CompletedProcess:
    """Wait for ``proc``; past ``timeout`` kill its whole process group and fail (a hang)."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"{proc.args} still running after {timeout} s")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def rank_pid(launcher: int, rank: int) -> int | None:
    """The pid of torchrun's worker of ``rank`` (its environment says RANK)."""
    for task in Path(f"/proc/{launcher}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in env:
                return int(child)
    return None


def kill_rank_after(proc: subprocess.Popen, log: Path, steps: int, rank: int = 1) -> subprocess.CompletedProcess:
    """kill -9 ``rank`` of the run ``proc`` once its ``log`` has ``steps`` lines (torchrun then
    stops the other ranks), and wait for the run to end: it must fail."""
    deadline = time.time() + LIMIT
    while time.time() < deadline and not (log.is_file() and len(log.read_text().splitlines()) >= steps):
        time.sleep(0.02)
    victim = rank_pid(proc.pid, rank)
    assert victim is not None, f"no worker of rank {rank} after {steps} logged steps"
    os.kill(victim, signal.SIGKILL)
    stopped = finish(proc)
    assert stopped.returncode != 0
    return stopped


OWN_LOSS_REFUSED = '''
import os
if "own-loss" in os.environ.get("PEFTKIT_TEST_FAIL", "").split(",") and "RANK" in os.environ:
    import torch
    import peftkit.train
    from transformers import LlamaForCausalLM
    plain_forward, plain_step, stepping = LlamaForCausalLM.forward, peftkit.train.accumulate_gradients, []
    def step(*args, **kwargs):
        stepping.append(1)
        try:
            return plain_step(*args, **kwargs)
        finally:
            stepping.pop()
    def refused(self, *args, **kwargs):
        if stepping and torch.is_grad_enabled():
            raise RuntimeError("a training step ran the whole Llama (its logits), not peftkit's fused loss")
        return plain_forward(self, *args, **kwargs)
    peftkit.train.accumulate_gradients, LlamaForCausalLM.forward = step, refused
'''
"""Appended to a test's sitecustomize.py: with ``own-loss`` among PEFTKIT_TEST_FAIL's
comma-separated words, a rank whose training step (``train.accumulate_gradients``) runs a
Llama's own forward with gradients on (its logits: the own loss, or a stand-in row's logits)
raises, so a run passes only if every micro-batch of every step took the fused loss, or the
logit-free zero of a rank left without rows. The doctor's probes, outside the steps, run it."""


def sitecustomize_env(site: Path, what: str) -> dict:
    """``ENV`` with ``site`` (a folder holding a sitecustomize.py, which every rank then runs
    at start) first on PYTHONPATH and PEFTKIT_TEST_FAIL set to ``what`` (words, comma-separated)
    for it to read."""
    return {**ENV, "PYTHONPATH": f"{site}{os.pathsep}{ENV.get('PYTHONPATH', '')}", "PEFTKIT_TEST_FAIL": what}


def train_args(folders: Path, *extra) -> list[str]:
    """The reference model and the test's data folders, no progress bars, then ``extra``."""
    return ["--model", str(folders / "reference"), "--data", str(folders / "train.jsonl"),
            "--eval-data", str(folders / "held_out.jsonl"), "--no-progress", *map(str, extra)]


def same_train_logs(expected: Path, other: Path) -> None:
    """The two runs' train_log.jsonl agree step by step: tokens exactly, the gradient norm
    before clipping (AdamW would hide a gradient off by a constant factor; the norm does not)
    and the loss to float32 sums in another order."""
    logs = [[json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]
            for folder in (expected, other)]
    assert len(logs[0]) == len(logs[1]) and logs[0]
    assert [r["tokens"] for r in logs[0]] == [r["tokens"] for r in logs[1]]
    for a, b in zip(*logs):
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
