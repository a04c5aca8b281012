"""``python -m bench.lora_step``: run the cases, each in a fresh worker process, and write
OUT/lora_step.json and OUT/lora_step.md."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import bench.lora_step
from bench import harness
from bench.lora_step.cases import (
    ADAPTER, ATTN_IMPLEMENTATION, BATCH, CASE_GROUPS, CASES, LORA, LR, MODEL_CONFIG, NUM_VIRTUAL_TOKENS, SEED,
    SEQ_LEN, worker_main,
)
from bench.lora_step.report import add_ratios, check_targets, combine_runs, markdown_report

WORKER_MODULE = "bench.lora_step"


def run_in_subprocess(case: str, args) -> dict:
    """Run one case in a fresh interpreter and parse its marked result line."""
    argv = ["--worker", case, "--warmup", str(args.warmup), "--steps", str(args.steps),
            "--threads", str(args.threads)]
    outcome = harness.run_worker(WORKER_MODULE, argv, harness.worker_env(args.threads, offline=False),
                                 timeout=args.timeout)
    return harness.worker_row(outcome, {"case": case}, args.timeout)


def run_all(args) -> dict[str, dict]:
    """Run each case ``--repeats`` times, interleaved round-robin, each run a fresh process."""
    runs: dict[str, list[dict]] = {case: [] for case in args.cases}
    for repeat in range(args.repeats):
        for case in args.cases:
            label = case if args.repeats == 1 else f"{case} ({repeat + 1}/{args.repeats})"
            print(f"[lora_step] {label} ...", end=" ", flush=True)
            load = harness.load_average()
            row = run_in_subprocess(case, args)
            row["loadavg_before"] = load
            runs[case].append(row)
            status = f"error: {row['error']}" if "error" in row else f"median {row['median_s']:.3f} s"
            print(f"{status} ({row['wall_s']:.0f} s wall, load {load:.1f} before)", flush=True)
    return {case: combine_runs(case_runs) for case, case_runs in runs.items()}


def parse_cases(text: str) -> list[str]:
    """Case names and group names (``all``, ``lora``, ``methods``), comma-separated."""
    return harness.expand_cases(text, CASES, CASE_GROUPS)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.lora_step",
                                description=bench.lora_step.__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=parse_cases, default=CASES,
                   help=f"comma-separated cases ({','.join(CASES)}) and/or groups: "
                        f"lora ({','.join(CASE_GROUPS['lora'])}), "
                        f"methods ({','.join(CASE_GROUPS['methods'])}), all (default: all)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per case (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps per case (default 3)")
    p.add_argument("--repeats", type=int, default=1,
                   help="fresh processes per case, run interleaved; steps are pooled (default 1)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads value (default 2)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds allowed per case (default 1800)")
    p.add_argument("--out-dir", type=Path, default=harness.RESULTS_DIR,
                   help="where lora_step.json and lora_step.md go (default bench/results)")
    p.add_argument("--worker", metavar="CASE", choices=CASES, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if min(args.steps, args.threads, args.repeats) < 1 or args.warmup < 0:
        p.error("--steps, --threads and --repeats must be >= 1, --warmup >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args.worker, args.warmup, args.steps, args.threads)

    results = run_all(args)
    add_ratios(results)

    report = {
        "benchmark": "lora_step",
        "date": harness.utc_now(),
        "machine": harness.machine_info(args.threads),
        "setup": {
            "model": MODEL_CONFIG, "dtype": "float32", "attn_implementation": ATTN_IMPLEMENTATION,
            "batch": BATCH, "seq_len": SEQ_LEN, "real_tokens_per_step": BATCH * SEQ_LEN,
            "lr": LR, "seed": SEED, "lora": LORA, "adapter": ADAPTER,
            "num_virtual_tokens": NUM_VIRTUAL_TOKENS,
            "warmup": args.warmup, "steps": args.steps, "repeats": args.repeats,
        },
        "results": [results[c] for c in args.cases],
        "targets": check_targets(results),
    }
    md = markdown_report(report)
    harness.write_atomic(args.out_dir / "lora_step.json", json.dumps(report, indent=2) + "\n")
    harness.write_atomic(args.out_dir / "lora_step.md", md)
    print()
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
