"""What trains and where gradients land: base weights left trainable or held by the
optimizer (M1), and after one backward, gradients no step uses, stale gradients on frozen
weights and adapter parameters without one (M12)."""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from ..probe import ROWS, Context, call, lm_inputs, scalar_loss, training_mode
from ..report import Finding, human_size, listing, many, tensor_bytes


def check_m1(ctx: Context) -> list[Finding]:
    """Trainable parameters outside adapters; frozen parameters in optimizer groups."""
    inv, findings = ctx.inv, []
    outside = [p for p in inv.params.values() if p.requires_grad and not inv.is_adapter(p)]
    if outside and inv.methods:
        count = sum(p.numel() for p in outside)
        share = count / max(1, sum(p.numel() for p in inv.params.values()))
        names = [inv.name(p) for p in outside]
        findings.append(Finding(
            "M1", "error", listing(names),
            f"parameters outside any adapter require grad: {many(len(outside), 'parameter')}, {count:,} values, "
            f"{share:.1%} of the model (e.g. {names[0]}). An optimizer holding them rewrites the base "
            "model and stores optimizer state for every one of them; left out of the optimizer they still "
            "get gradients (M12).",
            "freeze every base parameter: model.requires_grad_(False) before adding the adapters, then "
            "train only the adapter parameters (peftkit.attach does both; with Hugging Face PEFT, do not "
            "re-enable base weights after get_peft_model)."))
    frozen = [p for p in ctx.optimizer_params().values() if not p.requires_grad]
    if frozen:
        findings.append(Finding(
            "M1", "warning", listing(inv.name(p) for p in frozen),
            f"the optimizer holds {many(len(frozen), 'frozen parameter')}, e.g. {inv.name(frozen[0])}: they "
            "never get a gradient, so they only cost bookkeeping now, and they start training silently if anything "
            "unfreezes them.",
            "build the optimizer from the trainable parameters only: "
            "torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=...)."))
    if not inv.methods:
        ctx.notes.append("no adapter found (peftkit, Hugging Face PEFT or hand-made LoRA, bottleneck, prompt "
                         "or prefix), so M1-M3, M5, M6, M8 and M12's adapter checks had nothing to check.")
    return findings


def check_m12(ctx: Context) -> list[Finding]:
    """After one backward: gradients no optimizer uses, stale gradients on frozen
    parameters, adapter parameters without a gradient. Every .grad is restored."""
    params = list(ctx.model.parameters())
    if not any(p.requires_grad for p in params):
        ctx.notes.append("M12 not probed: no parameter requires grad (an inference setup).")
        return []
    batch = ctx.batch if ctx.batch is not None else _synthetic_batch(ctx)
    if batch is None:
        ctx.notes.append("M12 not probed: pass batch=... (the model does not take token ids).")
        return []
    saved = [p.grad for p in params]
    findings = _stale_gradients(ctx, params, saved)
    try:
        for param in params:
            param.grad = None
        with training_mode(ctx.model), torch.enable_grad():
            loss = scalar_loss(call(ctx.model, batch))
            # A loss that needs no grad is the finding itself (reentrant checkpointing on
            # frozen inputs cuts every path), not a probe that failed.
            if loss.requires_grad:
                loss.backward()
        received = [p for p in params if p.grad is not None]
    except Exception as e:
        ctx.notes.append(f"M12 not probed: forward + backward on the batch failed ({type(e).__name__}: {e}).")
        return findings
    finally:
        for param, grad in zip(params, saved):
            param.grad = grad
    return findings + _gradient_findings(ctx, params, received)


def _synthetic_batch(ctx: Context) -> Any:
    """Random token ids, or random rows (ROWS, in) for the first Linear of a model
    without an input embedding; None when neither fits."""
    if ctx.inv.embedding is not None:
        return lm_inputs(ctx.inv)
    first = next((m for m in ctx.model.modules() if type(m) is nn.Linear), None)
    if first is None:
        return None
    return torch.randn(ROWS, first.in_features, generator=torch.Generator().manual_seed(12)).to(first.weight)


def _stale_gradients(ctx: Context, params: list[nn.Parameter], saved: list[Tensor | None]) -> list[Finding]:
    stale = [p for p, g in zip(params, saved) if g is not None and not p.requires_grad]
    if not stale:
        return []
    return [Finding(
        "M12", "warning", listing(ctx.inv.name(p) for p in stale),
        f"frozen parameters still hold a .grad ({many(len(stale), 'parameter')}, {human_size(tensor_bytes(stale))}), "
        "left from before they were frozen: memory as large as those weights, and an optimizer that holds "
        "them would apply it.",
        "set their .grad to None (optimizer.zero_grad(set_to_none=True), or p.grad = None for each).")]


def _gradient_findings(ctx: Context, params: list[nn.Parameter], received: list[nn.Parameter]) -> list[Finding]:
    inv, findings = ctx.inv, []
    held = ctx.optimizer_params()
    got = {id(p) for p in received}
    if ctx.optimizer is not None:
        unused = [p for p in received if id(p) not in held]
        whom = "no optimizer group holds them"
    else:
        unused = [p for p in received if not inv.is_adapter(p)] if inv.methods else []
        whom = "they are not adapter parameters"
    if unused:
        findings.append(Finding(
            "M12", "error", listing(inv.name(p) for p in unused),
            f"parameters received gradients in one backward but {whom} ({many(len(unused), 'parameter')}, "
            f"{human_size(tensor_bytes(unused))} of gradients, e.g. {inv.name(unused[0])}): "
            "backward computes and stores weight-sized gradients that no step uses.",
            "freeze them with requires_grad_(False) (leaving them out of the optimizer is not enough), or add "
            "them to the optimizer if they are meant to train."))
    missing = [p for p in params if p.requires_grad and inv.is_adapter(p) and id(p) not in got]
    if missing:
        findings.append(_missing_gradients(ctx, missing))
    return findings


def _missing_gradients(ctx: Context, missing: list[nn.Parameter]) -> Finding:
    inv = ctx.inv
    where = listing(inv.name(p) for p in missing)
    what = f"{many(len(missing), 'parameter')}, e.g. {inv.name(missing[0])}"
    reentrant = _reentrant_checkpointing(ctx.model)
    # The classic case named outright: with the input hook on, the inputs do need grad and
    # reentrant mode is not what starves the adapters, so the general causes follow.
    if reentrant and not _input_grad_hooks(ctx.model):
        return Finding(
            "M12", "error", where,
            f"gradient checkpointing is on in reentrant mode (use_reentrant=True: {listing(reentrant, 2)}) and "
            "the inputs need no grad (the embeddings are frozen), so no gradient reaches the adapters inside "
            f"the checkpointed blocks ({what}): they never train.",
            "use use_reentrant=False (peftkit.enable_gradient_checkpointing does; with transformers, "
            "model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})) "
            "or call model.enable_input_require_grads().")
    return Finding(
        "M12", "error", where,
        f"trainable adapter parameters got no gradient from a backward on the batch ({what}): they never "
        "train. The usual causes are gradient checkpointing with use_reentrant=True on inputs that do not "
        "require grad, a detach() or no_grad() in the forward, or an adapter that is not active.",
        "with gradient checkpointing, use use_reentrant=False or call model.enable_input_require_grads(); "
        "remove detach()/no_grad() from the adapter path; make sure the adapter is active.")


def _reentrant_checkpointing(model: nn.Module) -> list[str]:
    """Paths of the modules checkpointed in reentrant mode the way transformers records
    it: ``gradient_checkpointing`` on, and ``_gradient_checkpointing_func`` a
    ``functools.partial`` of a checkpoint function with its keywords (or the bare
    ``torch.utils.checkpoint.checkpoint``). torch's default when ``use_reentrant`` is
    not given is True."""
    paths = []
    for path, module in model.named_modules():
        func = getattr(module, "_gradient_checkpointing_func", None)
        if getattr(module, "gradient_checkpointing", False) is not True or func is None:
            continue
        if isinstance(func, functools.partial):
            reentrant = func.keywords.get("use_reentrant", True)
        else:
            reentrant = func is torch.utils.checkpoint.checkpoint
        if reentrant:
            paths.append(path)
    return paths


def _input_grad_hooks(model: nn.Module) -> bool:
    """True when transformers' ``enable_input_require_grads`` hook is on some module
    (``_require_grads_hooks`` in transformers 5, ``_require_grads_hook`` before)."""
    return any(getattr(m, "_require_grads_hooks", None) or getattr(m, "_require_grads_hook", None)
               for m in model.modules())
