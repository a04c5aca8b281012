"""A whole run, as ``peftkit train`` does it: the options, the data split and held-out file,
the loop of ``train.py`` in its run folder (``run_folder``: one run per folder, resumed from
its last checkpoint), the log and the summary."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpointing import enable_gradient_checkpointing
from .config import PeftConfig
from . import adapter_files, distributed, packing
from .model import PeftModel
from .run_folder import ADAPTER, CHECKPOINTS, LOCK_FILE, LOG_FILE, RUN_FILE, RunFolderError, claim_out_dir, rewrite_log
from .train import MAX_GRAD_NORM, evaluate, train
from .learning_rates import LORA_PLUS_RATIO
from .train_checkpoints import newest_step
from .precision import DEVICES, DTYPES, Precision, place, resolve_device, resolve_dtype
from .nf4 import SCHEMES as QUANTIZE_SCHEMES
from .chat import TRAIN_ON
from .validate import InvalidValue, flag, number, one_of, positive_int


__all__ = ["LOCK_FILE", "RUN_FILE", "LOG_FILE", "CHECKPOINTS", "ADAPTER", "RunFolderError", "RunOptions",
           "RunSummary", "run_training"]
# Where a run computes and whether it recomputes activations are not part of its identity.
NOT_IDENTITY = ("device", "gradient_checkpointing")


# -- a whole run: what `peftkit train` does ------------------------------------------------
@dataclass
class RunOptions:
    """Everything about a run besides the model, the data and the method.

    Every field is checked on construction (``validate.InvalidValue`` names the field, the
    allowed range and the value): counts are ints >= 1, rates and fractions finite and in
    range, a bool is never a number. None means "the default" only where a field allows it
    (steps, epochs, lr, eval_data, eval_limit); an explicit value, 0 included, is never
    replaced by a default.
    """

    steps: int | None = None  # optimizer steps; default: `epochs` epochs
    epochs: float | None = None  # default 1 (when steps is None too)
    lr: float | None = None  # default: the method's (M9)
    batch_size: int = 8
    grad_accum: int = 1
    eval_fraction: float = 0.1  # 0 <= x < 1
    seed: int = 0
    max_length: int = 512
    checkpoint_every: int = 50  # 0: no checkpoints
    warmup_ratio: float = 0.1  # 0 <= x <= 1
    eval_data: str | None = None  # a held-out JSONL file; default: eval_fraction of the data
    lora_plus_ratio: float = LORA_PLUS_RATIO  # LoRA's B rate over A's at default rates; 1 = off
    eval_limit: int | None = None  # score only the first N held-out examples (a quicker look)
    max_grad_norm: float = MAX_GRAD_NORM  # clip each step's gradient to this total norm; 0 = off
    eval_every: int | None = None  # held-out loss and accuracy every N steps, in the log
    device: str = "auto"  # auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N, mps
    dtype: str = "auto"  # the frozen base's: auto (bfloat16 on a GPU that has it, else float32) or a name
    adapter_dtype: str = "float32"  # adapter weights on a half-precision base; "base": the base's dtype
    gradient_checkpointing: bool = False  # recompute each block in backward: less memory, ~1 more forward
    quantize: str | None = None  # "nf4": the frozen base's linear weights in 4 bits (QLoRA)
    train_on: str = "assistant"  # conversations: loss on every assistant turn, the last one, or all tokens
    add_eos: bool = True  # {text} and {prompt, completion} examples end with the tokenizer's EOS
    pack: bool = False  # several examples per row of max_length, no attention across them
    fsdp: bool = False  # several ranks: the base sharded over them with FSDP2, not copied on each (DDP)

    def __post_init__(self) -> None:
        owner = "RunOptions"
        if self.steps is not None:
            positive_int(owner, "steps", self.steps)
        if self.epochs is not None:
            # The cap keeps the step count a number (1e308 epochs overflow it); no run is that long.
            number(owner, "epochs", self.epochs, above=0, at_most=1e6)
        if self.lr is not None:
            number(owner, "lr", self.lr, above=0)
        for name in ("batch_size", "grad_accum", "max_length"):
            positive_int(owner, name, getattr(self, name))
        positive_int(owner, "checkpoint_every", self.checkpoint_every, minimum=0)  # 0: none, as train()
        number(owner, "eval_fraction", self.eval_fraction, at_least=0, below=1)
        positive_int(owner, "seed", self.seed, minimum=0)
        number(owner, "seed", self.seed, at_most=2**64 - 1)  # torch.manual_seed's range
        number(owner, "warmup_ratio", self.warmup_ratio, at_least=0, at_most=1)
        number(owner, "lora_plus_ratio", self.lora_plus_ratio, at_least=1, hint=" (1 turns LoRA+ off)")
        if self.eval_limit is not None:
            positive_int(owner, "eval_limit", self.eval_limit)
        number(owner, "max_grad_norm", self.max_grad_norm, at_least=0, hint=" (0 turns clipping off)")
        if self.eval_every is not None:
            positive_int(owner, "eval_every", self.eval_every)
        if not isinstance(self.device, str) or not self.device:
            raise InvalidValue(owner, "device", f"a device name ({DEVICES})", self.device)
        one_of(owner, "dtype", self.dtype, ("auto", *DTYPES))
        one_of(owner, "adapter_dtype", self.adapter_dtype, ("base", *DTYPES))
        flag(owner, "gradient_checkpointing", self.gradient_checkpointing)
        one_of(owner, "quantize", self.quantize, (None, *QUANTIZE_SCHEMES))
        one_of(owner, "train_on", self.train_on, TRAIN_ON)
        flag(owner, "add_eos", self.add_eos)
        flag(owner, "pack", self.pack)
        flag(owner, "fsdp", self.fsdp)
        if self.fsdp and self.quantize is not None:
            raise InvalidValue(owner, "fsdp", "False with quantize (FSDP2 cannot shard a 4-bit NF4 base)", self.fsdp)

    def precision(self) -> Precision:
        """The device and the base's dtype, checked against this machine (``PrecisionError``)."""
        device = resolve_device(self.device)
        return Precision(device, resolve_dtype(self.dtype, device))

    def adapter_torch_dtype(self) -> torch.dtype | None:
        return None if self.adapter_dtype == "base" else DTYPES[self.adapter_dtype]


@dataclass
class RunSummary:
    method: str
    trainable_params: int
    total_params: int
    train_examples: int
    eval_examples: int
    steps: int
    learning_rate: float
    seconds: float
    tokens: int
    first_loss: float
    last_loss: float
    eval_before: dict[str, float]
    eval_after: dict[str, float]
    adapter_dir: str
    adapter_bytes: int
    classes: list[str]
    resumed_from: int
    rates: dict[str, float] = field(default_factory=dict)  # TrainResult.rates
    dropped: int = 0  # examples left out: no label to learn from (data.build_dataset)
    device: str = "cpu"
    dtype: str = "float32"  # the frozen base's
    skipped_steps: int = 0  # float16 steps the gradient scaler skipped (TrainResult.skipped_steps)


def _encoding(loaded, options: RunOptions) -> dict:
    """How ``build_dataset`` tokenizes a run's data: the model's tokenizer and vocabulary, and
    the run's max_length, EOS and conversation options."""
    return {"eos_id": loaded.eos_id if options.add_eos else None, "max_length": options.max_length,
            "vocab_size": loaded.vocab_size, "tokenizer": loaded.tokenizer, "train_on": options.train_on,
            "source": loaded.source}


def _held_out_file(path: str | Path, fmt: str, train_set, loaded, options: RunOptions):
    """The held-out set from its own file: the training file's format, and for classification
    only the classes the model is trained on (an unseen class could never be predicted)."""
    from . import data as datamod

    eval_fmt, records = datamod.read_jsonl(path)
    if eval_fmt != fmt:
        raise datamod.DataError(f"{path} is {eval_fmt!r} data but the training file is {fmt!r}; "
                                "the held-out file must use the same format.")
    try:
        return datamod.build_dataset(fmt, records, loaded.encode, classes=train_set.classes or None,
                                     **_encoding(loaded, options))
    except datamod.UnknownClassError as e:
        raise datamod.DataError(f"held-out file {path}: {e} The training data has no example of it, so "
                                "the model cannot learn it: add examples to the training file or drop "
                                "those lines.") from e
    except datamod.DataError as e:  # a bad line: its own message says it all
        raise datamod.DataError(f"held-out file {path}: {e}") from e


def run_training(loaded, data_path: str | Path, config: PeftConfig, out_dir: str | Path,
                 options: RunOptions, *, resume: bool = False, progress: bool = True,
                 preflight: Callable[[PeftModel, torch.optim.Optimizer, dict], None] | None = None) -> RunSummary:
    """Load data, attach ``config`` to ``loaded.model``, train with checkpoints, evaluate on a
    held-out split, and write ``out_dir``: run.json, train_log.jsonl, checkpoints/, adapter/.

    ``loaded`` is a ``peftkit.loading.LoadedModel``; ``preflight`` is passed to ``train``.
    The data, the options and the method are checked before anything is written. The folder
    is locked for the whole run (``_claim_out_dir``): a second run, or a ``resume``, while
    this one is alive gets ``RunFolderError``. ``resume`` continues from the newest
    checkpoint and is refused when there is none. A run that stops (an exception,
    ``train.NonFiniteError``, a kill) writes no adapter/ and keeps its checkpoints; one that
    stops before its first checkpoint is taken over by the next run into the folder.

    Under torchrun (``distributed``) every rank calls this with the same arguments and reads
    the same files (a filesystem all ranks share): ``batch_size`` is each rank's, so a step
    trains on batch_size x ranks rows; ranks given another run are refused (``same_run``).
    Rank 0 alone claims and writes the folder, logs, evaluates and shows progress; every rank
    returns once the adapter is written. With ``fsdp`` only rank 0 holds the whole model (on
    the CPU; the others on the meta device, except for a .gguf base, which every rank reads),
    and run.json records the global batch, so the run resumes on another rank count that
    gives the same.
    """
    # Checked again: a field assigned after construction skipped __post_init__.
    options = dataclasses.replace(options)
    precision = options.precision()  # a device that is not there: refused before anything is read
    device = distributed.rank_device(precision.device, distributed.World.from_env())
    with distributed.joined(device) as world:
        return _run(loaded, data_path, config, Path(out_dir), options, resume, progress, preflight,
                    Precision(device, precision.dtype), world)


def _run(loaded, data_path, config: PeftConfig, out_dir: Path, options: RunOptions, resume: bool, progress: bool,
         preflight, precision: Precision, world: distributed.World) -> RunSummary:
    """``run_training`` on this rank of ``world``, on its device."""
    from . import data as datamod
    from .model import attach

    if config.base_model_name_or_path is None:
        config = dataclasses.replace(config, base_model_name_or_path=loaded.source)
    fmt, records = datamod.read_jsonl(data_path)
    if (fmt == "classification") != (loaded.task == "classification"):
        raise datamod.DataError(
            f"{data_path} is {fmt!r} data but the model was loaded for {loaded.task!r}; "
            "{'text', 'label'} lines need a sequence-classification model and the others a causal LM.")
    dataset = datamod.build_dataset(fmt, records, loaded.encode, **_encoding(loaded, options))
    if options.eval_data is not None:
        train_set, eval_set = dataset, _held_out_file(options.eval_data, fmt, dataset, loaded, options)
    else:
        train_set, eval_set = datamod.split(dataset, options.eval_fraction, options.seed)
    if not train_set.examples:
        raise datamod.DataError(f"{data_path} has too few examples to train on ({len(dataset)}).")
    if options.eval_limit is not None:
        eval_set = dataclasses.replace(eval_set, examples=eval_set.examples[:options.eval_limit])
    # --pack is refused (classification, virtual tokens, a model that cannot) before --out is touched.
    attention = packing.check_packable(train_set, config, loaded.model) if options.pack else None
    torch.manual_seed(options.seed)
    rows = options.batch_size * world.size  # every rank draws the global batch and trains on its share
    if options.pack:
        train_batches = packing.PackedBatches(train_set, rows, options.max_length, loaded.pad_id,
                                              seed=options.seed, attention=attention)
    else:
        train_batches = datamod.EpochBatches(train_set, rows, loaded.pad_id, seed=options.seed)
    eval_batches = datamod.batches(eval_set, options.batch_size, loaded.pad_id, shuffle=False) if eval_set.examples else []
    if options.steps is not None:
        steps = options.steps
    else:
        epochs = 1.0 if options.epochs is None else options.epochs
        steps = max(1, math.ceil(epochs * len(train_batches) / options.grad_accum))

    # Where it runs and whether it recomputes activations do not change the run: a run may
    # resume on another GPU, or with checkpointing turned on to fit.
    run_options = {k: v for k, v in dataclasses.asdict(options).items() if k not in NOT_IDENTITY}
    if options.eval_data is not None:  # absolute, so that run.json re-runs from any folder
        run_options["eval_data"] = str(Path(options.eval_data).resolve())
    defaults = {f.name: f.default for f in dataclasses.fields(RunOptions) if f.name not in NOT_IDENTITY}
    model = Path(loaded.source)
    identity = {"model": str(model.resolve()) if model.exists() else loaded.source,
                "data": str(Path(data_path).resolve()), "config": config.to_dict(),
                "options": {**run_options, "steps": steps}}
    if options.fsdp:
        # A sharded run resumes on any rank count with the same global batch: that, not each
        # rank's share of it, is what must match (torch.distributed.checkpoint reshards the state).
        identity["global_batch_size"] = rows
    # Every rank must be on this run: the same config, options and examples (paths may differ by node).
    compared_options = {k: v for k, v in identity["options"].items() if k != "eval_data"}
    compared_config = {k: v for k, v in identity["config"].items() if k != "base_model_name_or_path"}
    distributed.same_run(world, {"config": compared_config, "options": compared_options,
                                 "examples": [e.input_ids for e in train_set.examples[:64]],
                                 "counts": [len(train_set), len(eval_set)]})
    # Rank 0 claims the folder; the others start once it is claimed and cleaned.
    claim = claim_out_dir(out_dir, identity, defaults, resume) if world.is_main else None
    distributed.barrier(world)
    with contextlib.closing(claim) if claim is not None else contextlib.nullcontext():
        if not options.fsdp:
            place(loaded.model, precision.device, precision.dtype)
        elif not distributed.on_meta(loaded.model):
            # Sharded, each device gets its rows only (``distributed.shard``): the whole stays on the CPU.
            place(loaded.model, torch.device("cpu"), precision.dtype)
        if options.quantize is not None:
            from .quantize import quantize_base
            # A base loaded quantized stays as it is; what the config trains in full stays plain.
            quantize_base(loaded.model, options.quantize, config.modules_to_save)
        pm = attach(loaded.model, config, adapter_dtype=options.adapter_torch_dtype())
        if options.gradient_checkpointing:
            enable_gradient_checkpointing(pm)
        if options.fsdp:
            distributed.check_shardable(pm, world)
        trainable, total = pm.parameter_counts()
        progress = progress and world.is_main
        # The model is the same on every rank: rank 0 scores it. Sharded, every forward gathers
        # each block from every rank: all of them score it, once train has sharded it.
        scored = eval_batches if world.is_main or options.fsdp else []
        eval_before = {}

        def score_before() -> None:
            eval_before.update(evaluate(pm, scored, progress, "held-out, before") if scored else {})

        if not options.fsdp:
            score_before()
        checkpoints = out_dir / CHECKPOINTS
        resumed_from = 0
        if resume:  # _claim_out_dir made sure that there is a checkpoint
            resumed_from = newest_step(checkpoints)
            if world.is_main:
                rewrite_log(out_dir / LOG_FILE, resumed_from)

        with (out_dir / LOG_FILE).open("a") if world.is_main else contextlib.nullcontext() as log:
            def write_log(record: dict) -> None:
                if options.eval_every and eval_batches and record["step"] % options.eval_every == 0:
                    # In eval mode, so no dropout draws: the run's random stream is unchanged.
                    held_out = evaluate(pm, eval_batches)
                    record = {**record, "eval_loss": held_out["loss"], "eval_accuracy": held_out["accuracy"]}
                if log is not None:
                    log.write(json.dumps(record) + "\n")
                    log.flush()

            result = train(pm, train_batches, steps=steps, lr=options.lr, warmup_ratio=options.warmup_ratio,
                           grad_accum=options.grad_accum, progress=progress, desc=f"{config.peft_type.lower()}",
                           checkpoint_dir=checkpoints, checkpoint_every=options.checkpoint_every,
                           resume=resume, on_step=write_log if world.is_main or options.fsdp else None,
                           preflight=preflight, lora_plus_ratio=options.lora_plus_ratio,
                           max_grad_norm=options.max_grad_norm, world=world, fsdp=options.fsdp,
                           device=precision.device, on_sharded=score_before if options.fsdp else None)
        eval_after = evaluate(pm, scored, progress, "held-out, after") if scored else {}
        tensors = None
        if options.fsdp:  # every rank sends its shards; rank 0 writes plain tensors, the ordinary folder
            tensors = {key: distributed.full(t).cpu()
                       for key, t in adapter_files.adapter_tensors(pm, pm.active_adapter).items()}
        if world.is_main:
            adapter_files.save_adapter(pm, out_dir / ADAPTER, pm.active_adapter, dataset.chat_template, tensors)
        distributed.barrier(world)  # the adapter is on disk when any rank returns
        adapter_dir = out_dir / ADAPTER
    return RunSummary(
        method=config.peft_type, trainable_params=trainable, total_params=total,
        train_examples=len(train_set), eval_examples=len(eval_set), steps=steps,
        learning_rate=result.learning_rate, seconds=result.seconds, tokens=result.tokens,
        first_loss=result.losses[0], last_loss=result.losses[-1],
        eval_before=eval_before, eval_after=eval_after, adapter_dir=str(adapter_dir),
        adapter_bytes=sum(f.stat().st_size for f in adapter_dir.iterdir()),
        classes=list(dataset.classes), resumed_from=resumed_from, rates=result.rates,
        dropped=dataset.dropped, device=str(precision.device), dtype=str(precision.dtype).removeprefix("torch."),
        skipped_steps=result.skipped_steps,
    )
