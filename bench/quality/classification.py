"""Part 1 of the quality bench: MiniLM with a fresh two-way head on Rotten Tomatoes review
sentiment, one case and seed per worker process (see bench/quality/__init__.py)."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from bench import harness
from bench import rotten_tomatoes as rt
from bench.quality.cases import (
    FULL_LR, HEAD, HEAD_LR, MAX_LENGTH, NUM_VIRTUAL_TOKENS, QV_TARGETS, WARMUP_RATIO, count_trainable, macro_f1,
    minilm_folder, saved_size, step_times, timing_summary,
)


def peftkit_config(method: str):
    """peftkit's config for a ``peftkit-<method>`` classification case (peftkit's defaults
    besides what the case names)."""
    peftkit = harness.import_peftkit()
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

    peftkit = harness.import_peftkit()
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
    from peftkit.learning_rates import default_learning_rate

    return default_learning_rate(peftkit_config(method), model)


def prepare_classification(case: str, model, adjust_config=None):
    """Wrap ``model`` for ``case``; return (model to train, its AdamW parameter groups, a
    record of the setup). ``adjust_config`` (a function of a peftkit config that returns
    another) is for studies of the defaults; the bench itself never passes it."""
    from peftkit.learning_rates import (LORA_PLUS_RATIO, TRAINED_COPY_LEARNING_RATE, default_learning_rate,
                                        default_parameter_groups)

    library, _, method = case.partition("-")
    if case in ("head", "full"):
        if case == "head":
            for name, p in model.named_parameters():
                p.requires_grad_(name.startswith(("classifier.", "bert.pooler.")))
        lr = HEAD_LR if case == "head" else FULL_LR
        return model, [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr}], {"lr": lr}
    if library == "peftkit":
        peftkit = harness.import_peftkit()
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
    harness.import_peftkit()
    from peftkit.learning_rates import LORA_PLUS_RATIO

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

    harness.import_peftkit()
    from peftkit.train import train

    folder = minilm_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    train_batches, test_batches, gold = classification_data(tokenizer, seed, args.batch_size, args.eval_limit, rows)
    torch.manual_seed(seed)  # the fresh head's init: the same for every case of this seed
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2, local_files_only=True)
    total_params = sum(p.numel() for p in model.parameters())
    rss_after_load = harness.peak_rss_mb()
    wrapped, groups, setup = prepare_classification(case, model, adjust_config)
    if regroup is not None:
        groups = regroup(wrapped, groups)
        setup["param_groups"] = describe_groups(groups)
    trainable = count_trainable(wrapped)

    torch.manual_seed(seed)  # dropout and adapter randomness from here on
    cumulative: list[float] = []
    result = train(wrapped, train_batches, steps=args.steps, param_groups=groups, warmup_ratio=WARMUP_RATIO,
                   progress=False, on_step=lambda info: cumulative.append(info["seconds"]))
    peak_rss = harness.peak_rss_mb()

    start = time.perf_counter()
    predicted = classify(wrapped, test_batches)
    eval_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        size, keys = saved_size(save_classification(case, wrapped, Path(tmp) / "saved"))
    return {
        "case": case, "seed": seed, "library_version": harness.library_version(case), **setup,
        "trainable_params": trainable, "total_params": total_params,
        "accuracy": sum(p == g for p, g in zip(predicted, gold)) / len(gold),
        "macro_f1": macro_f1(predicted, gold), "eval_examples": len(gold),
        "predicted_positive_share": sum(predicted) / len(predicted),
        **timing_summary(step_times(cumulative)),
        "train_s": result.seconds, "eval_s": eval_s,
        "first_loss": result.losses[0], "last_loss": result.losses[-1],
        "peak_rss_mb": peak_rss, "rss_after_load_mb": rss_after_load,
        "peak_rss_end_mb": harness.peak_rss_mb(),
        "saved_bytes": size, "saved_tensors": len(keys),
        "head_saved": any("classifier" in k.split(".") for k in keys),
        "torch_threads": torch.get_num_threads(),
    }
