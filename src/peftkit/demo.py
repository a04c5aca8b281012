"""The main job: LoRA on the built-in reference model, end to end, with nothing downloaded.

Steps: build the reference decoder, attach LoRA, train it on a small built-in text task,
save the adapter, reload it onto a fresh copy of the base, merge it, and report what a
practitioner checks: trainable share, loss before and after, adapter size against the
model's, and how far the merged model is from the unmerged one.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .config import LoraConfig
from .io import load
from .model import attach
from .models import ByteTokenizer, ReferenceConfig, ReferenceDecoder
from .train import evaluate, train, warmup_cosine

BASE_STEPS = 300  # full training steps that teach the reference decoder task A
BASE_SEED = 0

_NAMES = ["ada", "bo", "cy", "dee", "eli", "fay", "gus", "hal", "ivy", "jo"]
_THINGS = ["apple", "book", "cup", "drum", "egg", "fig", "hat", "key"]


def task_lines(task: str, count: int, seed: int) -> list[str]:
    """The two built-in tasks, short sentences whose arithmetic is right.

    Task A (what the base model is pretrained on), addition:
        "ada has 3 cups and 4 hats, 7 things."
    Task B (what the adapter teaches), subtraction in a related template:
        "ada had 7 cups and gave 3, 4 left."
    """
    rng = random.Random(f"{task}-{seed}")
    lines = []
    for _ in range(count):
        name, (first, second) = rng.choice(_NAMES), rng.sample(_THINGS, 2)
        if task == "A":
            a, b = rng.randint(1, 4), rng.randint(1, 4)
            lines.append(f"{name} has {a} {first}s and {b} {second}s, {a + b} things.")
        else:
            total = rng.randint(2, 9)
            given = rng.randint(1, total - 1)
            lines.append(f"{name} had {total} {first}s and gave {given}, {total - given} left.")
    return lines


def batches_from_lines(lines: list[str], tokenizer: ByteTokenizer, batch_size: int) -> list[dict]:
    """Right-padded causal-LM batches; labels are the inputs with padding set to -100."""
    batches = []
    for i in range(0, len(lines), batch_size):
        enc = tokenizer(lines[i:i + batch_size], add_bos=True, add_eos=True)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        batches.append({**enc, "labels": labels})
    return batches


@dataclass
class DemoReport:
    trainable_params: int
    total_params: int
    task_b_loss_before: float
    task_b_loss_after: float
    task_a_loss_before: float
    task_a_loss_after: float
    train_seconds: float
    steps: int
    learning_rate: float
    adapter_bytes: int
    model_bytes: int
    reload_max_diff: float
    merge_max_diff: float
    adapter_dir: Path


def pretrain_base(steps: int, seed: int, progress: bool) -> ReferenceDecoder:
    """A reference decoder that knows task A: every weight trained, from a seeded random init."""
    torch.manual_seed(seed)
    model = ReferenceDecoder(ReferenceConfig())
    batches = batches_from_lines(task_lines("A", 1024, seed), ByteTokenizer(), batch_size=32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scheduler = warmup_cosine(optimizer, steps // 10, steps)
    model.train()
    for step in tqdm(range(steps), desc="base model (task A)", disable=not progress, dynamic_ncols=True):
        model(**batches[step % len(batches)]).loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return model.eval()


def run_demo(out_dir: str | Path, *, steps: int = 150, base_steps: int = BASE_STEPS, seed: int = BASE_SEED,
             progress: bool = True) -> DemoReport:
    out_dir = Path(out_dir)
    tokenizer = ByteTokenizer()
    base = pretrain_base(base_steps, seed, progress)
    base.save_pretrained(out_dir / "base")
    fresh_base = ReferenceDecoder.from_pretrained(out_dir / "base")

    train_b = batches_from_lines(task_lines("B", 1024, seed), tokenizer, batch_size=32)
    eval_a = batches_from_lines(task_lines("A", 128, seed + 1), tokenizer, batch_size=32)
    eval_b = batches_from_lines(task_lines("B", 128, seed + 1), tokenizer, batch_size=32)

    pm = attach(base, LoraConfig(r=8, alpha=16, target_modules="all-linear"))
    trainable, total = pm.parameter_counts()
    task_a_before, task_b_before = evaluate(pm, eval_a)["loss"], evaluate(pm, eval_b)["loss"]
    # A small model and a few hundred steps: 2e-3 rather than the 2e-4 default that suits
    # billion-parameter bases trained for thousands of steps.
    result = train(pm, train_b, steps=steps, lr=2e-3, progress=progress, desc="LoRA (task B)")
    task_a_after, task_b_after = evaluate(pm, eval_a)["loss"], evaluate(pm, eval_b)["loss"]

    adapter_dir = pm.save(out_dir / "adapter")
    probe = {k: eval_b[0][k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        trained_logits = pm(**probe).logits
        reloaded = load(fresh_base, adapter_dir)
        reloaded_logits = reloaded(**probe).logits
        merged = reloaded.merge_and_unload()
        merged_logits = merged(**probe).logits

    return DemoReport(
        trainable_params=trainable, total_params=total,
        task_b_loss_before=task_b_before, task_b_loss_after=task_b_after,
        task_a_loss_before=task_a_before, task_a_loss_after=task_a_after,
        train_seconds=result.seconds, steps=steps, learning_rate=result.learning_rate,
        adapter_bytes=(adapter_dir / "adapter_model.safetensors").stat().st_size,
        model_bytes=(out_dir / "base" / "model.safetensors").stat().st_size,
        reload_max_diff=(reloaded_logits - trained_logits).abs().max().item(),
        merge_max_diff=(merged_logits - reloaded_logits).abs().max().item(),
        adapter_dir=adapter_dir,
    )
