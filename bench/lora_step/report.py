"""From the measurements to the report: per case the min and median step of the interleaved
rounds, every ratio taken round by round, the peak memory of each case's own process, the
design targets, and markdown."""

from __future__ import annotations

import statistics

from bench.harness import (
    MEDIAN_CONFIDENCE, error_cells, fmt, ratio_of_rounds, reread_line, table_head, table_row,
)
from bench.lora_step.cases import ABOVE_FLOOR, PEFT_COUNTERPART, TARGETS

REFERENCES = {"floor": lambda case: "floor", "full": lambda case: "full", "peft": PEFT_COUNTERPART.get}


def step_ratio(seconds: dict[str, list[float]], case: str, reference: str | None) -> dict | None:
    """``case`` over ``reference``: the ratio of each round's two steps (taken moments apart),
    its median with a distribution-free 95% interval (``harness.median_interval``), and the
    ratio of the two minima; None when either was not timed."""
    if reference is None or case not in seconds or reference not in seconds or case == reference:
        return None
    return {"reference": reference, **ratio_of_rounds(seconds[case], seconds[reference])}


def step_target(found: dict | None, limit: float | None) -> tuple[float | None, list | None, bool | None]:
    """(median of the per-round ratios, its interval, met) for a step target of ``limit``: met
    only when the whole interval is at or below the limit, missed when all of it is above,
    None (undecided at this noise, not measured, or no limit: reported only) otherwise."""
    if found is None:
        return None, None, None
    interval = found.get("interval")
    if interval is None or limit is None:
        return found["median_of_rounds"], interval and list(interval), None
    low, high = interval
    return found["median_of_rounds"], list(interval), True if high <= limit else False if low > limit else None


def summarize(timing: dict, memory: dict[str, dict]) -> dict[str, dict]:
    """One row per case of one allocator setting: its steps, ratios and memory."""
    seconds = timing.get("seconds", {})
    rows = {}
    for case in list(seconds) + [c for c in timing.get("errors", {}) if c not in seconds]:
        if case in timing.get("errors", {}):
            rows[case] = {"case": case, "error": timing["errors"][case]}
            continue
        steps = seconds[case]
        row = {"case": case, "trainable_params": timing["trainable_params"][case], "min_s": min(steps),
               "median_s": statistics.median(steps), "step_s": steps, "final_loss": timing["final_loss"][case]}
        for name, reference_of in REFERENCES.items():
            row[f"to_{name}"] = step_ratio(seconds, case, reference_of(case))
        # The floor over this case, round by round: the lowest ratio to this case that any
        # LoRA (which does the floor's work and more) could reach.
        row["floor_to_case"] = step_ratio(seconds, "floor", case) if case != "floor" else None
        to_floor = row["to_floor"]
        # A case that does the floor's work and more cannot be faster than it.
        row["below_floor"] = bool(case in ABOVE_FLOOR and to_floor is not None
                                  and min(to_floor["median_of_rounds"], to_floor["of_min"]) < 1.0)
        mem = memory.get(case, {})
        row["peak_rss_mb"] = mem.get("peak_rss_mb")
        row["memory_error"] = mem.get("error")
        reference = PEFT_COUNTERPART.get(case)
        theirs = memory.get(reference, {}).get("peak_rss_mb") if reference else None
        row["rss_to_peft"] = row["peak_rss_mb"] / theirs if row["peak_rss_mb"] and theirs else None
        rows[case] = row
    return rows


def floor_bound(rows: dict[str, dict], reference: str, metric: str) -> float | None:
    """The floor over ``reference`` (its step, median of the per-round ratios, or its peak
    RSS): no LoRA can do better than the floor, so no ratio to ``reference`` below this
    is within reach on this machine. None without a floor row or a measurement."""
    floor, theirs = rows.get("floor", {}), rows.get(reference, {})
    if metric == "step":
        found = theirs.get("floor_to_case")
        return found["median_of_rounds"] if found else None
    mine, other = floor.get("peak_rss_mb"), theirs.get("peak_rss_mb")
    return mine / other if mine and other else None


def check_targets(rows: dict[str, dict]) -> list[dict]:
    """Each design target that these rows have both sides of, with the floor's own ratio to
    the reference where the reference is not the floor (the best any LoRA could reach)."""
    checks = []
    for case, reference, metric, limit in TARGETS:
        row = rows.get(case, {})
        if metric == "step":
            kind = "to_floor" if reference == "floor" else "to_full" if reference == "full" else "to_peft"
            value, interval, met = step_target(row.get(kind), limit)
        else:
            value, interval = row.get("rss_to_peft"), None
            met = None if value is None else value <= limit
        bound = floor_bound(rows, reference, metric) if reference != "floor" and case in ABOVE_FLOOR else None
        checks.append({"case": case, "reference": reference, "metric": metric, "max_ratio": limit, "ratio": value,
                       "interval": interval, "met": met, "floor_bound": bound,
                       "measurement_error": bool(row.get("below_floor")) and reference == "floor"})
    return checks


def target_verdict(check: dict) -> str:
    """met / missed / undecided / not measured, and for a missed target whose limit lies below
    the floor's own ratio, that no LoRA could have met it here. A step target is met or missed
    only by its whole interval; one that the interval spans is undecided at this noise."""
    interval = check.get("interval")
    span = f"{MEDIAN_CONFIDENCE:.0%} interval {interval[0]:.3f}-{interval[1]:.3f}" if interval else None
    if check.get("measurement_error"):
        return "**not read: below the floor, a measurement error**" + (f"; {span}" if span else "")
    if check["met"] is None and check["ratio"] is not None:
        verdict = (f"**undecided**: the {span} spans the limit" if span
                   else "**undecided**: too few rounds for an interval")
    else:
        verdict = {True: "met", False: "**missed**", None: "not measured"}[check["met"]]
        if span:
            verdict += f", {span}"
    bound = check.get("floor_bound")
    if bound is not None:
        verdict += f"; the floor is {bound:.3f} x {check['reference']}"
        if check["met"] is False and check["max_ratio"] < bound:
            verdict += ", so the limit is below the floor here: out of reach for any LoRA"
    return verdict


def _ratio_cell(found: dict | None) -> str:
    if found is None:
        return "n/a"
    return f"{found['median_of_rounds']:.3f} ({found['of_min']:.3f})"


def setting_lines(name: str, setting: dict) -> list[str]:
    """The table and the targets of one allocator setting."""
    rows = setting["rows"]
    lines = [f"## {name}", "", setting["describe"], "",
             *table_head(["case", "trainable params", "min step (s)", "median step (s)", "x floor", "x PEFT",
                          "x full", "peak RSS (MB)", "RSS x PEFT"])]
    for row in rows.values():
        if "error" in row:
            lines.append(table_row(error_cells(row["case"], row["error"], 9)))
            continue
        mark = " **‡ below the floor: measurement error**" if row["below_floor"] else ""
        lines.append(table_row([
            row["case"] + mark, f"{row['trainable_params']:,}", f"{row['min_s']:.3f}", f"{row['median_s']:.3f}",
            _ratio_cell(row["to_floor"]), _ratio_cell(row["to_peft"]), _ratio_cell(row["to_full"]),
            fmt(row["peak_rss_mb"], ".0f") if not row["memory_error"] else "error",
            fmt(row["rss_to_peft"], ".3f"),
        ]))
    lines += ["", "Targets:", ""]
    for t in setting["targets"]:
        if t["case"] not in rows or t["reference"] not in rows:
            continue
        what = "step" if t["metric"] == "step" else "peak RSS"
        lines.append(f"- {t['case']} {what} <= {t['max_ratio']:.2f} x {t['reference']}: "
                     f"{fmt(t['ratio'], '.3f')} ({target_verdict(t)})")
    return lines + [""]


def allocator_lines(settings: dict) -> list[str]:
    """Each case's min step with glibc tuned over its min step with the default allocator.
    Two processes, so the machine's drift between them is in these ratios."""
    if not {"default", "tuned"} <= set(settings):
        return []
    default, tuned = settings["default"]["rows"], settings["tuned"]["rows"]
    lines = ["## The allocator: tuned / default", "",
             "Min step with glibc tuned as `peftkit train` sets it, over the min step with glibc's defaults, per "
             "case. The two settings ran in two processes one after the other, so a drift of the machine "
             "between them is in these ratios too (the ratios within one setting have none).", "",
             *table_head(["case", "min step tuned / default", "peak RSS tuned / default"])]
    for case, row in tuned.items():
        other = default.get(case, {})
        if "error" in row or "error" in other or not other:
            continue
        rss = row["peak_rss_mb"] / other["peak_rss_mb"] if row["peak_rss_mb"] and other.get("peak_rss_mb") else None
        lines.append(table_row([case, f"{row['min_s'] / other['min_s']:.3f}", fmt(rss, ".3f")]))
    return lines + [""]


def markdown_report(report: dict) -> str:
    m, s = report["machine"], report["setup"]
    lines = [
        "# Training step: peftkit vs Hugging Face PEFT, interleaved",
        "",
        f"`{report['command']}`",
        "",
        f"{report['date']} · {m['cpu_model']} · torch {m['torch']} · {s['threads']} thread(s) · "
        f"transformers {m['transformers']} · peft {m['peft']}",
        "",
        *reread_line(report),
        f"Llama {s['model']['num_hidden_layers']} layers, hidden {s['model']['hidden_size']}, fp32, "
        f"{s['attn_implementation']} attention, batch {s['batch']} x {s['seq_len']}, AdamW lr {s['lr']}, "
        f"LoRA r={s['lora']['r']} alpha={s['lora']['alpha']} dropout {s['lora']['dropout']}. "
        f"Timing: every case built in one process, {s['warmup']} warm-up steps each, then {s['rounds']} rounds "
        f"of one step per case (order reversed every round), each step timed by {s['clock']}. "
        "x floor / x PEFT / x full: the median over the rounds of (case / reference in the same round), "
        "and in brackets the ratio of the two minima. "
        "A step target is met only when the whole 95% interval of that median (distribution-free: order "
        "statistics of the per-round ratios) is at or below its limit, missed when all of it is above, and "
        "otherwise undecided at this machine's noise. "
        "Peak RSS: one fresh process per case "
        f"({s['memory_warmup']} + {s['memory_steps']} steps).",
        "",
        "The floor is the frozen model's forward and backward down to the outputs of the first layer's q and v "
        "projections (leaves that require grad), with peftkit's fused loss (the logits never whole): exactly the "
        "activation gradients LoRA on q, v needs, without LoRA's own work. A LoRA or full fine-tuning row below "
        "1.0 x floor is marked ‡, a measurement error. PEFT and full fine-tuning train on the model's own loss "
        "(`model(...).loss`), peftkit on the loss `peftkit train` computes (`lm_loss.training_loss`, fused), and "
        "the `-own-loss` rows are peftkit's LoRA on the model's own loss.",
        "",
    ]
    for name, setting in report["settings"].items():
        lines += setting_lines(name, setting)
    lines += allocator_lines(report["settings"])
    return "\n".join(lines).rstrip() + "\n"
