"""``python -m bench.lora_step``: per allocator setting, the interleaved timing of every case in
one worker process and the peak memory of each case in a fresh one; OUT/lora_step.json and
OUT/lora_step.md (``--name`` changes the file names)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import bench.lora_step
from bench import harness
from bench.lora_step.cases import (
    ADAPTER, ATTN_IMPLEMENTATION, BATCH, CASE_GROUPS, CASES, LORA, LR, MODEL_CONFIG, NUM_VIRTUAL_TOKENS, SEED,
    SEQ_LEN, timing_worker_main, worker_main,
)
from bench.lora_step.report import check_targets, markdown_report, summarize

WORKER_MODULE = "bench.lora_step"
SETTINGS = {
    "default": "glibc's allocator as it comes (large buffers mapped and unmapped every step).",
    "tuned": "glibc's allocator as `peftkit train` sets it (`peftkit.allocator`: M_MMAP_MAX 0, "
             "M_TRIM_THRESHOLD 1 GiB), for every case, PEFT's included.",
}


def _worker(argv: list[str], args, identity: dict) -> dict:
    outcome = harness.run_worker(WORKER_MODULE, argv, harness.worker_env(args.threads, offline=False),
                                 timeout=args.timeout)
    return harness.worker_row(outcome, identity, args.timeout)


def measure(setting: str, args) -> dict:
    """One allocator setting: the interleaved timing, then each case's memory."""
    malloc = ["--tuned-malloc"] if setting == "tuned" else []
    print(f"[lora_step] {setting}: timing {len(args.cases)} cases interleaved, {args.rounds} rounds ...", flush=True)
    timing = _worker(["--time-worker", ",".join(args.cases), "--warmup", str(args.warmup),
                      "--rounds", str(args.rounds), "--threads", str(args.threads), *malloc], args, {})
    if "error" in timing:
        timing = {"seconds": {}, "errors": {case: timing["error"] for case in args.cases}}
    memory = {}
    for case in args.cases if args.memory_steps else []:
        print(f"[lora_step] {setting}: peak memory of {case} ...", flush=True)
        memory[case] = _worker(["--worker", case, "--warmup", str(args.memory_warmup), "--steps",
                                str(args.memory_steps), "--threads", str(args.threads), *malloc], args, {"case": case})
    rows = summarize(timing, memory)
    return {"describe": SETTINGS[setting], "timing": timing, "memory": memory, "rows": rows,
            "targets": check_targets(rows)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.lora_step",
                                description=bench.lora_step.__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=lambda text: harness.expand_cases(text, CASES, CASE_GROUPS),
                   default=CASE_GROUPS["lora"],
                   help=f"comma-separated cases ({','.join(CASES)}) and/or groups: "
                        f"lora ({','.join(CASE_GROUPS['lora'])}, the default), "
                        f"methods ({','.join(CASE_GROUPS['methods'])}), all")
    p.add_argument("--rounds", type=int, default=8, help="timed rounds of one step per case (default 8)")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps per case (default 2)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: each step timed by the CPU time of the stepping thread)")
    p.add_argument("--malloc", choices=["default", "tuned", "both"], default="both",
                   help="glibc allocator settings to measure (default both)")
    p.add_argument("--memory-steps", type=int, default=2,
                   help="steps of each case's own process for its peak RSS (default 2; 0 skips memory)")
    p.add_argument("--memory-warmup", type=int, default=1, help="untimed steps before them (default 1)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds allowed per worker (default 3600)")
    p.add_argument("--out-dir", type=Path, default=harness.RESULTS_DIR, help="where the report goes")
    p.add_argument("--name", default="lora_step", help="file name of the report (default lora_step)")
    p.add_argument("--reread", type=Path, metavar="JSON",
                   help="read a saved report's measurements again (targets, intervals) and write it anew")
    p.add_argument("--worker", metavar="CASE", choices=CASES, help=argparse.SUPPRESS)
    p.add_argument("--time-worker", metavar="CASES", help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=2, help=argparse.SUPPRESS)  # a memory worker's steps
    p.add_argument("--tuned-malloc", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if min(args.rounds, args.threads) < 1 or min(args.warmup, args.memory_steps, args.memory_warmup) < 0:
        p.error("--rounds and --threads must be >= 1, --warmup and the memory steps >= 0")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.time_worker:
        return timing_worker_main(args.time_worker.split(","), args.warmup, args.rounds, args.threads,
                                  args.tuned_malloc)
    if args.worker:
        return worker_main(args.worker, args.warmup, args.steps, args.threads, args.tuned_malloc)

    if args.reread:
        report = harness.reread(args.reread, " ".join(["python -m bench.lora_step", *argv]))
        for setting in report["settings"].values():
            setting["targets"] = check_targets(setting["rows"])
        return write(report, args)
    settings = ["default", "tuned"] if args.malloc == "both" else [args.malloc]
    report = {
        "benchmark": "lora_step",
        "command": " ".join(["python -m bench.lora_step", *argv]),
        "date": harness.utc_now(),
        "machine": harness.machine_info(args.threads),
        "setup": {
            "model": MODEL_CONFIG, "dtype": "float32", "attn_implementation": ATTN_IMPLEMENTATION,
            "batch": BATCH, "seq_len": SEQ_LEN, "real_tokens_per_step": BATCH * SEQ_LEN,
            "lr": LR, "seed": SEED, "lora": LORA, "adapter": ADAPTER, "num_virtual_tokens": NUM_VIRTUAL_TOKENS,
            "warmup": args.warmup, "rounds": args.rounds, "threads": args.threads,
            "clock": "the thread's CPU time (time.thread_time)" if args.threads == 1 else "the wall clock",
            "memory_warmup": args.memory_warmup, "memory_steps": args.memory_steps,
        },
        "settings": {setting: measure(setting, args) for setting in settings},
    }
    return write(report, args)


def write(report: dict, args) -> int:
    md = markdown_report(report)
    harness.write_atomic(args.out_dir / f"{args.name}.json", json.dumps(report, indent=2) + "\n")
    harness.write_atomic(args.out_dir / f"{args.name}.md", md)
    print()
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
