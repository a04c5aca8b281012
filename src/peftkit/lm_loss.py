"""The causal-LM training loss without the full logits (fused linear cross-entropy).

A causal LM's loss is the mean over the scored positions t (label y_t != -100, labels
shifted one to the left) of

    ℓ_t = logsumexp(z_t) − z_t[y_t],    z_t = h_t Wᵀ + b,

with h (N, H) the backbone's last hidden states, W (V, H) the output head, b (V,) its bias.
Some models map the head's output u = h Wᵀ + b before the loss: Granite divides it by a
scale (z = s·u), Gemma 2 (and Gemma 3 where set) soft-caps it, z = c·tanh(s·u / c);
then ∂z/∂u = s·(1 − (z/c)²), which the gradient below is multiplied by.
Computed the plain way (``model(**batch).loss``) it holds the logits (N, V), their float32
copy, the log-softmax autograd saves and, in backward, two more (N, V) buffers: at a vocab of
32k–152k these outweigh every activation of a small model (4 × 2048 tokens of a 152k vocab
are 5 GB per float32 buffer). ``LinearCrossEntropy`` takes only the scored rows of h, in
chunks of rows, and for each chunk computes z, the loss and, when h needs a gradient, at
once the gradient

    ∂ℓ/∂h_t = (softmax(z_t) − onehot(y_t)) W / n_scored

so that one chunk of logits exists at a time and nothing of size V is kept for backward;
backward scales the kept (N, H) gradient by the loss's incoming gradient. The products are
the plain path's (z forward, (p − onehot) W backward), so it costs no extra FLOPs, and
positions without a label (a conversation's user turns, padding) cost nothing at all.

``training_loss`` takes this path for the decoders whose forward is exactly "backbone, then
head, then (a soft-cap or scale, then) this loss" (Llama, Mistral, Qwen 2/3, Gemma 1/2/3,
OLMo 1/2, Granite, Phi-2, Phi-3, GPT-2) with a frozen plain ``nn.Linear`` head, and otherwise
calls the model for its own loss: prompt and prefix tuning, a LoRA or a trained copy on the
head, a logit transform the model type is not known to apply. It runs inside the model's
call (``model(**batch, run_inside=fused_loss)``), so a DDP or FSDP2 wrapper around the model
does its work around it as around any forward: DDP prepares its gradient all-reduce, FSDP
gathers the root's parameters (embeddings, final norm, head) and frees them after.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.parallel import DistributedDataParallel

from .distributed import is_sharded
from .masks import IGNORE_INDEX
from .model import PeftModel

CHUNK_LOGITS = 1 << 22
"""Elements of one chunk of logits (16 MB in float32; below glibc's largest mmap threshold,
so a chunk's buffer is reused from the heap, not mapped afresh): rows = this // vocab, but
at least ``MIN_CHUNK_ROWS``."""

MIN_CHUNK_ROWS = 256
"""Fewest scored rows per chunk: every chunk reads the whole head W (V, H), so a chunk needs
enough rows for its product to be bound by arithmetic, not by reading W (2·rows flops per
element of W; 256 bf16 rows is about an H200's ratio of bf16 flops to memory bandwidth).
On the bench model (CPU, vocab 32k, 1020 scored rows) 128 to 512 rows took 0.88-0.93x the
plain loss's step (2026-12-03, AMD EPYC)."""

FUSED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo",
                               "olmo2", "granite", "phi", "phi3", "gpt2"})
"""``config.model_type`` of the models whose forward is backbone -> head -> (``LOGIT_MAPS``) ->
mean cross-entropy."""

LOGIT_MAPS = {
    "gemma2": ("final_logit_softcapping", "softcap"),
    "gemma3_text": ("final_logit_softcapping", "softcap"),
    "granite": ("logits_scaling", "divide"),
}
"""The config field each fused model type maps its logits by, and how (transformers'
``Gemma2ForCausalLM``: ``tanh(logits / cap) * cap`` when the field is set; ``GraniteForCausalLM``:
``logits / logits_scaling``)."""

BACKBONE_KEYS = frozenset({"input_ids", "attention_mask", "position_ids", "token_type_ids", "inputs_embeds",
                           "use_cache", "labels"})
"""Batch keys the fused loss understands; any other (``adapter_names`` of a mixed batch, a
loss argument such as ``num_items_in_batch`` or ``shift_labels``) means the model's own call."""

_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")
"""Config fields of models that change the logits after the head; any set that is not the
model type's own ``LOGIT_MAPS`` field means no fusion (it is not known what the model does with it)."""


def logit_map(config) -> tuple[float, float | None] | None:
    """(scale s, soft-cap c or None) with which ``config``'s model maps its head's output u to
    the logits, z = c·tanh(s·u / c) or z = s·u; None when a transform is set that this model
    type is not known to apply."""
    field, kind = LOGIT_MAPS.get(getattr(config, "model_type", None), (None, None))
    if any(name != field and getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS):
        return None
    value = getattr(config, field, None) if field else None
    if value is None:
        return 1.0, None
    return (1.0, float(value)) if kind == "softcap" else (1.0 / float(value), None)


class LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of the logits z against ``targets``, never holding more than one
    chunk of them: z = s·u, or z = c·tanh(s·u / c) with a soft-cap c, for u = h Wᵀ + b.
    Shapes: hidden (N, H), weight (V, H), bias (V,) or None, targets (N,) with
    ``IGNORE_INDEX`` where a row is not scored; returns a float32 scalar (NaN with no scored
    row, as the plain mean). u is computed in hidden's dtype, the map and the softmax in
    float32, as ``ForCausalLMLoss`` upcasts the logits. Gradient to hidden only: weight and
    bias must be frozen (``training_loss`` checks).

    The gradient is computed in forward, before any loss scale is known, so it is divided by
    the row count only after the product with W, and kept in float32 for a float16 hidden:
    (softmax − onehot)/count in float16 would fall below its smallest number (1/V/count is
    about 1e-9 for 32k tokens of a 32k vocabulary), and a GradScaler's incoming 2^16 is
    above its largest."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, rows: int, scale: float, softcap: float | None):
        scored = torch.nonzero(targets != IGNORE_INDEX).squeeze(1)  # (n,) the rows with a label
        count = scored.numel()
        need_grad = ctx.needs_input_grad[0]
        grad_dtype = torch.float32 if hidden.dtype == torch.float16 else hidden.dtype
        grad_hidden = torch.zeros_like(hidden, dtype=grad_dtype) if need_grad else None
        ctx.hidden_dtype = hidden.dtype
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, count, rows):
            index = scored[start:start + rows]
            h = hidden.index_select(0, index)  # (n_c, H): the chunk's scored rows only
            z = (h @ weight.t() if bias is None else torch.addmm(bias, h, weight.t())).float()  # (n_c, V): u
            if scale != 1.0:
                z.mul_(scale)
            slope = None  # ∂z/∂(s·u) of the soft-cap, 1 − tanh², while the tanh is at hand
            if softcap is not None:
                z.div_(softcap).tanh_()
                slope = torch.mul(z, z).neg_().add_(1.0) if need_grad else None
                z.mul_(softcap)
            target = targets.index_select(0, index)
            log_norm = torch.logsumexp(z, dim=1)  # (n_c,)
            total += (log_norm - z.gather(1, target[:, None]).squeeze(1)).sum()
            if need_grad:
                probs = z.sub_(log_norm[:, None]).exp_()  # softmax, in z's memory
                probs[torch.arange(index.numel(), device=z.device), target] -= 1.0
                if slope is not None:
                    probs.mul_(slope)  # the chain rule through the cap: ∂ℓ/∂(s·u)
                if scale != 1.0:
                    probs.mul_(scale)  # and through the scale: ∂ℓ/∂u
                grad_hidden.index_copy_(0, index, (probs.to(hidden.dtype) @ weight).to(grad_dtype).div_(count))
            del z, slope
        ctx.save_for_backward(grad_hidden)
        return total / count

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        (grad_hidden,) = ctx.saved_tensors
        return (grad_hidden * grad_loss.to(grad_hidden.dtype)).to(ctx.hidden_dtype), None, None, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor, rows: int | None = None, scale: float = 1.0,
                         softcap: float | None = None) -> torch.Tensor:
    """``LinearCrossEntropy`` in one compute dtype (the autocast dtype when autocast is on for
    hidden's device, else hidden's own), in chunks of ``rows`` scored rows (default: as many
    as make ``CHUNK_LOGITS`` logits, at least ``MIN_CHUNK_ROWS``), the logits mapped by
    ``scale`` and ``softcap`` (as ``logit_map`` reads them). hidden (..., H) and targets (...)
    are flattened."""
    rows = rows or max(MIN_CHUNK_ROWS, CHUNK_LOGITS // weight.shape[0])
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    cast = [None if t is None else t.to(dtype) for t in (hidden.reshape(-1, hidden.shape[-1]), weight, bias)]
    with torch.autocast(device, enabled=False):
        return LinearCrossEntropy.apply(cast[0], cast[1], cast[2], targets.reshape(-1), rows, scale, softcap)


class FusedParts(NamedTuple):
    """What the fused loss reads of a causal LM: its backbone (the model up to the last hidden
    states), its output head and the map of the head's output to the logits (``logit_map``)."""

    backbone: nn.Module
    head: nn.Linear
    scale: float = 1.0
    softcap: float | None = None


def fused_parts(model: nn.Module) -> FusedParts | None:
    """The parts of a model whose loss ``training_loss`` can compute fused, else None.

    ``model`` is a peftkit ``PeftModel`` (sharded by FSDP2 or not) with no prompt or prefix
    adapter active (those rewrite the call around virtual tokens) around a causal LM of
    ``FUSED_MODEL_TYPES`` with no logit transform but its own, whose output head is a frozen plain
    ``nn.Linear``. A bare transformers model is left to its own loss, and so is a model whose
    causal LM or head FSDP2 sharded as a unit of its own: the fused loss calls neither, so
    their gather would not run (``peftkit train --fsdp`` shards the blocks and the PeftModel)."""
    if not isinstance(model, PeftModel) or model._active_input_adapter() is not None:
        return None
    causal_lm = model.base_model
    config = getattr(causal_lm, "config", None)
    if getattr(config, "model_type", None) not in FUSED_MODEL_TYPES:
        return None
    mapping = logit_map(config)
    if mapping is None:
        return None
    backbone = getattr(causal_lm, "base_model", causal_lm)
    head = causal_lm.get_output_embeddings()
    if backbone is causal_lm or type(head) is not nn.Linear:  # a LoRA or trained copy wraps the head
        return None
    if head.weight.requires_grad or (head.bias is not None and head.bias.requires_grad):
        return None
    if is_sharded(causal_lm) or is_sharded(head):
        return None
    return FusedParts(backbone, head, *mapping)


def _parts_for(model: nn.Module, batch: dict) -> FusedParts | None:
    """``fused_parts(model)`` when ``batch`` also allows the fused loss (labels per token, only
    ``BACKBONE_KEYS``), else None."""
    labels = batch.get("labels")
    if labels is None or labels.dim() != 2 or not BACKBONE_KEYS.issuperset(batch):
        return None
    return fused_parts(model)


def _unwrapped(model: nn.Module) -> nn.Module:
    """The module inside DDP (the one whose parts the fused loss reads); any other as it is."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def _inputs(batch: dict) -> dict:
    """The batch without its labels: what the backbone (or a logits-only call) takes."""
    return {k: v for k, v in batch.items() if k != "labels"}


def training_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """The mean loss over the batch's scored labels of ``model`` (a ``PeftModel``, or one in
    ``DistributedDataParallel`` or sharded by ``fully_shard``): fused where ``_parts_for``
    allows, by the model's call with ``run_inside=fused_loss`` (through the wrapper, so its
    hooks run), else ``model(**batch).loss``."""
    if _parts_for(_unwrapped(model), batch) is None:
        return model(**batch).loss
    return model(**batch, run_inside=fused_loss)


def fused_loss(model: PeftModel, batch: dict) -> torch.Tensor:
    """``backbone_loss`` of ``model``'s parts on ``batch``, or a ValueError naming why they
    cannot be fused and what to call instead. Through a DDP or FSDP2 wrapper, call it inside
    the model's call: ``model(**batch, run_inside=fused_loss)``, as ``training_loss`` does."""
    parts = _parts_for(model, batch)
    if parts is None:
        raise ValueError("the fused loss needs a causal LM of a fused model type "
                         f"({', '.join(sorted(FUSED_MODEL_TYPES))}) in a PeftModel, with a frozen plain head, no "
                         f"prompt or prefix adapter active, and a batch of {', '.join(sorted(BACKBONE_KEYS))} with "
                         "labels (batch, tokens); call peftkit.lm_loss.training_loss(model, batch), which "
                         "falls back to the model's own loss.")
    return backbone_loss(parts, batch)


def joining_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """A zero loss whose backward reaches every trainable parameter, for a rank that has no
    label token in a micro-batch but must join DDP's or FSDP2's gradient reduction (``batch``
    is a stand-in row, its labels masked): where ``_parts_for`` allows, the backbone's last
    hidden states times 0, inside the model's call and without any logits; else the model's
    logits times 0."""
    if _parts_for(_unwrapped(model), batch) is not None:
        return model(**batch, run_inside=_zero_from_hidden)
    return model(**_inputs(batch)).logits.float().sum() * 0.0


def _zero_from_hidden(model: PeftModel, batch: dict) -> torch.Tensor:
    return fused_parts(model).backbone(**_inputs(batch))[0].float().sum() * 0.0


def backbone_loss(parts: FusedParts, batch: dict) -> torch.Tensor:
    """A causal LM's loss on ``batch`` (model keyword arguments with ``labels`` (B, T)) from
    its ``parts``, never holding the whole logits: the backbone's last hidden states
    (B, T, H), position t scored against label t + 1 (the last one against nothing), through
    ``linear_cross_entropy``."""
    hidden = parts.backbone(**_inputs(batch))[0]
    targets = nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX).to(hidden.device)
    return linear_cross_entropy(hidden, parts.head.weight, parts.head.bias, targets, scale=parts.scale,
                                softcap=parts.softcap)
