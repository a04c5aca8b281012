"""``python -m bench.quality``: plan the (case, seed) runs, run each in a fresh worker process,
and rewrite OUT/quality.json and OUT/quality.md after every run."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import bench.quality
from bench import harness
from bench.quality.cases import CASE_GROUPS, CASES, CLASSIFICATION_CASES, GENERATION_CASES, MULTI_SEED_CASES, plan
from bench.quality.classification import run_classification
from bench.quality.generation import run_generation
from bench.quality.report import write_report

WORKER_MODULE = "bench.quality"


def worker_main(case: str, seed: int, args) -> int:
    """Subprocess entry point: print one marked JSON line, success or error."""

    def measure() -> dict:
        import torch

        torch.set_num_threads(args.threads)
        return run_generation(case, args) if case in GENERATION_CASES else run_classification(case, seed, args)

    return harness.emit_result(measure, {"case": case, "seed": seed})


def worker_argv(case: str, seed: int, args) -> list[str]:
    argv = ["--worker", case, "--seed", str(seed),
            "--seeds", ",".join(map(str, args.seeds)), "--threads", str(args.threads),
            "--steps", str(args.steps), "--batch-size", str(args.batch_size),
            "--gen-steps", str(args.gen_steps), "--gen-batch-size", str(args.gen_batch_size),
            "--gen-eval-limit", str(args.gen_eval_limit), "--gen-max-new-tokens", str(args.gen_max_new_tokens)]
    if args.eval_limit:
        argv += ["--eval-limit", str(args.eval_limit)]
    return argv


def run_in_subprocess(case: str, seed: int, args) -> dict:
    """Run one case and seed in a fresh interpreter and parse its marked result line."""
    outcome = harness.run_worker(WORKER_MODULE, worker_argv(case, seed, args), harness.worker_env(args.threads),
                                 timeout=args.timeout)
    row = harness.worker_row(outcome, {"case": case, "seed": seed}, args.timeout)
    if outcome.result is not None and "error" in row:
        row["traceback_tail"] = outcome.stderr_tail(6)
    return row


def parse_cases(text: str) -> list[str]:
    """Case names and group names (``all``, ``classification``, ``generation``), comma-separated."""
    return harness.expand_cases(text, CASES, CASE_GROUPS)


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--seeds takes comma-separated integers, got {text!r}") from e
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"--seeds needs distinct integers, got {text!r}")
    return seeds


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.quality",
                                description=bench.quality.__doc__.split("\n\n")[0])
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
    p.add_argument("--out", type=Path, default=harness.RESULTS_DIR,
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
        load = harness.load_average()
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
