"""How a prefix's init meets a pretrained model: the loss on the first training batch.

SmolLM2-135M-Instruct (from its GGUF file) on the first 8 Rotten Tomatoes
{"prompt","completion"} lines of bench.quality's generation part, before any training:
the bare model, a 20-token prefix from PEFT's N(0, 1) init (peftkit ``init="random"``) and
peftkit's default, the keys and values the model computes for 20 vocabulary tokens
(``init="vocab"``), over a few seeds.

Usage:  python -m bench.prefix_init [--seeds 0,1,2]   (from the repository root)
"""

from __future__ import annotations

import argparse
import copy
import random

import torch

from bench import harness
from bench import rotten_tomatoes as rt
from bench.quality.cases import smollm2_gguf


def first_batch(tokenizer, size: int = 8) -> dict:
    from peftkit import data

    train_rows, _ = rt.split()
    rows = list(train_rows)
    random.Random(42).shuffle(rows)  # the order bench.quality trains in (seed 42)
    records = rt.completion_records(rows[:size], tokenizer)
    dataset = data.build_dataset("completion", records, lambda text: tokenizer(text)["input_ids"],
                                 eos_id=tokenizer.eos_token_id, max_length=256)
    return data.batches(dataset, size, tokenizer.pad_token_id, shuffle=False)[0]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.prefix_init", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    args = parser.parse_args()
    peftkit = harness.import_peftkit()  # the working tree's peftkit
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True).eval()
    batch = first_batch(tokenizer)
    with torch.no_grad():
        print(f"bare model: first-batch loss {model(**batch).loss.item():.2f}")
        for init in ("random", "vocab"):
            losses = []
            for seed in (int(s) for s in args.seeds.split(",")):
                torch.manual_seed(seed)
                pm = peftkit.attach(copy.deepcopy(model), peftkit.PrefixConfig(num_virtual_tokens=20, init=init))
                losses.append(pm(**batch).loss.item())
            print(f"prefix init={init!r}: first-batch loss " + ", ".join(f"{x:.2f}" for x in losses))


if __name__ == "__main__":
    main()
