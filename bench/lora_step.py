"""Time one training step with peftkit's methods, side by side with Hugging Face PEFT.

What is measured
----------------
One optimiser step on a small random-weight Llama (8 layers, hidden 512, fp32, CPU):

    optimizer.zero_grad(set_to_none=True); loss = model(...).loss; loss.backward(); optimizer.step()

for twelve cases, each in its own fresh Python subprocess so that the peak resident
memory (``ru_maxrss``) belongs to that case alone. The LoRA group (``--cases lora``):

    full                 every parameter trainable (what LoRA is meant to avoid)
    floor                forward + backward with no parameter trainable; the input
                         embeddings are a detached leaf that requires grad, so the
                         backward still computes every activation gradient. No
                         optimiser step (nothing to update). This is the least any
                         adapter method can cost: an adapter adds its own small
                         matmuls and weight gradients on top of it.
    peft-qv              HF PEFT LoRA r=8 on q_proj, v_proj
    peft-all-linear      HF PEFT LoRA r=8 on every linear layer but lm_head
    peftkit-qv           peftkit LoRA r=8 on q_proj, v_proj
    peftkit-all-linear   peftkit LoRA r=8 on "all-linear"

and the other methods (``--cases methods``: these, plus full and floor):

    peft-prefix               HF PEFT prefix tuning, 20 virtual tokens
    peft-prompt               HF PEFT prompt tuning, 20 virtual tokens
    peftkit-adapter-pfeiffer  peftkit bottleneck adapter 64, after each feed-forward block
    peftkit-adapter-houlsby   peftkit bottleneck adapter 64, after attention and feed-forward
    peftkit-prefix            peftkit prefix tuning, 20 virtual tokens
    peftkit-prompt            peftkit prompt tuning, 20 virtual tokens

Every case trains on the same 4 x 256 real tokens. Prompt tuning runs 20 more
positions through every layer and prefix tuning attends over 20 more keys, so their
ratios to floor and full include that extra sequence.

Each case builds the same model from the same seed, runs ``--warmup`` untimed steps,
then times ``--steps`` steps and reports the median and the minimum step time, the
process's peak RSS at the end, and the trainable parameter count.

Why
---
The design targets for peftkit's LoRA are:

    * peftkit-qv         median step <= 1.03 x floor
    * peftkit-all-linear median step <= 1.08 x floor
    * no slower and no bigger (peak RSS) than PEFT with the same targets,

and for prefix and prompt tuning: no slower and no bigger than PEFT's same method.
(PEFT has no bottleneck adapters, so the adapter rows have no PEFT reference.)

The "floor" makes the first two checkable: it is the cost of the frozen model's
forward and backward, which LoRA cannot avoid. The PEFT rows make the third one
checkable on the same machine in the same run.

A case that fails (peftkit not importable yet, an exception in a step, a crash, a
timeout) becomes an error row with the message; the other cases still run.

Usage:  python bench/lora_step.py [--cases lora|methods|floor,peft-qv,...] [--steps 10]
Writes: bench/results/lora_step.json and bench/results/lora_step.md
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from importlib import metadata
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"

REFERENCE_CASES = ["full", "floor"]
LORA_CASES = ["peft-qv", "peft-all-linear", "peftkit-qv", "peftkit-all-linear"]
METHOD_CASES = [
    "peft-prefix", "peft-prompt",
    "peftkit-adapter-pfeiffer", "peftkit-adapter-houlsby", "peftkit-prefix", "peftkit-prompt",
]
CASES = REFERENCE_CASES + LORA_CASES + METHOD_CASES
# Names accepted by --cases besides the case names; each includes full and floor.
CASE_GROUPS = {
    "all": CASES,
    "lora": REFERENCE_CASES + LORA_CASES,
    "methods": REFERENCE_CASES + METHOD_CASES,
}
QV_TARGETS = ["q_proj", "v_proj"]

# The Hugging Face PEFT case each peftkit case is compared with (same method and
# settings). Bottleneck adapters have none: PEFT doesn't implement them.
PEFT_COUNTERPART = {
    "peftkit-qv": "peft-qv",
    "peftkit-all-linear": "peft-all-linear",
    "peftkit-prefix": "peft-prefix",
    "peftkit-prompt": "peft-prompt",
}

MODEL_CONFIG = dict(
    hidden_size=512,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=8,
    intermediate_size=1408,
    vocab_size=32000,
    max_position_embeddings=512,
)
BATCH, SEQ_LEN = 4, 256
LR = 1e-4
SEED = 0
ATTN_IMPLEMENTATION = "sdpa"
LORA = dict(r=8, alpha=16, dropout=0.0)
ADAPTER = dict(bottleneck=64)  # placement from the case name: pfeiffer or houlsby
NUM_VIRTUAL_TOKENS = 20  # prefix and prompt tuning

# Design targets: (case, reference case, metric, max ratio).
TARGETS = [
    ("peftkit-qv", "floor", "median_s", 1.03),
    ("peftkit-all-linear", "floor", "median_s", 1.08),
    ("peftkit-qv", "peft-qv", "median_s", 1.00),
    ("peftkit-all-linear", "peft-all-linear", "median_s", 1.00),
    ("peftkit-qv", "peft-qv", "peak_rss_mb", 1.00),
    ("peftkit-all-linear", "peft-all-linear", "peak_rss_mb", 1.00),
    ("peftkit-prefix", "peft-prefix", "median_s", 1.00),
    ("peftkit-prompt", "peft-prompt", "median_s", 1.00),
    ("peftkit-prefix", "peft-prefix", "peak_rss_mb", 1.00),
    ("peftkit-prompt", "peft-prompt", "peak_rss_mb", 1.00),
]

NOISY_SPREAD = 1.10  # a median this far above the min marks a row as noisy
MIN_STEPS_FOR_VERDICT = 3  # with fewer timed steps per case, the spread can't show noise

RESULT_MARKER = "@@LORA_STEP_RESULT@@ "


# --------------------------------------------------------------------------- worker
# Everything below up to the "parent" section runs inside the per-case subprocess.


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB (Linux reports KiB)."""
    import resource

    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 1024.0


def build_model():
    """The seeded random-weight Llama every case starts from, in training mode."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**MODEL_CONFIG, use_cache=False, attn_implementation=ATTN_IMPLEMENTATION)
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.train()
    return model


def make_batch():
    import torch

    gen = torch.Generator().manual_seed(SEED + 1)
    return torch.randint(0, MODEL_CONFIG["vocab_size"], (BATCH, SEQ_LEN), generator=gen)


def trainable(params) -> list:
    return [p for p in params if p.requires_grad]


def lm_step_fn(model, params, ids):
    """The standard training step: zero_grad + forward + backward + AdamW step."""
    import torch

    optimizer = torch.optim.AdamW(params, lr=LR)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def floor_step_fn(model, ids):
    """Forward + backward through a fully frozen model, activation gradients included."""
    for p in model.parameters():
        p.requires_grad_(False)
    embed = model.get_input_embeddings()

    def step() -> float:
        inputs_embeds = embed(ids).detach().requires_grad_()
        loss = model(inputs_embeds=inputs_embeds, labels=ids).loss
        loss.backward()
        return loss.item()

    return step


def peft_config(method: str):
    """Hugging Face PEFT's config for a ``peft-<method>`` case."""
    import peft

    if method in ("qv", "all-linear"):
        return peft.LoraConfig(
            r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
            target_modules=QV_TARGETS if method == "qv" else "all-linear",
        )
    if method == "prefix":
        return peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=NUM_VIRTUAL_TOKENS)
    if method == "prompt":
        return peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=NUM_VIRTUAL_TOKENS)
    raise ValueError(f"no PEFT case for {method!r}")


def peft_model(model, method: str):
    import peft

    return peft.get_peft_model(model, peft_config(method))


def peftkit_config(method: str):
    """peftkit's config for a ``peftkit-<method>`` case."""
    import peftkit

    if method in ("qv", "all-linear"):
        return peftkit.LoraConfig(
            r=LORA["r"], alpha=LORA["alpha"], dropout=LORA["dropout"],
            target_modules=QV_TARGETS if method == "qv" else "all-linear",
        )
    if method.startswith("adapter-"):
        return peftkit.AdapterConfig(bottleneck=ADAPTER["bottleneck"], placement=method.removeprefix("adapter-"))
    if method == "prefix":
        return peftkit.PrefixConfig(num_virtual_tokens=NUM_VIRTUAL_TOKENS)
    if method == "prompt":
        return peftkit.PromptConfig(num_virtual_tokens=NUM_VIRTUAL_TOKENS)
    raise ValueError(f"no peftkit case for {method!r}")


def peftkit_model(model, method: str):
    sys.path.insert(0, str(REPO_ROOT / "src"))  # the working tree's peftkit, installed or not
    import peftkit

    return peftkit.attach(model, peftkit_config(method))


def setup_case(case: str, ids):
    """Build the model for ``case``; return (step function, trainable parameter count)."""
    model = build_model()
    if case == "floor":
        return floor_step_fn(model, ids), 0
    if case == "full":
        wrapped = model
    else:
        library, _, method = case.partition("-")
        wrapped = peft_model(model, method) if library == "peft" else peftkit_model(model, method)
    params = trainable(wrapped.parameters())
    return lm_step_fn(wrapped, params, ids), sum(p.numel() for p in params)


def time_steps(step, warmup: int, steps: int) -> tuple[list[float], float]:
    """Run ``warmup`` untimed steps, then ``steps`` timed ones; return (seconds, last loss)."""
    loss = float("nan")
    for _ in range(warmup):
        loss = step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - start)
    return times, loss


def library_version(case: str) -> str | None:
    """Version of the adapter library this case used (peftkit's from the imported module)."""
    if case.startswith("peftkit-"):
        return getattr(sys.modules.get("peftkit"), "__version__", None)
    if case.startswith("peft-"):
        return sys.modules["peft"].__version__
    return None


def run_case(case: str, warmup: int, steps: int, threads: int) -> dict:
    """Measure one case in this process; the result is a JSON-able dict."""
    import torch
    import transformers  # noqa: F401  (imported here so rss_after_import counts it)

    torch.set_num_threads(threads)
    rss_after_import = peak_rss_mb()
    ids = make_batch()
    step, n_trainable = setup_case(case, ids)
    rss_after_setup = peak_rss_mb()
    times, loss = time_steps(step, warmup, steps)
    return {
        "case": case,
        "library_version": library_version(case),
        "trainable_params": n_trainable,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "step_s": times,
        "peak_rss_mb": peak_rss_mb(),
        "rss_after_import_mb": rss_after_import,
        "rss_after_setup_mb": rss_after_setup,
        "final_loss": loss,
        "torch_threads": torch.get_num_threads(),
    }


def worker_main(case: str, warmup: int, steps: int, threads: int) -> int:
    """Subprocess entry point: print one marked JSON line, success or error."""
    try:
        result = run_case(case, warmup, steps, threads)
    except BaseException as exc:  # report anything, including KeyboardInterrupt/SystemExit
        traceback.print_exc()
        result = {"case": case, "error": f"{type(exc).__name__}: {exc}"}
    print(RESULT_MARKER + json.dumps(result), flush=True)
    return 0


# --------------------------------------------------------------------------- parent


def run_in_subprocess(case: str, args) -> dict:
    """Run one case in a fresh interpreter and parse its marked result line."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(args.threads)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--worker", case,
        "--warmup", str(args.warmup), "--steps", str(args.steps), "--threads", str(args.threads),
    ]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"case": case, "error": f"timed out after {args.timeout} s",
                "wall_s": time.perf_counter() - start}
    wall = time.perf_counter() - start
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            result = json.loads(line[len(RESULT_MARKER):])
            result["wall_s"] = wall
            return result
    tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
    return {"case": case, "error": f"subprocess exited with code {proc.returncode}: {tail}",
            "wall_s": wall}


def run_all(args) -> dict[str, dict]:
    """Run each case ``--repeats`` times, interleaved round-robin, each run a fresh process."""
    runs: dict[str, list[dict]] = {case: [] for case in args.cases}
    for repeat in range(args.repeats):
        for case in args.cases:
            label = case if args.repeats == 1 else f"{case} ({repeat + 1}/{args.repeats})"
            print(f"[lora_step] {label} ...", end=" ", flush=True)
            load = os.getloadavg()[0]
            row = run_in_subprocess(case, args)
            row["loadavg_before"] = load
            runs[case].append(row)
            status = f"error: {row['error']}" if "error" in row else f"median {row['median_s']:.3f} s"
            print(f"{status} ({row['wall_s']:.0f} s wall, load {load:.1f} before)", flush=True)
    return {case: combine_runs(case_runs) for case, case_runs in runs.items()}


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


def ratio(results: dict, case: str, reference: str, metric: str) -> float | None:
    """results[case][metric] / results[reference][metric], or None if either is missing."""
    a, b = results.get(case, {}), results.get(reference, {})
    if a.get(metric) is None or not b.get(metric):
        return None
    return a[metric] / b[metric]


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


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def machine_info(threads: int) -> dict:
    return {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": package_version("torch"),
        "transformers": package_version("transformers"),
        "peft": package_version("peft"),
    }


def fmt(value, spec: str, suffix: str = "") -> str:
    return "–" if value is None else format(value, spec) + suffix


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
        "| case | trainable params | median step (s) | min step (s) | x floor | x full | x PEFT "
        "| peak RSS (MB) | RSS x PEFT |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["results"]:
        if "error" in row:
            message = " ".join(row["error"].split()).replace("|", "/")
            lines.append(f"| {row['case']} | error: {message} | | | | | | | |")
            continue
        mark = " †" if is_noisy(row) else ""
        lines.append(
            f"| {row['case']} | {row['trainable_params']:,} | {row['median_s']:.3f}{mark} | {row['min_s']:.3f} "
            f"| {fmt(row['ratio_to_floor'], '.3f')} | {fmt(row['ratio_to_full'], '.3f')} "
            f"| {peft_ratio(row, 'ratio_to_peft')} "
            f"| {row['peak_rss_mb']:.0f} | {peft_ratio(row, 'rss_ratio_to_peft')} |"
        )
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


def write_atomic(path: Path, text: str) -> None:
    """Write to a temp file in the same folder, then os.replace it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; results are meant to be read
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def expand_cases(text: str, known: list[str], groups: dict[str, list[str]]) -> list[str]:
    """Comma-separated case and group names -> case names (shared with quality.py).

    Groups expand in place; a case named twice runs once, where it first appears.
    """
    names = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in names if c not in known and c not in groups]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown case(s) {unknown}; choose from {known} or the groups {sorted(groups)}")
    if not names:
        raise argparse.ArgumentTypeError("no cases given")
    cases: list[str] = []
    for name in names:
        for case in groups.get(name, [name]):
            if case not in cases:
                cases.append(case)
    return cases


def parse_cases(text: str) -> list[str]:
    """Case names and group names (``all``, ``lora``, ``methods``), comma-separated."""
    return expand_cases(text, CASES, CASE_GROUPS)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=parse_cases, default=CASES,
                   help=f"comma-separated cases ({','.join(CASES)}) and/or groups: "
                        f"lora ({','.join(CASE_GROUPS['lora'])}), "
                        f"methods ({','.join(CASE_GROUPS['methods'])}), all (default: all)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per case (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps per case (default 3)")
    p.add_argument("--repeats", type=int, default=1,
                   help="fresh processes per case, run interleaved; steps are pooled (default 1)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads value (default 2)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds allowed per case (default 1800)")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR,
                   help="where lora_step.json and lora_step.md go (default bench/results)")
    p.add_argument("--worker", metavar="CASE", choices=CASES, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if min(args.steps, args.threads, args.repeats) < 1 or args.warmup < 0:
        p.error("--steps, --threads and --repeats must be >= 1, --warmup >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args.worker, args.warmup, args.steps, args.threads)

    results = run_all(args)
    add_ratios(results)

    report = {
        "benchmark": "lora_step",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(args.threads),
        "setup": {
            "model": MODEL_CONFIG, "dtype": "float32", "attn_implementation": ATTN_IMPLEMENTATION,
            "batch": BATCH, "seq_len": SEQ_LEN, "real_tokens_per_step": BATCH * SEQ_LEN,
            "lr": LR, "seed": SEED, "lora": LORA, "adapter": ADAPTER,
            "num_virtual_tokens": NUM_VIRTUAL_TOKENS,
            "warmup": args.warmup, "steps": args.steps, "repeats": args.repeats,
        },
        "results": [results[c] for c in args.cases],
        "targets": check_targets(results),
    }
    md = markdown_report(report)
    write_atomic(args.out_dir / "lora_step.json", json.dumps(report, indent=2) + "\n")
    write_atomic(args.out_dir / "lora_step.md", md)
    print()
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
