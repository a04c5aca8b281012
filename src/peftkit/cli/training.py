"""`peftkit demo` and `peftkit train`: the method config from the options, the doctor's
pre-flight, and the run summary."""

from __future__ import annotations

import argparse
import sys
import tempfile
import traceback
from pathlib import Path

from .. import allocator, distributed
from ..validate import InvalidValue
from .output import _fail, _human_bytes, _table
from .run_config import set_by


def cmd_demo(args: argparse.Namespace) -> int:
    from ..data import DataError
    from ..demo import run_demo
    from ..loading import ModelLoadError

    if (args.model is None) != (args.data is None):
        return _fail("pass --model and --data together (or neither, for the built-in demo).")
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="peftkit-demo-"))
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        return _fail(f"{out} is not empty; pick another --out or pass --overwrite.")
    if args.model is None:
        print("peftkit demo: the built-in reference decoder already knows task A (addition sentences);\n"
              "each method teaches it task B (subtraction) with the same step budget.\n")
    try:
        report = run_demo(out, model=args.model or "reference", data=args.data, steps=args.steps,
                          seed=args.seed, progress=not args.no_progress)
    except (DataError, ModelLoadError, ValueError) as e:
        return _fail(str(e))
    has_a = report.a_accuracy_before is not None
    header = ["method", "trainable", "share", "time", "peak RSS", "B acc before -> after"]
    header += ["A acc after"] if has_a else []
    header += ["on disk"]
    rows = []
    for c in report.cases:
        row = [c["name"], f"{c['trainable']:,}", f"{100 * c['trainable'] / c['total']:.2f}%",
               f"{c['seconds']:.1f} s", f"{c['peak_rss_mb']:.0f} MB",
               f"{100 * report.b_accuracy_before:.1f}% -> {100 * c['b_accuracy']:.1f}%"]
        if has_a:
            row.append(f"{100 * c['a_accuracy']:.1f}% (was {100 * report.a_accuracy_before:.1f}%)")
        row.append(_human_bytes(c["bytes"]))
        rows.append(row)
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    print(f"\nResults after {report.steps} steps each (accuracy: next-token accuracy on held-out answers)\n")
    print("  " + "  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for row in rows:
        print("  " + "  ".join(v.ljust(w) for v, w in zip(row, widths)))
    ok = max(report.reload_max_diff, report.merge_max_diff, report.merged_reload_max_diff) < 1e-4
    print("\nLoRA adapter, reloaded from disk onto a fresh base, then merged into the weights:")
    print(_table([
        ("reloaded vs trained", f"max |logit diff| = {report.reload_max_diff:.2e}"),
        ("merged vs unmerged", f"max |logit diff| = {report.merge_max_diff:.2e}"),
        ("merged, from disk", f"max |logit diff| = {report.merged_reload_max_diff:.2e}"),
        ("folders", str(out)),
    ]))
    print("\n" + ("OK: the adapter reloads and merges to the same outputs." if ok
                  else "PROBLEM: reloaded or merged outputs differ from the trained model."))
    return 0 if ok else 1

def _given(value) -> bool:
    """An option the user set: argparse leaves unset options None (flags False); 0 is a value."""
    return value is not None and value is not False

def _method_config(args: argparse.Namespace, tokenizer=None):
    """The method config from the options, on the base of a --config file's ``config`` section
    (a run.json's method config) when that is this method's; an option of another method is an error."""
    from .. import registry

    method = registry.method_named(args.method)
    stray = sorted({dest for other in registry.METHODS for dest in other.cli_options
                    if dest not in method.cli_options and _given(getattr(args, dest))})
    if stray:
        flags = ", ".join(set_by(args, o) for o in stray)
        raise ValueError(f"{flags} do(es) not apply to --method {args.method}.")
    kwargs = {field: getattr(args, dest) for dest, field in method.cli_options.items() if _given(getattr(args, dest))}
    targets = kwargs.get("target_modules")
    if targets is not None and targets not in ("attention", "all-linear"):
        kwargs["target_modules"] = [t.strip() for t in targets.split(",") if t.strip()]
    base = args.method_config if args.method_config and args.method_config["peft_type"] == method.peft_type else {}
    kwargs = {**{k: v for k, v in base.items() if k != "peft_type"}, **kwargs}
    if kwargs.get("init") == "text":
        kwargs["tokenizer"] = tokenizer
    try:
        return method.config_class(**kwargs)
    except InvalidValue as e:  # the config's own check; say which option or config key set the field
        options = [dest for dest, field in method.cli_options.items() if field == e.field]
        if options and _given(getattr(args, options[0])):
            where = set_by(args, options[0])
        elif e.field in base:
            where = args.option_sources[f"config.{e.field}"]
        elif options:
            where = f"--{options[0].replace('_', '-')}"
        else:
            raise
        raise ValueError(f"{e} (set by {where})") from None

class PreflightFailed(Exception):
    """The doctor found an error before the first training step."""

def _doctor_preflight(model, optimizer, batch, *, tokenizer=None, train_on: str | None = None) -> None:
    """Run the doctor on the real model, optimizer and first batch, with the tokenizer the
    data was made with and, for conversations, the tokens the loss is meant to be on (the
    data checks D1-D5); errors stop the run."""
    from ..doctor import doctor

    report = doctor(model, optimizer=optimizer, batch=batch, tokenizer=tokenizer, train_on=train_on)
    if not report.ok:
        # Said here, before the verdict reaches the other ranks and they exit.
        print(f"peftkit doctor stopped the run before the first step:\n{report}", file=sys.stderr)
        raise PreflightFailed(str(report))
    for finding in report.warnings:
        print(f"doctor warning {finding.id} at {finding.where}: {finding.message} Fix: {finding.fix}", file=sys.stderr)
    for note in report.notes:  # probes that could not run: say so rather than pass in silence
        print(f"doctor note: {note}", file=sys.stderr)

def _preflight_for(loaded, fmt: str, train_on: str):
    """The pre-flight of one run: ``train_on`` tells the doctor the intent only for
    conversations, the formats it applies to (the others fix their loss mask themselves)."""
    from ..chat import CHAT_FORMATS

    intent = train_on if fmt in CHAT_FORMATS else None

    def preflight(model, optimizer, batch) -> None:
        _doctor_preflight(model, optimizer, batch, tokenizer=loaded.tokenizer, train_on=intent)

    return preflight

def _rate_split(rates: dict[str, float]) -> str:
    """How the rate was split among the optimizer groups, e.g. " (LoRA+: A 3.3e-4, B 5.2e-3;
    trained in full 1e-3)"; empty for one plain rate."""
    parts = []
    if "lora_B" in rates:
        parts.append(f"LoRA+: A {rates.get('lora_A', 0):.2g}, B {rates['lora_B']:.2g}")
    if "modules_to_save" in rates:
        parts.append(f"trained in full {rates['modules_to_save']:.2g}")
    return f" ({'; '.join(parts)})" if parts else ""

def _fail_on(world: distributed.World, message: str) -> int:
    """``_fail``, naming the rank when there are several: each prints its own error."""
    if not world.active:
        return _fail(message)
    print(f"rank {world.rank}: error: {message}", file=sys.stderr)
    return 2

def cmd_train(args: argparse.Namespace) -> int:
    """`peftkit train`: exit 0 when the adapter is written.

    Exit 2, with one ``error:`` line, when an input is refused before training: an option
    out of range (the line names the option that set it; nothing is written), the data or
    the model (nothing is written), the method (at most the stub of a failed start, which
    the next run into --out takes over), or the --out folder (a file, not writable, another
    run's, locked by a live run, or --resume with no checkpoint to resume from).
    Exit 1 when the run itself stopped: the doctor's pre-flight found an error, or a loss or
    gradient became NaN or infinite (one ``error:`` line naming the step and the parameter
    group; the last good checkpoint is kept and no adapter is written).

    ``--nproc N`` (N > 1) runs the same command on N ranks under torchrun and returns its exit
    code; under torchrun each rank runs this, errors are prefixed with the rank ("rank 1:
    error: ..."), an unexpected one exits 1 with its traceback, and rank 0 prints the summary.
    """
    from ..data import DataError, read_jsonl
    from ..formats.adapter_folder import AdapterFileError
    from ..loading import ModelLoadError, load_model
    from ..precision import PrecisionError
    from ..quantize import QuantizeError, check_scheme
    from ..runs import RunFolderError, RunOptions, run_training
    from ..train import NonFiniteError
    from ..validate import InvalidValue

    world = distributed.World.from_env()

    def fail(message: str) -> int:
        return _fail_on(world, message)

    given = {"lora_plus_ratio": args.lora_plus_ratio} if args.lora_plus_ratio is not None else {}
    try:  # first: a number out of range is refused before the model is loaded
        options = RunOptions(steps=args.steps, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                             grad_accum=args.grad_accum, eval_fraction=args.eval_fraction, seed=args.seed,
                             max_length=args.max_length, checkpoint_every=args.checkpoint_every,
                             warmup_ratio=args.warmup_ratio, eval_data=args.eval_data,
                             eval_limit=args.eval_limit, max_grad_norm=args.max_grad_norm, eval_every=args.eval_every,
                             device=args.device, dtype=args.dtype, adapter_dtype=args.adapter_dtype,
                             gradient_checkpointing=args.gradient_checkpointing, quantize=args.quantize,
                             train_on=args.train_on, add_eos=args.add_eos, pack=args.pack, fsdp=args.fsdp,
                             **given)
        precision = options.precision()  # no GPU for --device cuda: refused before the model is read
        if options.quantize is not None:
            check_scheme(options.quantize)  # bitsandbytes missing: refused before the model is read
    except InvalidValue as e:  # each RunOptions field is set by the option of its name
        return fail(f"{e} (set by {set_by(args, e.field)})")
    except (PrecisionError, QuantizeError) as e:
        return fail(str(e))
    if options.fsdp and (args.nproc or world.size) < 2:  # before the model is read
        return fail(distributed.FSDP_ON_ONE_RANK)
    if args.nproc is not None and not distributed.launched(args.nproc):
        try:
            distributed.check_nproc(args.nproc, precision.device)
        except distributed.DistributedError as e:
            return fail(str(e))
        if args.nproc > 1:  # the console script's own arguments, run again by every rank
            return distributed.launch(args.nproc, args.argv)
    try:
        fmt, records = read_jsonl(args.data)
        task = "classification" if fmt == "classification" else "causal-lm"
        num_labels = len({str(r["label"]) for r in records}) if task == "classification" else None
        # Sharded, rank 0's copy is the only one read: the others build the model on the meta
        # device and get their shards from it (distributed.shard).
        loaded = load_model(args.model, task=task, num_labels=num_labels, progress=not args.no_progress,
                            dtype=precision.dtype, quantize=options.quantize,
                            meta=options.fsdp and world.active and not world.is_main)
        config = _method_config(args, loaded.tokenizer)
        # From here on, freed activation buffers are kept for the next step (allocator.py); the
        # model is loaded, so what its loading freed went back to the system as usual.
        allocator.tune_for_training()
        summary = run_training(loaded, args.data, config, args.out, options, resume=args.resume,
                               progress=not args.no_progress,
                               preflight=_preflight_for(loaded, fmt, options.train_on))
    except (PreflightFailed, distributed.StoppedByRank):  # the doctor's report is printed (on rank 0)
        return 1
    except NonFiniteError as e:
        fail(str(e))
        return 1  # the run started and failed, unlike a refused input (2)
    except (DataError, ModelLoadError, RunFolderError, AdapterFileError, ValueError) as e:
        return fail(str(e))
    except Exception as e:  # on several ranks, say which one failed; torchrun then stops the others
        if not world.active:
            raise
        if distributed.peer_lost(e):  # the rank that died printed the error that matters
            print(f"rank {world.rank}: stopped: another rank left the run (its error is above); what the "
                  "checkpoints hold is kept.", file=sys.stderr)
            return 1
        traceback.print_exc()
        print(f"rank {world.rank}: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    if not world.is_main:
        return 0
    share = 100 * summary.trainable_params / summary.total_params
    rows = [
        ("method", summary.method),
        ("trainable parameters", f"{summary.trainable_params:,} of {summary.total_params:,} ({share:.3f}%)"),
        ("data", f"{summary.train_examples} train / {summary.eval_examples} held-out examples"
                 + (f", classes {summary.classes}" if summary.classes else "")
                 + (f" ({summary.dropped} left out: no label to learn from)" if summary.dropped else "")),
        ("steps", f"{summary.steps} at lr {summary.learning_rate:.2g}" + _rate_split(summary.rates)
                  + (f" (resumed at step {summary.resumed_from})" if summary.resumed_from else "")),
        ("device", f"{summary.device}, base in {summary.dtype}"
                   + (f" ({summary.skipped_steps} float16 step(s) skipped by the gradient scaler)"
                      if summary.skipped_steps else "")),
        ("time", f"{summary.seconds:.1f} s, {summary.tokens / max(summary.seconds, 1e-9):,.0f} tokens/s"),
        ("train loss", f"{summary.first_loss:.4f} -> {summary.last_loss:.4f}"),
    ]
    if summary.eval_after:
        b, a = summary.eval_before, summary.eval_after
        rows.append(("held-out loss", f"{b['loss']:.4f} -> {a['loss']:.4f}"))
        rows.append(("held-out accuracy", f"{100 * b['accuracy']:.1f}% -> {100 * a['accuracy']:.1f}%"))
    rows.append(("adapter", f"{summary.adapter_dir} ({_human_bytes(summary.adapter_bytes)})"))
    print("\nTraining finished")
    print(_table(rows))
    return 0
