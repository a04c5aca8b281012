"""``peftkit.doctor``: find the twelve classic PEFT mistakes (M1-M12) in a live model, and
five mistakes in what it is trained on (D1-D5).

    report = peftkit.doctor(model, optimizer=None, batch=None, checkpoint=None,
                            tokenizer=None, train_on=None, chat_template=None)
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

The data checks read the batch's labels (with its attention mask and input ids), the
tokenizer and the chat template recorded for export:

- D1 (error) no label in the batch enters the loss (all -100): NaN or zero loss, no
  gradient; (warning) some rows have none.
- D2 (error) labels set on padding (attention_mask 0, label not -100). Not checked without
  an attention mask (packed batches). With pad == eos, the real EOS is attended and
  trained, which is right and not flagged.
- D3 the user turn's header inside a trained span of the labels: the loss is on user and
  system tokens. The header comes from the tokenizer's own template (``templates``). An
  error when ``train_on`` is "assistant" or "last", a warning when it is None (intent
  unknown), nothing for "all".
- D4 (warning) no trained label is an EOS token (the tokenizer's, the model config's, the
  template's end-of-turn token): the model never learns to stop. Only with a tokenizer,
  which says that the batch is real data (random ids for M12 have no EOS to find).
- D5 (error) the tokenizer's chat template differs from the recorded one (``chat_template``,
  which peftkit saves as ``chat_template.jinja`` beside the adapter).

D1, D2 take 2-D integer labels; D3, D4 only labels that are the input's own tokens (a
language model's: equal to ``input_ids``, or to them shifted by one), so classification,
token-classification and masked-LM labels are left alone.

The doctor changes nothing it is given. Probes run in eval mode under ``torch.no_grad()``,
on copies of single layers (the frozen weight is shared, not copied) or through
``torch.func.functional_call`` with replaced tensors; the one backward (M12) saves every
``.grad`` first and puts it back; module modes and the random-number generator state are
restored on exit; the optimizer is only read. When a probe cannot run, the report says
so in ``notes`` rather than passing silently.

The package, one job a module: ``report`` (Finding, DoctorReport), ``views`` and
``inventory`` (the adapters found), ``probe`` (the harness), ``checkpoint`` (reading
files without unpickling), ``kinds`` (the method families it tells apart), ``batch`` and
``templates`` (what the data checks read from the batch and the chat template), ``checks``
(``CHECKS``, the twelve by id, and ``DATA_CHECKS``, D1-D5).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import open_checkpoint
from ..chat import TRAIN_ON
from .checks import CHECKS, DATA_CHECKS
from .inventory import find_adapters
from .probe import Context, probe_sequence, untouched
from .report import DATA_FINDINGS, MISTAKES, SEVERITIES, DoctorReport, Finding, mistake_order


def doctor(model: nn.Module, optimizer: torch.optim.Optimizer | None = None, batch: Any = None,
           checkpoint: str | Path | None = None, *, tokenizer: Any = None, train_on: str | None = None,
           chat_template: str | None = None) -> DoctorReport:
    """Check ``model`` for the twelve classic PEFT mistakes, and what it is trained on for
    D1-D5, and return a report.

    Args:
        model: any nn.Module: a peftkit ``PeftModel``, a Hugging Face PEFT model, or a
            plain model with hand-written adapters.
        optimizer: the optimizer that will train it; enables the checks on its groups
            (M1, M9, M12) and tells whether a step has run (M2).
        batch: one training batch: a dict of keyword arguments (with ``labels`` to get the
            model's own loss), a tuple of positional ones, or a tensor; used for the
            backward of M12. Without it, random token ids are used. A dict's ``labels``,
            ``attention_mask`` and ``input_ids`` are read by D1-D4.
        checkpoint: a saved file (.safetensors, or .bin/.pt/.pth read with weights_only)
            or a folder of them (``save_pretrained``, a Trainer ``checkpoint-N``, a
            sharded model: every weight file in it) to check for base-model weights (M10).
        tokenizer: the transformers tokenizer the data was (or will be) made with: its chat
            template finds user turns in the labels (D3), its EOS id and the template's
            end-of-turn token are what the labels should end with (D4), and its template is
            compared with ``chat_template`` (D5).
        train_on: which tokens the loss is meant to be on: "assistant" (every assistant
            turn), "last" (the last one) or "all"; None when not known (D3's severity).
        chat_template: the chat template recorded for export, to compare with the
            tokenizer's (D5): ``peftkit.formats.adapter_folder.read_chat_template(folder)``
            reads the one peftkit saved with an adapter.

    Nothing given is changed: see the module docstring.

    Raises:
        FileNotFoundError: ``checkpoint`` does not exist.
        ValueError: ``checkpoint`` is a file that cannot be read without unpickling, no
            weight file, or a folder without one; ``train_on`` is not one of the above.
    """
    if train_on is not None and train_on not in TRAIN_ON:
        raise ValueError(f"train_on must be one of {TRAIN_ON} or None, got {train_on!r}.")
    opened = None if checkpoint is None else open_checkpoint(checkpoint)
    notes: list[str] = []
    training = model.training
    with untouched(model), torch.no_grad():
        inv = find_adapters(model)
        inv.sequence = probe_sequence(model, inv, notes)
        ctx = Context(model, optimizer, batch, opened, inv, notes, training, tokenizer, train_on, chat_template)
        checks = {**CHECKS, **DATA_CHECKS}
        findings = [f for mistake in sorted(checks, key=mistake_order) for f in checks[mistake](ctx)]
    findings.sort(key=lambda f: (mistake_order(f.id), SEVERITIES.index(f.severity)))
    return DoctorReport(findings, notes)


__all__ = ["CHECKS", "DATA_CHECKS", "DATA_FINDINGS", "MISTAKES", "DoctorReport", "Finding", "doctor"]
