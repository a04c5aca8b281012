"""What the model is trained on: the batch's labels (D1-D4, ``doctor.batch``) and the chat
template it was rendered with against the one recorded for export (D5, ``doctor.templates``).

The model may be set up right and still learn nothing, or the wrong thing: no label to
learn from (D1), the loss on padding (D2) or on the user's side of a conversation (D3), no
end-of-sequence token to learn to stop with (D4), or served with another chat template
than the one it was trained with (D5).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from ..batch import BatchLabels
from ..probe import Context
from ..report import Finding, listing, many
from ...chat import renders_chats, template_text
from ..templates import TemplateProbeError, describe, turn_end, user_header


def _rows(rows: list[int]) -> str:
    return ("row " if len(rows) == 1 else "rows ") + listing(map(str, rows), limit=6)


# -- D1 -----------------------------------------------------------------------------------
def check_d1(ctx: Context) -> list[Finding]:
    """A batch in which no label enters the loss (error), or rows of it with none (warning)."""
    view = ctx.labels
    if view is None:
        return []
    learned = view.learned
    empty = [r for r in range(learned.shape[0]) if not learned[r].any()]
    if not empty:
        return []
    why = ("a prompt that fills max_length and cuts off the completion (or assistant turn), a loss mask "
           "that is inverted or shifted, or labels made from an empty completion")
    fix = ("set the labels of the tokens to learn to their token ids and only the rest to -100: the completion "
           "(or the assistant's turns) must fit in max_length, so raise it or shorten the prompts; build the "
           "mask as labels[~trained] = -100, not labels[trained] = -100.")
    if len(empty) == learned.shape[0]:
        return [Finding(
            "D1", "error", f"batch labels ({many(len(empty), 'row')})",
            f"every label in the batch is -100 ({learned.shape[0]} rows of {learned.shape[1]} tokens"
            f"{', counting from the second position, as a causal LM shifts' if view.shift == 0 else ''}): the "
            "loss averages over no token, so it is NaN (0/0) or zero and the adapter gets no gradient. "
            f"Usual causes: {why}.", fix)]
    return [Finding(
        "D1", "warning", f"batch labels, {_rows(empty)}",
        f"{many(len(empty), 'row')} of {learned.shape[0]} in the batch ({_rows(empty)}) "
        f"{'has' if len(empty) == 1 else 'have'} no label that enters the loss: "
        f"{'it costs' if len(empty) == 1 else 'they cost'} a forward and backward and "
        f"{'teaches' if len(empty) == 1 else 'teach'} nothing. Usual causes: {why}.",
        fix + " peftkit's data loading leaves such examples out with a warning.")]


# -- D2 -----------------------------------------------------------------------------------
def check_d2(ctx: Context) -> list[Finding]:
    """Labels set where the attention mask says padding."""
    view = ctx.labels
    if view is None or view.mask is None:  # a packed batch has no padding to find
        return []
    padded = view.learned & ~view.mask
    if not padded.any():
        return []
    rows = sorted({int(r) for r in padded.nonzero()[:, 0]})
    count = int(padded.sum())
    hint = (" The padding token is the EOS token here, so do not mask by token id either: input_ids == "
            "pad_token_id would also hide every real EOS, and the model would never learn to stop (D4)."
            if _pad_is_eos(ctx) else "")
    return [Finding(
        "D2", "error", f"batch labels, {_rows(rows)}",
        f"{many(count, 'label')} in {_rows(rows)} sit on padding (attention_mask 0) but are not -100: part of the "
        "loss is on predicting padding (the shorter the row, the more), which dilutes the real tokens' share "
        "and teaches the model to emit padding after its answer (labels = input_ids.clone() copies the padding).",
        "set labels to -100 wherever attention_mask is 0, e.g. labels[attention_mask == 0] = -100 (peftkit's "
        "collate does this; transformers' DataCollatorForSeq2Seq pads labels with -100)." + hint)]


# -- D3 -----------------------------------------------------------------------------------
def check_d3(ctx: Context) -> list[Finding]:
    """The user turn's header inside a trained span of the labels: the loss is on user (and
    system) tokens."""
    view = ctx.labels
    if view is None or not view.language_model or ctx.train_on == "all" or ctx.tokenizer is None:
        return []
    intended = ctx.train_on in ("assistant", "last")
    if not renders_chats(ctx.tokenizer):
        if intended:
            ctx.notes.append(f"D3 not checked: train_on={ctx.train_on!r}, but the tokenizer has no chat template "
                             "to find the user's turns with.")
        return []
    try:
        header = user_header(ctx.tokenizer)
    except TemplateProbeError as e:
        ctx.notes.append(f"D3 not checked: {e}.")
        return []
    rows = [r for r in range(view.labels.shape[0]) if _holds(view, r, header)]
    if not rows:
        return []
    shown = describe(ctx.tokenizer, header)
    if intended:
        meant = (f"train_on={ctx.train_on!r} puts the loss on the assistant's "
                 f"{'last turn' if ctx.train_on == 'last' else 'turns'} only, so the loss mask is wrong: the model")
    else:
        meant = "Unless the loss on every token is meant (train_on='all'), this is the mistake: the model"
    return [Finding(
        "D3", "error" if intended else "warning", f"batch labels, {_rows(rows)}",
        f"the labels of {_rows(rows)} hold the user turn's header {shown} inside a trained span: the loss is on "
        f"the user's (and the system's) tokens as well as the assistant's. {meant} learns to write the user's "
        "side of the conversation, and the assistant's replies get a smaller share of the gradient.",
        "label only the assistant's turns and set every other token to -100 (peftkit's messages, sharegpt and "
        "alpaca formats do this from the template with --train-on assistant; transformers' "
        "apply_chat_template(..., return_assistant_tokens_mask=True) gives the mask for templates with "
        "{% generation %}); if every token is meant to be trained, pass train_on='all'.")]


def _holds(view: BatchLabels, row: int, header: list[int]) -> bool:
    """Whether ``header`` lies inside one unbroken trained span of the row's labels."""
    for span in _spans(view.labels[row].tolist()):
        n = len(header)
        if any(span[i:i + n] == header for i in range(len(span) - n + 1)):
            return True
    return False


def _spans(labels: list[int]) -> Iterator[list[int]]:
    span: list[int] = []
    for label in labels + [-100]:
        if label == -100:
            if span:
                yield span
            span = []
        else:
            span.append(label)


# -- D4 -----------------------------------------------------------------------------------
def check_d4(ctx: Context) -> list[Finding]:
    """A batch of language-model labels in which no row is labelled with an EOS token.

    Only with a tokenizer: it says that the batch is real data made for this model (random
    ids for M12's backward have no EOS to find) and which tokens end a sequence."""
    view = ctx.labels
    if view is None or not view.language_model or ctx.tokenizer is None:
        return []
    stops = _stop_ids(ctx)
    if not stops:
        ctx.notes.append("D4 not checked: no EOS id is known (neither the tokenizer nor the model config sets "
                         "eos_token_id, and the tokenizer has no chat template with an end-of-turn token).")
        return []
    learned = view.learned
    rows = [r for r in range(learned.shape[0]) if learned[r].any()]
    if not rows or any(int(t) in stops for r in rows for t in view.labels[r][learned[r]]):
        return []
    names = ", ".join(map(str, sorted(stops)))
    attended = ~view.labelled if view.mask is None else view.mask & ~view.labelled
    masked = view.ids is not None and _pad_is_eos(ctx) and any(int(t) in stops for t in view.ids[attended])
    hint = (" The EOS token is in input_ids but its label is -100: with pad == eos, a collator that sets labels "
            "to -100 wherever input_ids == pad_token_id also hides every real EOS "
            "(DataCollatorForLanguageModeling does)." if masked else "")
    return [Finding(
        "D4", "warning", f"batch labels, {_rows(rows)}",
        f"no trained label in the batch is an end-of-sequence token (ids {names}): the model never learns to "
        "stop, and at inference it runs on to max_new_tokens, repeating or inventing a next turn. Expected "
        f"only when every row is a chunk cut from a longer document.{hint}",
        "end every example with the EOS token (or the chat template's end-of-turn token) and keep its label: "
        "mask padding by attention_mask == 0, not by token id (peftkit's text and prompt/completion formats "
        "append EOS; conversations end with the template's end-of-turn token).")]


def _stop_ids(ctx: Context) -> set[int]:
    """The token ids generation stops at: the tokenizer's EOS, the model's configured EOS
    (an id or a list), and the chat template's end-of-turn token."""
    ids = set()
    for source in _id_sources(ctx):
        ids |= _ids(getattr(source, "eos_token_id", None))
    if ctx.tokenizer is not None and renders_chats(ctx.tokenizer):
        end = turn_end(ctx.tokenizer)
        if end is not None:
            ids.add(end)
    return ids


def _pad_is_eos(ctx: Context) -> bool:
    """Whether the padding id (the tokenizer's, else the model's) is an EOS id, as in
    SmolLM2 and many Llama setups."""
    pads = next((ids for ids in (_ids(getattr(s, "pad_token_id", None)) for s in _id_sources(ctx)) if ids), set())
    eos = set().union(*(_ids(getattr(s, "eos_token_id", None)) for s in _id_sources(ctx)))
    return bool(pads & eos)


def _ids(value: Any) -> set[int]:
    """A token id setting (None, an id, or a list of ids) as a set."""
    items = value if isinstance(value, (list, tuple)) else [value]
    return {item for item in items if isinstance(item, int) and not isinstance(item, bool)}


def _id_sources(ctx: Context) -> list[Any]:
    """Where special token ids are set: the tokenizer, then the config and generation
    config of the model, or of the first module inside it that has one (a wrapper such as
    a PEFT model keeps the base model's deeper down)."""
    sources: list[Any] = [ctx.tokenizer] if ctx.tokenizer is not None else []
    configured = next((m for m in ctx.model.modules() if hasattr(getattr(m, "config", None), "eos_token_id")), None)
    if configured is not None:
        sources += [configured.config, getattr(configured, "generation_config", None)]
    return sources


# -- D5 -----------------------------------------------------------------------------------
def check_d5(ctx: Context) -> list[Finding]:
    """The tokenizer's chat template is not the one recorded for export."""
    recorded = ctx.chat_template
    if recorded is None:
        return []
    if ctx.tokenizer is None:
        ctx.notes.append("D5 not checked: a chat template was recorded, but no tokenizer was given to compare it "
                         "with (pass tokenizer=...).")
        return []
    current = template_text(ctx.tokenizer)
    if current is not None and current.rstrip() == recorded.rstrip():
        return []
    where = "tokenizer.chat_template vs the recorded template (chat_template.jinja)"
    fix = ("serve with the recorded template: copy chat_template.jinja from the adapter folder into the model "
           "folder, or set tokenizer.chat_template = peftkit.formats.adapter_folder.read_chat_template(adapter); "
           "or, if this tokenizer's template is the one to serve with, retrain the adapter with it.")
    if current is None:
        return [Finding(
            "D5", "error", where,
            "the tokenizer has no chat template, but the adapter was trained on conversations rendered with the "
            "recorded one: a server without it formats prompts as plain text (or refuses them), which the "
            "adapter never saw.", fix)]
    return [Finding(
        "D5", "error", where,
        f"the tokenizer's chat template differs from the one recorded when the adapter was trained "
        f"({_first_difference(current, recorded)}): prompts built with it put other tokens around each turn "
        "than training did, so the adapter sees text it was not trained on and answers worse, or does not "
        "stop at the end-of-turn token it learned.", fix)]


def _first_difference(current: str, recorded: str) -> str:
    """Where two templates first differ, e.g. "line 2: tokenizer '...' vs recorded '...'"."""
    ours, theirs = current.splitlines(), recorded.splitlines()
    for number, (a, b) in enumerate(zip(ours, theirs), 1):
        if a != b:
            start = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            cut = max(0, start - 20)
            return f"first at line {number}: the tokenizer's has {a[cut:cut + 60]!r}, the recorded {b[cut:cut + 60]!r}"
    return (f"the tokenizer's has {len(ours)} lines, the recorded {len(theirs)}; they agree on the first "
            f"{min(len(ours), len(theirs))}")
