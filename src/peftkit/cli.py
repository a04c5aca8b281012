"""The ``peftkit`` command line. The only module that parses arguments or prints."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    raise AssertionError


def _table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)


def cmd_demo(args: argparse.Namespace) -> int:
    from .data import DataError
    from .demo import run_demo
    from .loading import ModelLoadError

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
    """The method config from the command line; an option of another method is an error."""
    from . import registry

    method = registry.method_named(args.method)
    stray = sorted({dest for other in registry.METHODS for dest in other.cli_options
                    if dest not in method.cli_options and _given(getattr(args, dest))})
    if stray:
        flags = ", ".join("--" + o.replace("_", "-") for o in stray)
        raise ValueError(f"{flags} do(es) not apply to --method {args.method}.")
    kwargs = {field: getattr(args, dest) for dest, field in method.cli_options.items() if _given(getattr(args, dest))}
    targets = kwargs.get("target_modules")
    if targets is not None and targets not in ("attention", "all-linear"):
        kwargs["target_modules"] = [t.strip() for t in targets.split(",") if t.strip()]
    if kwargs.get("init") == "text":
        kwargs["tokenizer"] = tokenizer
    return method.config_class(**kwargs)


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


class PreflightFailed(Exception):
    """The doctor found an error before the first training step."""


def _doctor_preflight(model, optimizer, batch) -> None:
    """Run the doctor on the real model, optimizer and first batch; errors stop the run."""
    from .doctor import doctor

    report = doctor(model, optimizer=optimizer, batch=batch)
    if not report.ok:
        raise PreflightFailed(str(report))
    for finding in report.warnings:
        print(f"doctor warning {finding.id} at {finding.where}: {finding.message} Fix: {finding.fix}", file=sys.stderr)
    for note in report.notes:  # probes that could not run: say so rather than pass in silence
        print(f"doctor note: {note}", file=sys.stderr)


def _positive_int(text: str) -> int:
    """An option that counts something: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number.") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is below 1.")
    return value


def _lora_plus_ratio(text: str) -> float:
    """--lora-plus-ratio: a number of at least 1 (B's rate over A's)."""
    ratio = float(text)
    if ratio < 1:
        raise argparse.ArgumentTypeError(f"{text} is below 1: the ratio is B's rate over A's; 1 turns LoRA+ off.")
    return ratio


def _rate_split(rates: dict[str, float]) -> str:
    """How the rate was split among the optimizer groups, e.g. " (LoRA+: A 3.3e-4, B 5.2e-3;
    trained in full 1e-3)"; empty for one plain rate."""
    parts = []
    if "lora_B" in rates:
        parts.append(f"LoRA+: A {rates.get('lora_A', 0):.2g}, B {rates['lora_B']:.2g}")
    if "modules_to_save" in rates:
        parts.append(f"trained in full {rates['modules_to_save']:.2g}")
    return f" ({'; '.join(parts)})" if parts else ""


def cmd_train(args: argparse.Namespace) -> int:
    from .data import DataError, read_jsonl
    from .formats.adapter_folder import AdapterFileError
    from .loading import ModelLoadError, load_model
    from .runs import RunFolderError, RunOptions, run_training

    try:
        fmt, records = read_jsonl(args.data)
        task = "classification" if fmt == "classification" else "causal-lm"
        num_labels = len({str(r["label"]) for r in records}) if task == "classification" else None
        loaded = load_model(args.model, task=task, num_labels=num_labels, progress=not args.no_progress)
        config = _method_config(args, loaded.tokenizer)
        options = RunOptions(steps=args.steps, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                             grad_accum=args.grad_accum, eval_fraction=args.eval_fraction, seed=args.seed,
                             max_length=args.max_length, checkpoint_every=args.checkpoint_every,
                             warmup_ratio=args.warmup_ratio, eval_data=args.eval_data,
                             eval_limit=args.eval_limit)
        if args.lora_plus_ratio is not None:
            options.lora_plus_ratio = args.lora_plus_ratio
        summary = run_training(loaded, args.data, config, args.out, options, resume=args.resume,
                               progress=not args.no_progress, preflight=_doctor_preflight)
    except PreflightFailed as e:
        print(f"peftkit doctor stopped the run before the first step:\n{e}", file=sys.stderr)
        return 1
    except (DataError, ModelLoadError, RunFolderError, AdapterFileError, ValueError) as e:
        return _fail(str(e))
    share = 100 * summary.trainable_params / summary.total_params
    rows = [
        ("method", summary.method),
        ("trainable parameters", f"{summary.trainable_params:,} of {summary.total_params:,} ({share:.3f}%)"),
        ("data", f"{summary.train_examples} train / {summary.eval_examples} held-out examples"
                 + (f", classes {summary.classes}" if summary.classes else "")),
        ("steps", f"{summary.steps} at lr {summary.learning_rate:.2g}" + _rate_split(summary.rates)
                  + (f" (resumed at step {summary.resumed_from})" if summary.resumed_from else "")),
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


def cmd_doctor(args: argparse.Namespace) -> int:
    """Exit 1 when the report has an error, 0 otherwise, 2 for input that cannot be used."""
    from .doctor import doctor
    from .model import load
    from .formats.adapter_folder import AdapterFileError
    from .loading import ModelLoadError, load_model

    try:
        model = load_model(args.model, progress=False).model
        if args.adapter:
            model = load(model, args.adapter)
        report = doctor(model.eval(), checkpoint=args.checkpoint)
    except (ModelLoadError, AdapterFileError, FileNotFoundError, ValueError) as e:
        return _fail(str(e))
    print(report.to_json() if args.json else report)
    return 0 if report.ok else 1


def _probe_ids(loaded, text: str = "The quick brown fox jumps over the lazy dog.") -> "torch.Tensor":
    import torch

    return torch.tensor([loaded.encode(text)])


def cmd_merge(args: argparse.Namespace) -> int:
    """Fold a LoRA adapter into the base weights and write a plain model folder."""
    import torch

    from .model import load
    from .formats.adapter_folder import AdapterFileError
    from .adapter_files import read_config
    from .loading import ModelLoadError, load_model, save_model_folder

    try:
        config = read_config(args.adapter)
        if config.peft_type != "LORA":
            return _fail(f"{args.adapter} is a {config.peft_type} adapter; only LoRA folds into the weights "
                         "(W + s·B A). Serve it with the adapter attached (peftkit.load) instead.")
        loaded = load_model(args.model, progress=False)
        pm = load(loaded.model, args.adapter)
        ids = _probe_ids(loaded)
        with torch.no_grad():
            unmerged = pm(input_ids=ids).logits
            loaded.model = pm.merge_and_unload()
            merged = loaded.model(input_ids=ids).logits
        out = save_model_folder(loaded, args.out)
        reloaded = load_model(out, progress=False)
        with torch.no_grad():
            again = reloaded.model(input_ids=ids).logits
    except (AdapterFileError, ModelLoadError, ValueError) as e:
        return _fail(str(e))
    merge_diff, reload_diff = (merged - unmerged).abs().max().item(), (again - unmerged).abs().max().item()
    print(_table([
        ("merged model", str(out)),
        ("merged vs unmerged", f"max |logit diff| = {merge_diff:.2e}"),
        ("reloaded vs unmerged", f"max |logit diff| = {reload_diff:.2e}"),
    ]))
    tolerance = _merge_tolerance(unmerged)
    if not max(merge_diff, reload_diff) <= tolerance:  # NaN fails too
        print(f"error: the merged model's logits differ from the adapter's by more than {tolerance:.2g}; "
              f"{out} does not compute what the adapter did. Report this, and serve the adapter unmerged "
              "(peftkit.load) meanwhile.", file=sys.stderr)
        return 1
    return 0


def _merge_tolerance(logits) -> float:
    """How far merged logits may drift from unmerged ones: float rounding of W + s·B A, about
    1e-4 of the logits' scale in float32 and 3e-2 of it in 16-bit weights."""
    import torch

    relative = 1e-4 if logits.dtype == torch.float32 else 3e-2
    return relative * max(1.0, logits.abs().max().item())


def cmd_export(args: argparse.Namespace) -> int:
    """Write a LoRA adapter as a GGUF LoRA file for llama.cpp (``--lora``)."""
    from .export import export_gguf_lora, read_gguf_lora
    from .formats.adapter_folder import AdapterFileError

    try:
        out = export_gguf_lora(args.adapter, args.gguf, base=args.model, dtype=args.dtype,
                               overwrite=args.overwrite)
    except (AdapterFileError, ValueError, OSError) as e:
        return _fail(str(e))
    summary = read_gguf_lora(out)
    base = args.model if args.model and str(args.model).endswith(".gguf") else "BASE.gguf"
    print(f"{out}")
    print(_table([
        ("tensors", f"{summary.tensors} ({summary.tensors // 2} LoRA pairs, rank {summary.rank}, {summary.dtype})"),
        ("layers", f"{summary.layers}: {', '.join(summary.targets)}"),
        ("alpha written", f"{summary.alpha:g} (llama.cpp scales by alpha / r = {summary.alpha / summary.rank:g})"),
        ("size", _human_bytes(summary.size)),
        ("apply with", f"llama-cli -m {base} --lora {out}"),
    ]))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """Describe an adapter folder or a model (folder or .gguf), or say what is wrong with it
    (exit 1)."""
    from pathlib import Path

    from .formats.adapter_folder import CONFIG_NAME, LAYER_PREFIX, AdapterFileError, read_tensors
    from .adapter_files import read_config

    folder = Path(args.path)
    if args.path == "reference" or not (folder / CONFIG_NAME).is_file() and (
            folder.is_file() or (folder / "config.json").is_file() or any(folder.glob("*.gguf"))):
        return _model_info(folder)
    try:
        config = read_config(folder)
        tensors = read_tensors(folder)
    except AdapterFileError as e:
        print(f"{folder}: not a usable adapter folder.\n  problem: {e}", file=sys.stderr)
        return 1
    settings = {k: v for k, v in config.to_dict().items()
                if k not in ("peft_type", "target_modules", "base_model_name_or_path", "task_type") and v is not None}
    modules = sorted({k.removeprefix(LAYER_PREFIX).rsplit(".", 2)[0] for k in tensors})
    size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    rows = [
        ("method", config.peft_type),
        ("settings", ", ".join(f"{k}={v}" for k, v in settings.items())),
        ("target modules", str(config.target_modules) if getattr(config, "target_modules", None) else "-"),
        ("tensors", f"{len(tensors)} in {len(modules)} module(s)"),
        ("parameters", f"{sum(t.numel() for t in tensors.values()):,}"),
        ("dtype", ", ".join(sorted({str(t.dtype).removeprefix('torch.') for t in tensors.values()}))),
        ("size on disk", _human_bytes(size)),
        ("base model", config.base_model_name_or_path or "(not recorded)"),
    ]
    print(f"{folder}")
    print(_table(rows))
    return 0


def _model_info(path) -> int:
    """Describe a base model from its config or GGUF header alone (no weights are read)."""
    from .loading import ModelLoadError, gguf_file_in, describe_model

    try:
        facts = describe_model(path)
    except ModelLoadError as e:
        print(f"{path}: not a usable model.\n  problem: {e}", file=sys.stderr)
        return 1
    print(f"{gguf_file_in(path) or path}")
    print(_table([(k, str(v)) for k, v in facts.items()]))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from .model import load
    from .formats.adapter_folder import AdapterFileError
    from .loading import ModelLoadError, load_model

    try:
        loaded = load_model(args.model, progress=False)
        model = load(loaded.model, args.adapter) if args.adapter else loaded.model
    except (AdapterFileError, ModelLoadError, ValueError) as e:
        return _fail(str(e))
    torch.manual_seed(args.seed)
    ids = _probe_ids(loaded, args.prompt)
    kwargs = {"max_new_tokens": args.max_new_tokens, "do_sample": args.sample,
              "eos_token_id": loaded.eos_id, "pad_token_id": loaded.pad_id}
    if args.sample:
        kwargs["temperature"] = args.temperature
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
    print(args.prompt + loaded.decode(out[0, ids.shape[1]:].tolist()))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Trainable parameters of each method on the real module tree, built on the meta device."""
    from . import config as cfg
    from .loading import ModelLoadError, meta_model
    from .model import attach

    source = args.model or args.config
    if source is None:
        return _fail("pass --model PATH (or 'reference') or --config config.json.")
    methods = [
        (f"LoRA r={args.r} (default targets)", cfg.LoraConfig(r=args.r, alpha=2 * args.r)),
        (f"LoRA r={args.r} all-linear", cfg.LoraConfig(r=args.r, alpha=2 * args.r, target_modules="all-linear")),
        (f"adapter pfeiffer b={args.bottleneck}", cfg.AdapterConfig(bottleneck=args.bottleneck)),
        (f"adapter houlsby b={args.bottleneck}", cfg.AdapterConfig(bottleneck=args.bottleneck, placement="houlsby")),
        (f"prefix {args.prefix_tokens} tokens", cfg.PrefixConfig(num_virtual_tokens=args.prefix_tokens)),
        (f"prompt {args.prompt_tokens} tokens", cfg.PromptConfig(num_virtual_tokens=args.prompt_tokens)),
    ]
    try:
        total = sum(p.numel() for p in meta_model(source).parameters())
        rows = [("full fine-tuning", total)]
        for label, config in methods:
            try:
                trainable, _ = attach(meta_model(source), config).parameter_counts()
                rows.append((label, trainable))
            except (ValueError, TypeError) as e:  # e.g. no adapter sites known for this architecture
                rows.append((label, f"n/a: {e}"))
    except ModelLoadError as e:
        return _fail(str(e))
    width = max(len(label) for label, _ in rows)
    print(f"{source}: {total:,} parameters\n")
    print(f"  {'method'.ljust(width)}  {'trainable':>15}  {'share':>8}")
    for label, count in rows:
        if isinstance(count, int):
            print(f"  {label.ljust(width)}  {count:>15,}  {100 * count / total:>7.4f}%")
        else:
            print(f"  {label.ljust(width)}  {count}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import registry

    parser = argparse.ArgumentParser(prog="peftkit", description="Parameter-efficient fine-tuning without the classic mistakes.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="compare full fine-tuning and the four methods on one task (built-in or yours)")
    demo.add_argument("--steps", type=int, default=150, help="optimizer steps for every method (default 150)")
    demo.add_argument("--model", help="your model folder (with --data); default: the built-in reference decoder")
    demo.add_argument("--data", help="your JSONL data (with --model)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", help="folder for the base model and the adapter (default: a new temporary folder)")
    demo.add_argument("--overwrite", action="store_true", help="allow a non-empty --out folder")
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    demo.set_defaults(func=cmd_demo)

    train = sub.add_parser("train", help="train an adapter on a JSONL file")
    train.add_argument("--model", required=True, help="'reference' or a local model folder")
    train.add_argument("--data", required=True, help="JSONL: {text} | {prompt, completion} | {text, label} | {input_ids[, labels]}")
    train.add_argument("--method", choices=[m.name for m in registry.METHODS], default="lora")
    train.add_argument("--out", required=True, help="output folder (run.json, train_log.jsonl, checkpoints/, adapter/)")
    length = train.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="optimizer steps (default: one epoch)")
    length.add_argument("--epochs", type=float)
    train.add_argument("--lr", type=float, help="learning rate (default: the method's: LoRA 2e-4 at hidden size 4096, "
                       "scaled by sqrt(4096/hidden) for other widths; prompt 3e-2, prefix 1e-2, adapters 1e-4)")
    train.add_argument("--lora-plus-ratio", type=_lora_plus_ratio, metavar="R",
                       help="with the default LoRA rate, train B at R times A's rate and A at half the "
                            "rate (LoRA+, Hayou et al. 2024; default 16); 1 trains both at the rate. "
                            "An explicit --lr trains everything at that one rate")
    train.add_argument("--batch-size", type=int, default=8)
    train.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    train.add_argument("--eval-fraction", type=float, default=0.1, help="share held out for evaluation")
    train.add_argument("--eval-data", help="a held-out JSONL file (same format) instead of --eval-fraction")
    train.add_argument("--eval-limit", type=_positive_int, metavar="N",
                       help="score only the first N held-out examples, before and after training "
                            "(default: all; thousands of rows take minutes on a CPU)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--max-length", type=int, default=512, help="tokens kept per example")
    train.add_argument("--warmup-ratio", type=float, default=0.1)
    train.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints (0: none)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    train.add_argument("--no-progress", action="store_true")
    lora = train.add_argument_group("LoRA (--method lora)")
    lora.add_argument("--r", type=int)
    lora.add_argument("--alpha", type=float)
    lora.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(r)")
    shared = train.add_argument_group("LoRA and adapters")
    shared.add_argument("--dropout", type=float)
    shared.add_argument("--targets", help="comma-separated module names, 'attention' or 'all-linear' (default: the architecture's)")
    adapter = train.add_argument_group("bottleneck adapters (--method adapter)")
    adapter.add_argument("--bottleneck", type=int)
    adapter.add_argument("--placement", choices=["houlsby", "pfeiffer", "parallel"])
    adapter.add_argument("--activation", choices=["relu", "gelu", "silu"])
    virtual = train.add_argument_group("prefix and prompt tuning (--method prefix | prompt)")
    virtual.add_argument("--virtual-tokens", type=int)
    virtual.add_argument("--projection-dim", type=int, help="prefix: MLP reparameterisation width")
    virtual.add_argument("--init", "--prompt-init", dest="init", choices=["random", "vocab", "text"],
                         help="how the virtual tokens start (prompt default: random at the embeddings' scale; "
                              "prefix default: vocab, the model's own keys and values of vocabulary tokens)")
    virtual.add_argument("--init-text", "--prompt-init-text", dest="init_text",
                         help="the text for --init text (encoded with the model's tokenizer)")
    train.set_defaults(func=cmd_train)

    check = sub.add_parser("doctor", help="check a model, its adapter and a checkpoint for the mistakes M1-M12")
    check.add_argument("--model", required=True, help="'reference' or a local model folder")
    check.add_argument("--adapter", help="an adapter folder to load onto the model (peftkit's or Hugging Face PEFT's)")
    check.add_argument("--checkpoint", help="a saved file or folder (save_pretrained, Trainer checkpoint-N) to check for base-model weights")
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.set_defaults(func=cmd_doctor)

    merge = sub.add_parser("merge", help="fold a LoRA adapter into the base weights and write a model folder")
    merge.add_argument("--model", required=True, help="'reference' or a local model folder")
    merge.add_argument("--adapter", required=True, help="a LoRA adapter folder")
    merge.add_argument("--out", required=True, help="a new folder for the merged model (safetensors)")
    merge.set_defaults(func=cmd_merge)

    export = sub.add_parser("export", help="write a LoRA adapter as a GGUF LoRA file for llama.cpp (--lora)")
    export.add_argument("--adapter", required=True, help="a LoRA adapter folder for a llama-architecture model")
    export.add_argument("--gguf", required=True, help="the .gguf file to write")
    export.add_argument("--model", help="the base model's .gguf file or transformers folder (for its head counts; "
                                        "default: the adapter's base_model_name_or_path if it is local)")
    export.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    export.add_argument("--overwrite", action="store_true", help="replace an existing --gguf file")
    export.set_defaults(func=cmd_export)

    info = sub.add_parser("info", help="describe an adapter folder (and check that it is whole) or a model "
                                       "(folder or .gguf)")
    info.add_argument("path", help="an adapter folder, a model folder or a .gguf file")
    info.set_defaults(func=cmd_info)

    gen = sub.add_parser("generate", help="generate text with a model and an optional adapter")
    gen.add_argument("--model", required=True)
    gen.add_argument("--adapter")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=40)
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, default=0.8)
    gen.add_argument("--seed", type=int, default=0)
    gen.set_defaults(func=cmd_generate)

    compare = sub.add_parser("compare", help="trainable parameters of each method on a model (meta device, no weights)")
    source = compare.add_mutually_exclusive_group()
    source.add_argument("--model", help="'reference' or a model folder")
    source.add_argument("--config", help="a config.json file")
    compare.add_argument("--r", type=int, default=8, help="LoRA rank (default 8)")
    compare.add_argument("--bottleneck", type=int, default=64)
    compare.add_argument("--prefix-tokens", type=int, default=10)
    compare.add_argument("--prompt-tokens", type=int, default=20)
    compare.set_defaults(func=cmd_compare)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
