"""The main job: what PEFT is for, shown on the built-in reference model with nothing downloaded.

A base model that already knows task A (the reference decoder, trained in full by
peftkit's own code on addition sentences and cached) is taught task B (subtraction
sentences, answered as a completion) by each method and by full fine-tuning, with the
same step budget. Each case runs in a fresh process so that its peak memory is its own.
The table shows what a practitioner weighs: trainable share, time, peak memory, task-B
accuracy before and after, task-A accuracy after (forgetting), and size on disk. Then the
LoRA adapter is merged, written and reloaded from disk, and shown to give the same outputs.

``peftkit demo --model PATH --data FILE`` runs the same comparison on a user's model and
JSONL data (there is no task A then).
"""

from __future__ import annotations

import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .specs.adapter import AdapterConfig
from .specs.lora import LoraConfig
from .specs.prefix import PrefixConfig
from .specs.prompt import PromptConfig
from . import validate
from .peak_memory import peak_rss_mb
from .data import EpochBatches, batches, build_dataset, read_jsonl, split
from .loading import LoadedModel, load_model
from .model_folder import save_model_folder
from .model import attach, load
from .pretrain import BASE_SEED, task_lines
from .train import evaluate, train


# Learning rates for a 1M-parameter model and a budget of a few hundred steps: each method's
# usual rate scaled up alike (full 1e-4 -> 1e-3, LoRA 2e-4 -> 2e-3, adapters 1e-4 -> 2e-3, prefix
# 1e-2, prompt 3e-2), so every method gets the same chance within the same budget.
CASES: list[tuple[str, object, float]] = [
    ("full fine-tuning", None, 1e-3),
    ("LoRA r=8 all-linear", LoraConfig(r=8, alpha=16, target_modules="all-linear"), 2e-3),
    ("adapter pfeiffer b=32", AdapterConfig(bottleneck=32), 2e-3),
    ("prefix 10 tokens", PrefixConfig(num_virtual_tokens=10), 1e-2),
    ("prompt 10 tokens", PromptConfig(num_virtual_tokens=10), 3e-2),
]
BATCH_SIZE = 32


def write_builtin_data(folder: Path, seed: int) -> tuple[Path, Path]:
    """Task B as {prompt, completion} lines (the answer is the completion) and task A the
    same way, for measuring forgetting."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for task, count in (("B", 1200), ("A", 200)):
        path = folder / f"task_{task.lower()}.jsonl"
        with path.open("w") as f:
            for line in task_lines(task, count, seed + 1):
                prompt, answer = line.rsplit(",", 1)
                f.write(json.dumps({"prompt": prompt + ",", "completion": answer}) + "\n")
        paths.append(path)
    return paths[0], paths[1]


def _dataset(loaded: LoadedModel, path: Path, seed: int, eval_fraction: float = 0.2):
    fmt, records = read_jsonl(path)
    data = build_dataset(fmt, records, loaded.encode, eos_id=loaded.eos_id, max_length=256,
                         tokenizer=loaded.tokenizer, source=loaded.source)  # conversations need its template
    return split(data, eval_fraction, seed)


def _task(path: Path) -> tuple[str, int | None]:
    fmt, records = read_jsonl(path)
    if fmt == "classification":
        return "classification", len({str(r["label"]) for r in records})
    return "causal-lm", None


def _load(model: str, data: Path, progress: bool = False) -> LoadedModel:
    """The model for ``data``'s task; ``progress`` shows the base being built on first use."""
    task, num_labels = _task(data)
    return load_model(model, task=task, num_labels=num_labels, progress=progress)


def run_case(index: int, model: str, data: Path, task_a: Path | None, steps: int, seed: int,
             out_dir: Path, progress: bool) -> dict:
    """One row of the table, run in a fresh process (see ``run_demo``)."""
    name, config, lr = CASES[index]
    torch.manual_seed(seed)
    loaded = _load(model, data)
    train_set, eval_set = _dataset(loaded, data, seed)
    train_batches = EpochBatches(train_set, BATCH_SIZE, loaded.pad_id, seed=seed)
    eval_batches = batches(eval_set, BATCH_SIZE, loaded.pad_id, shuffle=False)
    total = sum(p.numel() for p in loaded.model.parameters())
    model_under_training = loaded.model if config is None else attach(loaded.model, config)
    trainable = sum(p.numel() for p in model_under_training.parameters() if p.requires_grad)
    result = train(model_under_training, train_batches, steps=steps, lr=lr, progress=progress, desc=name)
    after = evaluate(model_under_training, eval_batches, progress, f"{name}: held-out task B")
    forgetting = None
    if task_a is not None:
        _, a_eval = _dataset(loaded, task_a, seed, eval_fraction=1.0)
        forgetting = evaluate(model_under_training, batches(a_eval, BATCH_SIZE, loaded.pad_id, shuffle=False),
                              progress, f"{name}: task A (forgetting)")["accuracy"]
    folder = out_dir / f"case-{index}"
    if config is None:
        save_model_folder(loaded, folder)
    else:
        model_under_training.save(folder)
    if isinstance(config, LoraConfig):  # kept to show that the reloaded adapter gives the same outputs
        with torch.no_grad():
            save_file({"logits": model_under_training(**_probe(loaded, data, seed)).logits}, str(out_dir / PROBE_FILE))
    return {
        "name": name, "trainable": trainable, "total": total, "seconds": result.seconds,
        "peak_rss_mb": peak_rss_mb(),
        "b_accuracy": after["accuracy"], "b_loss": after["loss"], "a_accuracy": forgetting,
        "bytes": sum(f.stat().st_size for f in folder.iterdir() if f.is_file()), "folder": str(folder),
        "lr": lr,
    }


@dataclass
class DemoReport:
    model: str
    data: str
    steps: int
    b_accuracy_before: float
    a_accuracy_before: float | None
    cases: list[dict]
    lora_folder: Path
    reload_max_diff: float
    merge_max_diff: float
    merged_reload_max_diff: float


def _accuracy(loaded: LoadedModel, path: Path | None, seed: int, eval_fraction: float,
              progress: bool, desc: str) -> float | None:
    if path is None:
        return None
    _, eval_set = _dataset(loaded, path, seed, eval_fraction)
    return evaluate(loaded.model, batches(eval_set, BATCH_SIZE, loaded.pad_id, shuffle=False),
                    progress, desc)["accuracy"]


PROBE_FILE = "lora-probe-logits.safetensors"


def _probe(loaded: LoadedModel, data: Path, seed: int) -> dict:
    _, eval_set = _dataset(loaded, data, seed)
    probe = batches(eval_set, 8, loaded.pad_id, shuffle=False)[0]
    return {k: probe[k] for k in ("input_ids", "attention_mask")}


def _merge_check(model: str, data: Path, lora_folder: Path, out_dir: Path, seed: int,
                 progress: bool) -> tuple[float, float, float]:
    """Reload the LoRA adapter from disk onto a fresh base and compare with the outputs the
    trained model gave; merge it, write the merged model, read it back and compare again."""
    phases = tqdm(total=4, desc="LoRA: reload, merge, save, read back", disable=not progress,
                  dynamic_ncols=True)
    loaded = _load(model, data)
    inputs = _probe(loaded, data, seed)
    trained = load_file(str(out_dir / PROBE_FILE))["logits"]
    with phases, torch.no_grad():
        pm = load(loaded.model, lora_folder)
        reloaded = pm(**inputs).logits
        phases.update()
        loaded.model = pm.merge_and_unload()
        merged = loaded.model(**inputs).logits
        phases.update()
        merged_folder = save_model_folder(loaded, out_dir / "lora-merged")
        phases.update()
        merged_from_disk = load_model(merged_folder, task=loaded.task, progress=False).model(**inputs).logits
        phases.update()
    diff = lambda a, b: (a - b).abs().max().item()  # noqa: E731
    return diff(reloaded, trained), diff(merged, reloaded), diff(merged_from_disk, reloaded)


def run_demo(out_dir: str | Path, *, model: str = "reference", data: str | Path | None = None,
             steps: int = 150, seed: int = BASE_SEED, progress: bool = True) -> DemoReport:
    validate.positive_int("run_demo", "steps", steps)
    validate.number("run_demo", "seed", seed, at_least=0, below=2 ** 63)  # torch.manual_seed's range
    if not isinstance(seed, int):
        raise validate.InvalidValue("run_demo", "seed", "a whole number", seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if data is None:
        data, task_a = write_builtin_data(out_dir / "data", seed)
    else:
        data, task_a = Path(data), None
    base = _load(model, data, progress)  # builds and caches the task-A reference base on first use
    b_before = _accuracy(base, data, seed, 0.2, progress, "base model: held-out task B")
    a_before = _accuracy(base, task_a, seed, 1.0, progress, "base model: task A")
    del base
    cases = []
    # A fresh process per case: peak memory is then the case's own, and no state leaks.
    context = multiprocessing.get_context("spawn")
    for index in range(len(CASES)):
        with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
            cases.append(pool.submit(run_case, index, model, data, task_a, steps, seed, out_dir, progress).result())
    lora_folder = Path(next(c["folder"] for c in cases if c["name"].startswith("LoRA")))
    reload_diff, merge_diff, merged_reload_diff = _merge_check(model, data, lora_folder, out_dir, seed, progress)
    return DemoReport(model=model, data=str(data), steps=steps, b_accuracy_before=b_before,
                      a_accuracy_before=a_before, cases=cases, lora_folder=lora_folder,
                      reload_max_diff=reload_diff, merge_max_diff=merge_diff,
                      merged_reload_max_diff=merged_reload_diff)
