"""Data-parallel training (``peftkit.distributed``): 2 CPU ranks with gloo under torchrun, on
the reference model, against one process with the whole global batch; a rank killed or
failing; the doctor's verdict on every rank; the sharding of every epoch's batches."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import tied_llama_folder, tiny_reference, write_jsonl
from ranks import (ENV, OWN_LOSS_REFUSED, finish, kill_rank_after, same_train_logs, sitecustomize_env, start,
                   torchrun_command, train_args)
from safetensors.torch import load_file

from peftkit.data import Dataset, EpochBatches, Example
from peftkit.distributed import World, rank_rows, share
from peftkit.pretrain import task_lines


# Patched into every rank through PYTHONPATH (no test hooks in the library): PEFTKIT_TEST_FAIL
# = "raise" makes rank 1's third step raise; "mismatch" gives rank 1 LoRA of twice the rank;
# "doctor" makes the doctor report an error; "own-loss" (ranks.OWN_LOSS_REFUSED) makes a training
# step on a Llama's own loss raise.
SITECUSTOMIZE = '''
import os, sys
what = os.environ.get("PEFTKIT_TEST_FAIL")
if what == "raise" and os.environ.get("RANK") == "1":
    import peftkit.train as train
    original, calls = train.accumulate_gradients, []
    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected failure")
        return original(*args, **kwargs)
    train.accumulate_gradients = failing
elif what == "mismatch" and os.environ.get("RANK") == "1":
    import peftkit.cli.training as training
    original = training._method_config
    def other_rank(*args, **kwargs):
        import dataclasses
        config = original(*args, **kwargs)
        return dataclasses.replace(config, r=config.r * 2)
    training._method_config = other_rank
elif what == "doctor" and "RANK" in os.environ:
    import peftkit.doctor
    from peftkit.doctor import DoctorReport, Finding
    planted = DoctorReport([Finding("M1", "error", "model.layers.0", "base weights are trainable.", "freeze them.")])
    sys.modules["peftkit.doctor"].doctor = lambda *a, **k: planted
'''


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    tiny_reference().save_pretrained(root / "reference")
    if importlib.util.find_spec("transformers"):  # for the tests of a transformers model only
        tied_llama_folder(root / "llama")
    # 33 examples of lengths spread by up to 6 words: at 8 rows a step, each epoch ends with a
    # batch of one row, which leaves rank 1 no row (it still joins the all-reduce).
    lines = [line.rsplit(",", 1) for line in task_lines("B", 37, 0)]
    records = [{"prompt": "so " * (i % 7) + p + ",", "completion": c} for i, (p, c) in enumerate(lines)]
    write_jsonl(root / "train.jsonl", records[:33])
    write_jsonl(root / "held_out.jsonl", records[33:])
    (root / "site").mkdir()
    (root / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE + OWN_LOSS_REFUSED)
    return root


def torchrun(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    return finish(start(torchrun_command(2, *args), env))


def in_process(*args) -> int:
    from peftkit.cli import main

    return main(["train", *map(str, args)])


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def test_each_rank_trains_on_disjoint_rows_that_cover_every_epoch():
    examples = [Example(input_ids=[i, i + 1, i + 2][: 1 + i % 3], labels=[i, i + 1, i + 2][: 1 + i % 3])
                for i in range(23)]
    for size in (2, 3):
        batches = EpochBatches(Dataset("pretokenized", examples), 4 * size, pad_id=0, seed=5)
        orders = []
        for epoch in range(3):
            seen = {rank: [] for rank in range(size)}
            for index in range(epoch * len(batches), (epoch + 1) * len(batches)):
                batch = batches.at(index)
                for rank in range(size):
                    mine = rank_rows(batch, World(rank, size, rank))
                    # a stand-in row (no labels) for a rank the epoch's last batch leaves empty
                    trained = [int(row[0]) for row, labels in zip(mine["input_ids"], mine["labels"])
                               if (labels != -100).any()]
                    seen[rank].extend(trained)
            together = [i for rank in range(size) for i in seen[rank]]
            assert sorted(together) == list(range(23)), (size, epoch)  # disjoint, and every example
            orders.append(together)
        assert orders[0] != orders[1] != orders[2]  # reshuffled every epoch
    assert [share(5, World(r, 3)) for r in range(3)] == [(0, 2), (2, 4), (4, 5)]
    assert [share(1, World(r, 2)) for r in range(2)] == [(0, 1), (1, 1)]


def test_two_ranks_train_the_adapter_of_one_process_with_the_global_batch(folders, tmp_path):
    common = ("--steps", 4, "--grad-accum", 2, "--lr", 3e-3, "--checkpoint-every", 0)
    assert in_process(*train_args(folders, *common, "--batch-size", 8, "--out", tmp_path / "one")) == 0
    two = finish(start([sys.executable, "-m", "peftkit", "train",
                          *train_args(folders, *common, "--batch-size", 4, "--nproc", 2, "--out", tmp_path / "two")]))
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("Training finished") == 1  # rank 0 alone reports
    one, other = _adapter(tmp_path / "one"), _adapter(tmp_path / "two")
    assert one.keys() == other.keys()
    # Measured max |difference| 1.0e-6 on weights up to 0.09: float32 sums in another order,
    # which AdamW's g / sqrt(v) magnifies where a gradient is near zero.
    for key in one:
        torch.testing.assert_close(other[key], one[key], rtol=0, atol=1e-5)
    same_train_logs(tmp_path / "one", tmp_path / "two")


def test_a_transformers_model_trains_on_two_ranks_on_the_fused_loss(folders, tmp_path):
    """A Llama in DDP takes the fused loss (inside DDP's call, so its all-reduce is prepared)
    on every step of every rank, and trains the single process's adapter. Step 5 ends the
    epoch with one row, so rank 1 joins it on a stand-in row: its zero loss has no logits."""
    pytest.importorskip("transformers")
    args = ["--model", folders / "llama", "--data", folders / "train.jsonl", "--eval-data", folders / "held_out.jsonl",
            "--no-progress", "--steps", 5,
            "--grad-accum", 2, "--lr", 3e-3, "--checkpoint-every", 0, "--target", "all-linear"]
    assert in_process(*args, "--batch-size", 8, "--out", tmp_path / "one") == 0
    two = torchrun(*args, "--batch-size", 4, "--out", tmp_path / "two",
                   env=sitecustomize_env(folders / "site", "own-loss"))
    assert two.returncode == 0, two.stderr
    one, other = _adapter(tmp_path / "one"), _adapter(tmp_path / "two")
    assert one.keys() == other.keys() and one
    for key in one:
        torch.testing.assert_close(other[key], one[key], rtol=0, atol=1e-5)
    same_train_logs(tmp_path / "one", tmp_path / "two")


def test_a_data_parallel_run_prints_no_warning_of_torch_s(folders, tmp_path):
    """With Python's warnings on (the tests' launches turn them off), a --nproc run's stderr
    holds no warning from torch, such as DDP's deprecation of broadcast_buffers."""
    env = {key: value for key, value in ENV.items() if key != "PYTHONWARNINGS"}
    run = finish(start([sys.executable, "-m", "peftkit", "train",
                        *train_args(folders, "--steps", 1, "--batch-size", 4, "--nproc", 2, "--out", tmp_path / "out")],
                       env))
    assert run.returncode == 0, run.stderr
    assert "deprecated" not in run.stderr and "FutureWarning" not in run.stderr, run.stderr


def test_kill_9_of_one_rank_then_resume_gives_the_uninterrupted_adapter(folders, tmp_path, capsys):
    args = ("--steps", 30, "--batch-size", 2, "--lr", 3e-3, "--dropout", 0.1, "--checkpoint-every", 5)
    whole = torchrun(*train_args(folders, *args, "--out", tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr

    killed = tmp_path / "killed"
    kill_rank_after(start(torchrun_command(2, *train_args(folders, *args, "--out", killed))),
                    killed / "train_log.jsonl", 13)
    assert not (killed / "adapter").exists()

    # A checkpoint of 2 ranks does not resume in one process: one clear error, exit 2.
    capsys.readouterr()
    assert in_process(*train_args(folders, *args, "--out", killed, "--resume")) == 2
    assert "was trained on 2 rank(s) and this run has 1; resume with --nproc 2" in capsys.readouterr().err

    resumed = torchrun(*train_args(folders, *args, "--out", killed, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed at step" in resumed.stdout
    expected, again = _adapter(tmp_path / "whole"), _adapter(killed)
    assert expected.keys() == again.keys()
    for key in expected:
        torch.testing.assert_close(again[key], expected[key], rtol=0, atol=0)
    log = (killed / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log] == list(range(1, 31))


def test_one_rank_raising_stops_every_rank_naming_it(folders, tmp_path):
    env = sitecustomize_env(folders / "site", "raise")
    start = time.time()
    proc = torchrun(*train_args(folders, "--steps", 8, "--batch-size", 2, "--lr", 3e-3, "--out", tmp_path / "r"), env=env)
    assert proc.returncode != 0
    assert time.time() - start < 90  # rank 0, waiting in the all-reduce, is stopped by torchrun
    assert "rank 1: error: RuntimeError: injected failure" in proc.stderr
    # Rank 0 either is stopped by torchrun or finds its peer gone: no error of its own, no gloo text.
    assert "rank 0: error" not in proc.stderr and "GLHF" not in proc.stderr
    assert not (tmp_path / "r" / "adapter").exists()


def test_the_doctors_error_on_rank_0_stops_every_rank_with_one_message(folders, tmp_path):
    env = sitecustomize_env(folders / "site", "doctor")
    proc = torchrun(*train_args(folders, "--steps", 3, "--batch-size", 2, "--out", tmp_path / "d"), env=env)
    assert proc.returncode == 1
    assert proc.stderr.count("stopped the run before the first step") == 1
    assert "base weights are trainable" in proc.stderr
    assert not (tmp_path / "d" / "adapter").exists()
    assert (tmp_path / "d" / "train_log.jsonl").read_text() == ""


def test_ranks_given_another_run_are_refused_on_rank_0_and_every_rank_exits(folders, tmp_path):
    proc = torchrun(*train_args(folders, "--steps", 3, "--batch-size", 2, "--out", tmp_path / "m"),
                    env=sitecustomize_env(folders / "site", "mismatch"))
    assert proc.returncode != 0
    assert "rank 0: error: rank(s) [1] were given another run than rank 0" in proc.stderr
    assert "start every rank with the same command, model and data" in proc.stderr
    assert not (tmp_path / "m" / "adapter").exists()


def test_nproc_beyond_the_devices_or_under_torchrun_is_refused(folders, tmp_path, capsys, monkeypatch):
    cores = os.cpu_count() or 1
    code = in_process(*train_args(folders, "--device", "cpu", "--nproc", cores + 1, "--out", tmp_path / "n"))
    assert code == 2
    assert f"--nproc {cores + 1} is more ranks than this machine's {cores} CPU core(s)" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert in_process(*train_args(folders, "--device", "cpu", "--nproc", 2, "--out", tmp_path / "n")) == 2
    assert "rank 1: error: --nproc starts torchrun" in capsys.readouterr().err
    assert not (tmp_path / "n").exists()
