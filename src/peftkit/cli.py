"""The ``peftkit`` command line. The only module that parses arguments or prints."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    raise AssertionError


def _table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="peftkit-demo-"))
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        print(f"error: {out} is not empty; pick another --out or pass --overwrite.", file=sys.stderr)
        return 2
    print("peftkit demo: a built-in reference decoder learns task A (addition sentences) in full,\n"
          "then a LoRA adapter (r=8, alpha=16, all linear layers) teaches it task B (subtraction).\n")
    report = run_demo(out, steps=args.steps, base_steps=args.base_steps, seed=args.seed,
                      progress=not args.no_progress)
    share = 100 * report.trainable_params / report.total_params
    ok = report.reload_max_diff < 1e-5 and report.merge_max_diff < 1e-4 * max(1.0, report.task_b_loss_before)
    print("\nResult")
    print(_table([
        ("trainable parameters", f"{report.trainable_params:,} of {report.total_params:,} ({share:.2f}%)"),
        ("task B held-out loss", f"{report.task_b_loss_before:.3f} -> {report.task_b_loss_after:.3f} nats/token (learned)"),
        ("task A held-out loss", f"{report.task_a_loss_before:.3f} -> {report.task_a_loss_after:.3f} nats/token (forgetting)"),
        ("training", f"{report.steps} steps in {report.train_seconds:.1f} s at lr {report.learning_rate:g}"),
        ("adapter on disk", f"{_human_bytes(report.adapter_bytes)} vs full model "
                            f"{_human_bytes(report.model_bytes)} ({report.model_bytes / report.adapter_bytes:.0f}x smaller)"),
        ("reloaded vs trained", f"max |logit diff| = {report.reload_max_diff:.2e}"),
        ("merged vs unmerged", f"max |logit diff| = {report.merge_max_diff:.2e}"),
        ("adapter folder", str(report.adapter_dir)),
    ]))
    print("\n" + ("OK: the adapter reloads and merges to the same outputs." if ok
                  else "PROBLEM: reloaded or merged outputs differ from the trained model."))
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peftkit", description="Parameter-efficient fine-tuning without the classic mistakes.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train LoRA on the built-in reference model and report the result")
    demo.add_argument("--steps", type=int, default=150, help="LoRA optimizer steps (default 150)")
    demo.add_argument("--base-steps", type=int, default=300, help="steps that teach the base model task A (default 300)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", help="folder for the base model and the adapter (default: a new temporary folder)")
    demo.add_argument("--overwrite", action="store_true", help="allow a non-empty --out folder")
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
