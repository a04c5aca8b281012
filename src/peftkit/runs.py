"""A whole run, as ``peftkit train`` does it: the run folder (one run per folder, resumed
from its last checkpoint), the data split and held-out file, the loop of ``train.py``, the
log and the summary."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import PeftConfig
from .model import PeftModel
from .train import CHECKPOINT_PREFIX, LORA_PLUS_RATIO, _checkpoint_paths, evaluate, train


# -- a whole run: what `peftkit train` does ------------------------------------------------
@dataclass
class RunOptions:
    """Everything about a run besides the model, the data and the method."""

    steps: int | None = None  # optimizer steps; default one epoch
    epochs: float | None = None
    lr: float | None = None  # default: the method's (M9)
    batch_size: int = 8
    grad_accum: int = 1
    eval_fraction: float = 0.1
    seed: int = 0
    max_length: int = 512
    checkpoint_every: int = 50
    warmup_ratio: float = 0.1
    eval_data: str | None = None  # a held-out JSONL file; default: eval_fraction of the data
    lora_plus_ratio: float = LORA_PLUS_RATIO  # LoRA's B rate over A's at default rates; 1 = off
    eval_limit: int | None = None  # score only the first N held-out examples (a quicker look)


@dataclass
class RunSummary:
    method: str
    trainable_params: int
    total_params: int
    train_examples: int
    eval_examples: int
    steps: int
    learning_rate: float
    seconds: float
    tokens: int
    first_loss: float
    last_loss: float
    eval_before: dict[str, float]
    eval_after: dict[str, float]
    adapter_dir: str
    adapter_bytes: int
    classes: list[str]
    resumed_from: int
    rates: dict[str, float] = field(default_factory=dict)  # TrainResult.rates


class RunFolderError(ValueError):
    """An output folder that holds something other than this run."""


RUN_FILE = "run.json"


def _claim_out_dir(out_dir: Path, identity: dict, resume: bool) -> None:
    """Refuse to mix runs: a non-empty folder must hold this very run (and then needs --resume)."""
    run_file = out_dir / RUN_FILE
    if out_dir.exists() and any(out_dir.iterdir()):
        if not run_file.is_file():
            raise RunFolderError(f"{out_dir} is not empty and holds no peftkit run; pick another --out.")
        previous = json.loads(run_file.read_text())
        if previous != identity:
            changed = sorted(k for k in set(previous) | set(identity) if previous.get(k) != identity.get(k))
            raise RunFolderError(f"{out_dir} holds a different run (it differs in {changed}); pick another --out.")
        if not resume:
            raise RunFolderError(f"{out_dir} already holds this run; pass --resume to continue it or pick another --out.")
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{RUN_FILE}.tmp"
    tmp.write_text(json.dumps(identity, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, run_file)


def _rewrite_log(path: Path, keep_through_step: int) -> None:
    """On resume, drop log lines of steps the checkpoint does not contain."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= keep_through_step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def _held_out_file(path: str | Path, fmt: str, train_set, loaded, options: RunOptions):
    """The held-out set from its own file: the training file's format, and for classification
    only the classes the model is trained on (an unseen class could never be predicted)."""
    from . import data as datamod

    eval_fmt, records = datamod.read_jsonl(path)
    if eval_fmt != fmt:
        raise datamod.DataError(f"{path} is {eval_fmt!r} data but the training file is {fmt!r}; "
                                "the held-out file must use the same format.")
    try:
        return datamod.build_dataset(fmt, records, loaded.encode, eos_id=loaded.eos_id,
                                     max_length=options.max_length, classes=train_set.classes or None)
    except datamod.DataError as e:
        raise datamod.DataError(f"held-out file {path}: {e} The training data has no example of it, so "
                                "the model cannot learn it: add examples to the training file or drop "
                                "those lines.") from e


def run_training(loaded, data_path: str | Path, config: PeftConfig, out_dir: str | Path,
                 options: RunOptions, *, resume: bool = False, progress: bool = True,
                 preflight: Callable[[PeftModel, torch.optim.Optimizer, dict], None] | None = None) -> RunSummary:
    """Load data, attach ``config`` to ``loaded.model``, train with checkpoints, evaluate on a
    held-out split, and write ``out_dir``: run.json, train_log.jsonl, checkpoints/, adapter/.

    ``loaded`` is a ``peftkit.loading.LoadedModel``; ``preflight`` is passed to ``train``.
    """
    from . import data as datamod
    from .model import attach

    out_dir = Path(out_dir)
    if config.base_model_name_or_path is None:
        config = dataclasses.replace(config, base_model_name_or_path=loaded.source)
    fmt, records = datamod.read_jsonl(data_path)
    if (fmt == "classification") != (loaded.task == "classification"):
        raise datamod.DataError(
            f"{data_path} is {fmt!r} data but the model was loaded for {loaded.task!r}; "
            "{'text', 'label'} lines need a sequence-classification model and the others a causal LM.")
    dataset = datamod.build_dataset(fmt, records, loaded.encode, eos_id=loaded.eos_id,
                                    max_length=options.max_length)
    if options.eval_data:
        train_set, eval_set = dataset, _held_out_file(options.eval_data, fmt, dataset, loaded, options)
    else:
        train_set, eval_set = datamod.split(dataset, options.eval_fraction, options.seed)
    if not train_set.examples:
        raise datamod.DataError(f"{data_path} has too few examples to train on ({len(dataset)}).")
    if options.eval_limit is not None:
        eval_set = dataclasses.replace(eval_set, examples=eval_set.examples[:options.eval_limit])
    torch.manual_seed(options.seed)
    train_batches = datamod.batches(train_set, options.batch_size, loaded.pad_id, shuffle=True, seed=options.seed)
    eval_batches = datamod.batches(eval_set, options.batch_size, loaded.pad_id, shuffle=False) if eval_set.examples else []
    steps = options.steps or max(1, math.ceil((options.epochs or 1.0) * len(train_batches) / options.grad_accum))

    identity = {"model": loaded.source, "data": str(Path(data_path).resolve()), "config": config.to_dict(),
                "options": {**dataclasses.asdict(options), "steps": steps}}
    _claim_out_dir(out_dir, identity, resume)

    pm = attach(loaded.model, config)
    trainable, total = pm.parameter_counts()
    eval_before = evaluate(pm, eval_batches, progress, "held-out, before") if eval_batches else {}
    checkpoints = out_dir / "checkpoints"
    resumed_from = 0
    if resume and _checkpoint_paths(checkpoints):
        resumed_from = int(_checkpoint_paths(checkpoints)[-1].name[len(CHECKPOINT_PREFIX):])
        _rewrite_log(out_dir / "train_log.jsonl", resumed_from)

    with (out_dir / "train_log.jsonl").open("a") as log:
        def write_log(record: dict) -> None:
            log.write(json.dumps(record) + "\n")
            log.flush()

        result = train(pm, train_batches, steps=steps, lr=options.lr, warmup_ratio=options.warmup_ratio,
                       grad_accum=options.grad_accum, progress=progress, desc=f"{config.peft_type.lower()}",
                       checkpoint_dir=checkpoints, checkpoint_every=options.checkpoint_every,
                       resume=resume, on_step=write_log, preflight=preflight,
                       lora_plus_ratio=options.lora_plus_ratio)
    eval_after = evaluate(pm, eval_batches, progress, "held-out, after") if eval_batches else {}
    adapter_dir = pm.save(out_dir / "adapter")
    return RunSummary(
        method=config.peft_type, trainable_params=trainable, total_params=total,
        train_examples=len(train_set), eval_examples=len(eval_set), steps=steps,
        learning_rate=result.learning_rate, seconds=result.seconds, tokens=result.tokens,
        first_loss=result.losses[0], last_loss=result.losses[-1],
        eval_before=eval_before, eval_after=eval_after, adapter_dir=str(adapter_dir),
        adapter_bytes=sum(f.stat().st_size for f in adapter_dir.iterdir()),
        classes=list(dataset.classes), resumed_from=resumed_from, rates=result.rates,
    )
