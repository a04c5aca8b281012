"""Inference latency of LoRA merged (M6) vs unmerged vs the plain base model, interleaved.

The seeded random Llama of ``lora_step`` (hidden 512, 8 layers, float32, ``bench.lora_step.cases.
build_model``), in eval mode under ``torch.inference_mode``, one forward of its 4 x 256 batch
(``make_batch``) per call, on the CPU. Cases, every model built from the same seed:

- ``base``: the plain model, no adapter (the floor);
- ``qv-unmerged`` / ``all-linear-unmerged``: ``peftkit.attach`` with LoRA r=8, alpha=16 on
  q_proj,v_proj / on every linear layer but ``lm_head``, called as ``pm(input_ids=ids)``;
- ``qv-merged`` / ``all-linear-merged``: the same adapter folded in by ``merge_and_unload()``,
  which gives back the plain model with W + s·B A in place of W: the base's computation exactly.

The base and the merged cases are one model (``SharedModel``): before each of their calls the
weights of that case are copied into it, untimed, so they run on the same modules in the same
memory and only the numbers differ. Separate copies of the model, as before, ran more than 2%
apart either way in two reruns, from where their weights happened to lie. Each unmerged case has
its own model.

Every B is drawn from N(0, 0.02²) (seeded; the A are peftkit's init), so that the merged
weights differ from the base's and the unmerged path adds real work. Before timing, each merged
model's logits are checked against its unmerged twin (``torch.testing.assert_close``, atol
1e-4) and shown to differ from the base's.

Timing, in one process (``harness.time_cases``): every case built, ``--warmup`` untimed calls
each, then ``--rounds`` rounds of one call per case, the order reversed every round. Each call is
read on two clocks: ``time.thread_time`` (CPU time of the calling thread, which other processes
on the machine cannot inflate, and which holds all the work with one torch thread) and
``time.perf_counter`` (wall). The report goes by the thread clock with ``--threads 1`` and by the
wall clock otherwise: min and median per case, and each case over ``base`` round by round (its
median over the rounds) and of the minima. Target: merged ≤ 1.02 x base. Merged is the base's
computation on other numbers, so a merged/base ratio below 0.98 is a measurement error, and the
report says so instead of counting it as met. The unmerged overhead is reported, no target.

    python -m bench.merged_latency                 # writes bench/results/merged_latency.{json,md}
    python -m bench.merged_latency --rounds 2 --warmup 1 --out-dir /tmp/ml     # smoke
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from bench import harness
from bench.lora_step import cases as setup

COMMAND = "python -m bench.merged_latency"
METHODS = ("qv", "all-linear")
CASES = ("base", *(f"{m}-{state}" for m in METHODS for state in ("unmerged", "merged")))
MERGED_TARGET = 1.02  # merged / base at most this (median of rounds)
MEASUREMENT_ERROR_BELOW = 0.98  # merged / base below this cannot be real: the same computation
# (case, reference, target: case / reference at most this); None: reported, no target.
RATIOS = tuple((case, "base", MERGED_TARGET if case.endswith("-merged") else None) for case in CASES[1:])
B_STD, B_SEED = 0.02, 1
CHECK_ATOL = 1e-4
CLOCKS = {"thread": time.thread_time, "wall": time.perf_counter}


def lora_model(method: str):
    """A fresh seeded model with peftkit LoRA on ``method``'s targets, every B drawn from
    N(0, B_STD²) from the same seed (so the two cases of a method hold the same adapter)."""
    import torch

    peftkit = harness.import_peftkit()
    pm = peftkit.attach(setup.build_model(), setup.peftkit_config(method))
    generator = torch.Generator().manual_seed(B_SEED)
    with torch.no_grad():
        found = 0
        for _, role, param in pm.adapter_parameters(pm.active_adapters):
            if role == "lora_B":
                torch.nn.init.normal_(param, std=B_STD, generator=generator)
                found += 1
    if not found:
        raise RuntimeError(f"no lora_B parameter found for {method!r}")
    return pm.eval()


class SharedModel:
    """The base model, whose weights are swapped for a merged model's before its calls: the
    base and the merged cases run on the same module objects and the same memory, so the
    numbers are all that differ between them (copies of a model in other memory ran more than
    2% apart, either way, from where their weights happened to lie)."""

    def __init__(self):
        import torch

        self.model = setup.build_model().eval()
        self.params = dict(self.model.named_parameters())
        self.weights = {"base": {}}
        for method in METHODS:
            merged = lora_model(method).merge_and_unload()
            changed = {name: p.detach().clone() for name, p in merged.named_parameters()
                       if not torch.equal(p, self.params[name])}
            if not changed:
                raise RuntimeError(f"merging {method!r} changed no weight")
            self.weights[f"{method}-merged"] = changed
            for name in changed:
                self.weights["base"].setdefault(name, self.params[name].detach().clone())

    def loader(self, case: str):
        """A function that puts ``case``'s weights into the model (the base's where it has none)."""
        import torch

        def load() -> None:
            with torch.no_grad():
                for name, base in self.weights["base"].items():
                    self.params[name].copy_(self.weights[case].get(name, base))

        return load


def build_models() -> tuple[dict, dict]:
    """(each case's model, the untimed function that loads a case's weights first): the
    unmerged cases each on a model built anew from the same seed, the base and merged cases
    on one ``SharedModel``."""
    shared = SharedModel()
    models, prepare = {}, {}
    for case in CASES:
        if case.endswith("-unmerged"):
            models[case] = lora_model(case.removesuffix("-unmerged"))
        else:
            models[case], prepare[case] = shared.model, shared.loader(case)
    return models, prepare


def check_outputs(models: dict, prepare: dict, ids) -> dict:
    """Largest |difference| of the logits, merged against unmerged (must be within CHECK_ATOL)
    and merged against the base (must be far from it), per method; raises if either fails."""
    import torch

    logits = {}
    with torch.inference_mode():
        for case, model in models.items():
            if case in prepare:
                prepare[case]()
            logits[case] = model(input_ids=ids).logits
    out = {}
    for method in METHODS:
        merged, unmerged = logits[f"{method}-merged"], logits[f"{method}-unmerged"]
        out[method] = {"merged_vs_unmerged": (merged - unmerged).abs().max().item(),
                       "merged_vs_base": (merged - logits["base"]).abs().max().item()}
        torch.testing.assert_close(merged, unmerged, atol=CHECK_ATOL, rtol=0.0,
                                   msg=lambda m, method=method: f"{method}: merged != unmerged: {m}")
        if out[method]["merged_vs_base"] <= 100 * CHECK_ATOL:
            raise AssertionError(f"{method}: the merged model's logits are within "
                                 f"{out[method]['merged_vs_base']:.1e} of the base's; the adapter does nothing")
    out["atol"] = CHECK_ATOL
    return out


def flag(ratios: list[dict]) -> list[dict]:
    """Mark each merged/base ratio below MEASUREMENT_ERROR_BELOW (median of rounds or of the
    minima, to the three decimals the report shows) a measurement error: its ``met`` becomes
    None, not a win."""
    for r in ratios:
        r["measurement_error"] = None
        if r["case"].endswith("-merged"):
            lowest = round(min(r["median_of_rounds"], r["of_min"]), 3)
            r["measurement_error"] = lowest < MEASUREMENT_ERROR_BELOW
            if r["measurement_error"]:
                r["met"] = None
    return ratios


def run(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    started, load_before = time.perf_counter(), harness.load_average()
    models, prepare = build_models()
    ids = setup.make_batch()
    checks = check_outputs(models, prepare, ids)
    calls = {case: (lambda m=model: m(input_ids=ids)) for case, model in models.items()}
    with torch.inference_mode():
        seconds = harness.time_cases(calls, args.rounds, args.warmup, CLOCKS, prepare)
    clock = "thread" if args.threads == 1 else "wall"
    timing = {name: harness.round_summary(s, RATIOS) for name, s in seconds.items()}
    for section in timing.values():
        flag(section["ratios"])
    return {
        "date": harness.utc_now(), "command": " ".join([COMMAND, *sys.argv[1:]]),
        "machine": harness.machine_info(args.threads), "loadavg_before": load_before,
        "loadavg_after": harness.load_average(),
        "setup": {"model": "LlamaForCausalLM " + ", ".join(f"{k} {v}" for k, v in setup.MODEL_CONFIG.items())
                           + f", random weights (seed {setup.SEED}), float32, {setup.ATTN_IMPLEMENTATION}, "
                           "use_cache=False, eval mode, torch.inference_mode",
                  "batch": setup.BATCH, "tokens": setup.SEQ_LEN, "lora": setup.LORA,
                  "targets": {"qv": setup.QV_TARGETS, "all-linear": "all-linear"},
                  "lora_B_init": f"N(0, {B_STD}^2), seed {B_SEED}", "merge": "PeftModel.merge_and_unload()",
                  "rounds": args.rounds, "warmup": args.warmup, "threads": args.threads,
                  "merged_target": MERGED_TARGET, "measurement_error_below": MEASUREMENT_ERROR_BELOW},
        "checks": checks, "clock": clock, "timing": timing, "wall_s": time.perf_counter() - started,
    }


def markdown(report: dict) -> str:
    s, m, c = report["setup"], report["machine"], report["checks"]
    clock = report["clock"]
    section, wall = report["timing"][clock], report["timing"]["wall"]
    clock_name = ("`time.thread_time` (CPU time of the calling thread)" if clock == "thread"
                  else "`time.perf_counter` (wall)")
    lines = [
        "# LoRA inference: merged vs unmerged vs the base model (CPU)", "",
        f"{report['date']} · `{report['command']}` · {m['cpu_model']} ({m['cpu_count']} cores, "
        f"{s['threads']} torch threads) · torch {m['torch']} · transformers {m['transformers']} · "
        f"1-min load {report['loadavg_before']:.2f} before, {report['loadavg_after']:.2f} after · "
        f"{report['wall_s']:.0f} s in all", "",
        f"Model: {s['model']}. One forward of {s['batch']} x {s['tokens']} tokens per call. LoRA r={s['lora']['r']} "
        f"alpha={s['lora']['alpha']} on q_proj,v_proj (qv) or every linear layer but lm_head (all-linear), B drawn "
        f"from {s['lora_B_init']}; merged = `{s['merge']}`. The base and the merged cases are one model whose weights "
        "are copied in, untimed, before each of their calls (the same modules and memory: only the numbers differ); "
        "each unmerged case has a model of its own. "
        f"{s['warmup']} warm-up calls per case, then {s['rounds']} rounds of one call per case in one process, order "
        f"reversed every round. Times by {clock_name}; the wall median beside them.", "",
        *harness.table_head(["case", "min (ms)", "median (ms)", "wall median (ms)"]),
    ]
    wall_median = {row["case"]: row["median_s"] for row in wall["results"]}
    for row in section["results"]:
        lines.append(harness.table_row([row["case"], f"{row['min_s'] * 1e3:.1f}", f"{row['median_s'] * 1e3:.1f}",
                                        f"{wall_median[row['case']] * 1e3:.1f}"]))
    lines += ["", *harness.table_head(["ratio", "median of rounds", "of the minima", "target", "<met"])]
    errors = []
    for r in section["ratios"]:
        target = "–" if r["target"] is None else f"≤ {r['target']:.2f}x"
        if r["measurement_error"]:
            met = f"**measurement error** (< {s['measurement_error_below']:.2f}x)"
            errors.append(r["case"])
        else:
            met = "–" if r["met"] is None else ("met" if r["met"] else "**missed**")
        lines.append(harness.table_row([f"{r['case']} / {r['reference']}", f"{r['median_of_rounds']:.3f}x",
                                        f"{r['of_min']:.3f}x", target, met]))
    lines.append("")
    if errors:
        lines += [f"{', '.join(errors)}: below {s['measurement_error_below']:.2f}x the base. A merged model runs "
                  "the base's computation on other numbers, so it cannot be faster: the machine was disturbed "
                  "unevenly (or the rounds are too few). Not a win; run it again on a quieter machine.", ""]
    lines += ["Checks before timing: largest |difference| of the logits, merged against unmerged "
              f"{c['qv']['merged_vs_unmerged']:.1e} (qv), {c['all-linear']['merged_vs_unmerged']:.1e} (all-linear), "
              f"within atol {c['atol']:.0e}; merged against the base {c['qv']['merged_vs_base']:.2f} (qv), "
              f"{c['all-linear']['merged_vs_base']:.2f} (all-linear).", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per case before the rounds")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads; 1: timed by time.thread_time")
    p.add_argument("--out-dir", type=Path, default=harness.RESULTS_DIR)
    args = p.parse_args(argv)
    if args.rounds < 1 or args.warmup < 0 or args.threads < 1:
        p.error("--rounds and --threads must be at least 1, --warmup at least 0")
    report = run(args)
    harness.write_report(args.out_dir, "merged_latency", report, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
