"""Export a LoRA adapter as an Ollama model folder: a ``Modelfile`` and the GGUF adapter.

    FROM /abs/path/base.gguf           the base model, where it already is (Ollama copies it
                                       into its own store at ``ollama create``; a copy here would
                                       be a second one of several GB)
    ADAPTER ./adapter.gguf             relative paths are read from the Modelfile's folder
    TEMPLATE <in triple quotes>        a Go text/template over .Messages (.Role, .Content)
    PARAMETER stop "<|im_end|>"        the chat template's end-of-turn token

Ollama's templates are Go templates and a chat template is Jinja, so the Jinja cannot be
copied: the Go template is derived from what the Jinja template renders. Probe conversations
with one marker word per message give, for each role, the text before and after a
message's content, the opening of the conversation (with and without a leading system
message, which covers a default system prompt such as SmolLM2's or Qwen's) and the
generation prompt. The Go template concatenates those pieces, and it is accepted only when
those pieces reproduce the Jinja rendering of every check conversation exactly; a template
that is not one piece per message (one that merges the system prompt into the first user
turn, or rewrites earlier turns) is refused, and ``go_template`` (``--ollama-template``)
takes a hand-written Go template instead.
"""

from __future__ import annotations

import copy
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .formats.atomic import write_folder

MODELFILE, ADAPTER_FILE = "Modelfile", "adapter.gguf"
ROLES = ("system", "user", "assistant")
_MARKS = ("Zqxjv", "Wvkpq", "Jxqzw", "Kvzqx", "Qxvjz", "Xjzvq")  # words no template writes itself
_CHECKS = (  # (roles, contents): conversations the derived template must render exactly
    (("user",), ("What is 2 + 2?",)),
    (("system", "user"), ("Be brief.", "Hi!\nWho are you?")),
    (("user", "assistant", "user"), ("Bonjour, ça va ?", "Oui. Et toi ?", "Tell me a {{ joke }}.")),
    (("system", "user", "assistant", "user"), ("Answer in French.", "Hello", "Bonjour.", "Thanks")),
    # a reasoning template drops an earlier turn's thinking (Qwen3's): not one piece per message
    (("user", "assistant", "user", "assistant", "user"), ("1", "<think>Add one.</think>2", "3 \"q\"", "4", "5")),
)
_LATER_SYSTEM = (("user", "assistant", "system", "user"), ("Hi", "Hello!", "Now answer in haiku.", "Rain?"))
_PADDED = (("user", "assistant", "user"), (" Hi there \n", "  Yes. ", "\tOk\n"))


class OllamaError(ValueError):
    """An export that cannot become an Ollama model folder; the message says how to fix it."""


@dataclass(frozen=True)
class OllamaTemplate:
    """A Go template for Ollama's TEMPLATE, its stop strings, and what a person should know."""

    text: str
    stops: list[str]
    default_system: str | None = None  # what the Jinja template writes when there is no system turn
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class OllamaExport:
    folder: Path
    base: Path
    template: OllamaTemplate
    template_source: str  # "translated from <the Jinja template>" or "written by hand"


# -- the Go template ----------------------------------------------------------------------
class _Refused(Exception):
    pass


def _go_string(text: str) -> str:
    """``text`` as a Go interpreted string literal."""
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch.isprintable():
            out.append(ch)
        else:
            out.append(f"\\u{ord(ch):04x}" if ord(ch) < 0x10000 else f"\\U{ord(ch):08x}")
    return '"' + "".join(out) + '"'


def _go_literal(text: str) -> str:
    """``text`` as template text that Go prints as it is and Ollama's Modelfile parser keeps.
    Go constants take the characters that would not survive: every ``{`` (raw, one could
    start an action with the next ``{``), the first quote of three in a row (they would end
    TEMPLATE), and what the Modelfile parser drops (all but printable characters, newline, tab)."""
    out = []
    for i, ch in enumerate(text):
        raw = ch != "{" and (ch.isprintable() or ch in "\n\t") and not text.startswith('"""', i)
        out.append(ch if raw else "{{ " + _go_string(ch) + " }}")
    return "".join(out)


@dataclass
class _Pieces:
    """render(messages) = opening(first role) + for each message: pre[role] + content + post[role],
    then the generation prompt."""

    open_system: str
    open_other: str
    pre: dict[str, str]
    post: dict[str, str]
    generation: str
    system_anywhere: bool

    def render(self, messages: list[dict]) -> str:
        if not messages:
            return self.generation
        opening = self.open_system if messages[0]["role"] == "system" else self.open_other
        turns = (self.pre[m["role"]] + m["content"] + self.post[m["role"]] for m in messages if m["role"] in self.pre)
        return opening + "".join(turns) + self.generation

    def go(self) -> str:
        """The same as a Go template: Ollama hands it the conversation as .Messages."""
        lit = _go_literal
        branches = [f'eq .Role "{role}" }}}}' + lit(self.pre[role]) + "{{ .Content }}" + lit(self.post[role])
                    for role in ROLES if role in self.pre]
        body = "{{ if " + "{{ else if ".join(branches) + "{{ end }}"
        if self.open_system == self.open_other:
            return lit(self.open_other) + "{{ range .Messages }}" + body + "{{ end }}" + lit(self.generation)
        opening = ('{{ if eq $i 0 }}{{ if ne .Role "system" }}' + lit(self.open_other)
                   + ("{{ else }}" + lit(self.open_system) if self.open_system else "") + "{{ end }}{{ end }}")
        return "{{ range $i, $_ := .Messages }}" + opening + body + "{{ end }}" + lit(self.generation)


def _cut_prefix(text: str, prefix: str, what: str) -> str:
    if not text.startswith(prefix):
        raise _Refused(f"{what} does not follow the end of the turn before it")
    return text[len(prefix):]


def _cut_suffix(text: str, suffix: str, what: str) -> str:
    if not text.endswith(suffix):
        raise _Refused(f"{what} does not end with the header a later one has")
    return text[:len(text) - len(suffix)]


def _derive(render: Callable[[list[dict], bool], str]) -> _Pieces:
    """The pieces, from marker conversations rendered with ``render(messages, generation_prompt)``."""
    def gaps(roles: tuple[str, ...], generation: bool = False) -> tuple[list[str], str]:
        marks = _MARKS[:len(roles)]
        try:
            text = render([{"role": r, "content": c} for r, c in zip(roles, marks)], generation)
        except Exception as e:  # a template's raise_exception or a Jinja error
            raise _Refused(f"it refused a {'/'.join(roles)} conversation ({e})") from e
        if any(text.count(mark) != 1 for mark in marks):
            raise _Refused("it does not show each message's content once, as given")
        cuts = [text.index(mark) for mark in marks]
        if cuts != sorted(cuts):
            raise _Refused("it does not keep the messages in order")
        ends = [0] + [c + len(m) for c, m in zip(cuts, marks)]
        return [text[start:cut] for start, cut in zip(ends, cuts + [len(text)])], text

    user, plain = gaps(("user",))
    _, prompted = gaps(("user",), True)
    if not prompted.startswith(plain):
        raise _Refused("the generation prompt changes the text before it")
    post = {"user": user[1]}
    user_assistant, _ = gaps(("user", "assistant"))
    pre = {"assistant": _cut_prefix(user_assistant[1], post["user"], "the assistant turn")}
    post["assistant"] = user_assistant[2]
    pre["user"] = _cut_prefix(gaps(("user", "assistant", "user"))[0][2], post["assistant"], "a later user turn")
    open_other = _cut_suffix(user[0], pre["user"], "the first user turn")
    pieces = _Pieces(open_other, open_other, pre, post, prompted[len(plain):], False)
    try:
        system_user, _ = gaps(("system", "user"))
    except _Refused:
        return pieces  # no system role (Gemma's templates refuse one)
    post["system"] = _cut_suffix(system_user[1], pre["user"], "the system turn")
    try:
        later = gaps(("user", "assistant", "system", "user"))[0]
        pre["system"] = _cut_prefix(later[2], post["assistant"], "a later system turn")
        if _cut_prefix(later[3], post["system"], "the user turn after a later system turn") != pre["user"]:
            raise _Refused("a later system turn renders differently")
        pieces.open_system = _cut_suffix(system_user[0], pre["system"], "the first system turn")
        pieces.system_anywhere = True
    except _Refused:  # the template takes a system message first only
        pre["system"], pieces.open_system = system_user[0], ""
    return pieces


def _mismatch(expected: str, got: str) -> str:
    at = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), min(len(expected), len(got)))
    return f"from character {at}: Jinja {expected[at:at + 40]!r}, per-message pieces {got[at:at + 40]!r}"


def _end_of_turn(tokenizer: Any, template: str) -> str | None:
    from .doctor.templates import turn_end

    probe = copy.copy(tokenizer)  # turn_end reads the tokenizer's own template; the original keeps its
    probe.chat_template = template
    token = turn_end(probe)
    return None if token is None else tokenizer.decode([token])


def derive_go_template(tokenizer: Any, template: str | None = None) -> OllamaTemplate:
    """The Go template for Ollama that renders conversations as ``template`` (Jinja; default:
    the tokenizer's own) does with the generation prompt, and its stop strings. ``OllamaError``
    when the Jinja template is not one piece per message."""
    from .chat import template_text

    template = template if template is not None else template_text(tokenizer)
    if template is None:
        raise OllamaError("the model has no chat template to translate; pass --ollama-template FILE with a "
                          "hand-written Go template.")

    def render(messages: list[dict], generation: bool) -> str:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=generation)

    fix = ("Write the Go template by hand (Ollama's template docs; a model of the same family in Ollama's "
           "library has one) and pass it as --ollama-template FILE.")
    checks = _CHECKS
    try:
        pieces = _derive(render)
        if pieces.system_anywhere:
            checks += (_LATER_SYSTEM,)
        if "system" not in pieces.pre:
            checks = tuple(c for c in checks if "system" not in c[0])
        for roles, contents in checks:
            messages = [{"role": r, "content": c} for r, c in zip(roles, contents)]
            expected, got = render(messages, True), pieces.render(messages)
            if expected != got:
                raise _Refused(f"a {'/'.join(roles)} conversation does not render as one piece per message "
                               f"({_mismatch(expected, got)})")
    except _Refused as e:
        raise OllamaError(f"the chat template cannot be translated into an Ollama (Go) template: {e}. {fix}") from None

    notes = []
    roles, contents = _PADDED
    padded = [{"role": r, "content": c} for r, c in zip(roles, contents)]
    if render(padded, True) != pieces.render(padded):
        notes.append("the chat template changes whitespace at the start or end of a message (Llama 3's trims it); "
                     "Ollama's template passes messages as sent, so the two agree on messages without such whitespace")
    if "system" not in pieces.pre:
        notes.append("the chat template has no system role: Ollama's system messages are left out")
    elif not pieces.system_anywhere:
        notes.append("the chat template takes a system message only as the first turn; a later one is written "
                     "like the first")
    if "strftime_now" in template:
        notes.append("the chat template writes today's date; the Ollama template has the date of this export")
    if "tools" in template:
        notes.append("tool calls are not translated (only system, user and assistant messages)")
    default = None
    if "system" in pieces.pre:
        head, tail, other = pieces.open_system + pieces.pre["system"], pieces.post["system"], pieces.open_other
        if other != pieces.open_system and len(other) >= len(head + tail) and other.startswith(head) \
                and other.endswith(tail):
            default = other[len(head):len(other) - len(tail)]
    stop = _end_of_turn(tokenizer, template)
    if stop is None:
        notes.append("no end-of-turn token found; Ollama stops at the model's end-of-sequence token")
    return OllamaTemplate(pieces.go(), [stop] if stop else [], default, notes)


# -- the Modelfile --------------------------------------------------------------------------
def _value(text: str, what: str) -> str:
    """``text`` as a Modelfile argument: as it is when Ollama's parser reads it back unchanged
    (one line, no surrounding spaces, no quote first), else in triple quotes."""
    dropped = sorted({repr(ch) for ch in text if not (ch.isprintable() or ch in "\n\t")})
    if dropped:
        raise OllamaError(f"{what} holds characters a Modelfile cannot carry ({', '.join(dropped)}).")
    if text and "\n" not in text and text == text.strip() and not text.startswith('"'):
        return text
    if '"""' in text:
        raise OllamaError(f'{what} holds """, which ends a Modelfile value; it cannot be written.')
    return f'"""{text}"""'


def modelfile_text(base: Path, template: OllamaTemplate, source: str) -> str:
    lines = [f"# Written by peftkit export --ollama; TEMPLATE {source}.",
             f"FROM {_value(str(base), 'the base model path')}",
             f"ADAPTER ./{ADAPTER_FILE}",
             f"TEMPLATE {_value(template.text, 'the template')}"]
    lines += [f"PARAMETER stop {_value(stop, 'the stop string')}" for stop in template.stops]
    return "\n".join(lines) + "\n"


# -- the export -----------------------------------------------------------------------------
def _gguf_header(path: Path, what: str):
    from .formats.gguf import GgufError, read_header

    try:
        return read_header(path)
    except GgufError as e:
        raise OllamaError(f"{what}: {e}") from e


_HOW_TO_GGUF = ("Ollama builds a model FROM a GGUF file: pass the base model's .gguf as --model (the file the "
                "model is published as, or one made with llama.cpp's convert_hf_to_gguf.py FOLDER --outfile "
                "base.gguf).")


def _base(base: str | Path | None, adapter: Path) -> tuple[Path, Any]:
    if base is None:
        from .formats.adapter_folder import read_config_data

        recorded = read_config_data(adapter)[0].get("base_model_name_or_path") if adapter.is_dir() else None
        if not (isinstance(recorded, str) and recorded.endswith(".gguf") and Path(recorded).is_file()):
            raise OllamaError(f"the adapter records no local GGUF base model (base_model_name_or_path="
                              f"{recorded!r}). {_HOW_TO_GGUF}")
        base = recorded
    base = Path(base).absolute()
    if base.is_dir():
        raise OllamaError(f"{base} is a folder (a transformers model?). {_HOW_TO_GGUF}")
    if not base.is_file():
        raise OllamaError(f"base model {base} does not exist. {_HOW_TO_GGUF}")
    header = _gguf_header(base, "the base model")
    if header.metadata.get("general.type") == "adapter":
        raise OllamaError(f"{base} is a GGUF adapter, not a model. {_HOW_TO_GGUF}")
    return base, header


def _gguf_tokenizer(path: Path) -> Any:
    try:
        import transformers
    except ImportError as e:
        raise OllamaError("translating the chat template needs transformers: pip install 'peftkit[gguf]'.") from e
    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)


def export_ollama(adapter: str | Path, out_dir: str | Path, *, base: str | Path | None = None,
                  go_template: str | None = None, dtype: str = "float32", overwrite: bool = False,
                  tokenizer: Any = None) -> OllamaExport:
    """Write ``out_dir`` (``Modelfile`` + ``adapter.gguf``) for ``ollama create -f out_dir/Modelfile``.

    Args:
        adapter: a LoRA adapter folder (exported with ``export_gguf_lora``) or a GGUF LoRA file.
        base: the base model's .gguf file; default: the adapter's recorded base model if it is one.
        go_template: a hand-written Go template for TEMPLATE; default: derived from the chat
            template saved with the adapter, else the one in the base GGUF.
        overwrite: replace the files of an existing non-empty ``out_dir`` (others are kept).
        tokenizer: the base model's tokenizer when it is loaded already (default: read from the
            base GGUF), for the chat template's special tokens.

    Nothing is written unless everything succeeds; the folder appears (or changes) as a whole.
    """
    from .export import export_gguf_lora
    from .formats.adapter_folder import read_chat_template

    adapter, out_dir = Path(adapter), Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OllamaError(f"{out_dir} is a file; --ollama takes a folder to write.")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise OllamaError(f"{out_dir} is not empty; pass overwrite=True (--overwrite) to replace the export in it.")
    if not adapter.exists():
        raise OllamaError(f"adapter {adapter} does not exist.")
    base_path, base_header = _base(base, adapter)
    if adapter.is_file():
        header = _gguf_header(adapter, "the adapter")
        if header.metadata.get("general.type") != "adapter":
            raise OllamaError(f"{adapter} is a GGUF model, not a LoRA adapter; pass the adapter folder or its .gguf.")
        if header.architecture != base_header.architecture:
            raise OllamaError(f"{adapter} is for {header.architecture!r} models and {base_path} is a "
                              f"{base_header.architecture!r} model; was the adapter trained on another model?")
    jinja = read_chat_template(adapter) if adapter.is_dir() else None
    source = f"translated from {adapter.name}/chat_template.jinja"
    if jinja is None:
        jinja = base_header.metadata.get("tokenizer.chat_template")
        source = f"translated from the chat template in {base_path.name}"
    if jinja is not None and tokenizer is None:
        tokenizer = _gguf_tokenizer(base_path)
    if go_template is not None:
        stop = _end_of_turn(tokenizer, jinja) if jinja else None
        template, source = OllamaTemplate(go_template, [stop] if stop else []), "written by hand"
    elif jinja is None:
        raise OllamaError(f"neither the adapter nor {base_path.name} holds a chat template; pass --ollama-template "
                          "FILE with a hand-written Go template.")
    else:
        template = derive_go_template(tokenizer, jinja)
    modelfile = modelfile_text(base_path, template, source)
    with tempfile.TemporaryDirectory() as tmp:
        gguf = adapter if adapter.is_file() else export_gguf_lora(adapter, Path(tmp) / ADAPTER_FILE, base=base_path,
                                                                  dtype=dtype)
        write_folder(out_dir, {MODELFILE: modelfile.encode("utf-8"), ADAPTER_FILE: gguf.read_bytes()})
    return OllamaExport(out_dir, base_path, template, source)


def model_name(folder: Path) -> str:
    """A name for ``ollama create``: the folder's name in the characters Ollama takes."""
    return re.sub(r"[^a-z0-9._-]+", "-", folder.absolute().name.lower()).strip("-._") or "peftkit-adapter"
