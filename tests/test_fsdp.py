"""FSDP2 (``peftkit train --fsdp``): 2 CPU ranks with gloo under torchrun, the reference model
sharded block by block, against one process with the whole global batch; the adapter folder;
sharded checkpoints resumed after a kill, and on another rank count; the refusals."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from helpers import tiny_reference, write_jsonl
from ranks import LIMIT, finish, rank_pid, start, torchrun_command, train_args
from safetensors.torch import load_file

import peftkit
from peftkit.pretrain import task_lines



@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    tiny_reference().save_pretrained(root / "reference")
    # Lengths spread by up to 6 words: every batch is padded, and rows differ in label tokens.
    lines = [line.rsplit(",", 1) for line in task_lines("B", 30, 0)]
    records = [{"prompt": "so " * (i % 7) + p + ",", "completion": c} for i, (p, c) in enumerate(lines)]
    write_jsonl(root / "train.jsonl", records[:26])
    write_jsonl(root / "held_out.jsonl", records[26:])
    return root


def torchrun(ranks: int, *args) -> subprocess.CompletedProcess:
    return finish(start(torchrun_command(ranks, *args)))


def in_process(*args) -> int:
    from peftkit.cli import main

    return main(["train", *map(str, args)])


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def test_two_sharded_ranks_train_the_adapter_of_one_process_with_the_global_batch(folders, tmp_path):
    common = ("--steps", 4, "--grad-accum", 2, "--lr", 3e-3, "--checkpoint-every", 0, "--target", "all-linear")
    assert in_process(*train_args(folders, *common, "--batch-size", 6, "--out", tmp_path / "one")) == 0
    two = torchrun(2, *train_args(folders, *common, "--batch-size", 3, "--fsdp", "--out", tmp_path / "two"))
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("Training finished") == 1
    one, other = _adapter(tmp_path / "one"), _adapter(tmp_path / "two")
    assert one.keys() == other.keys()
    worst = max(float((other[k] - one[k]).abs().max()) for k in one)
    print(f"FSDP2 2 x 3 vs 1 x 6: max |difference| {worst:.2e}")
    for key in one:
        torch.testing.assert_close(other[key], one[key], rtol=0, atol=1e-5)
    # The ordinary PEFT folder: it loads onto a fresh base and gives the tensors back.
    loaded = peftkit.load(tiny_reference(), tmp_path / "two" / "adapter")
    from peftkit.adapter_files import adapter_tensors
    again = adapter_tensors(loaded, "default")
    for key in other:
        torch.testing.assert_close(again[key].float(), other[key].float(), rtol=0, atol=0)


def test_a_sharded_run_killed_then_resumed_gives_the_uninterrupted_adapter(folders, tmp_path):
    args = ("--steps", 40, "--batch-size", 2, "--lr", 3e-3, "--dropout", 0.1, "--checkpoint-every", 5, "--fsdp")
    whole = torchrun(2, *train_args(folders, *args, "--out", tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr
    assert (tmp_path / "whole" / "checkpoints" / "step-00000040" / "sharded" / ".metadata").is_file()

    killed = tmp_path / "killed"
    proc = start(torchrun_command(2, *train_args(folders, *args, "--out", killed)))
    log, deadline = killed / "train_log.jsonl", time.time() + LIMIT
    while time.time() < deadline and not (log.is_file() and len(log.read_text().splitlines()) >= 12):
        time.sleep(0.02)
    victim = rank_pid(proc.pid, 1)  # past the checkpoint of step 10; torchrun then stops rank 0
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    assert finish(proc).returncode != 0
    assert not (killed / "adapter").exists()

    resumed = torchrun(2, *train_args(folders, *args, "--out", killed, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed at step" in resumed.stdout
    expected, again = _adapter(tmp_path / "whole"), _adapter(killed)
    for key in expected:
        torch.testing.assert_close(again[key], expected[key], rtol=0, atol=0)


def test_fsdp_it_cannot_shard_is_refused_with_one_clear_error(folders, tmp_path, capsys):
    assert in_process(*train_args(folders, "--fsdp", "--out", tmp_path / "a")) == 2
    assert "--fsdp shards the base over several ranks, and this run has one" in capsys.readouterr().err
    assert in_process(*train_args(folders, "--fsdp", "--quantize", "nf4", "--out", tmp_path / "b")) == 2
    assert "FSDP2 cannot shard a 4-bit NF4 base" in capsys.readouterr().err
    prompt = torchrun(2, *train_args(folders, "--method", "prompt", "--fsdp", "--steps", 1, "--out", tmp_path / "c"))
    assert prompt.returncode != 0  # torchrun: 1 when a rank exits non-zero (each exits 2)
    assert "rank 0: error: --fsdp shards LoRA and bottleneck adapters, not a prompt or prefix" in prompt.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
