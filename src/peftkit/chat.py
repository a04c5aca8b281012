"""Conversations: three line formats, rendered with the tokenizer's own chat template, with
the loss on the assistant's turns.

Line formats (one per file, detected like the others in ``data``):

- ``messages``: ``{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}``
- ``sharegpt``: ``{"conversations": [{"from": "system" | "human" | "user" | "gpt" | "assistant",
  "value": str}, ...]}`` (an optional top-level ``"system"`` string comes first)
- ``alpaca``: ``{"instruction": str, "input": str (optional), "output": str}`` (an optional
  ``"system"`` string); the user turn is the instruction, then a blank line and the input.

Each becomes a list of ``{"role", "content"}`` messages, rendered by
``tokenizer.apply_chat_template`` (never a template written here), so training sees exactly
the text a server that uses the same template builds.

Which tokens carry the loss (``train_on``):

- ``assistant`` (default): every assistant turn: its content and its end-of-turn token;
- ``last``: the last assistant turn only;
- ``all``: every token of the conversation.

The mask is exact for any template, with or without ``{% generation %}`` markers: turn k's
span in the text is ``[len(render(m[:k], add_generation_prompt=True)), len(render(m[:k+1])))``,
its end trimmed of the whitespace a template writes after the end-of-turn token (ChatML's
newline after ``<|im_end|>``, which a server never generates, since it stops at that token).
Both renderings must be prefixes of the whole conversation's rendering; a template that
rewrites earlier turns once later ones follow is refused with the fix rather than given
a wrong mask. The conversation is tokenized once, as a whole (special tokens come from
the template, so none are added), and a token is trained when its characters overlap a
trained span (``return_offsets_mapping``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .masks import IGNORE_INDEX as IGNORE

TRAIN_ON = ("assistant", "last", "all")  # --train-on: which tokens of a conversation the loss is on
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
# Line formats: required keys, then optional ones.
CHAT_FORMATS = {
    "messages": (("messages",), ()),
    "sharegpt": (("conversations",), ("system",)),
    "alpaca": (("instruction", "output"), ("input", "system")),
}


class ChatError(ValueError):
    """A conversation, or a tokenizer, that cannot be rendered and masked as it is."""


def _kind(value: Any) -> str:
    return ("null" if value is None else "a boolean" if isinstance(value, bool) else
            "a number" if isinstance(value, (int, float)) else "a string" if isinstance(value, str) else
            "an array" if isinstance(value, list) else "an object")


def _string(value: Any, what: str, where: str) -> str:
    if not isinstance(value, str):
        raise ChatError(f"{where}: {what} must be a string, got {_kind(value)}.")
    return value


def _turns(obj: dict, key: str, role_key: str, content_key: str, roles: dict[str, str], where: str) -> list[dict]:
    turns = obj[key]
    if not isinstance(turns, list) or not turns:
        raise ChatError(f'{where}: "{key}" must be a non-empty array of turns, got {_kind(turns)}'
                        + (" (empty)" if isinstance(turns, list) else "") + ".")
    messages = []
    for i, turn in enumerate(turns):
        at = f'"{key}"[{i}]'
        if not isinstance(turn, dict) or role_key not in turn or content_key not in turn:
            raise ChatError(f'{where}: {at} must be an object with "{role_key}" and "{content_key}".')
        role = turn[role_key]
        if role not in roles:
            raise ChatError(f'{where}: {at} has the {role_key} {role!r}; use one of {sorted(roles)}.')
        messages.append({"role": roles[role], "content": _string(turn[content_key], f'{at}["{content_key}"]', where)})
    return messages


def conversation(obj: dict, fmt: str, where: str) -> list[dict]:
    """The record ``obj`` of line format ``fmt`` as checked ``{"role", "content"}`` messages
    with at least one assistant turn; ``ChatError`` names the line, the turn and the fix."""
    if fmt == "messages":
        messages = _turns(obj, "messages", "role", "content", {r: r for r in ROLES}, where)
    elif fmt == "sharegpt":
        messages = _turns(obj, "conversations", "from", "value", SHAREGPT_ROLES, where)
        if "system" in obj:
            messages.insert(0, {"role": "system", "content": _string(obj["system"], '"system"', where)})
    elif fmt == "alpaca":
        instruction = _string(obj["instruction"], '"instruction"', where)
        extra = _string(obj.get("input", ""), '"input"', where)
        messages = [{"role": "user", "content": f"{instruction}\n\n{extra}" if extra else instruction},
                    {"role": "assistant", "content": _string(obj["output"], '"output"', where)}]
        if "system" in obj:
            messages.insert(0, {"role": "system", "content": _string(obj["system"], '"system"', where)})
    else:
        raise ValueError(f"{fmt!r} is not a conversation format; these are {sorted(CHAT_FORMATS)}.")
    if not any(m["role"] == "assistant" for m in messages):
        raise ChatError(f"{where}: the conversation has no assistant turn, so there is nothing to learn; "
                        "add the assistant's reply (role \"assistant\", ShareGPT \"gpt\").")
    return messages


def template_text(tokenizer: Any) -> str | None:
    """The tokenizer's chat template (the default one when it has several named ones), or None."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    return template if isinstance(template, str) and template.strip() else None


def renders_chats(tokenizer: Any) -> bool:
    """True when the tokenizer has a chat template and can apply it."""
    return template_text(tokenizer) is not None and callable(getattr(tokenizer, "apply_chat_template", None))


def chat_template(tokenizer: Any, source: str, where: str) -> str:
    """The tokenizer's chat template, or ``ChatError`` saying how to get one."""
    template = template_text(tokenizer)
    if template is None or not renders_chats(tokenizer):
        raise ChatError(f"{where}: conversations are rendered with the tokenizer's chat template, and the "
                        f"tokenizer of {source} has none. Use an instruct model (its tokenizer_config.json "
                        "or chat_template.jinja holds the template), add the template to the model folder, "
                        "or write the data as {\"prompt\", \"completion\"} lines.")
    return template


class ChatRenderer:
    """Renders conversations with ``tokenizer``'s chat template and masks the labels.

    ``render(messages, where)`` returns ``(input_ids, labels)``, lists of equal length
    (labels -100 outside the trained spans), not yet cut to any maximum length.
    """

    def __init__(self, tokenizer: Any, train_on: str = "assistant", *, source: str = "the model",
                 where: str = "the data") -> None:
        if train_on not in TRAIN_ON:
            raise ValueError(f"train_on must be one of {TRAIN_ON}, got {train_on!r}.")
        self.tokenizer, self.train_on = tokenizer, train_on
        self.template = chat_template(tokenizer, source, where)

    def _text(self, messages: Sequence[dict], where: str, generation_prompt: bool = False) -> str:
        try:
            text = self.tokenizer.apply_chat_template(list(messages), tokenize=False,
                                                      add_generation_prompt=generation_prompt)
        except Exception as e:  # a template's raise_exception (e.g. "roles must alternate") or a Jinja error
            raise ChatError(f"{where}: the chat template refused the conversation: {e}") from e
        if not isinstance(text, str):
            raise ChatError(f"{where}: the chat template rendered {type(text).__name__}, not text.")
        return text

    def _opening(self, where: str) -> str:
        """What the template writes before an assistant turn that opens the conversation (a
        BOS token, a default system prompt, the assistant's header): the generation prompt
        of no messages at all, which not every template can render."""
        try:
            return self._text([], where, generation_prompt=True)
        except ChatError:
            raise ChatError(f"{where}: the conversation opens with an assistant turn, and the chat template "
                            "cannot render what comes before it; begin with a user (or system) turn, or "
                            "leave that turn out.") from None

    def spans(self, messages: Sequence[dict], where: str) -> tuple[str, list[tuple[int, int]]]:
        """The whole rendered text and the character spans that carry the loss."""
        full = self._text(messages, where)
        if self.train_on == "all":
            return full, [(0, len(full))]
        turns = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
        if self.train_on == "last":
            turns = turns[-1:]
        spans = []
        for k in turns:
            before = self._opening(where) if k == 0 else self._text(messages[:k], where, generation_prompt=True)
            through = self._text(messages[:k + 1], where)
            if not (through.startswith(before) and full.startswith(through)):
                raise ChatError(
                    f"{where}: the chat template renders turn {k + 1} differently once later turns follow "
                    "(it rewrites earlier turns, as reasoning templates that drop old thinking do), so "
                    "the assistant's tokens cannot be found exactly. Use --train-on last, or split the "
                    "conversation into one example per assistant turn.")
            start, end = len(before), len(through)
            while end > start and through[end - 1].isspace():  # after the end-of-turn token
                end -= 1
            spans.append((start, end))
        return full, spans

    def render(self, messages: Sequence[dict], where: str) -> tuple[list[int], list[int]]:
        full, spans = self.spans(messages, where)
        try:
            encoded = self.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        except (NotImplementedError, ValueError, TypeError) as e:
            raise ChatError(f"{where}: the tokenizer cannot give character offsets ({e}); conversations "
                            "need a fast tokenizer (tokenizer.json).") from e
        ids = list(encoded["input_ids"])
        labels = [token if any(s < span_end and e > span_start for span_start, span_end in spans) else IGNORE
                  for token, (s, e) in zip(ids, encoded["offset_mapping"])]
        return ids, labels


def prompt_ids(tokenizer: Any, messages: Sequence[dict], template: str | None = None,
               source: str = "the model") -> list[int]:
    """Token ids of ``messages`` rendered for the assistant's reply (the generation prompt),
    by ``template`` (the one saved with an adapter) or else the tokenizer's own."""
    if template is None or tokenizer is None:
        chat_template(tokenizer, source, "--chat")
    try:
        text = tokenizer.apply_chat_template(list(messages), chat_template=template, tokenize=False,
                                             add_generation_prompt=True)
    except Exception as e:  # a template's raise_exception (e.g. no system role) or a Jinja error
        raise ChatError(f"--chat: the chat template refused the prompt: {e}") from e
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
