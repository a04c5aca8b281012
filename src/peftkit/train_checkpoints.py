"""A training run's checkpoints: each one written whole or not at all, the newest found, and
restored only into a run that can continue it (``train.train`` writes and reads them).

A checkpoint is the folder ``step-NNNNNNNN`` in the run's checkpoint directory: the trainable
weights (``trainable.safetensors``) and ``state.pt`` (optimizer, scheduler, random generators,
losses, the rank count), or for a model sharded with FSDP2 the ``sharded/`` folder of
``torch.distributed.checkpoint`` beside ``state.pt``.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

from . import distributed
from .distributed import SINGLE, World
from .model import PeftModel

if TYPE_CHECKING:
    from .train import TrainResult  # train imports this module


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Name -> parameter for everything that trains, what a checkpoint holds: a PeftModel's
    adapters, or every parameter that requires grad in a plain model (full fine-tuning)."""
    if isinstance(model, PeftModel):
        return model.trainable_parameters()
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


CHECKPOINT_PREFIX = "step-"


def checkpoint_paths(directory: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a folder only gets its final name once whole)."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
             and p.name[len(CHECKPOINT_PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def newest_step(directory: Path | None) -> int:
    """The step of the newest complete checkpoint in ``directory`` (0: none, or no directory):
    where a resumed run starts. A checkpoint folder is named by its step."""
    found = checkpoint_paths(directory) if directory is not None else []
    return int(found[-1].name[len(CHECKPOINT_PREFIX):]) if found else 0


SHARDED = "sharded"  # a checkpoint's folder of torch.distributed.checkpoint files (--fsdp)


def save_checkpoint(directory: Path, step: int, model: PeftModel, optimizer, scheduler, result: TrainResult,
                    scaler: torch.amp.GradScaler | None = None, world: World = SINGLE,
                    global_rows: int | None = None) -> Path:
    """Trainable weights (safetensors) + optimizer, scheduler, RNG states and step, written
    into a temporary folder and renamed, so a kill at any moment leaves whole checkpoints.
    It records the world size: a run on several ranks resumes on as many.

    A model sharded with FSDP2 (``distributed.shard``) keeps its weights and optimizer in
    ``sharded/`` (``torch.distributed.checkpoint``, written by every rank, which must all call
    this), so it resumes on any rank count with the same global batch; rank 0 writes the rest
    and renames the folder once every rank's shards are written."""
    sharded = distributed.is_sharded(model)
    final = directory / f"{CHECKPOINT_PREFIX}{step:08d}"
    if not sharded and not world.is_main:
        return final
    if sharded:  # one name that every rank knows; a killed run's leftover is replaced
        staging = directory / f".partial-{final.name}"
        if world.is_main:
            directory.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
        distributed.barrier(world)
        distributed.save_sharded(staging / SHARDED, model, optimizer)  # returns once every rank has written
        if not world.is_main:
            return final
        optimizer_state = None
    else:
        directory.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=directory))
        weights = {n: p.detach().cpu().contiguous() for n, p in trainable_parameters(model).items()}
        save_file(weights, str(staging / "trainable.safetensors"))
        optimizer_state = optimizer.state_dict()
    state = {
        "step": step, "optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
        # Dropout on a GPU draws from the device's own generator: without it a resumed run diverges.
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "mps_rng": torch.mps.get_rng_state() if torch.backends.mps.is_available() else None,
        "losses": result.losses, "tokens": result.tokens, "skipped_steps": result.skipped_steps,
        # float16's loss scale, grown and cut by the run so far: a resumed run continues from it.
        "grad_scaler": scaler.state_dict() if scaler is not None else None,
        "world_size": world.size, "sharded": sharded,
        "global_rows": global_rows,  # a sharded run may resume on other ranks with as many
    }
    torch.save(state, staging / "state.pt")
    for f in staging.rglob("*"):
        if f.is_file():
            with f.open("rb") as handle:
                os.fsync(handle.fileno())
    os.replace(staging, final)
    for old in checkpoint_paths(directory)[:-1]:
        shutil.rmtree(old)
    return final


def checkpoint_state(path: Path, model: torch.nn.Module, world: World, global_rows: int | None) -> dict:
    """A checkpoint's state.pt, refused when this run cannot continue it: another rank count
    (the global batch, and so every step, depends on it) unless both are sharded with the
    same global batch (torch.distributed.checkpoint reshards), or sharded against not."""
    # Our own file, still read without unpickling arbitrary objects.
    state = torch.load(path / "state.pt", weights_only=True)
    ranks, sharded = int(state.get("world_size", 1)), bool(state.get("sharded", False))
    if sharded != distributed.is_sharded(model):
        was, now = ("with", "without") if sharded else ("without", "with")
        raise distributed.DistributedError(f"checkpoint {path} was written {was} --fsdp and this run is {now} it; "
                                           f"resume {was} --fsdp.")
    if sharded and ranks != world.size and state.get("global_rows") == global_rows:
        return state
    if ranks != world.size:
        again = f"--nproc {ranks}" if ranks > 1 else "a single process (no --nproc, no torchrun)"
        raise distributed.DistributedError(f"checkpoint {path} was trained on {ranks} rank(s) and this run has "
                                           f"{world.size}; resume with {again}.")
    return state


def restore_checkpoint(path: Path, model: PeftModel, optimizer, scheduler, result: TrainResult,
                        scaler: torch.amp.GradScaler | None = None, world: World = SINGLE,
                        global_rows: int | None = None) -> int:
    state = checkpoint_state(path, model, world, global_rows)
    if state.get("sharded", False):
        distributed.load_sharded(path / SHARDED, model, optimizer)
    else:
        params = trainable_parameters(model)
        saved = load_file(str(path / "trainable.safetensors"))
        if set(saved) != set(params):
            raise ValueError(f"checkpoint {path} was written for other trainable parameters; "
                             "resume with the same model, method and options.")
        with torch.no_grad():
            for name, tensor in saved.items():
                params[name].copy_(tensor)
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    if state.get("cuda_rng") and torch.cuda.is_available() and len(state["cuda_rng"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    if state.get("mps_rng") is not None and torch.backends.mps.is_available():
        torch.mps.set_rng_state(state["mps_rng"])
    result.losses, result.tokens = list(state["losses"]), int(state["tokens"])
    result.skipped_steps = int(state.get("skipped_steps", 0))
    if scaler is not None and state.get("grad_scaler"):
        scaler.load_state_dict(state["grad_scaler"])
    return int(state["step"])
