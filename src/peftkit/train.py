"""A small, honest training loop: method-aware learning rate (M9), AdamW, warm-up then
cosine decay, gradient accumulation and a progress bar."""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .config import LoraConfig, PeftConfig
from .model import PeftModel

# LoRA: Hu et al. (2021) fine-tune GPT-2 with 2e-4; QLoRA (Dettmers et al. 2023) uses
# 1e-4 to 2e-4 for 7B-65B models; Hugging Face PEFT's examples use 1e-4 to 3e-4. A full
# fine-tuning rate (1e-5 to 5e-5) leaves a zero-initialised B almost where it started.
DEFAULT_LEARNING_RATES: dict[str, float] = {LoraConfig.peft_type: 2e-4}


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


def train(model: PeftModel, batches: Iterable[dict], *, steps: int, lr: float | None = None,
          warmup_ratio: float = 0.1, weight_decay: float = 0.0, grad_accum: int = 1,
          progress: bool = True, desc: str = "train") -> TrainResult:
    """Run ``steps`` optimizer steps over ``batches`` (cycled), each of ``grad_accum`` micro-batches.

    A batch is a dict of keyword arguments for the model that includes ``labels``.
    """
    lr = default_learning_rate(next(iter(model.configs.values()))) if lr is None else lr
    params = list(model.trainable_parameters().values())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    scheduler = warmup_cosine(optimizer, int(warmup_ratio * steps), steps)
    stream: Iterator[dict] = itertools.cycle(batches)
    result = TrainResult(learning_rate=lr)
    model.train()
    start = time.perf_counter()
    bar = tqdm(range(steps), desc=desc, disable=not progress, dynamic_ncols=True)
    for _ in bar:
        step_loss = 0.0
        for _ in range(grad_accum):
            batch = next(stream)
            loss = model(**batch).loss / grad_accum
            loss.backward()
            step_loss += loss.item()
            result.tokens += _count_tokens(batch)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        result.losses.append(step_loss)
        elapsed = time.perf_counter() - start
        bar.set_postfix(loss=f"{step_loss:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}",
                        tok_s=f"{result.tokens / max(elapsed, 1e-9):.0f}")
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
