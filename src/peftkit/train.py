"""A small, honest training loop: method-aware learning rate (M9), AdamW, warm-up then
cosine decay, gradient accumulation, checkpoints and resume (written and read by
``train_checkpoints.py``), and a progress bar. A whole `peftkit train` run (its folder, data
and summary) is ``runs.py``'s."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import distributed
from .data import EpochBatches
from .distributed import SINGLE, World
from .learning_rates import LORA_PLUS_RATIO, default_parameter_groups, warmup_cosine
from .lm_loss import joining_loss, training_loss
from .model import PeftModel
from .precision import Precision
from .train_checkpoints import checkpoint_paths, newest_step, restore_checkpoint, save_checkpoint, trainable_parameters
from .validate import flag, number, positive_int


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)
    learning_rate: float = 0.0  # the adapters' method rate (LoRA+ splits it; see ``rates``)
    seconds: float = 0.0
    tokens: int = 0
    rates: dict[str, float] = field(default_factory=dict)  # peak rate of each kind of group
    skipped_steps: int = 0  # float16 steps whose gradients overflowed: the scaler skipped them


def _count_tokens(batch: dict) -> int:
    """The batch's real tokens: a packed batch carries its count (``packing.PackedBatch``:
    its padding has no mask to count it by), a padded one has its 2D mask."""
    real = getattr(batch, "real_tokens", None)
    if real is not None:
        return real
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


class NonFiniteError(ValueError):
    """Training produced a loss or a gradient that is NaN or infinite, and stopped before
    applying it: ``step`` (1-based) is the step that failed, ``where`` says what was not
    finite, ``checkpoint`` is the newest checkpoint on disk (None when there is none)."""

    def __init__(self, message: str, *, step: int, where: str, checkpoint: Path | None) -> None:
        super().__init__(message)
        self.step, self.where, self.checkpoint = step, where, checkpoint


def _check_train_arguments(batches: Sequence[dict], steps, lr, warmup_ratio, weight_decay, grad_accum,
                           checkpoint_every, resume, lora_plus_ratio, param_groups) -> None:
    """The rules RunOptions applies, for a caller of ``train`` who skips RunOptions."""
    positive_int("train", "steps", steps)
    if lr is not None:
        number("train", "lr", lr, above=0)
    number("train", "warmup_ratio", warmup_ratio, at_least=0, at_most=1)
    number("train", "weight_decay", weight_decay, at_least=0)
    positive_int("train", "grad_accum", grad_accum)
    positive_int("train", "checkpoint_every", checkpoint_every, minimum=0)
    flag("train", "resume", resume)
    number("train", "lora_plus_ratio", lora_plus_ratio, at_least=1)
    for index, group in enumerate(param_groups or ()):
        number("train", f"param_groups[{index}]['lr']", group.get("lr"), above=0)
    if len(batches) == 0:
        raise ValueError("train needs at least one batch; the data gave none.")


def _gradient_owners(model: torch.nn.Module) -> dict[int, tuple[str, str]]:
    """id(parameter) -> (group, path): the group is "adapter '<name>' <role>" as the adapter's
    module declares the role (lora_A, lora_B, prompt, ...); in a plain model, the path alone."""
    if not isinstance(model, PeftModel):
        return {id(p): (n, n) for n, p in model.named_parameters() if p.requires_grad}
    owners = {}
    for name in model.active_adapters:
        for path, role, param in model.adapter_parameters([name]):
            owners.setdefault(id(param), (f"adapter '{name}' {role}", path))
    return owners


def _micro_batch(batches: Sequence[dict] | EpochBatches, index: int) -> dict:
    """The index-th micro-batch of the run: ``EpochBatches`` (or ``packing.PackedBatches``,
    anything with ``at``) draws each epoch anew, a plain list of batches is cycled in its order."""
    return batches.at(index) if hasattr(batches, "at") else batches[index % len(batches)]


MAX_GRAD_NORM = 1.0  # the bound transformers' Trainer, axolotl and LLaMA-Factory clip to by default
# float16 steps skipped in a row before the run stops: from the default scale of 2^16, 24
# halvings reach 2^-8, below which no overflow is the scale's doing.
MAX_SKIPPED_IN_A_ROW = 24


class _NonFiniteLoss(Exception):
    def __init__(self, index: int, value: float) -> None:
        self.index, self.value = index, value


def _label_count(batch: dict) -> int:
    """The label tokens a batch's loss is the mean over (``_scored``)."""
    return int(_scored(batch["labels"]).sum())


def accumulate_gradients(model: torch.nn.Module, micro_batches: Sequence[dict], precision: Precision | None = None,
                         scaler: torch.amp.GradScaler | None = None, world: World = SINGLE) -> float:
    """Forward and backward over one optimizer step's micro-batches; return the step's loss.

    Each micro-batch is moved to the model's device and run under ``precision``'s autocast
    (default: the model's own, ``Precision.of``); with a float16 ``scaler`` the backward is
    of the scaled loss (the gradients are unscaled before they are clipped).

    The model's loss for a micro-batch is the mean over its n_i label tokens. Weighting it by
    n_i / N, with N = sum of n_i over the step, makes the step's loss (and gradient) the mean
    over all N tokens, which one batch of every row would give: the plain mean of the
    micro-batch means would count a token of a short micro-batch more than one of a long one
    (transformers, torchtune and mlx-lm normalise over the step's tokens for this reason).
    A micro-batch with no label token adds nothing and is not run (its mean would be 0/0).
    Raises ``_NonFiniteLoss`` before the backward of a non-finite loss.

    On several ranks (``world``; ``model`` in DDP) the micro-batches are the global ones and
    each rank runs its rows (``distributed.rank_rows``); N counts the global step's tokens, and
    a rank's n_i / N is multiplied by the world size because DDP averages the ranks'
    gradients. Every rank runs every micro-batch, one without label tokens too (a zero loss
    of its logits), so each joins the all-reduce of the step's last backward. The loss
    returned is the global step's.
    """
    precision = precision or Precision.of(model)
    counts = [_label_count(batch) for batch in micro_batches]
    total = sum(counts)
    step_loss = 0.0
    for index, (batch, count) in enumerate(zip(micro_batches, counts)):
        if world.active:
            batch = distributed.rank_rows(batch, world)
            count = _label_count(batch)
        elif count == 0:
            continue
        with distributed.sync_unless(model, skip=index < len(micro_batches) - 1):
            if count == 0:
                with precision.autocast():
                    zero = joining_loss(model, precision.move(batch))  # no logits where it can (lm_loss.py)
                zero.backward()
                continue
            with precision.autocast():
                loss = training_loss(model, precision.move(batch))  # fused where it can (lm_loss.py)
            value = loss.item()
            if not math.isfinite(value):
                raise _NonFiniteLoss(index, value)
            weighted = loss * (count / total * world.size)
            (weighted if scaler is None else scaler.scale(weighted)).backward()
        step_loss += value * count / total
    return distributed.all_sum(step_loss, world)


def _gradient_norm(params: list[torch.nn.Parameter]) -> tuple[torch.Tensor, list[torch.nn.Parameter]]:
    """(total norm of the gradients, the parameters whose gradient holds a NaN or an infinity).

    One fused norm and a single sync per step, shared by the finiteness check and clipping:
    NaN or inf in any tensor makes the total non-finite. A huge finite gradient can overflow
    the total, so the rare hit is confirmed tensor by tensor before anything is refused."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(()), []
    # Of sharded gradients (FSDP2), the norm of the whole: every rank's shards together.
    total = distributed.full(torch.nn.utils.get_total_norm(grads))
    if bool(torch.isfinite(total)):
        return total, []
    return total, [p for p in params if p.grad is not None and not bool(torch.isfinite(distributed.local(p.grad)).all())]


def _stop(what: str, step: int, where: str, checkpoints: Path | None, lora_plus: bool) -> NonFiniteError:
    """The error for a non-finite ``what`` at ``step``: what was kept, and what to try."""
    newest = checkpoint_paths(checkpoints)[-1] if checkpoints is not None and checkpoint_paths(checkpoints) else None
    kept = (f"the last good checkpoint, {newest}, is kept" if newest is not None
            else "no checkpoint had been written yet")
    tries = "a lower learning rate (--lr), a look at the data near this step"
    tries += ", or a lower --lora-plus-ratio (1 turns LoRA+ off)" if lora_plus else ""
    message = f"training stopped at step {step}: {what}. Nothing of step {step} was applied and {kept}. Try {tries}."
    return NonFiniteError(message, step=step, where=where, checkpoint=newest)


def train(model: torch.nn.Module, batches: Sequence[dict] | EpochBatches, *, steps: int, lr: float | None = None,
          warmup_ratio: float = 0.1, weight_decay: float = 0.0, grad_accum: int = 1,
          progress: bool = True, desc: str = "train", checkpoint_dir: str | Path | None = None,
          checkpoint_every: int = 0, resume: bool = False,
          on_step: Callable[[dict], None] | None = None,
          preflight: Callable[[PeftModel, torch.optim.Optimizer, dict], None] | None = None,
          param_groups: list[dict] | None = None, lora_plus_ratio: float = LORA_PLUS_RATIO,
          max_grad_norm: float = MAX_GRAD_NORM, world: World = SINGLE, fsdp: bool = False,
          device: torch.device | None = None, on_sharded: Callable[[], None] | None = None) -> TrainResult:
    """Run ``steps`` optimizer steps, each over ``grad_accum`` micro-batches taken from
    ``batches``: ``data.EpochBatches`` (reshuffled each epoch, as ``peftkit train`` uses) or a
    list of batches, cycled in order. A batch is a dict of model keyword arguments with ``labels``.
    A step's loss is normalised over all its label tokens (``accumulate_gradients``), and its
    gradient is clipped to a total norm of ``max_grad_norm`` (0: no clipping); ``on_step``
    gets the norm before clipping as ``grad_norm``.

    With ``checkpoint_dir`` and ``checkpoint_every``, a checkpoint is written every N steps
    (0: none); ``resume=True`` continues from the newest one, so a killed run ends with the
    same adapter as an uninterrupted one. ``on_step`` receives {step, loss, lr, tokens, seconds}.
    ``preflight(model, optimizer, first_batch)`` runs before the first step (the doctor) and
    may raise to stop the run. ``param_groups`` (AdamW groups, each with its ``lr``) replaces
    the groups ``lr`` or the defaults would give. Without ``lr`` a LoRA adapter trains LoRA+
    style (``default_parameter_groups``; ``lora_plus_ratio=1`` turns that off); an explicit
    ``lr`` trains every parameter at that one rate.

    The model trains where it is, in the precision its base is stored in (``precision.py``):
    each batch is moved to its device, a bfloat16 or float16 base computes under autocast,
    and a float16 one trains with a gradient scaler, which skips a step whose gradients
    overflowed (counted in ``skipped_steps``) instead of stopping the run.

    The numbers are checked as RunOptions checks them (``validate.InvalidValue``). A loss
    or a gradient that is NaN or infinite raises ``NonFiniteError`` before the optimizer
    applies it: the model keeps the weights of the step before, the checkpoints on disk stay,
    and neither ``on_step`` nor a checkpoint sees the failed step.

    ``world`` (``distributed.World``, torchrun's ranks, process group started): each step's
    micro-batches are global batches and each rank trains on its rows in DDP, with the step's
    gradient that of one process on the global batch (``accumulate_gradients``). ``preflight``
    runs on rank 0 and its verdict reaches every rank (``distributed.agree``); checkpoints are
    written by rank 0 and record the world size; the caller passes ``on_step`` and
    ``progress`` to rank 0 only. Each rank draws its dropout from (seed, step, rank).

    ``fsdp=True`` (several ranks) shards the model with FSDP2 (``distributed.shard``) in
    place of DDP, after the pre-flight (which runs on rank 0's whole model, with the groups
    of the optimizer to be) and before the optimizer is built; checkpoints go through
    ``torch.distributed.checkpoint`` and resume on any rank count with the same global batch.
    The model stays sharded: the caller evaluates it on every rank (each forward gathers
    every block) and saves it with ``distributed.full`` tensors. Its shards go to ``device``
    (default: where this rank's model is; pass it when that is the CPU or the meta device), so
    rank 0 may hold the whole model on the CPU and the
    other ranks on the meta device (``distributed.shard`` loads them from rank 0);
    ``on_sharded()`` runs on every rank once it is sharded, before a checkpoint is restored
    (the held-out score before training).
    """
    _check_train_arguments(batches, steps, lr, warmup_ratio, weight_decay, grad_accum, checkpoint_every,
                           resume, lora_plus_ratio, param_groups)
    number("train", "max_grad_norm", max_grad_norm, at_least=0, hint=" (0 turns clipping off)")
    flag("train", "fsdp", fsdp)

    def parameter_groups() -> list[dict]:
        if param_groups is not None:
            return param_groups
        if lr is not None:
            return [{"params": list(trainable_parameters(model).values()), "lr": lr}]
        if isinstance(model, PeftModel):
            # Each active adapter at its method's rate: LoRA + prompt trains LoRA at ~2e-4 and the
            # prompt at 3e-2, where one shared rate would starve one of them (M9).
            return default_parameter_groups(model, lora_plus_ratio)
        raise ValueError("full fine-tuning needs an explicit learning rate.")

    checkpoints = Path(checkpoint_dir) if checkpoint_dir is not None else None
    global_rows = len(_micro_batch(batches, 0)["labels"])
    if fsdp:
        distributed.check_shardable(model, world)
        if param_groups is not None:
            raise ValueError("train(fsdp=True) builds its optimizer after sharding, so it cannot take param_groups "
                             "(they hold the parameters before); pass lr or none.")
        if preflight is not None:  # on rank 0's whole model, with the optimizer to be
            first_step = newest_step(checkpoints) if resume else 0
            first = _micro_batch(batches, first_step * grad_accum)
            provisional = torch.optim.AdamW(parameter_groups(), weight_decay=weight_decay)
            precision = Precision.of(model)
            distributed.agree(world, lambda: preflight(model, provisional, precision.move(first)))
            preflight = None
        distributed.shard(model, world, device or Precision.of(model).device)
        if on_sharded is not None:
            on_sharded()
    groups = parameter_groups()
    optimizer = torch.optim.AdamW(groups, weight_decay=weight_decay)
    scheduler = warmup_cosine(optimizer, int(warmup_ratio * steps), steps)
    # The rate reported is the adapters' method rate (a head trained in full beside them has
    # its own). initial_lr: the scheduler has already scaled "lr" by the first warm-up factor.
    adapter_groups = [g for g in groups if g.get("kind") != "modules_to_save"] or groups
    result = TrainResult(learning_rate=max(g.get("base_lr", g.get("initial_lr")) for g in adapter_groups))
    for group in groups:
        kind = group.get("kind", "params")
        result.rates[kind] = max(result.rates.get(kind, 0.0), group["initial_lr"])
    precision = Precision.of(model)
    scaler = precision.grad_scaler()
    if scaler is not None and any(p.dtype == torch.float16 for g in groups for p in g["params"]):
        # GradScaler unscales in place and cannot hold fp16 gradients; fp16 weights would also
        # lose AdamW's small updates. A classifier head (modules_to_save) runs in the base's dtype.
        raise ValueError("a float16 base trains with a gradient scaler, which needs float32 trainable weights, but "
                         "some are float16 (--adapter-dtype float16 or base, or a classifier head trained in full "
                         "on a float16 base); pass --adapter-dtype float32, or --dtype bfloat16 or float32.")
    seed = torch.initial_seed()  # the run's, before a checkpoint's generator state replaces it
    first_step = 0
    if resume and checkpoints is not None and checkpoint_paths(checkpoints):
        first_step = restore_checkpoint(checkpoint_paths(checkpoints)[-1], model, optimizer, scheduler, result,
                                         scaler, world, global_rows)
    if preflight is not None:
        first = _micro_batch(batches, first_step * grad_accum)
        distributed.agree(world, lambda: preflight(model, optimizer, precision.move(first)))
    forward = model if fsdp else distributed.wrap(model, world, precision.device)
    stepped = [p for g in optimizer.param_groups for p in g["params"]]
    owners = _gradient_owners(model)
    lora_plus = "lora_B" in result.rates
    skipped_in_a_row = 0
    model.train()
    start = time.perf_counter()
    bar = tqdm(range(first_step, steps), initial=first_step, total=steps, desc=desc,
               disable=not progress, dynamic_ncols=True)
    for step in bar:
        micro_batches = [_micro_batch(batches, step * grad_accum + micro) for micro in range(grad_accum)]
        if world.active:
            torch.manual_seed(distributed.step_seed(seed, step, world))
        try:
            step_loss = accumulate_gradients(forward, micro_batches, precision, scaler, world)
        except _NonFiniteLoss as e:
            optimizer.zero_grad(set_to_none=True)
            raise _stop(f"the loss of micro-batch {e.index + 1} of {grad_accum} is {e.value}", step + 1,
                        "loss", checkpoints, lora_plus) from None
        result.tokens += sum(_count_tokens(batch) for batch in micro_batches)
        if scaler is not None:
            scaler.unscale_(optimizer)  # true gradients, for the norm and the clip
        total_norm, bad = _gradient_norm(stepped)
        if bad and scaler is None:
            optimizer.zero_grad(set_to_none=True)
            named = [owners.get(id(p), ("a parameter outside the adapters", "?")) for p in bad]
            groups_hit = sorted({group for group, _ in named})
            raise _stop(f"the gradient of {', '.join(groups_hit)} is not finite ({len(bad)} tensor(s), "
                        f"first {named[0][1]})", step + 1, ", ".join(groups_hit), checkpoints, lora_plus)
        if max_grad_norm and not bad:
            torch.nn.utils.clip_grads_with_norm_(stepped, max_grad_norm, total_norm)
        if scaler is None:
            optimizer.step()
        else:
            # float16 that overflowed at this loss scale is no error: the scaler skips the
            # step (the weights stay) and halves the scale for the next one.
            scaler.step(optimizer)
            scaler.update()
        if bad:
            result.skipped_steps += 1
            skipped_in_a_row += 1
            if skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:  # no loss scale helps: the gradients are not finite
                raise _stop(f"float16 gradients overflowed {skipped_in_a_row} steps in a row, down to a loss scale "
                            f"of {scaler.get_scale():.3g}", step + 1, "gradients", checkpoints, lora_plus)
        else:
            skipped_in_a_row = 0
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        grad_norm = float(total_norm)  # before clipping; None in the log when it overflowed
        result.losses.append(step_loss)
        elapsed = time.perf_counter() - start
        # The method's rate at this point of the schedule (LoRA+ groups run at multiples of it).
        first = optimizer.param_groups[0]
        current_lr = result.learning_rate * (first["lr"] / first["initial_lr"] if first["initial_lr"] else 0.0)
        bar.set_postfix(loss=f"{step_loss:.3f}", lr=f"{current_lr:.2e}",
                        tok_s=f"{result.tokens / max(elapsed, 1e-9):.0f}")
        if on_step is not None:
            on_step({"step": step + 1, "loss": step_loss, "lr": current_lr,
                     "grad_norm": grad_norm if math.isfinite(grad_norm) else None,
                     "tokens": result.tokens, "seconds": elapsed, **({"skipped": True} if bad else {})})
        if checkpoints is not None and checkpoint_every and (step + 1) % checkpoint_every == 0:
            save_checkpoint(checkpoints, step + 1, model, optimizer, scheduler, result, scaler, world, global_rows)
    result.seconds = time.perf_counter() - start
    model.eval()
    return result


def _scored(labels: torch.Tensor) -> torch.Tensor:
    """Which labels a metric scores: for a causal LM (B, T) the targets labels[:, 1:] (the
    first token is never predicted), for classification (B,) every label; -100 is masked."""
    return (labels[:, 1:] if labels.dim() > 1 else labels) != -100


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable[dict], progress: bool = False,
             desc: str = "eval") -> dict[str, float]:
    """Held-out loss and accuracy: per predicted token for a causal LM (labels (B, T), the
    model predicting position t+1 from t), per example for classification (labels (B,)).
    Labels of -100 are not scored, so an example whose labels are all masked counts for
    nothing (a batch of only such examples is skipped rather than giving a NaN loss).
    ``progress`` shows a bar (a held-out file of thousands of rows takes minutes on a CPU)."""
    loss_sum, loss_count, correct, total = 0.0, 0, 0, 0
    precision = Precision.of(model)
    was_training = model.training
    model.eval()
    for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
        labels = batch["labels"]
        counted = _scored(labels)
        n = int(counted.sum())
        if n == 0:  # the model's mean loss over no tokens is NaN (0 / 0)
            continue
        with precision.autocast():
            out = model(**precision.move(batch))
        labels, counted = labels.to(out.logits.device), counted.to(out.logits.device)
        if labels.dim() == 1:
            correct += int(((out.logits.argmax(-1) == labels) & counted).sum())
        else:
            # Soft prompts put extra positions in front; the last T logits are the tokens'.
            logits = out.logits[:, -labels.shape[1]:]
            correct += int(((logits[:, :-1].argmax(-1) == labels[:, 1:]) & counted).sum())
        # The model's loss is the mean over its scored labels: weighted by their number, the
        # held-out loss is the mean over every scored label of every batch.
        loss_sum += out.loss.item() * n
        loss_count += n
        total += n
    model.train(was_training)
    return {"loss": loss_sum / max(loss_count, 1), "accuracy": correct / max(total, 1)}
