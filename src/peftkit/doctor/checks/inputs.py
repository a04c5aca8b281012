"""The input side of prompt and prefix tuning: a soft prompt must be the first positions
of the input embeddings and reach the first real token (M7); with a prefix, a row inside
a left-padded batch must give what it gives alone (M11). The rules are ``peftkit.masks``'."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ... import masks
from ..probe import Context, differs, lm_inputs, main_tensor, tolerance
from ..kinds import PREFIX, PROMPT_METHODS
from ..report import Finding, listing
from ..views import SequenceProbe

_PADDING = 2  # left-padding tokens of the first row in M11's batch


# -- M7 -----------------------------------------------------------------------------------
def check_m7(ctx: Context) -> list[Finding]:
    """A soft prompt that is not the first positions of the input embeddings, or that the
    first real token cannot see."""
    # Only where a prompt is known (a config, or trainable parameters that feed added input
    # positions): some models add positions of their own.
    if not ctx.inv.declares(*PROMPT_METHODS):
        return []
    probe = ctx.inv.sequence
    if probe is None or probe.seq is None:
        ctx.notes.append("M7 not probed: the input embeddings the model received could not be observed.")
        return []
    tokens, length = probe.ids.shape[1], probe.seq.shape[1]
    where = listing(ctx.inv.name(p) for p in ctx.inv.params_of(*PROMPT_METHODS)) or "the model's input embeddings"
    if length == tokens:
        return [_m7_finding(where, "the transformer received exactly the input tokens: the soft prompt never "
                                   "reaches the input embeddings (injected later or not at all)")]
    offset = _token_offset(probe)
    virtual = length - tokens
    if offset is None:
        problem = (f"the transformer received {length} positions for {tokens} tokens, but the token embeddings "
                   "are not among them unchanged: the prompt was mixed into them instead of prepended")
    elif offset != virtual:
        problem = (f"the tokens start at position {offset} of {length}: the {virtual} prompt positions come "
                   f"{'after' if offset == 0 else 'around'} the input instead of before it")
    elif _prompt_reaches_first_token(ctx, probe, virtual) is False:
        problem = ("the prompt is in front, but changing it leaves the first real token's output unchanged: "
                   "the attention mask hides the prompt positions")
    else:
        return []
    return [_m7_finding(where, problem)]


def _m7_finding(where: str, problem: str) -> Finding:
    return Finding(
        "M7", "error", where,
        f"soft prompt {where}: {problem}. Prompt tuning (Lester et al. 2021) learns N embeddings that every "
        "token must be able to attend to from the first layer on; anywhere else the prompt trains little or "
        "nothing.",
        "concatenate at the input embeddings, prompt first: inputs_embeds = cat([prompt, embed(ids)], dim=1), "
        "attention_mask = cat([ones(B, N), mask], dim=1), labels = cat([full((B, N), -100), labels], dim=1) "
        "(peftkit's prompt tuning does this in masks.py).")


def _token_offset(probe: SequenceProbe) -> int | None:
    """Where the token embeddings sit among the positions the transformer received."""
    seq, tokens = probe.seq, probe.tokens
    count = probe.ids.shape[1]
    if tokens is None or tokens.shape[1] != count:
        return None
    for offset in range(seq.shape[1] - count + 1):
        if not differs(seq[:, offset:offset + count], tokens):
            return offset
    return None


def _prompt_reaches_first_token(ctx: Context, probe: SequenceProbe, virtual: int) -> bool | None:
    """Whether replacing the prompt changes the output at the first real token; None when
    it cannot be tested (no known prompt parameter, or no per-position output)."""
    params = ctx.inv.params_of(*PROMPT_METHODS)
    output = probe.output
    if not params or output is None or output.dim() < 2:
        return None
    index = {probe.seq.shape[1]: virtual, probe.ids.shape[1]: 0}.get(output.shape[1])
    if index is None:
        return None
    generator = torch.Generator().manual_seed(7)
    replaced = {}
    for param in params:  # another prompt of the same scale, given to a functional call
        noise = torch.randn(param.shape, generator=generator).to(param)
        replaced[ctx.inv.name(param)] = param.detach() + noise * (param.detach().float().std() + 0.1)
    try:
        changed = torch.func.functional_call(ctx.model, replaced, (), lm_inputs(ctx.inv), strict=False)
    except Exception as e:
        ctx.notes.append(f"M7: could not rerun the model with another prompt ({type(e).__name__}: {e}).")
        return None
    changed = main_tensor(changed)
    return differs(changed[:, index], output[:, index], scale=output)


# -- M11 ----------------------------------------------------------------------------------
def check_m11(ctx: Context) -> list[Finding]:
    """A prefix-tuned model whose rows inside a left-padded batch differ from the rows alone."""
    probe = ctx.inv.sequence
    if not (ctx.inv.declares(PREFIX) or (probe is not None and probe.cache_length > 0)):
        return []
    if ctx.inv.embedding is None or probe is None:
        ctx.notes.append("M11 not probed: the prefix-tuned model could not be run on input_ids.")
        return []
    try:
        gap, scale = _padding_gap(ctx)
    except Exception as e:
        ctx.notes.append(f"M11 not probed: the padded batch could not be run ({type(e).__name__}: {e}).")
        return []
    if gap <= tolerance(torch.float32) * 10 * scale:
        return []
    where = listing(ctx.inv.name(p) for p in ctx.inv.params_of(PREFIX)) or "the key/value prefix handed to the model"
    return [Finding(
        "M11", "error", where,
        f"with the prefix ({where}), a row inside a left-padded batch gives other outputs than the same row alone "
        f"(max |difference| {gap:.3g} on real tokens, outputs up to {scale:.3g}): the attention mask was not "
        "extended for the prefix, or was extended at the wrong end, so the model masks prefix positions or "
        "attends to padding.",
        "put N ones for the prefix in front of the mask: attention_mask = cat([ones(B, N), mask], dim=1), "
        "keep padding at 0 and take positions from the real tokens (peftkit's masks.py does this).")]


def _padding_gap(ctx: Context) -> tuple[float, float]:
    """(max |padded - alone| on real tokens, max |output|) for a left-padded batch."""
    inputs = lm_inputs(ctx.inv)
    ids, mask = inputs["input_ids"].clone(), inputs["attention_mask"].clone()
    mask[0, :_PADDING] = 0
    ids[0, :_PADDING] = 0
    call = _lm_caller(ctx.model)
    batch = call(ids, mask)
    gap, scale = 0.0, float(batch.float().abs().max())
    for row in range(ids.shape[0]):
        real = ids[row][mask[row].bool()][None]
        alone = call(real, torch.ones_like(real))
        n = real.shape[1]
        gap = max(gap, float((batch[row, -n:].float() - alone[0, -n:].float()).abs().max()))
    return gap, scale


def _lm_caller(model: nn.Module) -> Callable[[Tensor, Tensor], Tensor]:
    """Call the model with ids and mask, and positions counted over real tokens when it
    takes them (otherwise a left-padded row sits at other positions than alone, which is
    the model's rule, not the prefix's)."""
    use_positions = [True]

    def call(ids: Tensor, mask: Tensor) -> Tensor:
        kwargs = {"input_ids": ids, "attention_mask": mask}
        if use_positions[0]:
            try:
                return main_tensor(model(**kwargs, position_ids=masks.position_ids(mask, mask.shape[1])))
            except TypeError:
                use_positions[0] = False
        return main_tensor(model(**kwargs))

    return call
