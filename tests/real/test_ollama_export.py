"""``export --ollama`` on a real model: a LoRA adapter for SmolLM2-135M-Instruct becomes a
folder that ``ollama create -f DIR/Modelfile`` takes, checked at the file level (Ollama
cannot run here): the Modelfile parses with Ollama's grammar, FROM and ADAPTER name files
that exist (the base GGUF, the GGUF adapter), TEMPLATE renders conversations as SmolLM2's
own Jinja template does, default system prompt included, and the stop parameter is its
end-of-turn token. Bad input is refused with the fix and leaves nothing behind.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")

from chat_templates import CONVERSATION, DROPS_THINKING_TEMPLATE  # noqa: E402
from llama_cpp_models import Q4_GGUF, require_smollm2, save_prompt_adapter  # noqa: E402
from test_ollama_template import conversations, go_render, jinja, parse_modelfile  # noqa: E402
from peftkit.cli import main  # noqa: E402
from peftkit.doctor.templates import turn_end  # noqa: E402
from peftkit.export import export_gguf_lora  # noqa: E402
from peftkit.ollama import OllamaError, export_ollama  # noqa: E402

require_smollm2()
# SmolLM2 and the small all-linear adapter are conftest.py's session fixtures.
SMOLLM_DEFAULT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.fixture(scope="module")
def tokenizer(_smollm2_loaded):
    return _smollm2_loaded.tokenizer


@pytest.fixture(scope="module")
def lora_gguf(small_adapter, tmp_path_factory) -> Path:
    return export_gguf_lora(small_adapter, tmp_path_factory.mktemp("lora") / "lora.gguf", base=Q4_GGUF)


def read_export(folder: Path) -> dict:
    """The Modelfile's instructions, with FROM and ADAPTER resolved as Ollama resolves them
    (relative to the Modelfile's folder)."""
    commands = parse_modelfile((folder / "Modelfile").read_text(encoding="utf-8"))
    single = {name: [v for n, _, v in commands if n == name] for name in ("from", "adapter", "template")}
    assert all(len(values) == 1 for values in single.values()), commands
    return {"from": folder / single["from"][0], "from as written": single["from"][0],
            "adapter": folder / single["adapter"][0],
            "template": single["template"][0], "stops": [v for n, k, v in commands if n == "parameter" and k == "stop"]}


def test_the_folder_holds_a_modelfile_whose_files_exist_and_whose_template_is_smollm2s(
        small_adapter, lora_gguf, tokenizer, tmp_path):
    done = export_ollama(small_adapter, tmp_path / "ollama", base=Q4_GGUF, tokenizer=tokenizer)
    assert sorted(p.name for p in done.folder.iterdir()) == ["Modelfile", "adapter.gguf"]
    modelfile = read_export(done.folder)
    assert modelfile["from"] == Q4_GGUF and Path(modelfile["from as written"]).is_absolute()
    assert modelfile["adapter"] == done.folder / "adapter.gguf"
    reader = gguf.GGUFReader(modelfile["adapter"])
    assert reader.fields["general.type"].contents() == "adapter"
    assert modelfile["adapter"].read_bytes() == lora_gguf.read_bytes()  # export_gguf_lora's file
    # The stop is the template's end-of-turn token, as the doctor reads it.
    assert modelfile["stops"] == [tokenizer.decode([turn_end(tokenizer)])] == ["<|im_end|>"]
    # TEMPLATE renders as SmolLM2's Jinja template: without a system turn it writes the default one.
    for messages in conversations():
        assert go_render(modelfile["template"], messages) == jinja(tokenizer, messages), messages
    assert SMOLLM_DEFAULT in go_render(modelfile["template"], CONVERSATION[1:2])
    assert SMOLLM_DEFAULT not in go_render(modelfile["template"], CONVERSATION[:2])
    assert done.template.default_system == SMOLLM_DEFAULT
    assert "the chat template in SmolLM2-135M-Instruct.Q4_1.gguf" in done.template_source


def test_the_template_saved_with_the_adapter_wins_over_the_base_models(small_adapter, tokenizer, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(small_adapter, adapter)
    trained_with = tokenizer.chat_template.replace(SMOLLM_DEFAULT, "You are a film critic.")
    (adapter / "chat_template.jinja").write_text(trained_with, encoding="utf-8")
    done = export_ollama(adapter, tmp_path / "ollama", base=Q4_GGUF, tokenizer=tokenizer)
    template = read_export(done.folder)["template"]
    for messages in conversations():
        assert go_render(template, messages) == jinja(tokenizer, messages, trained_with)
    assert done.template.default_system == "You are a film critic."
    assert "adapter/chat_template.jinja" in done.template_source


def test_the_cli_prints_the_ollama_commands(small_adapter, tmp_path, capsys):
    """Through the CLI, with the base read from the adapter's record (the Q4_1 GGUF it was loaded
    from) and the tokenizer from that GGUF."""
    out = tmp_path / "My Adapter"
    assert main(["export", "--adapter", str(small_adapter), "--ollama", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"ollama create my-adapter -f {out / 'Modelfile'}" in printed
    assert "ollama run my-adapter" in printed
    assert f"FROM {Q4_GGUF}" in printed and "<|im_end|>" in printed and SMOLLM_DEFAULT in printed
    assert read_export(out)["from"] == Q4_GGUF
    # Again into the same folder: refused before any work, the export kept.
    before = (out / "Modelfile").read_bytes()
    assert main(["export", "--adapter", str(small_adapter), "--ollama", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err and (out / "Modelfile").read_bytes() == before


def test_a_gguf_adapter_is_copied_and_a_hand_written_template_used(lora_gguf, tokenizer, tmp_path):
    lora = lora_gguf
    hand = "{{ range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
    done = export_ollama(lora, tmp_path / "ollama", base=Q4_GGUF, go_template=hand, tokenizer=tokenizer)
    assert (done.folder / "adapter.gguf").read_bytes() == lora.read_bytes()
    modelfile = read_export(done.folder)
    assert modelfile["template"] == hand and modelfile["stops"] == ["<|im_end|>"]


def test_overwrite_replaces_the_export_and_keeps_other_files(small_adapter, tokenizer, tmp_path):
    out = tmp_path / "ollama"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "Modelfile").write_text("FROM old\n")
    export_ollama(small_adapter, out, base=Q4_GGUF, tokenizer=tokenizer, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine" and read_export(out)["from"] == Q4_GGUF
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "adapter.gguf", "notes.txt"]


# -- refusals: clear, and nothing written ------------------------------------------------
def _refused(call, out: Path, *fragments: str) -> None:
    before = sorted(out.parent.rglob("*"))
    with pytest.raises(OllamaError) as caught:
        call()
    for fragment in fragments:
        assert fragment in str(caught.value), str(caught.value)
    assert sorted(out.parent.rglob("*")) == before, "the failed export left files behind"


def test_a_transformers_folder_as_base_is_refused_with_how_to_get_a_gguf(small_adapter, smollm, tmp_path, capsys):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(smollm.config.to_dict()))
    out = tmp_path / "ollama"
    _refused(lambda: export_ollama(small_adapter, out, base=tmp_path / "hf"), out,
             "FROM a GGUF file", "convert_hf_to_gguf.py", "--model")
    assert main(["export", "--adapter", str(small_adapter), "--ollama", str(out), "--model", str(tmp_path / "hf")]) == 2
    assert "Ollama builds a model FROM a GGUF file" in capsys.readouterr().err and not out.exists()


def test_no_gguf_base_at_all_is_refused(small_adapter, lora_gguf, tmp_path):
    unrecorded = tmp_path / "adapter"
    shutil.copytree(small_adapter, unrecorded)
    config = unrecorded / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "base_model_name_or_path": "HuggingFaceTB/x"}))
    out = tmp_path / "ollama"
    _refused(lambda: export_ollama(unrecorded, out), out, "records no local GGUF base model", "--model")
    _refused(lambda: export_ollama(small_adapter, out, base=lora_gguf), out, "is a GGUF adapter, not a model")


def test_a_template_that_cannot_be_translated_leaves_nothing(small_adapter, tokenizer, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(small_adapter, adapter)
    (adapter / "chat_template.jinja").write_text(DROPS_THINKING_TEMPLATE, encoding="utf-8")
    out = tmp_path / "ollama"
    _refused(lambda: export_ollama(adapter, out, base=Q4_GGUF, tokenizer=tokenizer), out,
             "one piece per message", "--ollama-template FILE")


def test_an_adapter_llama_cpp_cannot_apply_leaves_nothing(smollm, tokenizer, tmp_path):
    save_prompt_adapter(smollm, tmp_path / "prompt")
    out = tmp_path / "ollama"
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(ValueError, match="only LoRA"):
        export_ollama(tmp_path / "prompt", out, base=Q4_GGUF, tokenizer=tokenizer)
    assert sorted(tmp_path.rglob("*")) == before
