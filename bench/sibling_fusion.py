"""What fusing the LoRA A of sibling projections could save, before building it.

q, k and v (and gate and up) read the same input x. Apart, each LoRA computes its own skinny
products with x and with its gradient; fused, they take one product with the stacked
[A_q; A_k; A_v] (r 3 x 8 = 24) and one for their summed input gradient:

    forward     u_i = x A_iᵀ                    fused: [u_q u_k u_v] = x [A_q; A_k; A_v]ᵀ
    grad A      s (g_i B_i)ᵀ x                  fused: [g_q B_q  g_k B_k  g_v B_v]ᵀ x
    grad x      Σ_i s (g_i B_i) A_i             fused: [g_q B_q  g_k B_k  g_v B_v] [A_q; A_k; A_v]

Only these products change: g_i B_i and grad B_i are per projection either way, and so is
the base work. This times both ways for the bench model's shapes (N = 4 x 256 tokens, hidden
512, MLP 1408, r 8), interleaved in one process on one thread (CPU time of the thread), and
multiplies the saving per layer by the layers, to set it beside the LoRA step of
``bench.lora_step`` (its results file).

    python -m bench.sibling_fusion [--rounds 30]
Writes bench/results/sibling_fusion.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from bench import harness
from bench.lora_step.cases import BATCH, LORA, MODEL_CONFIG, SEQ_LEN

COMMAND = "python -m bench.sibling_fusion"


def products(x, grads_b, a_list):
    """The three products of the siblings apart: forward u_i, grad A_i, their grad x sum.
    ``grads_b``: each sibling's g_i B_i (N, r), as the backward has it."""
    u = [x @ a.t() for a in a_list]
    grad_a = [gb.t() @ x for gb in grads_b]
    grad_x = grads_b[0] @ a_list[0]
    for gb, a in zip(grads_b[1:], a_list[1:]):
        grad_x.addmm_(gb, a)
    return u, grad_a, grad_x


def fused_products(x, grads_b, a_list):
    import torch

    stacked = torch.cat(a_list)  # (3r, in): a copy of r x in weights, next to nothing
    gb = torch.cat(grads_b, dim=1)  # (N, 3r)
    return x @ stacked.t(), gb.t() @ x, gb @ stacked


def measure(rounds: int, warmup: int) -> dict:
    import torch

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    n, hidden, mlp, r = BATCH * SEQ_LEN, MODEL_CONFIG["hidden_size"], MODEL_CONFIG["intermediate_size"], LORA["r"]
    groups = {"q,k,v": 3, "gate,up": 2}
    x = torch.randn(n, hidden, generator=gen)
    cases = {}
    for name, count in groups.items():
        a_list = [torch.randn(r, hidden, generator=gen) for _ in range(count)]
        grads_b = [torch.randn(n, r, generator=gen) for _ in range(count)]
        apart, fused = products(x, grads_b, a_list), fused_products(x, grads_b, a_list)
        # The same numbers either way (float32 sums in another order).
        torch.testing.assert_close(fused[0], torch.cat(apart[0], dim=1), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(fused[1], torch.cat(apart[1]), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(fused[2], apart[2], rtol=1e-5, atol=1e-4)
        cases[f"{name} apart"] = lambda g=grads_b, a=a_list: products(x, g, a)
        cases[f"{name} fused"] = lambda g=grads_b, a=a_list: fused_products(x, g, a)
    seconds = harness.time_cases(cases, rounds, warmup, {"thread": time.thread_time})["thread"]
    rows = {case: {"min_s": min(s), "median_s": statistics.median(s)} for case, s in seconds.items()}
    layers = MODEL_CONFIG["num_hidden_layers"]
    saved = {name: (statistics.median(a - f for a, f in zip(seconds[f"{name} apart"], seconds[f"{name} fused"])))
             for name in groups}
    return {"rows": rows, "saved_per_layer_s": saved, "saved_per_step_s": sum(saved.values()) * layers,
            "layers": layers, "shapes": {"tokens": n, "hidden": hidden, "mlp": mlp, "r": r},
            "rounds": rounds, "warmup": warmup}


def lora_step_reference() -> dict | None:
    """peftkit all-linear's step and the floor's, glibc default, from bench/results/lora_step.json."""
    try:
        report = json.loads((harness.RESULTS_DIR / "lora_step.json").read_text())
        rows = report["settings"]["default"]["rows"]
        return {"peftkit_all_linear_s": rows["peftkit-all-linear"]["min_s"], "floor_s": rows["floor"]["min_s"],
                "date": report["date"]}
    except (OSError, KeyError, ValueError):
        return None


def markdown(report: dict) -> str:
    m, res = report["machine"], report["measured"]
    lines = ["# Fusing the LoRA A of sibling projections: what it could save", "",
             f"`{report['command']}` · {report['date']} · {m['cpu_model']} · torch {m['torch']} · 1 thread", "",
             f"The products that fusion changes, for {res['shapes']['tokens']} tokens, hidden "
             f"{res['shapes']['hidden']}, r {res['shapes']['r']}: forward x Aᵀ, grad A, and the siblings' summed "
             f"LoRA input gradient; apart (one per projection) and fused (stacked A). {res['warmup']} warm-up calls, "
             f"{res['rounds']} interleaved rounds, CPU time of the thread.", "",
             *harness.table_head(["products", "min (ms)", "median (ms)"])]
    for case, row in res["rows"].items():
        lines.append(harness.table_row([case, f"{row['min_s'] * 1e3:.2f}", f"{row['median_s'] * 1e3:.2f}"]))
    saved_ms = res["saved_per_step_s"] * 1e3
    lines += ["", "Saved per layer (median of the per-round differences): "
              + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in res["saved_per_layer_s"].items())
              + f"; x {res['layers']} layers = **{saved_ms:.1f} ms per training step**."]
    ref = report.get("lora_step")
    if ref:
        extra = ref["peftkit_all_linear_s"] - ref["floor_s"]
        lines += ["", f"Against `lora_step.json` ({ref['date']}, glibc default, minima): peftkit all-linear "
                  f"{ref['peftkit_all_linear_s']:.3f} s, the floor {ref['floor_s']:.3f} s, so LoRA's own work is "
                  f"{extra * 1e3:.0f} ms a step; fusion would take off {saved_ms:.0f} ms of it "
                  f"({saved_ms / (ref['peftkit_all_linear_s'] * 1e3):.1%} of the step), bringing all-linear from "
                  f"{ref['peftkit_all_linear_s'] / ref['floor_s']:.3f}x to about "
                  f"{(ref['peftkit_all_linear_s'] - saved_ms / 1e3) / ref['floor_s']:.3f}x the floor."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out-dir", default=str(harness.RESULTS_DIR), help="where NAME.json and NAME.md go")
    args = p.parse_args(argv)
    report = {"benchmark": "sibling_fusion", "command": " ".join([COMMAND, *argv]), "date": harness.utc_now(),
              "machine": harness.machine_info(1), "measured": measure(args.rounds, args.warmup),
              "lora_step": lora_step_reference()}
    harness.write_report(Path(args.out_dir), "sibling_fusion", report, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
