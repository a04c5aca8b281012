"""``peftkit.doctor``: find the twelve classic PEFT mistakes (M1-M12) in a live model.

    report = peftkit.doctor(model, optimizer=None, batch=None, checkpoint=None)
    print(report)          # a table: id, severity, where; then what is wrong and how to fix it
    report.ok              # False when any finding is an error
    report.to_json()

The model may be set up by peftkit, by Hugging Face PEFT or by hand in plain torch.
Adapters are found by structure, never by a name substring alone (``inventory``); soft
prompts and prefixes by one probe forward (``probe``).

Most checks probe behaviour rather than read names: the output of a layer against the
LoRA formula (M3), identity at init (M2, M8), padded rows against rows alone (M11),
where gradients land (M12). Checks that read files or settings (M4, M5, M9, M10) apply
the same rules peftkit applies when it attaches an adapter.

The doctor changes nothing it is given. Probes run in eval mode under ``torch.no_grad()``,
on copies of single layers (the frozen weight is shared, not copied) or through
``torch.func.functional_call`` with replaced tensors; the one backward (M12) saves every
``.grad`` first and puts it back; module modes and the random-number generator state are
restored on exit; the optimizer is only read. When a probe cannot run, the report says
so in ``notes`` rather than passing silently.

The package, one job a module: ``report`` (Finding, DoctorReport), ``views`` and
``inventory`` (the adapters found), ``probe`` (the harness), ``checkpoint`` (reading
files without unpickling), ``kinds`` (the method families it tells apart), ``checks`` (``CHECKS``, the
twelve by id).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import open_checkpoint
from .checks import CHECKS
from .inventory import find_adapters
from .probe import Context, probe_sequence, untouched
from .report import MISTAKES, SEVERITIES, DoctorReport, Finding, mistake_order


def doctor(model: nn.Module, optimizer: torch.optim.Optimizer | None = None, batch: Any = None,
           checkpoint: str | Path | None = None) -> DoctorReport:
    """Check ``model`` for the twelve classic PEFT mistakes and return a report.

    Args:
        model: any nn.Module: a peftkit ``PeftModel``, a Hugging Face PEFT model, or a
            plain model with hand-written adapters.
        optimizer: the optimizer that will train it; enables the checks on its groups
            (M1, M9, M12) and tells whether a step has run (M2).
        batch: one training batch: a dict of keyword arguments (with ``labels`` to get the
            model's own loss), a tuple of positional ones, or a tensor; used for the
            backward of M12. Without it, random token ids are used.
        checkpoint: a saved file (.safetensors, or .bin/.pt/.pth read with weights_only)
            or a folder of them (``save_pretrained``, a Trainer ``checkpoint-N``, a
            sharded model: every weight file in it) to check for base-model weights (M10).

    Nothing given is changed: see the module docstring.

    Raises:
        FileNotFoundError: ``checkpoint`` does not exist.
        ValueError: ``checkpoint`` is a file that cannot be read without unpickling, no
            weight file, or a folder without one.
    """
    opened = None if checkpoint is None else open_checkpoint(checkpoint)
    notes: list[str] = []
    training = model.training
    with untouched(model), torch.no_grad():
        inv = find_adapters(model)
        inv.sequence = probe_sequence(model, inv, notes)
        ctx = Context(model, optimizer, batch, opened, inv, notes, training)
        findings = [f for mistake in sorted(CHECKS, key=mistake_order) for f in CHECKS[mistake](ctx)]
    findings.sort(key=lambda f: (mistake_order(f.id), SEVERITIES.index(f.severity)))
    return DoctorReport(findings, notes)


__all__ = ["CHECKS", "MISTAKES", "DoctorReport", "Finding", "doctor"]
