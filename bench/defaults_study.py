"""Choosing peftkit's defaults on a validation split, never on bench.quality's held-out one.

bench.quality reports held-out accuracy with peftkit's defaults, so the defaults must not
be picked by looking at that held-out split. This study carves a validation split out of the
*training* reviews (by movie again: 20 % of the training movies' reviews, seed 1), trains on
the rest with bench.quality's exact setup (MiniLM, batches of 32, 162 steps, warm-up then cosine,
the head trained in full at 1e-3) and compares candidate setups on the validation reviews.

Studies (``--study``):

  lora    LoRA on query,value and on all-linear, beside full fine-tuning (5e-5) as the reference:
            plain      A and B at peftkit's width rate (2e-4 x sqrt(4096 / hidden size))
            loraplus   LoRA+ (Hayou et al. 2024): B at 16 x A's rate, A at half the width rate,
                       as the LoRA+ authors advise (the ratio 2^4 and "eta_A slightly smaller,
                       by a factor of 2, than a vanilla LoRA rate"); peftkit's default since
            rate-1e-3  A and B at 1e-3, the top of peftkit's LoRA range, as a reference point
  prefix  prefix tuning, 20 virtual tokens at 1e-2:
            vocab      the model's own keys and values of vocabulary tokens (peftkit's default
                       for a language model)
            random     N(0, 1), Hugging Face PEFT's init (peftkit's default for a classifier
                       since this study)

Usage:  python -m bench.defaults_study --study lora [--candidates plain,loraplus] [--seeds 42,43]
Writes OUT/defaults_<study>.json and prints a table (OUT defaults to bench/results).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from bench import harness
from bench import rotten_tomatoes as rt
from bench.quality.classification import run_classification

VALIDATION_FRACTION, VALIDATION_SEED = 0.2, 1
STUDIES = {  # study -> (cases, candidates); the reference case "full" runs once per seed
    "lora": (["full", "peftkit-qv", "peftkit-all-linear"], ["plain", "loraplus", "rate-1e-3"]),
    "prefix": (["peftkit-prefix"], ["vocab", "random"]),
}


def validation_rows() -> tuple[list[dict], list[dict]]:
    """(reviews to train on, validation reviews): the training side of the corpus's split,
    split again by movie. No held-out review of bench.quality is in either."""
    train, _ = rt.split()
    return rt.split_by_movie(train, VALIDATION_FRACTION, VALIDATION_SEED)


def hooks_for(candidate: str):
    """(regroup, adjust_config) for run_classification: how ``candidate`` changes the
    optimizer groups or the config of peftkit's defaults (None: unchanged)."""
    from peftkit.learning_rates import LORA_PLUS_RATIO, default_parameter_groups

    def groups(ratio: float, rate: float | None = None):
        def regroup(model, _defaults):
            built = default_parameter_groups(model, lora_plus_ratio=ratio)
            return [{**g, "lr": rate} if rate and g["kind"] == "adapter" else g for g in built]
        return regroup

    if candidate == "plain":
        return groups(1.0), None
    if candidate == "loraplus":
        return groups(LORA_PLUS_RATIO), None
    if candidate == "rate-1e-3":
        return groups(1.0, 1e-3), None
    if candidate in ("vocab", "random"):
        return None, lambda config: dataclasses.replace(config, init=candidate)
    raise ValueError(f"unknown candidate {candidate!r}")


def worker(case: str, candidate: str, seed: int, args) -> None:
    import torch

    torch.set_num_threads(args.threads)

    def measure() -> dict:
        harness.import_peftkit()
        regroup, adjust_config = (None, None) if case == "full" else hooks_for(candidate)
        row = run_classification(case, seed, args, rows=validation_rows(), regroup=regroup,
                                 adjust_config=adjust_config)
        return {**{k: v for k, v in row.items() if k != "step_s"}, "candidate": candidate}

    harness.emit_result(measure, {"case": case, "seed": seed, "candidate": candidate})


def run(case: str, candidate: str, seed: int, args) -> dict:
    argv = ["--study", args.study, "--worker", case, "--candidate", candidate,
            "--seed", str(seed), "--threads", str(args.threads), "--steps", str(args.steps)]
    outcome = harness.run_worker("bench.defaults_study", argv, harness.worker_env(args.threads))
    if outcome.result is not None:
        return outcome.result
    return {"case": case, "candidate": candidate, "seed": seed, "error": " | ".join(outcome.stderr_tail(3))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.defaults_study", description=__doc__.split("\n\n")[0])
    p.add_argument("--study", choices=sorted(STUDIES), required=True)
    p.add_argument("--candidates", help="comma-separated (default: all of the study's)")
    p.add_argument("--seeds", default="42,43")
    p.add_argument("--steps", type=int, default=162)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=harness.RESULTS_DIR)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--candidate", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    # run_classification reads these from its own arguments.
    args.batch_size, args.eval_limit = 32, 0
    if args.worker:
        worker(args.worker, args.candidate, args.seed, args)
        return 0

    cases, candidates = STUDIES[args.study]
    candidates = args.candidates.split(",") if args.candidates else candidates
    fit, validation = validation_rows()
    print(f"training on {len(fit)} reviews, validating on {len(validation)} (of movies not trained on)")
    runs = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for case in cases:
            for candidate in (["plain"] if case == "full" else candidates):
                start = time.perf_counter()
                row = run(case, candidate, seed, args)
                runs.append(row)
                shown = (f"{100 * row['accuracy']:.1f}% (loss {row['first_loss']:.3f} -> {row['last_loss']:.3f})"
                         if "accuracy" in row else row["error"])
                print(f"{case:20s} {candidate:10s} seed {seed}: {shown}  [{time.perf_counter() - start:.0f} s]",
                      flush=True)
    summary = {}
    for row in runs:
        if "accuracy" in row:
            summary.setdefault(f"{row['case']} {row['candidate']}", []).append(row["accuracy"])
    print("\nmean validation accuracy over seeds:")
    for key, values in summary.items():
        print(f"  {key:32s} {100 * sum(values) / len(values):.1f}  ({', '.join(f'{100 * v:.1f}' for v in values)})")
    report = {"study": args.study,
              "setup": {"validation_fraction": VALIDATION_FRACTION, "validation_seed": VALIDATION_SEED,
                        "train_reviews": len(fit), "validation_reviews": len(validation), "steps": args.steps},
              "torch_threads": args.threads,
              "runs": runs, "mean_accuracy": {k: sum(v) / len(v) for k, v in summary.items()}}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"defaults_{args.study}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
