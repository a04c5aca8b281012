"""The built-in tasks and the base model that knows the first one, built by peftkit's own code.

The reference decoder (``models/``) is trained in full on task A; the demo then teaches it
task B with each method. ``loading.reference_base`` caches the trained base by seed and
step count, so it is built once per machine.
"""

from __future__ import annotations

import random

import torch
from tqdm.auto import tqdm

from .data import Example, collate
from .models import ByteTokenizer, ReferenceConfig, ReferenceDecoder
from .learning_rates import warmup_cosine

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


def pretrain_base(steps: int, seed: int, progress: bool) -> ReferenceDecoder:
    """A reference decoder that knows task A: every weight trained, from a seeded random init."""
    torch.manual_seed(seed)
    model = ReferenceDecoder(ReferenceConfig())
    tokenizer = ByteTokenizer()
    examples = [Example(ids, list(ids)) for ids in
                (tokenizer.encode(line, add_bos=True, add_eos=True) for line in task_lines("A", 1024, seed))]
    batches = [collate(examples[i:i + 32], tokenizer.pad_token_id) for i in range(0, len(examples), 32)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scheduler = warmup_cosine(optimizer, steps // 10, steps)
    model.train()
    for step in tqdm(range(steps), desc="base model (task A)", disable=not progress, dynamic_ncols=True):
        model(**batches[step % len(batches)]).loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return model.eval()
