"""The Go template that ``peftkit export --ollama`` derives from a Jinja chat template renders
conversations as the Jinja template does (with the generation prompt), on real templates
(Llama 3's, Qwen2.5's) with in-process tokenizers; the Modelfile it goes into parses back
as Ollama's parser reads it.

Ollama cannot run here, so the checks are at the file level, with two stand-ins written
from Ollama's documented behaviour: ``parse_modelfile`` (its Modelfile grammar) and
``go_render`` (Go's text/template, for the subset the export writes). Where a Go toolchain
is installed, the real text/template renders the same conversations too.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest

from chat_templates import CONVERSATION, DROPS_THINKING_TEMPLATE, byte_tokenizer, llama3_tokenizer, qwen25_tokenizer
from peftkit.cli import main
from peftkit.doctor.templates import turn_end
from peftkit.ollama import OllamaError, OllamaTemplate, derive_go_template, modelfile_text

pytest.importorskip("transformers")


# -- Ollama's Modelfile grammar ------------------------------------------------------------
# From Ollama's Modelfile reference: `# comment` lines and `INSTRUCTION arguments`, instructions
# in any case; PARAMETER takes a name ([A-Za-z0-9_]+) then a value, MESSAGE a role then a value.
# A value runs to the end of its line, or, when it opens a quote ("..." or """..."""), to the end
# of the first line on which that quote is closed; the text around it is trimmed, the quotes
# removed, and characters other than printable ones, newline and tab are dropped.
INSTRUCTIONS = ("from", "adapter", "template", "parameter", "system", "message", "license", "renderer",
                "parser", "requires")


def _complete(value: str) -> bool:
    if value.startswith('"""'):
        return len(value) >= 6 and value.endswith('"""')
    if value.startswith('"'):
        return len(value) >= 2 and value.endswith('"')
    return True


def _unquote(value: str) -> str:
    if value.startswith('"""'):
        return value[3:-3]
    return value[1:-1] if value.startswith('"') else value


def parse_modelfile(text: str) -> list[tuple[str, str | None, str]]:
    """(instruction, name or role or None, value) for each instruction of a Modelfile."""
    commands, pos = [], 0
    while pos < len(text):
        if text[pos] in " \t\r\n":
            pos += 1
            continue
        if text[pos] == "#":
            pos = text.find("\n", pos) if "\n" in text[pos:] else len(text)
            continue
        word = re.compile(r"[A-Za-z]+[ \t]").match(text, pos)
        assert word and word.group()[:-1].lower() in INSTRUCTIONS, f"not an instruction: {text[pos:pos + 30]!r}"
        instruction, pos, key = word.group()[:-1].lower(), word.end(), None
        if instruction in ("parameter", "message"):
            named = re.compile(r"[ \t]*([A-Za-z0-9_]+)[ \t]").match(text, pos)
            assert named, f"{instruction} without a name: {text[pos:pos + 30]!r}"
            key, pos = named.group(1), named.end()
        value = ""
        while True:
            end = text.find("\n", pos)
            line = text[pos:] if end < 0 else text[pos:end]
            value += "".join(ch for ch in line if ch.isprintable() or ch == "\t")
            pos = len(text) if end < 0 else end + 1
            if _complete(value.strip()) or end < 0:
                break
            value += "\n"
        assert _complete(value.strip()), f"{instruction}: a quote is not closed"
        commands.append((instruction, key, _unquote(value.strip())))
    assert any(c[0] == "from" for c in commands), "no FROM line"
    return commands


# -- Go's text/template, the subset the export writes ------------------------------------------
_ACTION = re.compile(r'\{\{(-[ \t\n])?((?:"(?:\\.|[^"\\])*"|[^"}]|\}(?!\}))*?)([ \t\n]-)?\}\}')
_TOKEN = re.compile(r'"(?:\\.|[^"\\])*"|\S+')
_GO_ESCAPE = re.compile(r'\\(u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|.)')


def _go_string(literal: str) -> str:
    simple = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\"}
    return _GO_ESCAPE.sub(lambda m: simple.get(m.group(1)) or chr(int(m.group(1)[1:], 16)), literal[1:-1])


def _parse_go(template: str) -> list:
    """Nodes: str (text), ("print", arg), ("if", [(condition, nodes)], else_nodes), ("range", vars, nodes)."""
    pieces, at = [], 0
    for m in _ACTION.finditer(template):
        pieces += [template[at:m.start()], (bool(m.group(1)), m.group(2).strip(), bool(m.group(3)))]
        at = m.end()
    pieces.append(template[at:])
    for k in range(1, len(pieces), 2):  # trim markers: whitespace on that side of the action goes
        if pieces[k][0]:
            pieces[k - 1] = pieces[k - 1].rstrip(" \t\r\n")
        if pieces[k][2]:
            pieces[k + 1] = pieces[k + 1].lstrip(" \t\r\n")
    stack = [("root", [])]
    for k, piece in enumerate(pieces):
        if k % 2 == 0:
            stack[-1][1].append(piece)
            continue
        words = _TOKEN.findall(piece[1])
        if words[0] == "if":
            node = ("if", [(words[1:], [])], [])
            stack[-1][1].append(node)
            stack.append(("if", node[1][0][1], node))
        elif words[0] == "else":
            node = stack.pop()[2]
            if words[1:2] == ["if"]:
                node[1].append((words[2:], []))
                stack.append(("if", node[1][-1][1], node))
            else:
                stack.append(("else", node[2], node))
        elif words[0] == "range":
            node = ("range", [w.rstrip(",") for w in words[1:-2]] if ":=" in words else [], [])
            stack[-1][1].append(node)
            stack.append(("range", node[2], node))
        elif words[0] == "end":
            stack.pop()
        else:
            assert len(words) == 1, f"not in the subset: {piece[1]!r}"
            stack[-1][1].append(("print", words[0]))
    assert len(stack) == 1, "an {{ end }} is missing"
    return stack[0][1]


def _value(arg: str, dot: dict, names: dict):
    if arg.startswith('"'):
        return _go_string(arg)
    if arg.startswith("$"):
        return names[arg]
    if arg.startswith("."):
        return dot[arg[1:]]
    return int(arg)


def _true(words: list[str], dot: dict, names: dict) -> bool:
    if words[0] in ("eq", "ne"):
        a, b = (_value(w, dot, names) for w in words[1:])
        return (a == b) == (words[0] == "eq")
    assert len(words) == 1, f"not in the subset: {words}"
    return bool(_value(words[0], dot, names))


def _run(nodes: list, dot: dict, names: dict, out: list[str]) -> None:
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif node[0] == "print":
            out.append(str(_value(node[1], dot, names)))
        elif node[0] == "if":
            body = next((b for words, b in node[1] if _true(words, dot, names)), node[2])
            _run(body, dot, names, out)
        else:
            for i, item in enumerate(dot["Messages"]):
                scope = dict(names)
                if node[1]:
                    scope[node[1][0]] = i
                    scope[node[1][1]] = item
                _run(node[2], item, scope, out)


def ollama_values(messages: list[dict]) -> dict:
    """What Ollama hands a .Messages template: consecutive messages of one role merged (joined
    by a blank line), .System all system messages joined (Ollama's template.Execute)."""
    merged: list[dict] = []
    for m in messages:
        if merged and merged[-1]["Role"] == m["role"]:
            merged[-1]["Content"] += "\n\n" + m["content"]
        else:
            merged.append({"Role": m["role"], "Content": m["content"]})
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    return {"Messages": merged, "System": system, "Response": ""}


def go_render(template: str, messages: list[dict]) -> str:
    out: list[str] = []
    _run(_parse_go(template), ollama_values(messages), {}, out)
    return "".join(out)


def jinja(tokenizer, messages: list[dict], template: str | None = None) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)


def conversations() -> list[list[dict]]:
    """Alternating conversations, with and without a system turn, one with a late system turn."""
    no_system = CONVERSATION[1:]
    late = no_system[:2] + [{"role": "system", "content": "From now on, rhyme."}] + no_system[2:3]
    return [CONVERSATION[:2], CONVERSATION[:4], CONVERSATION[1:2], no_system[:3],
            CONVERSATION + [{"role": "user", "content": "Multi\nline, with {{ braces }} and \"quotes\"."}], late]


# -- the derived template renders as the Jinja one --------------------------------------------
TOKENIZERS = {"llama3": llama3_tokenizer, "qwen2.5": qwen25_tokenizer}


@pytest.mark.parametrize("family", sorted(TOKENIZERS))
def test_the_go_template_renders_conversations_as_the_jinja_template_does(family):
    tokenizer = TOKENIZERS[family]()
    derived = derive_go_template(tokenizer)
    for messages in conversations():
        assert go_render(derived.text, messages) == jinja(tokenizer, messages), messages


@pytest.mark.parametrize("family, end", [("llama3", "<|eot_id|>"), ("qwen2.5", "<|im_end|>")])
def test_stop_is_the_templates_end_of_turn_token(family, end):
    tokenizer = TOKENIZERS[family]()
    derived = derive_go_template(tokenizer)
    assert derived.stops == [tokenizer.decode([turn_end(tokenizer)])] == [end]


def test_a_default_system_prompt_comes_only_without_a_system_turn():
    tokenizer = qwen25_tokenizer()
    derived = derive_go_template(tokenizer)
    default = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    assert derived.default_system == default
    assert default in go_render(derived.text, CONVERSATION[1:2])
    assert default not in go_render(derived.text, CONVERSATION[:2])
    assert derive_go_template(llama3_tokenizer()).default_system is None


def test_llama3_trimming_the_messages_is_said():
    """Llama 3's template trims each message, which a Go template cannot: said, not hidden."""
    notes = derive_go_template(llama3_tokenizer()).notes
    assert any("trims" in note for note in notes), notes
    assert derive_go_template(qwen25_tokenizer()).notes == []


# -- templates that are not one piece per message --------------------------------------------
def test_a_template_that_rewrites_earlier_turns_is_refused_with_the_fix():
    with pytest.raises(OllamaError) as caught:
        derive_go_template(qwen25_tokenizer(), DROPS_THINKING_TEMPLATE)
    message = str(caught.value)
    assert "one piece per message" in message and "--ollama-template FILE" in message, message


# Mistral-style: the system prompt goes inside the first user turn.
SYSTEM_IN_FIRST_USER = (
    "{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}[INST] {% if loop.index0 == 1 and "
    "messages[0].role == 'system' %}{{ messages[0].content }}\n\n{% endif %}{{ m.content }} [/INST]"
    "{% elif m.role == 'assistant' %}{{ m.content }}</s>{% endif %}{% endfor %}")


def test_a_template_that_merges_the_system_prompt_into_the_first_user_turn_is_refused():
    tokenizer = byte_tokenizer(("<s>", "</s>"), bos="<s>", eos="</s>", template=SYSTEM_IN_FIRST_USER)
    with pytest.raises(OllamaError, match="--ollama-template FILE"):
        derive_go_template(tokenizer)


# Gemma's template: no system role (it raises), "model" for the assistant, each message trimmed.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + "
    "message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{'<start_of_turn>model\n'}}{% endif %}")


def test_a_template_without_a_system_role_leaves_system_messages_out_and_says_so():
    tokenizer = byte_tokenizer(("<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"), bos="<bos>", eos="<eos>",
                               template=GEMMA_TEMPLATE)
    derived = derive_go_template(tokenizer)
    assert 'eq .Role "system"' not in derived.text
    assert any("no system role" in note for note in derived.notes), derived.notes
    assert derived.stops == ["<end_of_turn>"]
    for messages in conversations()[2:4]:
        assert go_render(derived.text, messages) == jinja(tokenizer, messages)
    assert go_render(derived.text, CONVERSATION[:2]) == jinja(tokenizer, CONVERSATION[1:2])


# -- text that Go or the Modelfile would not carry as it is --------------------------------------
AWKWARD_TEMPLATE = (  # literal {{, triple quotes and a zero-width space in the template's own text
    "{% for m in messages %}{{ '{{' + m.role + '}} \"\"\"' + m.content + '\u200b\"\"\"\"\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '{{assistant}} \"\"' }}{% endif %}")


def test_braces_quotes_and_invisible_characters_in_the_template_survive_go_and_the_modelfile(tmp_path):
    tokenizer = byte_tokenizer(("<|end|>",), eos="<|end|>", template=AWKWARD_TEMPLATE)
    derived = derive_go_template(tokenizer)
    assert '"""' not in derived.text and "\u200b" not in derived.text
    for messages in conversations():
        assert go_render(derived.text, messages) == jinja(tokenizer, messages)
    text = modelfile_text(tmp_path / "a base" / "model.gguf", derived, "translated from a test template")
    commands = parse_modelfile(text)
    assert ("from", None, str(tmp_path / "a base" / "model.gguf")) in commands
    assert ("template", None, derived.text) in commands
    assert derived.stops == []  # plain text ends the turn: no special token to stop at


def test_a_value_the_modelfile_cannot_carry_is_refused(tmp_path):
    template = OllamaTemplate("{{ .Prompt }}", ['\n"""'])  # needs quotes, and holds the closing ones
    with pytest.raises(OllamaError, match="cannot be written"):
        modelfile_text(tmp_path / "base.gguf", template, "a test")
    with pytest.raises(OllamaError, match="cannot carry"):
        modelfile_text(tmp_path / "base.gguf", OllamaTemplate("{{ .Prompt }}\x00", []), "a test")


def test_the_modelfile_parser_follows_the_documented_grammar():
    """The stand-in parser itself, on the reference's own forms."""
    text = ('# comment\nfrom llama3.2\nPARAMETER temperature 1\nPARAMETER stop "<|eot_id|>"\n'
            'TEMPLATE """{{ if .System }}\n{{ .System }}\n{{ end }}"""\nSYSTEM You are Mario, an assistant.\n'
            'MESSAGE user Is Toronto in Canada?\nLICENSE """\nMIT\n"""\n')
    assert parse_modelfile(text) == [
        ("from", None, "llama3.2"), ("parameter", "temperature", "1"), ("parameter", "stop", "<|eot_id|>"),
        ("template", None, "{{ if .System }}\n{{ .System }}\n{{ end }}"),
        ("system", None, "You are Mario, an assistant."),
        ("message", "user", "Is Toronto in Canada?"), ("license", None, "\nMIT\n")]
    with pytest.raises(AssertionError, match="not closed"):
        parse_modelfile('FROM x\nTEMPLATE """open\n')


def test_the_cli_takes_one_destination_and_the_go_template_only_with_ollama(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["export", "--adapter", "a", "--gguf", "a.gguf", "--ollama", str(tmp_path / "o")])
    assert "not allowed with" in capsys.readouterr().err
    assert main(["export", "--adapter", "a", "--gguf", "a.gguf", "--ollama-template", "t.tmpl"]) == 2
    assert "--ollama-template goes with --ollama DIR" in capsys.readouterr().err


# -- the real text/template, where Go is installed -------------------------------------------
GO_PROGRAM = """package main

import ("encoding/json"; "os"; "strings"; "text/template")

type Message struct { Role string; Content string }

func main() {
	var input struct { Template string; Conversations [][]*Message }
	if err := json.NewDecoder(os.Stdin).Decode(&input); err != nil { panic(err) }
	tmpl := template.Must(template.New("").Option("missingkey=zero").Parse(input.Template))
	var out []string
	for _, messages := range input.Conversations {
		var b strings.Builder
		if err := tmpl.Execute(&b, map[string]any{"Messages": messages, "Response": ""}); err != nil { panic(err) }
		out = append(out, b.String())
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
"""


@pytest.mark.skipif(shutil.which("go") is None, reason="no Go toolchain: the stand-in renderer above checks alone")
@pytest.mark.parametrize("family", ["llama3", "qwen2.5", "awkward"])
def test_go_text_template_renders_the_derived_template_as_jinja_does(family, tmp_path):
    tokenizer = (byte_tokenizer(("<|end|>",), eos="<|end|>", template=AWKWARD_TEMPLATE) if family == "awkward"
                 else TOKENIZERS[family]())
    derived = derive_go_template(tokenizer)
    (tmp_path / "render.go").write_text(GO_PROGRAM)
    chats = conversations()
    payload = {"Template": derived.text, "Conversations": [ollama_values(c)["Messages"] for c in chats]}
    done = subprocess.run(["go", "run", "render.go"], cwd=tmp_path, input=json.dumps(payload), capture_output=True,
                          text=True, timeout=300, env={"PATH": os.environ["PATH"], "HOME": str(tmp_path),
                                                       "GOCACHE": str(tmp_path / "cache"), "GO111MODULE": "off"})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [jinja(tokenizer, c) for c in chats]
    assert [go_render(derived.text, c) for c in chats] == [jinja(tokenizer, c) for c in chats]
