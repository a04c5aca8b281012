"""Part 2 of the quality bench: SmolLM2-135M-Instruct from its GGUF file, trained with peftkit
LoRA, prefix and prompt tuning to answer "positive or negative?" about a review, and scored
on greedy ``generate`` answers to held-out reviews (see bench/quality/__init__.py)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from bench import harness
from bench import rotten_tomatoes as rt
from bench.quality.cases import (
    GEN_EVAL_BATCH, NUM_VIRTUAL_TOKENS, WARMUP_RATIO, count_trainable, macro_f1, saved_size, smollm2_gguf,
    step_times, timing_summary,
)


def generation_config(method: str):
    peftkit = harness.import_peftkit()
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

    peftkit = harness.import_peftkit()
    from peftkit import data
    from peftkit.train import train
    from peftkit.learning_rates import default_learning_rate

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
        row.update(eval_s=time.perf_counter() - start, trainable_params=0, peak_rss_mb=harness.peak_rss_mb())
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
               trainable_params=count_trainable(pm), peak_rss_mb=harness.peak_rss_mb(),
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
