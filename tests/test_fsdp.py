"""FSDP2 (``peftkit train --fsdp``): 2 CPU ranks with gloo under torchrun, the reference model
sharded block by block, against one process with the whole global batch; the adapter folder;
sharded checkpoints resumed after a kill, and on another rank count; the refusals."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from helpers import tied_llama_folder, tiny_reference, write_jsonl
from ranks import (OWN_LOSS_REFUSED, finish, kill_rank_after, same_train_logs, sitecustomize_env, start,
                   torchrun_command, train_args)
from safetensors.torch import load_file

import peftkit
from peftkit.pretrain import task_lines



# Run by every rank at start (ranks.sitecustomize_env): on every rank but 0, reading a weights
# file raises, so a run that passes has read the base on rank 0 alone.
SITECUSTOMIZE = '''
import os
fails = os.environ.get("PEFTKIT_TEST_FAIL", "").split(",")
if "rank-0-reads" in fails and os.environ.get("RANK", "0") != "0":
    import safetensors, safetensors.torch
    from peftkit.models import folder
    def refused(*args, **kwargs):
        raise RuntimeError(f"rank {os.environ['RANK']} read a weights file")
    safetensors.safe_open = safetensors.torch.safe_open = safetensors.torch.load_file = refused
    folder.read = refused
if "other-buffers" in fails and os.environ.get("RANK", "0") == "1":
    import torch
    from peftkit import loading
    original = loading._load_on_meta
    def with_a_buffer_more(*args, **kwargs):
        loaded = original(*args, **kwargs)
        loaded.model.register_buffer("stray", torch.zeros(3), persistent=False)
        return loaded
    loading._load_on_meta = with_a_buffer_more
'''


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    tiny_reference().save_pretrained(root / "reference")
    tied_llama_folder(root / "llama")
    (root / "site").mkdir()
    (root / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE + OWN_LOSS_REFUSED)
    # Lengths spread by up to 6 words: every batch is padded, and rows differ in label tokens.
    lines = [line.rsplit(",", 1) for line in task_lines("B", 30, 0)]
    records = [{"prompt": "so " * (i % 7) + p + ",", "completion": c} for i, (p, c) in enumerate(lines)]
    write_jsonl(root / "train.jsonl", records[:26])
    write_jsonl(root / "held_out.jsonl", records[26:])
    return root


def torchrun(ranks: int, *args, env: dict | None = None) -> subprocess.CompletedProcess:
    return finish(start(torchrun_command(ranks, *args), env))


def in_process(*args) -> int:
    from peftkit.cli import main

    return main(["train", *map(str, args)])


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def _same_adapter(folder: Path, expected: Path, label: str, atol: float = 1e-5) -> dict[str, torch.Tensor]:
    one, other = _adapter(expected), _adapter(folder)
    assert one.keys() == other.keys()
    worst = max(float((other[k] - one[k]).abs().max()) for k in one)
    print(f"{label}: max |difference| {worst:.2e}")
    for key in one:
        torch.testing.assert_close(other[key], one[key], rtol=0, atol=atol)
    return other


def test_two_sharded_ranks_train_the_adapter_of_one_process_with_the_global_batch(folders, tmp_path):
    common = ("--steps", 4, "--grad-accum", 2, "--lr", 3e-3, "--checkpoint-every", 0, "--target", "all-linear")
    assert in_process(*train_args(folders, *common, "--batch-size", 6, "--out", tmp_path / "one")) == 0
    # Rank 1 reads no weights (it would raise): it gets its shards from rank 0.
    two = torchrun(2, *train_args(folders, *common, "--batch-size", 3, "--fsdp", "--out", tmp_path / "two"),
                   env=sitecustomize_env(folders / "site", "rank-0-reads"))
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("Training finished") == 1
    other = _same_adapter(tmp_path / "two", tmp_path / "one", "FSDP2 2 x 3 vs 1 x 6")
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
    # Past the checkpoint of step 10; torchrun then stops rank 0.
    kill_rank_after(start(torchrun_command(2, *train_args(folders, *args, "--out", killed))),
                    killed / "train_log.jsonl", 12)
    assert not (killed / "adapter").exists()

    resumed = torchrun(2, *train_args(folders, *args, "--out", killed, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed at step" in resumed.stdout
    expected, again = _adapter(tmp_path / "whole"), _adapter(killed)
    for key in expected:
        torch.testing.assert_close(again[key], expected[key], rtol=0, atol=0)


def test_a_sharded_run_resumes_on_another_rank_count_with_the_same_global_batch(folders, tmp_path, capsys):
    # Dropout 0: ranks draw their masks by rank, so only without it may the rank count change.
    args = ("--steps", 12, "--lr", 3e-3, "--dropout", 0, "--checkpoint-every", 4, "--fsdp")
    whole = torchrun(2, *train_args(folders, *args, "--batch-size", 3, "--out", tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr
    killed = tmp_path / "killed"
    kill_rank_after(start(torchrun_command(2, *train_args(folders, *args, "--batch-size", 3, "--out", killed))),
                    killed / "train_log.jsonl", 6)
    # Another global batch is another run; 3 ranks x 2 rows is this one, resharded.
    other = torchrun(3, *train_args(folders, *args, "--batch-size", 3, "--out", killed, "--resume"))
    assert other.returncode != 0 and "holds a different run" in other.stderr
    resumed = torchrun(3, *train_args(folders, *args, "--batch-size", 2, "--out", killed, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed at step 4" in resumed.stdout or "resumed at step 8" in resumed.stdout
    _same_adapter(killed, tmp_path / "whole", "FSDP2 2 x 3, resumed on 3 x 2")
    # Its run.json replays as a config (global_batch_size is recorded, not an option): here on
    # one rank, so --fsdp itself is what stops it.
    assert in_process("--config", killed / "run.json", "--out", tmp_path / "again") == 2
    assert "--fsdp shards the base over several ranks, and this run has one" in capsys.readouterr().err


def test_a_tied_transformers_model_shards_from_rank_0_alone(folders, tmp_path):
    """Llama with its head tied to its embedding and rotary buffers (not in the state dict):
    rank 1 builds it on the meta device and still trains the single process's adapter, every
    step on the fused loss (computed inside the sharded root's call, which gathers the head)."""
    args = ["--model", folders / "llama", "--data", folders / "train.jsonl", "--eval-data", folders / "held_out.jsonl",
            "--no-progress", "--steps", 3, "--lr", 3e-3, "--checkpoint-every", 0, "--target", "all-linear"]
    assert in_process(*args, "--batch-size", 4, "--out", tmp_path / "one") == 0
    two = torchrun(2, *args, "--batch-size", 2, "--fsdp", "--out", tmp_path / "two",
                   env=sitecustomize_env(folders / "site", "rank-0-reads,own-loss"))
    assert two.returncode == 0, two.stderr
    _same_adapter(tmp_path / "two", tmp_path / "one", "FSDP2 tied Llama 2 x 2 vs 1 x 4")
    same_train_logs(tmp_path / "one", tmp_path / "two")


def test_a_bfloat16_base_trains_sharded_beside_float32_adapters(folders, tmp_path):
    args = ("--steps", 3, "--batch-size", 2, "--lr", 3e-3, "--checkpoint-every", 0, "--dtype", "bfloat16")
    assert in_process(*train_args(folders, *args, "--batch-size", 4, "--out", tmp_path / "one")) == 0
    two = torchrun(2, *train_args(folders, *args, "--fsdp", "--out", tmp_path / "two"))
    assert two.returncode == 0, two.stderr
    assert "bfloat16" in two.stdout  # the summary names the base's dtype
    adapter = _adapter(tmp_path / "two")
    assert {t.dtype for t in adapter.values()} == {torch.float32}
    # bf16 forwards in another order of sums: the same run, to bf16's precision.
    _same_adapter(tmp_path / "two", tmp_path / "one", "FSDP2 bf16 base 2 x 2 vs 1 x 4", atol=2e-3)


def test_ranks_that_built_other_buffers_are_refused_before_any_is_sent(folders, tmp_path):
    args = ["--model", folders / "llama", "--data", folders / "train.jsonl", "--no-progress", "--steps", 1,
            "--batch-size", 2, "--fsdp", "--out", tmp_path / "b"]
    proc = torchrun(2, *args, env=sitecustomize_env(folders / "site", "other-buffers"))
    assert proc.returncode != 0
    assert "rank 0: error: rank(s) [1] built the model with other buffers than rank 0" in proc.stderr
    assert not (tmp_path / "b" / "adapter").exists()


def test_fsdp_it_cannot_shard_is_refused_with_one_clear_error(folders, tmp_path, capsys):
    assert in_process(*train_args(folders, "--fsdp", "--out", tmp_path / "a")) == 2
    assert "--fsdp shards the base over several ranks, and this run has one" in capsys.readouterr().err
    assert in_process(*train_args(folders, "--fsdp", "--quantize", "nf4", "--out", tmp_path / "b")) == 2
    assert "FSDP2 cannot shard a 4-bit NF4 base" in capsys.readouterr().err
    prompt = torchrun(2, *train_args(folders, "--method", "prompt", "--fsdp", "--steps", 1, "--out", tmp_path / "c"))
    assert prompt.returncode != 0  # torchrun: 1 when a rank exits non-zero (each exits 2)
    assert "rank 0: error: --fsdp shards LoRA and bottleneck adapters, not a prompt or prefix" in prompt.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
