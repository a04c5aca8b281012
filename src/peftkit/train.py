"""A small, honest training loop: method-aware learning rate (M9), AdamW, warm-up then
cosine decay, gradient accumulation and a progress bar."""

from __future__ import annotations

import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .config import AdapterConfig, LoraConfig, PeftConfig
from .model import PeftModel

# LoRA: Hu et al. (2021) fine-tune GPT-2 with 2e-4; QLoRA (Dettmers et al. 2023) uses
# 1e-4 to 2e-4 for 7B-65B models; Hugging Face PEFT's examples use 1e-4 to 3e-4. A full
# fine-tuning rate (1e-5 to 5e-5) leaves a zero-initialised B almost where it started.
# Bottleneck adapters: Pfeiffer et al. (2021, AdapterFusion) and AdapterHub train them
# with 1e-4, Houlsby et al. (2019) pick from 3e-5 to 3e-3; a zero-initialised up-projection,
# like LoRA's B, barely moves at a full fine-tuning rate.
DEFAULT_LEARNING_RATES: dict[str, float] = {LoraConfig.peft_type: 2e-4, AdapterConfig.peft_type: 1e-4}


def default_learning_rate(config: PeftConfig) -> float:
    """The learning rate a method trains well with when the user gives none (M9)."""
    return DEFAULT_LEARNING_RATES[config.peft_type]


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from 0 to the base rate, then cosine decay to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)
    learning_rate: float = 0.0
    seconds: float = 0.0
    tokens: int = 0


def _count_tokens(batch: dict) -> int:
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


CHECKPOINT_PREFIX = "step-"


def _checkpoint_paths(directory: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a folder only gets its final name once whole)."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
             and p.name[len(CHECKPOINT_PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def save_checkpoint(directory: Path, step: int, model: PeftModel, optimizer, scheduler, result: "TrainResult") -> Path:
    """Trainable weights (safetensors) + optimizer, scheduler, RNG states and step, written
    into a temporary folder and renamed, so a kill at any moment leaves whole checkpoints."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"{CHECKPOINT_PREFIX}{step:08d}"
    staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=directory))
    weights = {n: p.detach().cpu().contiguous() for n, p in model.trainable_parameters().items()}
    save_file(weights, str(staging / "trainable.safetensors"))
    state = {
        "step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
        "losses": result.losses, "tokens": result.tokens,
    }
    torch.save(state, staging / "state.pt")
    for f in staging.iterdir():
        with f.open("rb") as handle:
            os.fsync(handle.fileno())
    os.replace(staging, final)
    for old in _checkpoint_paths(directory)[:-1]:
        shutil.rmtree(old)
    return final


def _restore_checkpoint(path: Path, model: PeftModel, optimizer, scheduler, result: "TrainResult") -> int:
    params = model.trainable_parameters()
    saved = load_file(str(path / "trainable.safetensors"))
    if set(saved) != set(params):
        raise ValueError(f"checkpoint {path} was written for other trainable parameters; "
                         "resume with the same model, method and options.")
    with torch.no_grad():
        for name, tensor in saved.items():
            params[name].copy_(tensor)
    # Our own file, still read without unpickling arbitrary objects.
    state = torch.load(path / "state.pt", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    result.losses, result.tokens = list(state["losses"]), int(state["tokens"])
    return int(state["step"])


def train(model: PeftModel, batches: Sequence[dict], *, steps: int, lr: float | None = None,
          warmup_ratio: float = 0.1, weight_decay: float = 0.0, grad_accum: int = 1,
          progress: bool = True, desc: str = "train", checkpoint_dir: str | Path | None = None,
          checkpoint_every: int = 0, resume: bool = False,
          on_step: Callable[[dict], None] | None = None) -> TrainResult:
    """Run ``steps`` optimizer steps, each over ``grad_accum`` micro-batches taken from
    ``batches`` in order (cycled). A batch is a dict of model keyword arguments with ``labels``.

    With ``checkpoint_dir`` and ``checkpoint_every``, a checkpoint is written every N steps;
    ``resume=True`` continues from the newest one, so a killed run ends with the same adapter
    as an uninterrupted one. ``on_step`` receives {step, loss, lr, tokens, seconds}.
    """
    lr = default_learning_rate(next(iter(model.configs.values()))) if lr is None else lr
    params = list(model.trainable_parameters().values())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    scheduler = warmup_cosine(optimizer, int(warmup_ratio * steps), steps)
    result = TrainResult(learning_rate=lr)
    checkpoints = Path(checkpoint_dir) if checkpoint_dir is not None else None
    first_step = 0
    if resume and checkpoints is not None and _checkpoint_paths(checkpoints):
        first_step = _restore_checkpoint(_checkpoint_paths(checkpoints)[-1], model, optimizer, scheduler, result)
    model.train()
    start = time.perf_counter()
    bar = tqdm(range(first_step, steps), initial=first_step, total=steps, desc=desc,
               disable=not progress, dynamic_ncols=True)
    for step in bar:
        step_loss = 0.0
        for micro in range(grad_accum):
            batch = batches[(step * grad_accum + micro) % len(batches)]
            loss = model(**batch).loss / grad_accum
            loss.backward()
            step_loss += loss.item()
            result.tokens += _count_tokens(batch)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        result.losses.append(step_loss)
        elapsed = time.perf_counter() - start
        current_lr = scheduler.get_last_lr()[0]
        bar.set_postfix(loss=f"{step_loss:.3f}", lr=f"{current_lr:.2e}",
                        tok_s=f"{result.tokens / max(elapsed, 1e-9):.0f}")
        if on_step is not None:
            on_step({"step": step + 1, "loss": step_loss, "lr": current_lr,
                     "tokens": result.tokens, "seconds": elapsed})
        if checkpoints is not None and checkpoint_every and (step + 1) % checkpoint_every == 0:
            save_checkpoint(checkpoints, step + 1, model, optimizer, scheduler, result)
    result.seconds = time.perf_counter() - start
    model.eval()
    return result


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, batches: Iterable[dict]) -> float:
    """Mean loss per predicted token over ``batches``."""
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    for batch in batches:
        labels = batch["labels"]
        n = int((labels[:, 1:] != -100).sum())  # causal LMs predict labels shifted by one
        total += model(**batch).loss.item() * n
        count += n
    model.train(was_training)
    return total / max(count, 1)
