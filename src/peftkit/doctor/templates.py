"""What the doctor reads from a tokenizer's chat template: the token ids that open a user
turn (D3) and the token that ends an assistant turn (D4), found by rendering small probe
conversations with the tokenizer's own ``apply_chat_template``, so that no template is
written here and any template works.

The user turn's header is the tokens just before a user message's content. Before the
first user message they follow whatever the template puts first (a BOS token, a default
system prompt); before a later one they follow the previous assistant turn. What the two
places share at their end, token by token, is what precedes every user message: ChatML's
``<|im_start|>user\\n``, Llama 3's ``<|start_header_id|>user<|end_header_id|>\\n\\n``,
Mistral's ``[INST]`` (with a default system prompt, ChatML's shared tail also holds the
``<|im_end|>\\n`` that ends the turn before). Tokens are taken from the whole rendering by
their character offsets, so a token that merges the header with the content is left out
rather than guessed.
"""

from __future__ import annotations

from typing import Any

# Probe contents: words no template rewrites and no header contains.
_FIRST, _REPLY, _SECOND = "Zqxjv", "Wvkpq", "Jxqzw"


class TemplateProbeError(ValueError):
    """The chat template could not be probed (it refused the probe conversation, or does
    not show the contents as given)."""


def _probe(tokenizer: Any) -> tuple[str, list[tuple[int, int, int]]]:
    """The probe conversation (user, assistant, user) rendered, and its tokens as
    (id, start, end) character spans."""
    messages = [{"role": "user", "content": _FIRST}, {"role": "assistant", "content": _REPLY},
                {"role": "user", "content": _SECOND}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as e:  # a template's raise_exception, or a Jinja error
        raise TemplateProbeError(f"the chat template refused a user/assistant/user conversation "
                                 f"({type(e).__name__}: {e})") from e
    if not isinstance(text, str) or any(text.count(word) != 1 for word in (_FIRST, _REPLY, _SECOND)):
        raise TemplateProbeError("the chat template does not render each message's content once, as given")
    return text, _tokens(tokenizer, text)


def _tokens(tokenizer: Any, text: str) -> list[tuple[int, int, int]]:
    try:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, ValueError, TypeError) as e:  # a slow tokenizer has no offsets
        raise TemplateProbeError(f"the tokenizer gives no character offsets ({e}); a fast tokenizer "
                                 "(tokenizer.json) is needed") from e
    return [(int(i), int(s), int(e)) for i, (s, e) in zip(encoded["input_ids"], encoded["offset_mapping"])]


def _within(tokens: list[tuple[int, int, int]], start: int, end: int) -> list[int]:
    return [i for i, s, e in tokens if s >= start and e <= end]


def user_header(tokenizer: Any) -> list[int]:
    """The token ids that precede every user message's content; ``TemplateProbeError``
    when the template cannot be probed or shows no such header."""
    text, tokens = _probe(tokenizer)
    first = _within(tokens, 0, text.index(_FIRST))
    reply_end = text.index(_REPLY) + len(_REPLY)
    later = _within(tokens, reply_end, text.index(_SECOND))
    header: list[int] = []
    while len(header) < min(len(first), len(later)) and first[-1 - len(header)] == later[-1 - len(header)]:
        header.insert(0, first[-1 - len(header)])
    if not tokenizer.decode(header).strip():  # only whitespace: it would be found everywhere
        raise TemplateProbeError("the chat template writes no header of its own before a user message")
    return header


def turn_end(tokenizer: Any) -> int | None:
    """The special token that ends an assistant turn (ChatML's ``<|im_end|>``, Llama 3's
    ``<|eot_id|>``), or None when the template ends it with plain text or cannot be probed:
    a model trained on chats learns to stop with it, and servers stop at it."""
    try:
        text, tokens = _probe(tokenizer)
    except TemplateProbeError:
        return None
    reply_end = text.index(_REPLY) + len(_REPLY)
    after = next((i for i, s, e in tokens if s >= reply_end and text[s:e].strip()), None)
    special = set(getattr(tokenizer, "all_special_ids", ())) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    return after if after in special else None


def describe(tokenizer: Any, ids: list[int]) -> str:
    """Token ids as text a person can read, e.g. '<|im_start|>user\\n' (ids 1, 85, 83, 71, 84, 94)."""
    try:
        shown = repr(tokenizer.decode(ids))[1:-1]
    except Exception:
        shown = "?"
    return f"'{shown}' (ids {', '.join(map(str, ids))})"
