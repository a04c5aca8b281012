"""From the cases' runs to the report: runs pooled per case, ratios, design targets, markdown."""

from __future__ import annotations

import statistics

from bench.harness import error_cells, fmt, ratio, table_head, table_row
from bench.lora_step.cases import MIN_STEPS_FOR_VERDICT, NOISY_SPREAD, PEFT_COUNTERPART, TARGETS

def combine_runs(runs: list[dict]) -> dict:
    """One row from a case's runs: steps pooled, peak RSS the largest, any error wins."""
    errors = [r["error"] for r in runs if "error" in r]
    summaries = [{k: v for k, v in r.items() if k != "step_s"} for r in runs]
    if errors:
        where = f" (in {len(errors)} of {len(runs)} runs)" if len(runs) > 1 else ""
        return {"case": runs[0]["case"], "error": errors[0] + where, "runs": summaries}
    times = [t for r in runs for t in r["step_s"]]
    return {
        **runs[-1],
        "median_s": statistics.median(times),
        "min_s": min(times),
        "step_s": times,
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
        "wall_s": sum(r["wall_s"] for r in runs),
        "loadavg_before": max(r["loadavg_before"] for r in runs),
        "runs": summaries,
    }


def peft_counterpart(case: str) -> str | None:
    return PEFT_COUNTERPART.get(case)


def add_ratios(results: dict) -> None:
    """Fill in each row's ratios to floor and full and, for peftkit rows, to the matching PEFT row."""
    for case, row in results.items():
        row["ratio_to_floor"] = ratio(results, case, "floor", "median_s")
        row["min_ratio_to_floor"] = ratio(results, case, "floor", "min_s")
        row["ratio_to_full"] = ratio(results, case, "full", "median_s")
        row["min_ratio_to_full"] = ratio(results, case, "full", "min_s")
        row["rss_ratio_to_full"] = ratio(results, case, "full", "peak_rss_mb")
        ref = peft_counterpart(case)
        row["peft_reference"] = ref
        row["ratio_to_peft"] = ratio(results, case, ref, "median_s") if ref else None
        row["min_ratio_to_peft"] = ratio(results, case, ref, "min_s") if ref else None
        row["rss_ratio_to_peft"] = ratio(results, case, ref, "peak_rss_mb") if ref else None


def check_targets(results: dict) -> list[dict]:
    """Evaluate each design target that this run has both sides of."""
    checks = []
    for case, reference, metric, limit in TARGETS:
        value = ratio(results, case, reference, metric)
        noisy = any(is_noisy(results[c]) or too_few_steps(results[c])
                    for c in (case, reference) if "median_s" in results.get(c, {}))
        checks.append({
            "case": case, "reference": reference, "metric": metric, "max_ratio": limit,
            "ratio": value, "met": None if value is None else value <= limit, "noisy": noisy,
        })
    return checks


def is_noisy(row: dict) -> bool:
    return row["median_s"] > NOISY_SPREAD * row["min_s"]


def too_few_steps(row: dict) -> bool:
    return len(row["step_s"]) < MIN_STEPS_FOR_VERDICT


def noise_note(report: dict) -> str:
    """Say how loaded the machine was, and whether any timing looks disturbed."""
    loads = [r["loadavg_before"] for r in report["results"] if "loadavg_before" in r]
    cpus = report["machine"]["cpu_count"]
    note = f"1-minute load average before the cases: up to {max(loads):.1f} on {cpus} CPUs." if loads else ""
    if any(is_noisy(r) for r in report["results"] if "error" not in r):
        note += (f" † median more than {NOISY_SPREAD:.2f} x min: the machine was busy or noisy, "
                 "so compare the min columns in the JSON (min_ratio_to_floor, min_ratio_to_peft) "
                 "and rerun with more --steps or --repeats on a quiet machine.")
    if any(too_few_steps(r) for r in report["results"] if "error" not in r):
        note += (f" Fewer than {MIN_STEPS_FOR_VERDICT} timed steps per case (with no warm-up, the "
                 "first includes one-time costs): the spread can't show noise, so the timings are "
                 "a smoke test and the timing verdicts are not conclusive.")
    return note.strip()


def peft_ratio(row: dict, key: str) -> str:
    """A ratio to the PEFT reference: "n/a" for a row that has none, "–" if it wasn't run."""
    return "n/a" if row.get("peft_reference") is None else fmt(row[key], ".3f")


def tokens_note(setup: dict) -> str:
    """Say that every case trains on the same real tokens, and what prompt/prefix add."""
    b, t, n = setup["batch"], setup["seq_len"], setup["num_virtual_tokens"]
    return (
        f"Every case trains on the same batch of {b} x {t} real tokens ({b * t:,}; labels = input_ids, "
        f"the loss covers the real tokens only). Prompt tuning prepends {n} virtual tokens to each row, "
        f"so {t + n} positions go through every layer; prefix tuning gives every attention layer {n} "
        f"extra keys and values, so {t} queries attend over {t + n} keys. Their x floor and x full "
        f"ratios include that extra sequence (floor and full run {t} positions)."
    )


def markdown_report(report: dict) -> str:
    """A human-readable table of the run, followed by the design-target checks."""
    m, s = report["machine"], report["setup"]
    lines = [
        "# Training step: peftkit vs Hugging Face PEFT",
        "",
        f"{report['date']} · {m['cpu_model']} · torch {m['torch']} · {m['torch_threads']} threads · "
        f"transformers {m['transformers']} · peft {m['peft']}",
        "",
        f"Llama {s['model']['num_hidden_layers']} layers, hidden {s['model']['hidden_size']}, "
        f"fp32, {s['attn_implementation']} attention, batch {s['batch']} x {s['seq_len']}, "
        f"AdamW lr {s['lr']}, LoRA r={s['lora']['r']} alpha={s['lora']['alpha']}, "
        f"bottleneck adapters {s['adapter']['bottleneck']}, "
        f"prefix and prompt tuning {s['num_virtual_tokens']} virtual tokens; "
        f"{s['warmup']} warm-up + {s['steps']} timed steps per case in a fresh process"
        + (f", {s['repeats']} interleaved processes per case." if s["repeats"] > 1 else "."),
        "",
        tokens_note(s),
        "",
        *table_head(["case", "trainable params", "median step (s)", "min step (s)", "x floor", "x full",
                     "x PEFT", "peak RSS (MB)", "RSS x PEFT"]),
    ]
    for row in report["results"]:
        if "error" in row:
            lines.append(table_row(error_cells(row["case"], row["error"], 9)))
            continue
        mark = " †" if is_noisy(row) else ""
        lines.append(table_row([
            row["case"], f"{row['trainable_params']:,}", f"{row['median_s']:.3f}{mark}", f"{row['min_s']:.3f}",
            fmt(row["ratio_to_floor"], ".3f"), fmt(row["ratio_to_full"], ".3f"), peft_ratio(row, "ratio_to_peft"),
            f"{row['peak_rss_mb']:.0f}", peft_ratio(row, "rss_ratio_to_peft"),
        ]))
    lines += ["", "x PEFT and RSS x PEFT compare a peftkit row with PEFT's same method and settings: "
              + ", ".join(f"{k} with {v}" for k, v in PEFT_COUNTERPART.items())
              + ". \"n/a\": no PEFT reference (PEFT has no bottleneck adapters); "
              "\"–\": the reference case isn't in this run."]
    lines += ["", noise_note(report)]
    lines += ["", "Design targets (\"not measured\" when this run lacks a side of the comparison):", ""]
    for t in report["targets"]:
        verdict = {True: "met", False: "**missed**", None: "not measured"}[t["met"]]
        if t["met"] is not None and t["metric"] == "median_s" and t["noisy"]:
            verdict += ", but timings are noisy: not conclusive"
        lines.append(
            f"- {t['case']} {t['metric']} <= {t['max_ratio']:.2f} x {t['reference']}: "
            f"{fmt(t['ratio'], '.3f')} ({verdict})"
        )
    return "\n".join(lines) + "\n"
