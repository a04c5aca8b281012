"""``python -m bench.gpu_check``: the prepared GPU check (issue 17, item 6), sized to end within
8 minutes on one H200. ``--dry-run`` runs the same stages on the CPU at toy sizes (hidden 64, 2
layers, batch 2 x 32, 1 round; about 2 minutes on 2 busy cores, nearly all of it imports).

Stages, each in a fresh worker process (``bench.harness``):

1. ``pytest -m gpu tests/gpu``: passed / failed / errors / skipped, from pytest's JUnit XML
   (left out of a dry run: the test suite itself collects tests/gpu, skipped without CUDA).
2. Speed, per configuration, peftkit and PEFT in ONE process: both models are built, each runs
   ``warmup`` untimed steps, then ``rounds`` rounds time ``steps`` steps of each, the order
   reversed every round (A B, B A, ...). A round is timed by ``time.perf_counter`` between two
   ``torch.cuda.synchronize()``; its step time is its time / ``steps``; tokens/s = batch x seq /
   the minimum over rounds (the median and every round are in the JSON).
3. Peak memory, per configuration and side, each in a fresh process: set up, one warm-up step,
   one timed step, then ``torch.cuda.max_memory_allocated()`` (all live tensors since the
   process began: weights, activations, gradients, AdamW state; ``setup_peak_mib`` is the same
   read before the first step, ``peak_reserved_mib`` the allocator's). Dry run: peak RSS (VmHWM, ``harness.peak_rss_mb``).

The step: ``zero_grad(set_to_none=True)``; under ``torch.autocast(device, dtype=torch.bfloat16)``
the loss, PEFT's ``model(input_ids=ids, labels=ids).loss`` and peftkit's the one ``peftkit train``
computes, ``peftkit.lm_loss.training_loss`` (fused: the logits never whole; the head stays
bf16 on an NF4 base, so every configuration takes it); ``loss.backward()``; ``AdamW(adapter params,
lr=1e-4).step()``. Model: ``LlamaConfig`` hidden 2048, 16 layers, 16
heads, 8 KV heads, intermediate 5632, vocab 32000 (1.1 B parameters), sdpa, random weights from
``torch.manual_seed(0)`` made on the GPU in float32, stored in bf16 (``peftkit.precision.place``);
8 x 1024 random tokens. LoRA r=16, alpha 32, dropout 0 on q,k,v,o,gate,up,down of every block,
float32 adapter weights on both sides (peftkit's default on a bf16 base, PEFT's
autocast_adapter_dtype=True).

Configurations: plain; checkpointing (peftkit.checkpointing; PEFT: transformers' non-reentrant
checkpointing + ``enable_input_require_grads``); nf4 (``peftkit.quantize.quantize_base`` before
attach; PEFT: the same weights saved to a temp folder, loaded as bitsandbytes NF4 with double
quantization, then ``prepare_model_for_kbit_training``, which as PEFT's QLoRA recipe does stores
the embeddings, norms and lm_head in float32); nf4-checkpointing. A side that cannot run (a
module or library missing, no CUDA) is recorded with its reason; with ``--budget-s``, so is a
stage that would not end within the budget. Targets, per configuration: peftkit's tokens/s >=
PEFT's and its peak memory <= PEFT's. Writes gpu_check.json and gpu_check.md to ``--out``
(default bench/results; a dry run's default is a new temp folder, and never bench/results).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from bench import harness

MODULE = "bench.gpu_check"
SIDES = ("peftkit", "peft")
CONFIGS = {  # name: (nf4 base, gradient checkpointing)
    "plain": (False, False), "checkpointing": (False, True),
    "nf4": (True, False), "nf4-checkpointing": (True, True),
}
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA = dict(r=16, alpha=32, dropout=0.0)
LR, SEED = 1e-4, 0
FULL = dict(model=dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=8,
                       intermediate_size=5632, vocab_size=32000, max_position_embeddings=1024),
            batch=8, seq=1024, warmup=2, rounds=5, steps=2)
DRY = dict(model=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, vocab_size=128, max_position_embeddings=32),
           batch=2, seq=32, warmup=1, rounds=1, steps=1)
# Seconds a stage is assumed to take ({dry_run: ...}) until one like it has run; then the longest seen.
FIRST_GUESS = {False: {"speed": 90.0, "memory": 40.0}, True: {"speed": 40.0, "memory": 25.0}}
GRACE_S = 40.0  # a worker may run this far past the budget before it is killed
TESTS_TIMEOUT_S = 120.0


# --------------------------------------------------------------------------- in a worker
def unavailable(config: str, side: str, dry: bool) -> str | None:
    """Why ``side`` cannot run ``config`` here (None when it can): the imports it needs, CUDA."""
    nf4, ckpt = CONFIGS[config]
    try:
        if side == "peftkit":
            harness.import_peftkit()
            if ckpt:
                importlib.import_module("peftkit.checkpointing").enable_gradient_checkpointing
            if nf4:  # the module, and the library it needs (check_scheme raises when bitsandbytes is missing)
                quantize = importlib.import_module("peftkit.quantize")
                getattr(quantize, "check_scheme", lambda scheme: quantize.quantize_base)("nf4")
        elif nf4:
            import torch
            if dry or not torch.cuda.is_available():
                return "not available: PEFT's NF4 (bitsandbytes through transformers) is run on CUDA only"
            importlib.import_module("bitsandbytes")
    except Exception as exc:  # ImportError, AttributeError, or a library failing at import
        return f"not available: {type(exc).__name__}: {exc}"
    return None


def build_base(s: dict, device):
    """The seeded random Llama, made on ``device`` in float32, stored in bfloat16, in train mode."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    harness.import_peftkit()
    from peftkit.precision import place

    torch.manual_seed(SEED)
    with device:
        model = LlamaForCausalLM(LlamaConfig(**s["model"], use_cache=False, attn_implementation="sdpa"))
    return place(model, device, torch.bfloat16).train()


def load_nf4(s: dict, device, folder: Path):
    """PEFT's QLoRA base: the same weights (saved to ``folder`` once) loaded as bitsandbytes NF4."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if not (folder / "config.json").exists():
        build_base(s, device).save_pretrained(folder)  # the model is freed when this line ends
        gc.collect()
        torch.cuda.empty_cache()
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                               bnb_4bit_use_double_quant=True)
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=quant, dtype=torch.bfloat16,
                                                device_map={"": device.index or 0}, attn_implementation="sdpa")


def setup(config: str, side: str, s: dict, device, folder: Path):
    """``side``'s LoRA model for ``config`` in train mode, and its trainable parameters."""
    nf4, ckpt = CONFIGS[config]
    if side == "peftkit":
        peftkit = harness.import_peftkit()
        model = build_base(s, device)
        if nf4:
            from peftkit.quantize import quantize_base
            quantize_base(model, "nf4")
        model = peftkit.attach(model, peftkit.LoraConfig(**LORA, target_modules="all-linear"))
        if ckpt:
            from peftkit.checkpointing import enable_gradient_checkpointing
            enable_gradient_checkpointing(model)
    else:
        import peft
        if nf4:
            model = peft.prepare_model_for_kbit_training(load_nf4(s, device, folder), use_gradient_checkpointing=ckpt,
                                                         gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            model = build_base(s, device)
            if ckpt:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                model.enable_input_require_grads()
        model = peft.get_peft_model(model, peft.LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"],
                                                           lora_dropout=LORA["dropout"], target_modules=TARGET_MODULES))
    model.train()
    return model, [p for p in model.parameters() if p.requires_grad]


def make_step(model, params, ids, side: str):
    """One training step of ``side``'s model on ``ids``: peftkit's on the loss ``peftkit train``
    computes (``lm_loss.training_loss``, fused where it applies), PEFT's on the model's own."""
    import torch

    optimizer = torch.optim.AdamW(params, lr=LR)
    if side == "peftkit":
        from peftkit.lm_loss import training_loss
        compute_loss = lambda: training_loss(model, {"input_ids": ids, "labels": ids})  # noqa: E731
    else:
        compute_loss = lambda: model(input_ids=ids, labels=ids).loss  # noqa: E731

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(ids.device.type, dtype=torch.bfloat16):
            loss = compute_loss()
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def context(dry: bool):
    """A worker's (settings, device, token ids on it, a function that waits for the device)."""
    import torch

    s = DRY if dry else FULL
    device = torch.device("cpu") if dry else torch.device("cuda", 0)
    ids = torch.randint(0, s["model"]["vocab_size"], (s["batch"], s["seq"]),
                        generator=torch.Generator().manual_seed(SEED + 1)).to(device)
    return s, device, ids, (lambda: None) if dry else (lambda: torch.cuda.synchronize(device))


def measure_speed(config: str, dry: bool, folder: Path) -> dict:
    import torch

    s, device, ids, sync = context(dry)
    sides, steps = {}, {}
    for side in SIDES:
        if reason := unavailable(config, side, dry):
            sides[side] = {"reason": reason}
            continue
        try:
            model, params = setup(config, side, s, device, folder)
        except Exception as exc:
            sides[side] = {"error": f"setup failed: {type(exc).__name__}: {exc}"}
            continue
        steps[side] = make_step(model, params, ids, side)
        sides[side] = {"trainable_params": sum(p.numel() for p in params),
                       "adapter_dtypes": sorted({str(p.dtype) for p in params}),
                       "frozen_dtypes": sorted({str(p.dtype) for p in model.parameters() if not p.requires_grad})}
        del model, params
    for step in steps.values():
        for _ in range(s["warmup"]):
            step()
    times, losses = {side: [] for side in steps}, {}
    for r in range(s["rounds"]):
        for side in (list(steps) if r % 2 == 0 else list(reversed(steps))):  # A B, B A, A B, ...
            sync()
            start = time.perf_counter()
            for _ in range(s["steps"]):
                losses[side] = steps[side]()
            sync()
            times[side].append((time.perf_counter() - start) / s["steps"])
    for side, t in times.items():
        sides[side].update(step_s=t, min_step_s=min(t), median_step_s=statistics.median(t),
                           tokens_per_s=s["batch"] * s["seq"] / min(t), final_loss=float(losses[side]))
    del steps, losses
    gc.collect()
    if not dry:
        torch.cuda.empty_cache()
    return {"config": config, "sides": sides, "peftkit_version": getattr(sys.modules.get("peftkit"), "__version__", None),
            "device_name": harness.cpu_model() if dry else torch.cuda.get_device_name(device)}


def measure_memory(config: str, side: str, dry: bool, folder: Path) -> dict:
    import torch

    s, device, ids, sync = context(dry)
    peak = harness.peak_rss_mb if dry else (lambda: torch.cuda.max_memory_allocated(device) / 2**20)
    if not dry:
        torch.cuda.reset_peak_memory_stats(device)
    model, params = setup(config, side, s, device, folder)
    step = make_step(model, params, ids, side)
    sync()
    setup_peak = peak()
    step()  # warm-up
    sync()
    start = time.perf_counter()
    step()  # timed
    sync()
    row = {"peak_mem_mib": peak(), "setup_peak_mib": setup_peak, "second_step_s": time.perf_counter() - start,
           "memory_measure": "VmHWM" if dry else "torch.cuda.max_memory_allocated"}
    return row if dry else {**row, "peak_reserved_mib": torch.cuda.max_memory_reserved(device) / 2**20}


# --------------------------------------------------------------------------- in the parent
def parse_junit(path: Path) -> dict:
    """Counts from pytest's JUnit XML (its <testsuite> elements summed)."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    n = {k: sum(int(x.get(k, 0)) for x in suites) for k in ("tests", "failures", "errors", "skipped")}
    return {"passed": n["tests"] - n["failures"] - n["errors"] - n["skipped"], "failed": n["failures"],
            "errors": n["errors"], "skipped": n["skipped"], "total": n["tests"]}


def run_tests(env: dict, timeout: float) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="gpu_check_junit_"))
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/gpu", "-o", "addopts=", "-q", "-p", "no:cacheprovider",
           f"--junitxml={folder / 'junit.xml'}"]
    row = {"command": "pytest -m gpu tests/gpu"}
    try:
        proc = subprocess.run(cmd, cwd=harness.REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        row.update(returncode=proc.returncode, tail=(proc.stdout + proc.stderr).strip().splitlines()[-15:])
        row.update(parse_junit(folder / "junit.xml"))
    except subprocess.TimeoutExpired:
        row["error"] = f"timed out after {timeout:.0f} s"
    except (OSError, ET.ParseError) as exc:
        row["error"] = f"no JUnit report: {type(exc).__name__}: {exc}"
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return row


class Runner:
    """Starts the stages while the budget lasts; each worker's timeout is what is left (+ grace)."""

    def __init__(self, args, env: dict, folder: Path):
        self.args, self.env, self.folder, self.start = args, env, folder, time.perf_counter()
        self.seen: dict[str, list[float]] = {"speed": [], "memory": []}

    def left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.start)

    def too_late(self, need: float) -> str | None:
        if self.left() >= need:
            return None
        return f"not started: {max(self.left(), 0):.0f} s of the {self.args.budget_s:.0f} s budget left, ~{need:.0f} s needed"

    def guess(self, kind: str) -> float:
        return max(self.seen[kind], default=FIRST_GUESS[self.args.dry_run][kind])

    def worker(self, kind: str, argv: list[str]) -> dict:
        argv = ["--worker", kind, "--folder", str(self.folder), *argv, *(["--dry-run"] if self.args.dry_run else [])]
        timeout = max(self.left(), 0) + GRACE_S
        outcome = harness.run_worker(MODULE, argv, self.env, timeout=timeout)
        self.seen[kind].append(outcome.wall_s)
        return harness.worker_row(outcome, {}, timeout)

    def config(self, name: str) -> dict:
        """One configuration: its speed worker, then a memory worker per side that ran."""
        row = {"config": name, "sides": {side: {} for side in SIDES},
               "reason": self.too_late(self.guess("speed") + 2 * self.guess("memory"))}
        reasons = {} if row["reason"] else {side: unavailable(name, side, self.args.dry_run) for side in SIDES}
        if reasons and all(reasons.values()):  # neither side can run: no worker needed to say so
            row["sides"] = {side: {"reason": reason} for side, reason in reasons.items()}
        elif not row["reason"]:
            print(f"[gpu_check] {name}: speed ...", flush=True)
            speed = self.worker("speed", ["--config", name])
            if "error" in speed:
                row["sides"] = {side: {"error": f"speed worker: {speed['error']}"} for side in SIDES}
            else:
                row.update(speed_wall_s=speed["wall_s"], device_name=speed["device_name"],
                           peftkit_version=speed["peftkit_version"], sides=speed["sides"])
            for side, cell in row["sides"].items():
                if "reason" in cell or "error" in cell:
                    continue
                if reason := self.too_late(self.guess("memory")):
                    cell["reason"] = reason
                    continue
                print(f"[gpu_check] {name}: memory of {side} ...", flush=True)
                mem = self.worker("memory", ["--config", name, "--side", side])
                cell.update({"error": f"memory worker: {mem['error']}"} if "error" in mem else mem)
        return finish(row)


def finish(row: dict) -> dict:
    """A configuration's status, ratios (peftkit / PEFT) and targets."""
    kit, ref = row["sides"]["peftkit"], row["sides"]["peft"]
    for key, name in (("tokens_per_s", "tokens_per_s_ratio"), ("peak_mem_mib", "peak_mem_ratio")):
        row[name] = kit[key] / ref[key] if kit.get(key) and ref.get(key) else None
    row["targets"] = {"tokens_per_s": None if row["tokens_per_s_ratio"] is None else row["tokens_per_s_ratio"] >= 1.0,
                      "peak_mem": None if row["peak_mem_ratio"] is None else row["peak_mem_ratio"] <= 1.0}
    if None not in row["targets"].values():
        row["status"] = "measured"
        row.pop("reason")
        if kit["trainable_params"] != ref["trainable_params"]:
            row["note"] = f"trainable parameters differ: peftkit {kit['trainable_params']}, PEFT {ref['trainable_params']}"
    else:
        why = "; ".join(f"{side}: {c.get('reason') or c['error']}" for side, c in row["sides"].items()
                        if c.get("reason") or c.get("error"))
        row["reason"] = row["reason"] or why or "not measured"
        row["status"] = "error" if any("error" in c for c in row["sides"].values()) else "skipped"
    return row


def overall(rows: list[dict]) -> str:
    missed = [r["config"] for r in rows if False in r["targets"].values()]
    missing = [r["config"] for r in rows if r["status"] != "measured"]
    head = (f"not met in {', '.join(missed)}" if missed else "not measured" if len(missing) == len(rows)
            else "met where measured" if missing else "met")
    return head + (f"; not measured: {', '.join(missing)}" if missing and len(missing) < len(rows) else
                   f": {', '.join(missing)}" if missing else "")


def markdown(report: dict) -> str:
    verdict = {None: "not measured", True: "met", False: "not met"}
    tests = report["tests"]
    lines = [f"# GPU check{' (dry run: toy sizes on the CPU; plumbing, not figures)' if report['dry_run'] else ''}", "",
             f"- date: {report['date']}", f"- device: {report['device']}", f"- command: `{report['command']}`",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
             f"- setup: {report['setup']['summary']}", f"- memory: {report['setup']['memory']}", "",
             "**Tests** (`pytest -m gpu tests/gpu`): " + (tests.get("reason") or tests.get("error") or
             f"{tests['passed']} passed, {tests['failed']} failed, {tests['errors']} errors, {tests['skipped']} skipped"),
             ""]
    lines += harness.table_head(["configuration", "peftkit tok/s", "PEFT tok/s", "ratio", "peftkit peak MiB",
                                 "PEFT peak MiB", "ratio", "<tok/s target", "<memory target"])
    for row in report["configurations"]:
        kit, ref = row["sides"]["peftkit"], row["sides"]["peft"]
        lines.append(harness.table_row([
            row["config"], harness.fmt(kit.get("tokens_per_s"), ",.0f"), harness.fmt(ref.get("tokens_per_s"), ",.0f"),
            harness.fmt(row["tokens_per_s_ratio"], ".3f"), harness.fmt(kit.get("peak_mem_mib"), ",.0f"),
            harness.fmt(ref.get("peak_mem_mib"), ",.0f"), harness.fmt(row["peak_mem_ratio"], ".3f"),
            verdict[row["targets"]["tokens_per_s"]], verdict[row["targets"]["peak_mem"]]]))
    lines += ["", "**Targets** (peftkit >= PEFT's tokens/s and <= its peak memory in every configuration): "
              f"{report['targets']}", ""]
    lines += [f"- {r['config']}: {r['status']}: {' '.join(r['reason'].split()).replace('|', '/')}"
              for r in report["configurations"] if r["status"] != "measured"]
    lines += [f"- {r['config']}: {r['note']}" for r in report["configurations"] if r.get("note")]
    return "\n".join(lines).rstrip() + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU, 1 round, peak RSS; no GPU tests")
    p.add_argument("--out", type=Path, help="folder for gpu_check.json/.md (default bench/results; dry run: a temp folder)")
    p.add_argument("--budget-s", type=float, default=420.0, help="start no stage that would end past this (default 420)")
    p.add_argument("--worker", choices=["speed", "memory"], help=argparse.SUPPRESS)
    p.add_argument("--config", choices=list(CONFIGS), help=argparse.SUPPRESS)
    p.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    p.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.dry_run and args.out is not None and args.out.resolve() == harness.RESULTS_DIR.resolve():
        p.error("a dry run never writes to bench/results (its toy figures would replace the real ones)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker == "speed":
        return harness.emit_result(lambda: measure_speed(args.config, args.dry_run, args.folder), {})
    if args.worker == "memory":
        return harness.emit_result(lambda: measure_memory(args.config, args.side, args.dry_run, args.folder), {})
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA GPU here; run it on a CUDA machine, or pass --dry-run.", file=sys.stderr)
        return 2
    out = args.out or (Path(tempfile.mkdtemp(prefix="gpu_check_dry_")) if args.dry_run else harness.RESULTS_DIR)
    env = harness.worker_env(os.cpu_count() or 1)
    env["PYTHONPATH"] = os.pathsep.join([str(harness.REPO_ROOT / "src"), env["PYTHONPATH"]])  # peftkit from src/
    folder = Path(tempfile.mkdtemp(prefix="gpu_check_model_"))  # PEFT's nf4 base is loaded from here
    runner, s = Runner(args, env, folder), DRY if args.dry_run else FULL
    if args.dry_run:
        tests = {"reason": "left out of a dry run: the test suite collects tests/gpu itself (skipped without CUDA)"}
    elif reason := runner.too_late(60.0):
        tests = {"reason": reason}
    else:
        print("[gpu_check] pytest -m gpu tests/gpu ...", flush=True)
        tests = run_tests(env, min(TESTS_TIMEOUT_S, runner.left() + GRACE_S))
    try:
        rows = [runner.config(name) for name in CONFIGS]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    names = [r["device_name"] for r in rows if r.get("device_name")]
    report = {
        "benchmark": "gpu_check", "date": harness.utc_now(), "dry_run": args.dry_run,
        "device": names[0] if names else "cpu" if args.dry_run else "cuda (no stage ran)",
        "command": " ".join(["python -m bench.gpu_check", *(sys.argv[1:] if argv is None else argv)]),
        "versions": {"peftkit": next((r["peftkit_version"] for r in rows if r.get("peftkit_version")), None),
                     **{k: harness.package_version(k) for k in ("torch", "transformers", "peft", "bitsandbytes")},
                     "cuda": torch.version.cuda},
        "setup": {"summary": f"Llama {s['model']}, batch {s['batch']} x {s['seq']}, bf16 base under autocast, "
                             f"LoRA {LORA} on {','.join(TARGET_MODULES)}, AdamW lr {LR}, warm-up {s['warmup']}, "
                             f"{s['rounds']} round(s) x {s['steps']} step(s), min over rounds",
                  "memory": "peak RSS (VmHWM) of a fresh process per case (MiB)" if args.dry_run else
                            "torch.cuda.max_memory_allocated of a fresh process per case after a warm-up and a timed "
                            "step (MiB)",
                  **s, "lora": LORA, "target_modules": TARGET_MODULES, "lr": LR, "seed": SEED},
        "budget_s": args.budget_s, "wall_s": time.perf_counter() - runner.start,
        "tests": tests, "configurations": rows, "targets": overall(rows),
    }
    md = markdown(report)
    harness.write_atomic(out / "gpu_check.json", json.dumps(report, indent=2) + "\n")
    harness.write_atomic(out / "gpu_check.md", md)
    print(f"\n{md}\nwritten to {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
