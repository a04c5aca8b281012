"""The run folder of ``peftkit train`` (see ``runs``): one run per folder, locked while it
runs, its identity (``run.json``) checked before a run may use or resume it, and what a
killed run leaves half-written cleaned up.

    DIR/run.json          the run's identity: model, data, method config, options
    DIR/train_log.jsonl   one line per step
    DIR/checkpoints/      the newest checkpoint (train.py)
    DIR/adapter/          the final adapter
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import IO

from .formats import atomic
from .train_checkpoints import checkpoint_paths


class RunFolderError(ValueError):
    """An output folder that cannot take this run: it holds something else, another run is
    using it, it cannot be written, or --resume finds nothing to resume."""


RUN_FILE = "run.json"
LOG_FILE = "train_log.jsonl"
CHECKPOINTS = "checkpoints"
ADAPTER = "adapter"
LOCK_FILE = ".peftkit-run.lock"  # locked (flock) by the run using the folder


def _lock(out_dir: Path) -> IO[str]:
    """Lock ``out_dir`` for this process, or refuse: the lock is the OS's (``flock`` on an
    open file), so it ends with the process, even one killed with SIGKILL, and never goes stale.
    The file stays (removing it would let a third run lock a new file beside a live lock)."""
    try:
        import fcntl
    except ImportError:  # Windows has no flock; a run without its lock could corrupt another's folder
        raise RunFolderError("peftkit train locks its --out folder with fcntl.flock, which this system "
                             "lacks (Windows); run it under WSL or Linux.") from None

    handle = open(out_dir / LOCK_FILE, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip()
        handle.close()
        raise RunFolderError(f"{out_dir} is in use by another peftkit run"
                             + (f" (process {holder})" if holder.isdigit() else "")
                             + "; wait for it to finish, or pick another --out.") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")  # for the message a second run prints
    handle.flush()
    return handle


def _remove_leftovers(out_dir: Path) -> None:
    """Remove what a killed run leaves half-written in its folder: ``*.tmp`` files, unfinished
    checkpoints (``.partial-*``) and adapter staging folders; a committed adapter replacement
    is completed instead (``atomic.recover_folder``). Only names peftkit writes are touched."""
    staging = f".{ADAPTER}{atomic.STAGING}"
    for folder, stale in ((out_dir, staging), (out_dir / CHECKPOINTS, ".partial-"),
                          (out_dir / ADAPTER, atomic.STAGING)):
        if not folder.is_dir():
            continue
        if folder.name == ADAPTER:
            atomic.recover_folder(folder)
        for entry in folder.iterdir():
            if entry.is_dir() and entry.name.startswith(stale):
                shutil.rmtree(entry, ignore_errors=True)
            elif entry.is_file() and entry.name.endswith(".tmp"):
                entry.unlink(missing_ok=True)


def _read_run_file(run_file: Path) -> dict:
    try:
        return json.loads(run_file.read_text())
    except (OSError, ValueError) as e:
        raise RunFolderError(f"{run_file} cannot be read as a peftkit run ({e}); pick another --out.") from e


def _as_written_now(identity: dict, defaults: dict) -> dict:
    """A run.json of an earlier peftkit as this one writes it: options added since then take
    their ``defaults`` (which reproduce the old behaviour) and paths are resolved, so that a
    run started before an upgrade still resumes."""
    options = identity.get("options")
    if not isinstance(options, dict):
        return identity
    options = {**defaults, **options}
    if options.get("eval_data") is not None:
        options["eval_data"] = str(Path(options["eval_data"]).resolve())
    model = identity.get("model")
    if isinstance(model, str) and Path(model).exists():
        model = str(Path(model).resolve())
    return {**identity, "model": model, "options": options}


def _per_rank_batch_aside(previous: dict, identity: dict) -> tuple[dict, dict]:
    """Both identities without each rank's batch size when both record the same global batch
    (an FSDP2 run, which resumes on another rank count that gives the same global batch)."""
    global_batch = identity.get("global_batch_size")
    if global_batch is None:
        return previous, identity
    if "global_batch_size" not in previous:  # written before it was recorded: each rank's batch must match
        return previous, {k: v for k, v in identity.items() if k != "global_batch_size"}
    if previous["global_batch_size"] != global_batch:
        return previous, identity

    def aside(ident: dict) -> dict:
        options = {k: v for k, v in ident.get("options", {}).items() if k != "batch_size"}
        return {**ident, "options": options}

    return aside(previous), aside(identity)


def _settle(out_dir: Path, identity: dict, defaults: dict, resume: bool) -> None:
    """Under the lock: decide whether this run may use ``out_dir``, then clean and stamp it.

    Only a folder with a checkpoint or a finished adapter holds a run. Such a folder must
    hold this very run (run.json equal to ``identity``) and then needs ``resume``, which
    needs a checkpoint. Anything else that run.json marks as peftkit's is the stub of a
    start that failed or was killed before its first checkpoint: a new run takes it over
    (new run.json, empty log), and ``resume`` is refused because there is nothing to resume.
    """
    run_file = out_dir / RUN_FILE
    has_checkpoint = bool(checkpoint_paths(out_dir / CHECKPOINTS))
    if has_checkpoint or (out_dir / ADAPTER).is_dir():
        if not run_file.is_file():
            raise RunFolderError(f"{out_dir} is not empty and holds no peftkit run; pick another --out.")
        previous = _as_written_now(_read_run_file(run_file), defaults)
        previous, identity = _per_rank_batch_aside(previous, identity)
        if previous != identity:
            changed = sorted(k for k in set(previous) | set(identity) if previous.get(k) != identity.get(k))
            raise RunFolderError(f"{out_dir} holds a different run (it differs in {changed}); pick another --out.")
        if not resume:
            raise RunFolderError(f"{out_dir} already holds this run; pass --resume to continue it or pick another --out.")
        if not has_checkpoint:
            raise RunFolderError(f"{out_dir} holds this run's finished adapter but no checkpoint to resume from; "
                                 "pick another --out to train again.")
        _remove_leftovers(out_dir)
        return
    if resume:
        raise RunFolderError(f"--resume: {out_dir} holds no checkpoint to resume from (a run writes its first "
                             "one after --checkpoint-every steps); run again without --resume to start afresh.")
    _remove_leftovers(out_dir)
    (out_dir / LOG_FILE).unlink(missing_ok=True)
    with atomic.replacing(run_file) as tmp:
        tmp.write_text(json.dumps(identity, indent=2, sort_keys=True) + "\n")


def claim_out_dir(out_dir: Path, identity: dict, defaults: dict, resume: bool) -> IO[str]:
    """Take ``out_dir`` for this run and return the open lock file: the folder stays locked
    until it is closed (or the process ends). Refused with ``RunFolderError``: a path that is
    not a folder, a folder that cannot be written, a non-empty folder that is not a peftkit
    run's, a folder another run is using, and what ``_settle`` refuses. An identity with a
    ``global_batch_size`` (an FSDP2 run) is the run of a run.json with the same one whatever
    each rank's batch size was: it resumes on another rank count."""
    try:
        if out_dir.exists() and not out_dir.is_dir():
            raise RunFolderError(f"--out {out_dir} is a file, not a folder; pick a folder (it is created if missing).")
        if out_dir.is_dir() and not (out_dir / RUN_FILE).is_file() and any(
                entry.name != LOCK_FILE for entry in out_dir.iterdir()):
            raise RunFolderError(f"{out_dir} is not empty and holds no peftkit run; pick another --out.")
        out_dir.mkdir(parents=True, exist_ok=True)
        lock = _lock(out_dir)
    except OSError as e:
        raise RunFolderError(f"cannot use {out_dir} as --out: {e.strerror or e}; pick a folder you can "
                             "write to.") from e
    try:
        _settle(out_dir, identity, defaults, resume)
    except OSError as e:
        lock.close()
        raise RunFolderError(f"cannot prepare {out_dir} for the run: {e}; pick another --out.") from e
    except BaseException:
        lock.close()
        raise
    return lock


def rewrite_log(path: Path, keep_through_step: int) -> None:
    """On resume, drop log lines of steps the checkpoint does not contain."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= keep_through_step]
    with atomic.replacing(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in kept))
