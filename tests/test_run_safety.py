"""A run refuses bad numbers and bad folders cleanly: RunOptions checks every field,
`peftkit train` prints one error line naming the option (no traceback, nothing written),
and a run folder holds one run at a time (a lock), is not blocked by a failed start, and is
cleaned of a killed run's leftovers."""

from __future__ import annotations

import fcntl
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import reference_run_inputs, train_killed_after

import peftkit
from peftkit import cli
from peftkit.loading import load_model
from peftkit.runs import LOCK_FILE, RunFolderError, RunOptions, run_training
from peftkit.train import NonFiniteError
from peftkit.validate import InvalidValue

BAD = {
    "steps": [0, -1, 2.5, True, "8", math.inf],
    "epochs": [0, -2, math.nan, math.inf, 1e308, "1", True],
    "lr": [0, -1.0, math.nan, math.inf, "2e-4", True],
    "batch_size": [0, -1, 8.0, None, True, "8"],
    "grad_accum": [0, -1, 2.0, None, True],
    "checkpoint_every": [-1, 5.5, None, True],
    "eval_fraction": [-0.1, 1.0, 2, math.nan, math.inf, None, "0.1", True],
    "seed": [-1, 1.5, True, None, "0", 2**70],
    "max_length": [0, -1, 512.0, None, True],
    "warmup_ratio": [-0.1, 1.5, math.nan, math.inf, None, "0.1"],
    "lora_plus_ratio": [0, 0.5, -1, math.nan, math.inf, None, "16", True],
    "eval_limit": [0, -1, 2.0, True, "3"],
}


@pytest.mark.parametrize("field,value", [(f, v) for f, values in BAD.items() for v in values])
def test_run_options_refuse_a_bad_value_naming_the_field(field, value):
    with pytest.raises(InvalidValue) as caught:
        RunOptions(**{field: value})
    assert caught.value.field == field
    assert str(caught.value).startswith(f"RunOptions.{field} must be ")


def test_run_options_keep_explicit_edge_values():
    options = RunOptions(steps=1, epochs=0.5, lr=1e-9, eval_fraction=0.0, warmup_ratio=0.0, seed=0,
                         lora_plus_ratio=1, eval_limit=1, checkpoint_every=0)
    assert options.checkpoint_every == 0  # --checkpoint-every 0: no checkpoints, as documented
    assert (options.eval_fraction, options.warmup_ratio, options.lora_plus_ratio) == (0.0, 0.0, 1)
    assert RunOptions(warmup_ratio=1.0).warmup_ratio == 1.0


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("run-safety")
    reference_run_inputs(root)
    return root


def train_cli(folders, out, *options, capsys):
    code = cli.main(["train", "--model", str(folders / "reference"), "--data", str(folders / "data.jsonl"),
                     "--out", str(out), "--no-progress", *map(str, options)])
    return code, capsys.readouterr()


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("option,value", [
    ("--lr", "nan"), ("--lr", "-1"), ("--max-steps", "0"), ("--grad-accum", "0"), ("--epochs", "-2"),
    ("--epochs", "0"), ("--lora-plus-ratio", "nan"), ("--batch-size", "0"), ("--eval-fraction", "1.0"),
    ("--warmup-ratio", "inf"), ("--max-length", "0"), ("--seed", "-1"),
])
def test_a_bad_train_option_is_one_error_line_naming_it(folders, tmp_path, capsys, option, value):
    out = tmp_path / "run"
    code, captured = train_cli(folders, out, option, value, capsys=capsys)
    assert code == 2
    assert captured.err.strip().splitlines() == error_lines(captured.err)
    assert len(error_lines(captured.err)) == 1
    assert captured.err.strip().endswith(f"(set by {option})")
    assert "Traceback" not in captured.err
    assert not out.exists()


def test_a_bad_method_option_names_the_option_that_set_it(folders, tmp_path, capsys):
    code, captured = train_cli(folders, tmp_path / "run", "--dropout", "nan", capsys=capsys)
    assert code == 2 and len(error_lines(captured.err)) == 1
    assert "LoraConfig.dropout" in captured.err and "(set by --dropout)" in captured.err


def test_the_real_entry_point_refuses_lr_nan_without_a_traceback(folders, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "peftkit", "train", "--model", str(folders / "reference"),
                           "--data", str(folders / "data.jsonl"), "--out", str(out), "--lr", "nan"],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: RunOptions.lr must be a finite number > 0, got nan. (set by --lr)"
    assert not out.exists()


def test_a_run_that_diverges_exits_1_keeping_its_checkpoint_and_writing_no_adapter(folders, tmp_path, capsys):
    out = tmp_path / "run"
    code, captured = train_cli(folders, out, "--steps", 6, "--lr", "1e30", "--warmup-ratio", 0,
                               "--checkpoint-every", 1, "--batch-size", 4, capsys=capsys)
    assert code == 1
    assert len(error_lines(captured.err)) == 1 and "Traceback" not in captured.err
    assert "training stopped at step 2" in captured.err
    assert not (out / "adapter").exists()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000001"]


# -- the run folder ------------------------------------------------------------------------
@pytest.fixture
def loaded(folders):
    return load_model(folders / "reference", progress=False)


CONFIG = peftkit.LoraConfig(r=4, target_modules=["q", "v"])


def options(**changes) -> RunOptions:
    return RunOptions(**{"steps": 4, "batch_size": 4, "lr": 3e-3, "checkpoint_every": 2, **changes})


def run(loaded, folders, out, opts=None, **kwargs):
    return run_training(loaded, folders / "data.jsonl", CONFIG, out, opts or options(), progress=False, **kwargs)


def test_a_second_run_or_resume_into_a_live_runs_folder_is_refused(folders, loaded, tmp_path):
    """While run A is alive (here: inside its pre-flight, holding the lock), a run B and a
    resume into its folder are refused; A then finishes with its whole log."""
    out = tmp_path / "run"
    refusals = []

    def second_run(model, optimizer, batch):
        for resume in (False, True):
            with pytest.raises(RunFolderError, match="in use by another peftkit run") as caught:
                run(load_model(folders / "reference", progress=False), folders, out, resume=resume)
            refusals.append(str(caught.value))

    summary = run(loaded, folders, out, preflight=second_run)
    assert len(refusals) == 2 and f"process {os.getpid()}" in refusals[0]
    assert Path(summary.adapter_dir).is_dir()
    steps = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_a_lock_held_by_another_process_refuses_the_run(folders, loaded, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c",
                               "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); f.write('4242\\n'); f.flush(); "
                               "print('locked', flush=True); time.sleep(60)", str(out / LOCK_FILE)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunFolderError, match=r"in use by another peftkit run \(process 4242\)"):
            run(loaded, folders, out)
    finally:
        holder.kill()
        holder.wait()
    # The lock ends with its process (even a SIGKILL): the folder is free again.
    assert Path(run(loaded, folders, out).adapter_dir).is_dir()


def test_a_failed_start_does_not_block_the_corrected_rerun(folders, loaded, tmp_path):
    out = tmp_path / "run"

    def doctor_says_no(model, optimizer, batch):
        raise RuntimeError("stopped before the first step")

    with pytest.raises(RuntimeError):
        run(loaded, folders, out, preflight=doctor_says_no)
    assert (out / "run.json").is_file()  # the stub of the failed start
    fresh = load_model(folders / "reference", progress=False)
    summary = run(fresh, folders, out, options(lr=1e-3))  # other options: a different identity
    assert Path(summary.adapter_dir).is_dir() and summary.resumed_from == 0
    assert json.loads((out / "run.json").read_text())["options"]["lr"] == 1e-3


def test_a_diverged_runs_checkpoint_is_kept_from_a_rerun_with_other_options(folders, loaded, tmp_path):
    """The last good checkpoint of a run that diverged is that run's record: a rerun with a
    lower rate is sent to another --out rather than overwriting it."""
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError):
        run(loaded, folders, out, options(lr=1e30, warmup_ratio=0.0, checkpoint_every=1))
    assert not (out / "adapter").exists()
    with pytest.raises(RunFolderError, match="holds a different run"):
        run(load_model(folders / "reference", progress=False), folders, out, options(lr=1e-3))
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000001"]


def test_resume_without_a_checkpoint_is_refused(folders, loaded, tmp_path):
    with pytest.raises(RunFolderError, match="no checkpoint to resume from"):
        run(loaded, folders, tmp_path / "new", resume=True)
    out = tmp_path / "finished"
    run(loaded, folders, out, options(checkpoint_every=10))  # 4 steps: never a checkpoint
    log = (out / "train_log.jsonl").read_text()
    with pytest.raises(RunFolderError, match="no checkpoint to resume from"):
        run(load_model(folders / "reference", progress=False), folders, out, options(checkpoint_every=10),
            resume=True)
    assert (out / "train_log.jsonl").read_text() == log


def plant_leftovers(out: Path) -> list[Path]:
    """What a kill leaves: temporary files, a half-written checkpoint, adapter staging."""
    planted = [out / ".run.json.1a2b3c.tmp", out / "train_log.tmp", out / "checkpoints" / ".partial-x1y2",
               out / ".adapter.peftkit-staging-abc123"]
    for path in planted:
        if path.suffix == ".tmp":
            path.write_text("half")
        else:
            path.mkdir(parents=True, exist_ok=True)
            (path / "trainable.safetensors").write_bytes(b"half")
    return planted


@pytest.mark.parametrize("resume", [False, True])
def test_a_killed_runs_leftovers_are_removed_by_the_next_run(folders, loaded, tmp_path, resume):
    out = tmp_path / "run"
    if resume:  # a run with a checkpoint, resumed
        run(loaded, folders, out, options(checkpoint_every=2, steps=3))
        (out / "adapter").rename(tmp_path / "moved")  # as if killed before the adapter was written
        loaded = load_model(folders / "reference", progress=False)
    else:  # a failed start, rerun
        with pytest.raises(RuntimeError):
            run(loaded, folders, out, preflight=lambda *a: (_ for _ in ()).throw(RuntimeError("stop")))
        loaded = load_model(folders / "reference", progress=False)
    planted = plant_leftovers(out)
    summary = run(loaded, folders, out, options(checkpoint_every=2, steps=3), resume=resume)
    assert summary.resumed_from == (2 if resume else 0)
    assert not [p for p in planted if p.exists()]
    assert (out / "adapter").is_dir() and (out / "run.json").is_file()


def test_out_that_is_a_file_is_refused_cleanly(folders, tmp_path, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    code, captured = train_cli(folders, target, "--steps", 1, capsys=capsys)
    assert code == 2 and len(error_lines(captured.err)) == 1 and "Traceback" not in captured.err
    assert "is a file, not a folder" in captured.err
    assert target.read_text() == "keep me"


def test_out_in_a_read_only_folder_is_refused_cleanly(folders, tmp_path, capsys, monkeypatch):
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: refuse the folder as the OS would
        real_mkdir = Path.mkdir

        def mkdir(self, *args, **kwargs):
            if parent in self.parents:
                raise PermissionError(13, "Permission denied", str(self))
            return real_mkdir(self, *args, **kwargs)

        monkeypatch.setattr(Path, "mkdir", mkdir)
    try:
        code, captured = train_cli(folders, parent / "run", "--steps", 1, capsys=capsys)
    finally:
        parent.chmod(0o755)
    assert code == 2 and len(error_lines(captured.err)) == 1 and "Traceback" not in captured.err
    assert "Permission denied" in captured.err and "--out" in captured.err
    assert not (parent / "run").exists()


def test_the_lock_file_alone_does_not_make_a_folder_foreign(folders, loaded, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with open(out / LOCK_FILE, "a+") as handle:  # left by a run that died before writing run.json
        fcntl.flock(handle, fcntl.LOCK_EX)
        fcntl.flock(handle, fcntl.LOCK_UN)
    assert Path(run(loaded, folders, out).adapter_dir).is_dir()


def test_a_run_started_before_an_upgrade_still_resumes(tmp_path, monkeypatch):
    """A run.json written before options were added (no train_on, add_eos, pack) and with the
    model path as typed resumes: the new options take the defaults that reproduce the old run."""
    from peftkit.cli import main

    import torch
    from safetensors.torch import load_file

    monkeypatch.chdir(tmp_path)
    folder, _ = reference_run_inputs(tmp_path)
    folder.rename(tmp_path / "tiny")  # "reference" alone names the built-in model
    common = ["train", "--model", "tiny", "--data", "data.jsonl", "--max-steps", "6", "--batch-size", "4",
              "--lr", "2e-3", "--checkpoint-every", "2", "--no-progress"]
    assert main(common + ["--out", "whole"]) == 0

    train_killed_after(monkeypatch, 3, common + ["--out", "old"])
    run_file = tmp_path / "old" / "run.json"
    written = json.loads(run_file.read_text())
    assert written["model"] == str((tmp_path / "tiny").resolve())
    for added in ("train_on", "add_eos", "pack"):
        del written["options"][added]
    written["model"] = "tiny"  # as typed, relative, as earlier versions kept it
    run_file.write_text(json.dumps(written))
    assert main(common + ["--out", "old", "--resume"]) == 0
    whole = load_file(tmp_path / "whole" / "adapter" / "adapter_model.safetensors")
    again = load_file(tmp_path / "old" / "adapter" / "adapter_model.safetensors")
    for key in whole:
        torch.testing.assert_close(again[key], whole[key], rtol=0, atol=0)
