"""What the fused loss saves on each rank of a data-parallel (DDP) and a sharded (FSDP2) run:
peak memory per rank on two CPU ranks (gloo, under torchrun), the model's own loss against
peftkit's fused one, on the bench model of ``bench.lora_step`` with LoRA on every linear layer.

Each case is one torchrun launch of two fresh ranks (so each rank's peak resident memory,
VmHWM, belongs to that case alone). A rank builds the seeded bench Llama (58.5M parameters,
vocab 32k, fp32), attaches peftkit's LoRA (r=8, all-linear), wraps it as ``peftkit train``
does (``distributed.wrap``: DDP; ``distributed.shard``: FSDP2, block by block and the root)
and takes ``--steps`` AdamW steps on its own batch of 4 x 256 tokens, the loss either the
model's own (``wrapped(**batch).loss``) or ``lm_loss.training_loss(wrapped, batch)``, which
runs the fused loss inside the wrapper's call. The two losses of a step agree to float32
rounding (the table shows the last step's mean over the ranks: a sanity check only, since in
three steps at lr 1e-4 from B = 0 the loss barely moves), and the table names the autograd node
that made the loss (``LinearCrossEntropyBackward``: the fused loss ran).

    python -m bench.distributed_loss        # writes bench/results/distributed_loss.{json,md}
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench import harness
from bench.lora_step import cases as lora_step

COMMAND = "python -m bench.distributed_loss"
CASES = ["ddp-own-loss", "ddp-fused", "fsdp-own-loss", "fsdp-fused"]
RANKS = 2


def rank_measure(case: str, steps: int) -> dict:
    """One rank's part of ``case``: build, wrap, train ``steps`` steps; rank 0 returns every
    rank's peak memory (gathered), the others None."""
    import torch
    import torch.distributed as dist

    harness.import_peftkit()
    from peftkit import LoraConfig, attach, distributed, lm_loss

    torch.set_num_threads(1)
    device = torch.device("cpu")
    with distributed.joined(device) as world:
        model = attach(lora_step.build_model(), LoraConfig(r=lora_step.LORA["r"], alpha=lora_step.LORA["alpha"],
                                                          target_modules="all-linear"))
        wrapping, _, loss_kind = case.partition("-")
        wrapped = distributed.shard(model, world, device) if wrapping == "fsdp" else distributed.wrap(model, world, device)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lora_step.LR)
        gen = torch.Generator().manual_seed(lora_step.SEED + 1 + world.rank)  # each rank its own rows
        ids = torch.randint(0, lora_step.MODEL_CONFIG["vocab_size"], (lora_step.BATCH, lora_step.SEQ_LEN), generator=gen)
        batch = {"input_ids": ids, "labels": ids}
        after_setup = harness.peak_rss_mb()
        loss = float("nan")
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            step_loss = wrapped(**batch).loss if loss_kind == "own-loss" else lm_loss.training_loss(wrapped, batch)
            step_loss.backward()
            optimizer.step()
            loss = distributed.all_sum(step_loss.item(), world) / world.size
        mine = {"rank": world.rank, "peak_rss_mb": harness.peak_rss_mb(), "rss_after_setup_mb": after_setup}
        every = [None] * world.size
        dist.all_gather_object(every, mine)
    if world.rank != 0:
        return None
    # What made the loss, read off its autograd graph: LinearCrossEntropyBackward where fused.
    return {"case": case, "steps": steps, "ranks": every, "mean_loss": loss,
            "loss_grad_fn": type(step_loss.grad_fn).__name__}


def report(data: dict) -> str:
    rows = {row["case"]: row for row in data["rows"]}
    lines = ["# The fused loss on two ranks: peak memory per rank, DDP and FSDP2", "",
             f"`{data['command']}` · {data['date']} · {data['machine']['cpu_model']} · torch "
             f"{data['machine']['torch']} · transformers {data['machine']['transformers']}", "",
             f"Two CPU ranks (gloo, torchrun), each 1 thread; the bench Llama of `bench.lora_step` (8 layers, hidden "
             f"512, vocab 32,000, fp32), peftkit LoRA r=8 on every linear layer, each rank its own batch of "
             f"{lora_step.BATCH} x {lora_step.SEQ_LEN} tokens, {data['steps']} AdamW steps. Peak RSS (VmHWM) of each "
             "rank, a fresh torchrun launch per case; `step peak` is the peak over the memory after setup "
             "(model built, wrapped, optimizer made).", "",
             *harness.table_head(["case", "<loss made by", "loss (last step, mean of ranks)", "rank 0 peak RSS (MB)",
                                  "rank 1 peak RSS (MB)", "rank 0 step peak (MB)", "rank 1 step peak (MB)",
                                  "peak x own loss"])]
    for case in CASES:
        row = rows.get(case)
        if row is None or "error" in row:
            lines.append(harness.table_row(harness.error_cells(case, (row or {}).get("error", "not run"), 8)))
            continue
        ranks = sorted(row["ranks"], key=lambda r: r["rank"])
        own = rows.get(case.replace("fused", "own-loss"))
        versus = "–"
        if case.endswith("fused") and own and "error" not in own:
            versus = harness.fmt(max(r["peak_rss_mb"] for r in ranks)
                                 / max(r["peak_rss_mb"] for r in own["ranks"]), ".3f")
        lines.append(harness.table_row([case, f"`{row['loss_grad_fn']}`", harness.fmt(row["mean_loss"], ".6f"),
                                        *[harness.fmt(r["peak_rss_mb"], ".0f") for r in ranks],
                                        *[harness.fmt(r["peak_rss_mb"] - r["rss_after_setup_mb"], ".0f") for r in ranks],
                                        versus]))
    lines += ["", "`peak x own loss`: the larger rank's peak with the fused loss over the larger rank's peak with "
              "the model's own loss, same wrapper."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", choices=CASES, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out-dir", type=Path, default=harness.RESULTS_DIR)
    parser.add_argument("--timeout", type=float, default=900.0)
    args = parser.parse_args()
    if args.worker:
        import os

        if os.environ.get("RANK", "0") == "0":
            raise SystemExit(harness.emit_result(lambda: rank_measure(args.worker, args.steps), {"case": args.worker}))
        rank_measure(args.worker, args.steps)
        return
    env = harness.worker_env(threads=1)
    rows = []
    for case in CASES:
        print(f"[distributed_loss] {case} on {RANKS} ranks ...", flush=True)
        outcome = harness.run_worker("torch.distributed.run", [
            "--standalone", "--nproc-per-node", str(RANKS), "--max-restarts", "0",
            "-m", "bench.distributed_loss", "--worker", case, "--steps", str(args.steps)], env, args.timeout)
        rows.append(harness.worker_row(outcome, {"case": case}, args.timeout))
        print(f"[distributed_loss] {case}: {rows[-1].get('error') or [r['peak_rss_mb'] for r in rows[-1]['ranks']]}",
              flush=True)
    data = {"benchmark": "distributed_loss", "command": COMMAND, "date": harness.utc_now(),
            "machine": harness.machine_info(1), "steps": args.steps, "rows": rows}
    harness.write_report(args.out_dir, "distributed_loss", data, report(data))
    print(report(data))


if __name__ == "__main__":
    main()
