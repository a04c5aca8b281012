"""The commands on models and adapter files: doctor, merge, export, info, generate, compare."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from .output import _fail, _human_bytes, _table

if TYPE_CHECKING:
    import torch


def cmd_doctor(args: argparse.Namespace) -> int:
    """Exit 1 when the report has an error, 0 otherwise, 2 for input that cannot be used."""
    from ..doctor import doctor
    from ..model import load
    from ..formats.adapter_folder import AdapterFileError, read_chat_template
    from ..loading import ModelLoadError, load_model

    try:
        loaded = load_model(args.model, progress=False)
        model, template = loaded.model, None
        if args.adapter:
            model = load(model, args.adapter)
            template = read_chat_template(args.adapter)  # what training rendered with (D5)
        report = doctor(model.eval(), checkpoint=args.checkpoint, tokenizer=loaded.tokenizer,
                        chat_template=template)
    except (ModelLoadError, AdapterFileError, FileNotFoundError, ValueError) as e:
        return _fail(str(e))
    print(report.to_json() if args.json else report)
    return 0 if report.ok else 1

def _probe_ids(loaded, text: str = "The quick brown fox jumps over the lazy dog.") -> "torch.Tensor":
    """A short input for merge's before/after comparison: ``text`` encoded, or, for a model
    without a tokenizer, the first ids of its vocabulary (any ids compare the two models)."""
    import torch

    if loaded.tokenizer is None:
        return torch.arange(1, 13)[None] % loaded.vocab_size
    return torch.tensor([loaded.encode(text)])

def cmd_merge(args: argparse.Namespace) -> int:
    """Fold a LoRA adapter into the base weights and write a plain model folder and/or a
    merged GGUF; each is read back and compared with the unmerged model (exit 1 beyond
    rounding)."""
    import torch

    from ..model import load
    from ..formats.adapter_folder import AdapterFileError
    from .. import registry
    from ..adapter_files import adapter_tensors, read_config
    from ..loading import ModelLoadError, load_model
    from ..model_folder import first_non_finite, save_model_folder
    from ..precision import dtype_named

    if args.out is None and args.gguf is None:
        return _fail("say what to write: --out NEW_FOLDER (safetensors), --gguf OUT.gguf, or both.")
    if args.gguf is not None and args.quantize is not None:
        return _fail("--gguf merges into the weights of the base .gguf itself, not into an NF4 copy; drop "
                     "--quantize, or write the NF4 merge as a folder (--out) and convert it with llama.cpp.")
    try:
        config = read_config(args.adapter)
        method = registry.method_for(config)
        if not method.mergeable:
            folding = [m.label for m in registry.METHODS if m.mergeable]
            return _fail(f"{args.adapter} is a {method.label} adapter; only {', '.join(folding)} folds into "
                         "the weights. Serve it with the adapter attached (peftkit.load) instead.")
        dtype = None if args.dtype is None else dtype_named(args.dtype)
        # Trained on NF4: the base it learned against is the 4-bit one, so that is what it merges
        # into, quantized from --dtype as training quantized it (a GPU run: bfloat16).
        loaded = load_model(args.model, progress=False, quantize=args.quantize, dtype=dtype)
        pm = load(loaded.model, args.adapter)
        bad = first_non_finite(adapter_tensors(pm, "default").items())
        if bad is not None:  # merged, it would make every output NaN
            return _fail(f"{args.adapter} holds non-finite weights: {bad}; nothing was written. Its training "
                         "went non-finite: train it again (a lower --lr, or fp32), or use an earlier checkpoint.")
        ids = _probe_ids(loaded)
        with torch.no_grad():
            unmerged = pm(input_ids=ids).logits
        rows, worst = [], []  # (diff, tolerance, what)
        if args.gguf is not None:
            rows += _merge_gguf(args, ids, unmerged, worst)
        if args.out is not None:
            with torch.no_grad():
                loaded.model = pm.merge_and_unload(dtype=dtype)
                merged = loaded.model(input_ids=ids).logits
            out = save_model_folder(loaded, args.out, max_shard_size=args.max_shard_size)
            with torch.no_grad():
                again = load_model(out, progress=False).model(input_ids=ids).logits
            tolerance = _merge_tolerance(unmerged, _coarser(unmerged.dtype, merged.dtype))
            merge_diff, reload_diff = _max_diff(merged, unmerged), _max_diff(again, unmerged)
            worst.append((max(merge_diff, reload_diff), tolerance, str(out)))
            shards = sorted(p.name for p in out.glob("*.safetensors"))
            rows += [("merged model", f"{out} ({len(shards)} safetensors file{'s' * (len(shards) > 1)}, "
                                      f"{_human_bytes(sum(p.stat().st_size for p in out.glob('*.safetensors')))}, "
                                      f"{str(merged.dtype).removeprefix('torch.')})"),
                     ("merged vs unmerged", f"max |logit diff| = {merge_diff:.2e}"),
                     ("reloaded vs unmerged", f"max |logit diff| = {reload_diff:.2e}")]
    except (AdapterFileError, ModelLoadError, ValueError) as e:
        return _fail(str(e))
    print(_table(rows))
    for diff, tolerance, what in worst:
        if not diff <= tolerance:  # NaN fails too
            print(f"error: the merged model's logits differ from the adapter's by more than {tolerance:.2g}; "
                  f"{what} does not compute what the adapter did. Report this, and serve the adapter unmerged "
                  "(peftkit.load) meanwhile.", file=sys.stderr)
            return 1
    return 0

def _max_diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()

def _merge_gguf(args: argparse.Namespace, ids, unmerged, worst: list) -> list[tuple[str, str]]:
    """Write the merged GGUF, read it back through transformers' GGUF loader, and compare."""
    import torch

    from ..loading import load_model
    from ..merged_gguf import write_merged_gguf

    written = write_merged_gguf(args.adapter, args.model, args.gguf, gguf_type=args.gguf_type,
                                overwrite=args.overwrite)
    with torch.no_grad():
        again = load_model(written.path, progress=False).model(input_ids=ids).logits
    diff = _max_diff(again, unmerged)
    worst.append((diff, _merge_tolerance(unmerged, _GGUF_STORED[args.gguf_type]), str(written.path)))
    rows = [("merged GGUF", f"{written.path} ({written.gguf_type}, {written.merged} weights merged, "
                            f"{_human_bytes(written.size)})"),
            ("reloaded vs unmerged", f"max |logit diff| = {diff:.2e}")]
    if written.fell_back:
        rows.append(("stored in f16", f"{len(written.fell_back)} weights whose rows do not fill q8_0 blocks"))
    return rows

# How far merged logits may drift from unmerged ones, as a share of the logits' scale: the
# rounding of W + s·B A to the stored type, carried through every layer. Measured on
# SmolLM2-135M (30 layers) with a random all-linear r=16 adapter: bfloat16 3.9%, q8_0 2.6%.
_MERGE_TOLERANCE = {"float32": 1e-4, "float16": 3e-2, "bfloat16": 1e-1, "q8_0": 1e-1}
_GGUF_STORED = {"f32": "float32", "f16": "float16", "bf16": "bfloat16", "q8_0": "q8_0"}

def _merge_tolerance(logits, stored: str) -> float:
    """The largest |logit difference| allowed for a model stored as ``stored``."""
    return _MERGE_TOLERANCE[stored] * max(1.0, logits.abs().max().item())

def _coarser(*dtypes) -> str:
    """The coarsest of the torch dtypes: the rounding the comparison has to allow for."""
    names = {str(d).removeprefix("torch.") for d in dtypes}
    return max(names, key=lambda name: _MERGE_TOLERANCE.get(name, 1e-1))

def cmd_export(args: argparse.Namespace) -> int:
    """Write a LoRA adapter as a GGUF LoRA file for llama.cpp (``--lora``), or as an Ollama
    model folder (``--ollama``)."""
    from pathlib import Path

    from ..export import export_gguf_lora, read_gguf_lora
    from ..formats.adapter_folder import AdapterFileError

    if args.ollama_template and not args.ollama:
        return _fail("--ollama-template goes with --ollama DIR.")
    try:
        if args.ollama:
            from .. import ollama

            go_template = Path(args.ollama_template).read_text(encoding="utf-8") if args.ollama_template else None
            done = ollama.export_ollama(args.adapter, args.ollama, base=args.model, go_template=go_template,
                                        dtype=args.dtype, overwrite=args.overwrite)
        else:
            out = export_gguf_lora(args.adapter, args.gguf, base=args.model, dtype=args.dtype,
                                   overwrite=args.overwrite)
    except (AdapterFileError, ValueError, OSError) as e:  # UnicodeDecodeError is a ValueError
        return _fail(str(e))
    if args.ollama:
        summary, template = read_gguf_lora(done.folder / ollama.ADAPTER_FILE), done.template
        modelfile, name = done.folder / ollama.MODELFILE, ollama.model_name(done.folder)
        rows = [("Modelfile", f"FROM {done.base}"),
                ("", f"ADAPTER ./{ollama.ADAPTER_FILE} ({summary.tensors // 2} LoRA pairs, rank {summary.rank}, "
                     f"{summary.dtype}, {_human_bytes(summary.size)})"),
                ("template", done.template_source),
                ("stop", ", ".join(template.stops) or "-")]
        if template.default_system is not None:
            rows.append(("default system", repr(template.default_system)))
        rows += [("note", note) for note in template.notes]
        print(f"{done.folder}")
        print(_table(rows))
        print(f"\ncreate and run with Ollama:\n  ollama create {name} -f {modelfile}\n  ollama run {name}")
        return 0
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

    from ..formats.adapter_folder import CONFIG_NAME, LAYER_PREFIX, AdapterFileError, read_tensors
    from ..adapter_files import read_config

    folder = Path(args.path)
    if args.path == "reference" or not (folder / CONFIG_NAME).is_file() and (
            folder.is_file() or (folder / "config.json").is_file() or any(folder.glob("*.gguf"))):
        if args.serve:
            return _fail(f"--serve checks an adapter folder, and {folder} is a model; pass the adapter folder.")
        return _model_info(folder)
    try:
        config = read_config(folder)
        tensors = read_tensors(folder)
    except AdapterFileError as e:
        print(f"error: {folder} is not a usable adapter folder: {e}", file=sys.stderr)
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
    return _serve_check(folder, args) if args.serve else 0


def _serve_check(folder, args: argparse.Namespace) -> int:
    """``info --serve vllm``: exit 0 with the command that serves the folder, or 1 with each
    reason vLLM would refuse it and its fix."""
    from .. import serving
    from ..formats.adapter_folder import read_config_data, read_tensors

    if args.max_lora_rank not in serving.VLLM_RANKS:
        return _fail(f"--max-lora-rank {args.max_lora_rank} is not a rank vLLM takes; use one of "
                     f"{list(serving.VLLM_RANKS)}.")
    data, _ = read_config_data(folder)
    problems = serving.vllm_problems(data, list(read_tensors(folder)), args.max_lora_rank)
    if not problems:
        print(f"\nvLLM: loads this adapter as it is:\n  {serving.vllm_command(folder, data, args.max_lora_rank)}")
        return 0
    print(f"\nvLLM: would refuse this adapter ({len(problems)} problem(s)):")
    for problem in problems:
        print(f"  - {problem.what}\n    fix: {problem.fix}")
    return 1

def _model_info(path) -> int:
    """Describe a base model from its config or GGUF header alone (no weights are read)."""
    from ..loading import ModelLoadError, gguf_file_in
    from ..model_info import describe_model

    try:
        facts = describe_model(path)
    except ModelLoadError as e:
        print(f"error: {path} is not a usable model: {e}", file=sys.stderr)
        return 1
    print(f"{gguf_file_in(path) or path}")
    print(_table([(k, str(v)) for k, v in facts.items()]))
    return 0

def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from ..model import load
    from ..formats.adapter_folder import AdapterFileError
    from .. import integrations, validate
    from ..loading import ModelLoadError, load_model

    if args.system is not None and not args.chat:
        return _fail("--system is the system turn of a --chat prompt; pass --chat too (or leave --system out).")
    try:
        validate.positive_int("generate", "max_new_tokens", args.max_new_tokens)
        validate.number("generate", "temperature", args.temperature, above=0)
        validate.positive_int("generate", "seed", args.seed, minimum=0)
    except validate.InvalidValue as e:
        return _fail(f"{e} (set by --{e.field.replace('_', '-')})")
    try:
        loaded = load_model(args.model, progress=False)
        model = load(loaded.model, args.adapter) if args.adapter else loaded.model
        if args.chat:
            ids = torch.tensor([_chat_prompt(loaded, args)])
        else:
            ids = torch.tensor([loaded.encode(args.prompt)])  # generate reads and writes text: a tokenizer is needed
    except (AdapterFileError, ModelLoadError, ValueError) as e:
        return _fail(str(e))
    torch.manual_seed(args.seed)
    positions = integrations.max_positions(loaded.model)
    if positions is not None and ids.shape[1] + args.max_new_tokens > positions:
        return _fail(f"the prompt ({ids.shape[1]} tokens) plus --max-new-tokens {args.max_new_tokens} exceed "
                     f"the {positions} positions the model reads; ask for at most "
                     f"{max(positions - ids.shape[1], 0)} new tokens.")
    stop = loaded.eos_id
    if args.chat:  # a chat reply ends with the template's end-of-turn token, which may not be the EOS
        from ..doctor.templates import turn_end

        ends = sorted({i for i in (loaded.eos_id, turn_end(loaded.tokenizer)) if i is not None})
        stop = ends[0] if len(ends) == 1 else ends or None
    kwargs = {"max_new_tokens": args.max_new_tokens, "do_sample": args.sample,
              "eos_token_id": stop, "pad_token_id": loaded.pad_id}
    if args.sample:
        kwargs["temperature"] = args.temperature
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
    reply = loaded.decode(out[0, ids.shape[1]:].tolist())
    print(reply if args.chat else args.prompt + reply)
    return 0


def _chat_prompt(loaded, args: argparse.Namespace) -> list[int]:
    """``--prompt`` as the user's turn (after ``--system``), rendered for the reply by the
    chat template saved with ``--adapter`` (the one its data was rendered with) or else the
    tokenizer's own."""
    from ..chat import prompt_ids
    from ..formats.adapter_folder import read_chat_template

    template = read_chat_template(args.adapter) if args.adapter else None
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": args.prompt}]
    return prompt_ids(loaded.tokenizer, messages, template, source=loaded.source)

def _compared_methods(args: argparse.Namespace) -> list[tuple[str, object]]:
    """(label, config) of each method ``peftkit compare`` counts; the configs check the numbers."""
    from .. import AdapterConfig, LoraConfig, PrefixConfig, PromptConfig

    return [
        (f"LoRA r={args.r} (default targets)", LoraConfig(r=args.r, alpha=2 * args.r)),
        (f"LoRA r={args.r} all-linear", LoraConfig(r=args.r, alpha=2 * args.r, target_modules="all-linear")),
        (f"adapter pfeiffer b={args.bottleneck}", AdapterConfig(bottleneck=args.bottleneck)),
        (f"adapter houlsby b={args.bottleneck}", AdapterConfig(bottleneck=args.bottleneck, placement="houlsby")),
        # A random init: the count is the same, and the "vocab" init would run the meta model.
        (f"prefix {args.prefix_tokens} tokens", PrefixConfig(num_virtual_tokens=args.prefix_tokens, init="random")),
        (f"prompt {args.prompt_tokens} tokens", PromptConfig(num_virtual_tokens=args.prompt_tokens)),
    ]

def cmd_compare(args: argparse.Namespace) -> int:
    """Trainable parameters of each method on the real module tree, built on the meta device."""
    from ..loading import ModelLoadError
    from ..model_info import meta_model
    from ..model import attach

    source = args.model or args.config
    if source is None:
        return _fail("pass --model PATH (or 'reference') or --config config.json.")
    try:
        methods = _compared_methods(args)
    except ValueError as e:
        return _fail(f"{e} (set by --r, --bottleneck, --prefix-tokens or --prompt-tokens)")
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
