"""Adapter files (M10): what a user relies on when saving, sharing and loading adapters.

Covers the peftkit round trip, moving adapters both ways between peftkit and Hugging Face
PEFT, what the file records about the base model, clear errors for every broken folder,
and the trainable flag (crash safety is tests/formats/test_atomic.py's).
Every model is a tiny seeded random-weight transformers model; LoRA weights are set to
random values before saving, so that no comparison is trivially equal (B = 0 at init).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from helpers import BUILDERS
from safetensors.torch import load_file, save_file
from torch import nn

import peftkit
from peftkit import AdapterFileError
from peftkit.methods.base import adapter_modules

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


# -- helpers ----------------------------------------------------------------------------
BUILDERS = {name: BUILDERS[name] for name in ("llama", "gpt2", "bert")}
llama, gpt2, bert = BUILDERS["llama"], BUILDERS["gpt2"], BUILDERS["bert"]


def input_ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def output(model: nn.Module) -> torch.Tensor:
    out = model(input_ids=input_ids())
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@torch.no_grad()
def randomize_peftkit(pm: peftkit.PeftModel, seed: int = 1) -> None:
    """Random values for every adapter tensor (A and B: an embedding's A starts at zero)."""
    generator = torch.Generator().manual_seed(seed)
    for _, module in adapter_modules(pm.base_model):
        for _, param in module.adapter_parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


@torch.no_grad()
def randomize_hf(model: nn.Module, seed: int = 1) -> None:
    """Same for a Hugging Face PEFT model (test helper: PEFT's own parameter names)."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if ".lora_" in name:
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def peftkit_adapted(builder, seed: int = 0, **config) -> tuple[peftkit.PeftModel, torch.Tensor]:
    """A peftkit LoRA model with random adapter weights, and the base model's output."""
    base = builder(seed)
    base_out = output(base)
    pm = peftkit.attach(base, peftkit.LoraConfig(**config))
    randomize_peftkit(pm)
    out = output(pm)
    assert not torch.allclose(out, base_out, atol=1e-4), "the adapter must change the output"
    return pm, base_out


def hf_wrapped_paths(hf_model) -> set[str]:
    from peft.tuners.lora import LoraLayer as HFLoraLayer

    inner = hf_model.base_model.model
    return {path for path, m in inner.named_modules() if isinstance(m, HFLoraLayer)}


def adapter_params(pm: peftkit.PeftModel) -> set[int]:
    return {id(p) for _, m in adapter_modules(pm.base_model) for _, p in m.adapter_parameters()}


def assert_untouched(model: nn.Module, expected: torch.Tensor) -> None:
    """After a refused load the user's model carries no adapter and computes as before."""
    assert not list(adapter_modules(model))
    torch.testing.assert_close(output(model), expected, rtol=0, atol=0)


pytestmark = pytest.mark.usefixtures("one_thread")  # the shared fixture in conftest.py


@pytest.fixture
def saved(tmp_path) -> tuple[Path, torch.Tensor]:
    """A valid peftkit adapter folder (Llama q,v) and the output of the model that saved it."""
    pm, _ = peftkit_adapted(llama, r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    directory = tmp_path / "adapter"
    pm.save(directory)
    return directory, output(pm)


# -- 1. peftkit save -> peftkit load --------------------------------------------------------
def test_round_trip_gives_identical_logits(tmp_path):
    base = llama()
    fresh = copy.deepcopy(base)
    pm = peftkit.attach(base, peftkit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    randomize_peftkit(pm)
    pm.save(tmp_path / "adapter")

    loaded = peftkit.load(fresh, tmp_path / "adapter")
    assert torch.equal(output(loaded), output(pm))
    assert loaded.target_paths["default"] == pm.target_paths["default"]
    config = loaded.configs["default"]
    assert (config.r, config.alpha, config.use_rslora) == (4, 8, False)


def test_folder_holds_only_adapter_files_and_keys(saved):
    directory, _ = saved
    assert sorted(p.name for p in directory.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]

    config = json.loads((directory / CONFIG_NAME).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["target_modules"] == ["q_proj", "v_proj"]

    tensors = load_file(directory / WEIGHTS_NAME)
    expected = {
        f"base_model.model.model.layers.{i}.self_attn.{proj}.{ab}.weight"
        for i in range(2) for proj in ("q_proj", "v_proj") for ab in ("lora_A", "lora_B")
    }
    assert set(tensors) == expected
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 64)
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].shape == (64, 4)
    assert tensors["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"].shape == (32, 4)
    assert all(torch.count_nonzero(t) > 0 for t in tensors.values())

    # M10: adapter weights only, so the file is a small fraction of the model.
    model_bytes = sum(p.numel() * p.element_size() for p in llama().parameters())
    adapter_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    file_bytes = (directory / WEIGHTS_NAME).stat().st_size
    assert file_bytes < adapter_bytes + 4096  # the tensors plus a small header, nothing else
    assert file_bytes < 0.05 * model_bytes


def test_load_adapter_beside_another(tmp_path, saved):
    directory, expected = saved
    pm = peftkit.attach(llama(), peftkit.LoraConfig(r=2, alpha=4, target_modules=["k_proj"]), name="other")
    pm.load_adapter(directory, name="loaded")
    assert sorted(pm.configs) == ["loaded", "other"]
    pm.set_adapter("loaded")
    torch.testing.assert_close(output(pm), expected, rtol=0, atol=0)


# -- 2. Hugging Face PEFT interop, both directions ------------------------------------------
INTEROP_CASES = {
    "llama-qv": (llama, dict(r=4, alpha=8, target_modules=["q_proj", "v_proj"])),
    "llama-all-linear-rslora": (llama, dict(r=4, alpha=8, target_modules="all-linear", use_rslora=True)),
    "llama-embedding": (llama, dict(r=4, alpha=8, target_modules=["embed_tokens", "q_proj"])),
    "gpt2-c_attn": (gpt2, dict(r=4, alpha=8, target_modules=["c_attn"])),
    "gpt2-attention-preset": (gpt2, dict(r=4, alpha=8, target_modules="attention")),
    "bert-query-value": (bert, dict(r=4, alpha=8, target_modules=["query", "value"])),
}


@pytest.mark.parametrize("case", sorted(INTEROP_CASES))
def test_peftkit_adapter_loads_in_hf_peft(tmp_path, case):
    builder, config = INTEROP_CASES[case]
    pm, _ = peftkit_adapted(builder, **config)
    pm.save(tmp_path / "adapter")

    hf = peft.PeftModel.from_pretrained(builder(0), tmp_path / "adapter").eval()
    assert hf_wrapped_paths(hf) == set(pm.target_paths["default"])
    torch.testing.assert_close(output(hf), output(pm), rtol=0, atol=1e-5)


def test_gpt2_attention_preset_saves_names_that_select_only_attention(tmp_path):
    pm, _ = peftkit_adapted(gpt2, r=4, alpha=8, target_modules="attention")
    pm.save(tmp_path / "adapter")
    saved_names = json.loads((tmp_path / "adapter" / CONFIG_NAME).read_text())["target_modules"]
    assert saved_names == ["attn.c_proj", "c_attn"]  # plain "c_proj" would also pick mlp.c_proj
    assert json.loads((tmp_path / "adapter" / CONFIG_NAME).read_text())["fan_in_fan_out"] is True

    hf = peft.PeftModel.from_pretrained(gpt2(0), tmp_path / "adapter")
    expected = {f"transformer.h.{i}.attn.{m}" for i in range(2) for m in ("c_attn", "c_proj")}
    assert set(pm.target_paths["default"]) == expected
    assert hf_wrapped_paths(hf) == expected


HF_CASES = {
    "llama-qv": (llama, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    "llama-all-linear": (llama, dict(r=4, lora_alpha=8, target_modules="all-linear")),
    "llama-embedding-rslora": (llama, dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"],
                                           use_rslora=True)),
    "gpt2-c_attn": (gpt2, dict(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True)),
    "bert-query-value": (bert, dict(r=4, lora_alpha=8, target_modules=["query", "value"])),
}


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_hf_peft_adapter_loads_in_peftkit(tmp_path, case):
    builder, config = HF_CASES[case]
    base = builder(0)
    base_out = output(base)
    hf = peft.get_peft_model(base, peft.LoraConfig(**config)).eval()
    randomize_hf(hf)
    hf_out = output(hf)
    assert not torch.allclose(hf_out, base_out, atol=1e-4)
    hf.save_pretrained(tmp_path / "adapter")  # PEFT's defaults, as a user would save

    pm = peftkit.load(builder(0), tmp_path / "adapter")
    assert set(pm.target_paths["default"]) == hf_wrapped_paths(hf)
    assert pm.configs["default"].use_rslora == config.get("use_rslora", False)
    torch.testing.assert_close(output(pm), hf_out, rtol=0, atol=1e-5)


def hf_embedding_adapter(directory: Path) -> torch.Tensor:
    """A PEFT adapter on embed_tokens + q_proj saved with PEFT's defaults; PEFT's output."""
    hf = peft.get_peft_model(llama(0), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]))
    randomize_hf(hf)
    with pytest.warns(UserWarning, match="save_embedding_layers"):
        hf.save_pretrained(directory)
    # PEFT stores the whole embedding table beside the adapter (save_embedding_layers="auto").
    assert "base_model.model.model.embed_tokens.base_layer.weight" in load_file(directory / WEIGHTS_NAME)
    return output(hf.eval())


def test_hf_saved_embedding_equal_to_base_loads_quietly(tmp_path, recwarn):
    hf_out = hf_embedding_adapter(tmp_path / "adapter")
    recwarn.clear()
    pm = peftkit.load(llama(0), tmp_path / "adapter")
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)], [str(w.message) for w in recwarn]
    torch.testing.assert_close(output(pm), hf_out, rtol=0, atol=1e-5)
    # The full table is not part of the adapter: saving again writes adapter keys only.
    pm.save(tmp_path / "again")
    assert not [k for k in load_file(tmp_path / "again" / WEIGHTS_NAME) if "base_layer" in k]


def test_hf_saved_embedding_that_differs_replaces_the_base_with_a_warning(tmp_path):
    hf_out = hf_embedding_adapter(tmp_path / "adapter")
    base = llama(0)
    with torch.no_grad():  # as after resizing the vocabulary: new rows, initialised anew
        base.model.embed_tokens.weight[100:].normal_()
    with pytest.warns(UserWarning, match="embed_tokens"):
        pm = peftkit.load(base, tmp_path / "adapter")
    torch.testing.assert_close(output(pm), hf_out, rtol=0, atol=1e-5)


# -- 3. what the file records, and saving over an existing folder ----------------------------
def test_an_adapter_records_the_folder_its_transformers_model_came_from(tmp_path):
    """As Hugging Face PEFT does (``base_model_name_or_path`` from the model's name_or_path),
    so that ``peftkit export`` finds the base model without --model."""
    from helpers import save_transformers_folder
    from transformers import LlamaForCausalLM

    save_transformers_folder(llama(), tmp_path / "base")
    config = dict(r=4, alpha=8, target_modules="all-linear")
    pm = peftkit.attach(LlamaForCausalLM.from_pretrained(tmp_path / "base"), peftkit.LoraConfig(**config))
    pm.save(tmp_path / "adapter")
    recorded = json.loads((tmp_path / "adapter" / CONFIG_NAME).read_text())["base_model_name_or_path"]
    hf = peft.get_peft_model(LlamaForCausalLM.from_pretrained(tmp_path / "base"),
                             peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    assert recorded == hf.peft_config["default"].base_model_name_or_path == str(tmp_path / "base")

    named = peftkit.attach(llama(), peftkit.LoraConfig(**config, base_model_name_or_path="my/base"))
    named.save(tmp_path / "named")  # a config that names its base keeps that name
    assert json.loads((tmp_path / "named" / CONFIG_NAME).read_text())["base_model_name_or_path"] == "my/base"

    pytest.importorskip("gguf")
    from peftkit.cli import main

    assert main(["export", "--adapter", str(tmp_path / "adapter"), "--gguf", str(tmp_path / "a.gguf")]) == 0
    assert (tmp_path / "a.gguf").is_file()


def test_saving_into_existing_folder_replaces_both_files_only(tmp_path, saved):
    directory, _ = saved
    (directory / "README.md").write_text("my notes")
    (directory / "training_args.json").write_text("{}")

    pm, _ = peftkit_adapted(llama, seed=0, r=2, alpha=2, target_modules=["k_proj"], use_rslora=True)
    pm.save(directory)

    assert (directory / "README.md").read_text() == "my notes"
    assert (directory / "training_args.json").read_text() == "{}"
    assert sorted(p.name for p in directory.iterdir()) == [
        "README.md", CONFIG_NAME, WEIGHTS_NAME, "training_args.json"]
    config = json.loads((directory / CONFIG_NAME).read_text())
    assert (config["r"], config["target_modules"], config["use_rslora"]) == (2, ["k_proj"], True)
    assert all(".k_proj." in k for k in load_file(directory / WEIGHTS_NAME))
    torch.testing.assert_close(output(peftkit.load(llama(), directory)), output(pm), rtol=0, atol=0)


def test_save_onto_a_file_is_refused(tmp_path):
    pm, _ = peftkit_adapted(llama, r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    target = tmp_path / "adapter"
    target.write_text("not a folder")
    with pytest.raises(AdapterFileError, match="not a folder"):
        pm.save(target)
    assert target.read_text() == "not a folder"


# -- 4. errors --------------------------------------------------------------------------------
def write_config(directory: Path, **changes) -> None:
    path = directory / CONFIG_NAME
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_missing_folder(tmp_path):
    model = llama()
    with pytest.raises(AdapterFileError, match="does not exist"):
        peftkit.load(model, tmp_path / "no-such-adapter")


def test_folder_without_config(tmp_path, saved):
    directory, _ = saved
    (directory / CONFIG_NAME).unlink()
    with pytest.raises(AdapterFileError, match=f"no {CONFIG_NAME}"):
        peftkit.load(llama(), directory)


def test_folder_without_weights(saved):
    directory, _ = saved
    (directory / WEIGHTS_NAME).unlink()
    model = llama()
    expected = output(model)
    with pytest.raises(AdapterFileError, match=f"no {WEIGHTS_NAME}"):
        peftkit.load(model, directory)
    assert_untouched(model, expected)


def test_invalid_json(saved):
    directory, _ = saved
    text = (directory / CONFIG_NAME).read_text()
    (directory / CONFIG_NAME).write_text(text[: len(text) // 2])
    with pytest.raises(AdapterFileError, match="not valid JSON"):
        peftkit.load(llama(), directory)


def test_unknown_peft_type(saved):
    directory, _ = saved
    write_config(directory, peft_type="IA3")
    with pytest.raises(AdapterFileError, match="peft_type 'IA3'"):
        peftkit.load(llama(), directory)


def test_unknown_config_field(saved):
    directory, _ = saved
    write_config(directory, lora_magic=3)
    with pytest.raises(AdapterFileError, match="unknown config field 'lora_magic'"):
        peftkit.load(llama(), directory)


def test_peft_feature_switched_on_is_refused(saved):
    directory, _ = saved
    write_config(directory, use_dora=True)
    with pytest.raises(AdapterFileError, match="use_dora=True"):
        peftkit.load(llama(), directory)
    write_config(directory, use_dora=False)  # switched off, the same field is fine
    peftkit.load(llama(), directory)


def test_truncated_safetensors(saved):
    directory, _ = saved
    path = directory / WEIGHTS_NAME
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    model = llama()
    expected = output(model)
    with pytest.raises(AdapterFileError, match="corrupt or truncated"):
        peftkit.load(model, directory)
    assert_untouched(model, expected)


def test_missing_keys(saved):
    directory, _ = saved
    tensors = load_file(directory / WEIGHTS_NAME)
    gone = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    del tensors[gone]
    save_file(tensors, directory / WEIGHTS_NAME)
    model = llama()
    expected = output(model)
    with pytest.raises(AdapterFileError, match="missing keys") as info:
        peftkit.load(model, directory)
    assert gone in str(info.value)
    assert_untouched(model, expected)


def test_unexpected_keys(saved):
    directory, _ = saved
    tensors = load_file(directory / WEIGHTS_NAME)
    extra = "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"
    tensors[extra] = torch.zeros(4, 64)
    save_file(tensors, directory / WEIGHTS_NAME)
    model = llama()
    expected = output(model)
    with pytest.raises(AdapterFileError, match="unexpected keys") as info:
        peftkit.load(model, directory)
    assert extra in str(info.value)
    assert_untouched(model, expected)


def test_wrong_shape_names_key_and_both_shapes(tmp_path):
    pm, _ = peftkit_adapted(llama, r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    pm.save(tmp_path / "adapter")
    smaller = llama(hidden_size=32)
    expected = output(smaller)
    with pytest.raises(AdapterFileError) as info:
        peftkit.load(smaller, tmp_path / "adapter")
    message = str(info.value)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in message
    assert "expected shape (4, 32), found (4, 64)" in message
    assert_untouched(smaller, expected)


def test_target_missing_from_model_is_a_clear_error(saved):
    directory, _ = saved
    with pytest.raises(AdapterFileError, match="q_proj"):
        peftkit.load(gpt2(), directory)


def test_legacy_bin_with_tensors_loads(saved):
    directory, expected = saved
    tensors = load_file(directory / WEIGHTS_NAME)
    (directory / WEIGHTS_NAME).unlink()
    torch.save(tensors, directory / "adapter_model.bin")
    torch.testing.assert_close(output(peftkit.load(llama(), directory)), expected, rtol=0, atol=0)


class _Payload:
    """Unpickling this object runs code: exactly what a loader must never do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('executed')",)


class _PlainObject:
    pass


@pytest.mark.parametrize("payload", ["code", "object"])
def test_legacy_bin_with_pickled_object_is_refused_unexecuted(saved, payload):
    directory, _ = saved
    marker = directory.parent / "marker.txt"
    tensors = load_file(directory / WEIGHTS_NAME)
    (directory / WEIGHTS_NAME).unlink()
    tensors["evil"] = _Payload(marker) if payload == "code" else _PlainObject()
    torch.save(tensors, directory / "adapter_model.bin")
    assert not marker.exists()

    model = llama()
    expected = output(model)
    with pytest.raises(AdapterFileError, match="refused") as info:
        peftkit.load(model, directory)
    assert "adapter_model.bin" in str(info.value)
    assert not marker.exists(), "the pickled payload was executed"
    assert_untouched(model, expected)


# -- 5. trainable flag --------------------------------------------------------------------------
def test_load_is_frozen_by_default(saved):
    directory, _ = saved
    pm = peftkit.load(llama(), directory)
    assert adapter_params(pm)
    assert not any(p.requires_grad for p in pm.parameters())
    pm = peftkit.load(llama(), directory, trainable=False)
    assert not any(p.requires_grad for p in pm.parameters())


def test_load_trainable_trains_adapter_only(saved):
    directory, _ = saved
    pm = peftkit.load(llama(), directory, trainable=True)
    adapters = adapter_params(pm)
    assert len(adapters) == 8  # A and B of q_proj and v_proj in two layers
    for p in pm.parameters():
        assert p.requires_grad == (id(p) in adapters)

    loss = pm(input_ids=input_ids()).logits.pow(2).mean()
    loss.backward()
    assert all(p.grad is not None for p in pm.parameters() if id(p) in adapters)
    assert all(p.grad is None for p in pm.parameters() if id(p) not in adapters)
