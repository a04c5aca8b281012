"""One LoRA projection's forward and backward, five ways: what ``LoraFunction`` costs over the
frozen layer, and whether ``torch.compile`` of the LoRA path wins on the CPU.

For the bench model's shapes (x: 4 x 256 tokens of 512, W: 512 x 512 frozen, r 8, s 2):

    base       y = x Wᵀ, backward to x only (what the floor does at this layer)
    peftkit    y = x Wᵀ + s (x Aᵀ) Bᵀ through ``peftkit.LoraFunction`` (grad x, A, B; never W's)
    before     ``LoraFunction`` as it was to 2026-12-02 (``RankTermAfter``): the large product
               first and the rank-r term added to its result, in forward (y) and backward (grad x)
    autograd   the same formula in plain torch ops, autograd's own backward
    compiled   that formula through ``torch.compile`` (inductor, forward and backward)

each forward + backward timed by the thread's CPU time on one thread, interleaved round-robin
in one process (the order reversed every round); every ratio is the median of the per-round
ratios to ``base``, beside the ratio of the minima.

    python -m bench.lora_layer [--rounds 100]
Writes bench/results/lora_layer.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from bench import harness
from bench.lora_step.cases import BATCH, LORA, MODEL_CONFIG, SEQ_LEN

COMMAND = "python -m bench.lora_layer"


def rank_term_after():
    """``LoraFunction``'s products in their order to 2026-12-02, without dropout or bias:
    y = x W_io, then y += s·u Bᵀ; grad_x = g W_ioᵀ, then grad_x += s·(g B) A. Today's
    function starts each from its rank-r term and accumulates the large product into it."""
    import torch

    class RankTermAfter(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight_io, lora_a, lora_b, scaling):
            x2d = x.reshape(-1, lora_a.shape[1])
            u = x2d @ lora_a.t()
            y = (x2d @ weight_io).addmm_(u, lora_b.t(), alpha=scaling)
            ctx.save_for_backward(x2d, weight_io, lora_a, lora_b, u)
            ctx.scaling, ctx.x_shape = scaling, x.shape
            return y.view(*x.shape[:-1], y.shape[-1])

        @staticmethod
        def backward(ctx, grad_out):
            x2d, weight_io, lora_a, lora_b, u = ctx.saved_tensors
            s, g = ctx.scaling, grad_out.reshape(-1, grad_out.shape[-1])
            g_b_t = lora_b.t() @ g.t()
            grad_x = (g @ weight_io.t()).addmm_(g_b_t.t(), lora_a, alpha=s)
            return grad_x.view(ctx.x_shape), None, (g_b_t @ x2d).mul_(s), (u.t() @ g).t().mul_(s), None

    return RankTermAfter


def build_calls() -> tuple[dict, dict]:
    """The five calls, each a forward and backward of one projection, and their gradients
    checked against each other (so every way computes the same thing)."""
    import torch

    peftkit = harness.import_peftkit()
    gen = torch.Generator().manual_seed(0)
    hidden, r = MODEL_CONFIG["hidden_size"], LORA["r"]
    scaling = LORA["alpha"] / r
    weight = torch.randn(hidden, hidden, generator=gen) / hidden**0.5
    lora_a = (torch.randn(r, hidden, generator=gen) / hidden**0.5).requires_grad_()
    lora_b = (torch.randn(hidden, r, generator=gen) * 0.02).requires_grad_()
    x = torch.randn(BATCH, SEQ_LEN, hidden, generator=gen).requires_grad_()
    grad = torch.randn(BATCH, SEQ_LEN, hidden, generator=gen)

    def formula(x, a, b):
        return x @ weight.t() + (x @ a.t()) @ b.t() * scaling

    compiled = torch.compile(formula)
    before = rank_term_after()
    forwards = {
        "base": lambda: x @ weight.t(),
        "peftkit": lambda: peftkit.LoraFunction.apply(x, weight.t(), None, lora_a, lora_b, scaling, None, 1.0),
        "before": lambda: before.apply(x, weight.t(), lora_a, lora_b, scaling),
        "autograd": lambda: formula(x, lora_a, lora_b),
        "compiled": lambda: compiled(x, lora_a, lora_b),
    }

    def call(forward):
        def run():
            x.grad = lora_a.grad = lora_b.grad = None
            forward().backward(grad)
        return run

    grads = {}
    for name, forward in forwards.items():
        call(forward)()
        grads[name] = [t.grad.clone() if t.grad is not None else None for t in (x, lora_a, lora_b)]
    for name in ("before", "autograd", "compiled"):
        for mine, theirs in zip(grads["peftkit"], grads[name]):
            torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)
    checked = {"max_grad_difference_vs_autograd": max(float((a - b).abs().max())
                                                      for a, b in zip(grads["peftkit"], grads["autograd"]))}
    return {name: call(forward) for name, forward in forwards.items()}, checked


def measure(rounds: int, warmup: int) -> dict:
    import torch

    torch.set_num_threads(1)
    calls, checked = build_calls()
    seconds = harness.time_cases(calls, rounds, warmup, {"thread": time.thread_time})["thread"]
    rows = {}
    for name, s in seconds.items():
        per_round = [a / b for a, b in zip(s, seconds["base"])]
        rows[name] = {"min_s": min(s), "median_s": statistics.median(s),
                      "to_base_median_of_rounds": statistics.median(per_round),
                      "to_base_of_min": min(s) / min(seconds["base"])}
    return {"rows": rows, "checked": checked, "rounds": rounds, "warmup": warmup}


def markdown(report: dict) -> str:
    m, res = report["machine"], report["measured"]
    lines = ["# One LoRA projection: peftkit's LoraFunction, as it was before, plain autograd, torch.compile", "",
             f"`{report['command']}` · {report['date']} · {m['cpu_model']} · torch {m['torch']} · 1 thread", "",
             f"x {BATCH} x {SEQ_LEN} x {MODEL_CONFIG['hidden_size']}, W {MODEL_CONFIG['hidden_size']} x "
             f"{MODEL_CONFIG['hidden_size']} frozen, r {LORA['r']}; forward + backward, {res['warmup']} warm-up "
             f"calls each, {res['rounds']} interleaved rounds, CPU time of the thread. The four LoRA ways give the "
             f"same gradients (peftkit vs autograd: max |difference| {res['checked']['max_grad_difference_vs_autograd']:.1e}).",
             "", *harness.table_head(["way", "min (ms)", "median (ms)", "x base (median of rounds)", "x base (minima)"])]
    for name, row in res["rows"].items():
        lines.append(harness.table_row([name, f"{row['min_s'] * 1e3:.2f}", f"{row['median_s'] * 1e3:.2f}",
                                        f"{row['to_base_median_of_rounds']:.3f}", f"{row['to_base_of_min']:.3f}"]))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=100)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--out-dir", default=str(harness.RESULTS_DIR), help="where NAME.json and NAME.md go")
    args = p.parse_args(argv)
    report = {"benchmark": "lora_layer", "command": " ".join([COMMAND, *argv]), "date": harness.utc_now(),
              "machine": harness.machine_info(1), "measured": measure(args.rounds, args.warmup)}
    harness.write_report(Path(args.out_dir), "lora_layer", report, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
