"""modules_to_save: the classification head is trained in full beside any adapter, saved
with it in Hugging Face PEFT's layout, and read by PEFT (and from PEFT) with the same logits."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import randomize_adapters, tiny_bert_classifier, tiny_llama

import peftkit
from peftkit import AdapterConfig, LoraConfig, PrefixConfig, PromptConfig

pytest.importorskip("transformers")

METHODS = {
    "lora": lambda **kw: LoraConfig(r=4, **kw),
    "adapter": lambda **kw: AdapterConfig(bottleneck=8, **kw),
    "prefix": lambda **kw: PrefixConfig(num_virtual_tokens=3, **kw),
    "prompt": lambda **kw: PromptConfig(num_virtual_tokens=3, **kw),
}


def tiny_llama_classifier(seed: int = 0):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, num_labels=3, pad_token_id=0)
    return LlamaForSequenceClassification(config).eval()


def ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 128, (3, 9), generator=torch.Generator().manual_seed(seed))


def randomize_everything(pm: peftkit.PeftModel, seed: int = 1) -> None:
    """Random adapter weights (inside the model and in the prompt/prefix encoders) and a
    random trained head, so that a load that drops any of them shows in the logits."""
    randomize_adapters(pm, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for encoder in pm.input_adapters.values():
            for _, param in encoder.adapter_parameters():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("build,heads", [(tiny_bert_classifier, ["bert.pooler", "classifier"]),
                                         (tiny_llama_classifier, ["score"])])
def test_the_head_of_a_classifier_is_trained_by_default(method, build, heads):
    """The classifier (``classifier``/``score``), and BERT's pooler that feeds it, train in
    full on copies; the base model keeps its own."""
    model = build()
    originals = {path: model.get_submodule(path).state_dict() for path in heads}
    originals = {f"{path}.{k}": v.clone() for path, sd in originals.items() for k, v in sd.items()}
    pm = peftkit.attach(model, METHODS[method]())
    assert pm.configs["default"].modules_to_save == heads
    trained = {n for n in pm.trainable_parameters() if n.startswith(tuple(heads))}
    expected = {f"{path}.copies.default.{k.removeprefix(path + '.')}" for path in heads
                for k in originals if k.startswith(path + ".")}
    assert trained == expected
    optimizer = torch.optim.AdamW(pm.trainable_parameters().values(), lr=1e-2)
    x = ids()
    labels = torch.tensor([0, 1, 1])
    pm(input_ids=x, labels=labels).loss.backward()
    optimizer.step()
    for path in heads:
        wrapper = pm.base_model.get_submodule(path)
        for key, weight in wrapper.copies["default"].state_dict().items():
            assert not torch.equal(weight, originals[f"{path}.{key}"]), f"{path}.{key} did not train"
        for key, weight in wrapper.original.state_dict().items():  # the originals did not
            torch.testing.assert_close(weight, originals[f"{path}.{key}"], rtol=0, atol=0)
    with pm.disable_adapter():  # the base model's own head, untouched
        torch.testing.assert_close(pm(input_ids=x).logits, build()(input_ids=x).logits, rtol=0, atol=0)


def test_lora_on_all_linear_layers_leaves_the_trained_pooler_alone():
    """all-linear would pick the pooler's dense layer; it trains in full with the head, so
    LoRA skips it (a LoRA layer inside a full copy would leave its base weight trainable)."""
    pm = peftkit.attach(tiny_bert_classifier(), LoraConfig(r=4, target_modules="all-linear"))
    assert pm.configs["default"].modules_to_save == ["bert.pooler", "classifier"]
    assert not [p for p in pm.target_paths["default"] if p.startswith(("bert.pooler", "classifier"))]
    assert "bert.encoder.layer.0.attention.self.query" in pm.target_paths["default"]
    x = ids()
    pm(input_ids=x, labels=torch.tensor([0, 1, 1])).loss.backward()  # trains: no base weight requires grad


def test_no_head_for_a_language_model_and_an_empty_list_means_none():
    assert peftkit.attach(tiny_llama(), LoraConfig(r=4)).trained_copy_paths == {"default": []}
    pm = peftkit.attach(tiny_bert_classifier(), LoraConfig(r=4, modules_to_save=[]))
    assert not [n for n in pm.trainable_parameters() if "classifier" in n or "pooler" in n]


def test_an_unknown_module_name_is_an_error_that_names_the_heads():
    model = tiny_bert_classifier()
    with pytest.raises(ValueError, match=r"modules_to_save entry 'head'.*\['classifier'\]"):
        peftkit.attach(model, LoraConfig(r=4, modules_to_save=["head"]))
    assert not any(isinstance(m, peftkit.PeftModel) for m in model.modules())


def test_a_lora_target_cannot_also_be_trained_in_full():
    model = tiny_bert_classifier()
    expected = model(input_ids=ids()).logits
    with pytest.raises(ValueError, match=r"'classifier' names layers inside modules_to_save \['bert.pooler', 'classifier'\].*either adapted or trained in full"):
        peftkit.attach(model, LoraConfig(r=1, target_modules=["query", "classifier"]))
    # The refused attach left the model as it was.
    assert type(model.classifier) is torch.nn.Linear
    torch.testing.assert_close(model(input_ids=ids()).logits, expected, rtol=0, atol=0)


def test_merge_and_unload_keeps_the_trained_head_and_unload_gives_the_original():
    pm = peftkit.attach(tiny_bert_classifier(), LoraConfig(r=4))
    randomize_everything(pm)
    with torch.no_grad():
        expected = pm(input_ids=ids()).logits
        merged = pm.merge_and_unload()
        assert type(merged.classifier) is torch.nn.Linear
        assert type(merged.bert.pooler).__name__ == "BertPooler"
        torch.testing.assert_close(merged(input_ids=ids()).logits, expected, rtol=1e-5, atol=1e-5)
    pm = peftkit.attach(tiny_bert_classifier(), LoraConfig(r=4))
    randomize_everything(pm)
    with torch.no_grad():
        plain = pm.unload()
        torch.testing.assert_close(plain(input_ids=ids()).logits, tiny_bert_classifier()(input_ids=ids()).logits,
                                   rtol=0, atol=0)


@pytest.mark.parametrize("method", list(METHODS))
def test_save_and_load_round_trip_with_the_head(method, tmp_path):
    pm = peftkit.attach(tiny_bert_classifier(), METHODS[method]())
    randomize_everything(pm)
    with torch.no_grad():
        expected = pm(input_ids=ids()).logits
    pm.save(tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["bert.pooler", "classifier"]
    loaded = peftkit.load(tiny_bert_classifier(), tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids()).logits, expected, rtol=0, atol=0)


def _peft_config(peft, method: str):
    return {
        "lora": lambda: peft.LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"),
        "lora-llama": lambda: peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS"),
        "prompt": lambda: peft.PromptTuningConfig(num_virtual_tokens=3, task_type="SEQ_CLS"),
    }[method]()


# PEFT 0.21's SEQ_CLS prefix tuning cannot run under transformers 5: it looks for a
# ``past_key_values`` argument in the backbone's forward, which is now called ``cache``
# ("Model does not support past key values"), for BERT and Llama alike. The prefix with its
# head is covered by the peftkit round trip above.
PEFT_CASES = {"lora": tiny_bert_classifier, "prompt": tiny_bert_classifier, "lora-llama": tiny_llama_classifier}


@pytest.mark.parametrize("method", list(PEFT_CASES))
def test_peftkit_classifier_adapter_loads_in_hf_peft_with_the_same_logits(method, tmp_path):
    peft = pytest.importorskip("peft")
    build = PEFT_CASES[method]
    pm = peftkit.attach(build(), METHODS[method.split("-")[0]]())
    randomize_everything(pm)
    x = ids()
    with torch.no_grad():
        expected = pm(input_ids=x, attention_mask=torch.ones_like(x)).logits
    pm.save(tmp_path / "ours")
    hf = peft.PeftModel.from_pretrained(build(), tmp_path / "ours").eval()
    with torch.no_grad():
        got = hf(input_ids=x, attention_mask=torch.ones_like(x)).logits
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(got, build()(input_ids=x).logits, atol=1e-3)


@pytest.mark.parametrize("method", list(PEFT_CASES))
def test_hf_peft_classifier_adapter_loads_in_peftkit_with_the_same_logits(method, tmp_path):
    peft = pytest.importorskip("peft")
    build = PEFT_CASES[method]
    torch.manual_seed(3)
    hf = peft.get_peft_model(build(), _peft_config(peft, method))
    with torch.no_grad():  # a trained-looking adapter and head
        for name, param in hf.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.1)
    hf.eval()
    x = ids()
    with torch.no_grad():
        expected = hf(input_ids=x, attention_mask=torch.ones_like(x)).logits
    hf.save_pretrained(tmp_path / "hf")
    pm = peftkit.load(build(), tmp_path / "hf")
    assert pm.trained_copy_paths["default"] == ["classifier" if build is tiny_bert_classifier else "score"]
    with torch.no_grad():
        torch.testing.assert_close(pm(input_ids=x, attention_mask=torch.ones_like(x)).logits, expected,
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", list(METHODS))
def test_the_head_trains_at_its_own_rate_beside_any_method(method):
    """train() without lr: the adapter at its method's rate, the modules trained in full at
    1e-3 in a group of their own (a prompt's 3e-2 would throw the pretrained pooler around)."""
    from peftkit.train import train
    from peftkit.learning_rates import TRAINED_COPY_LEARNING_RATE, default_learning_rate

    pm = peftkit.attach(tiny_bert_classifier(), METHODS[method]())
    seen = []
    train(pm, [{"input_ids": ids(), "labels": torch.tensor([0, 1, 1])}], steps=1, progress=False,
          preflight=lambda model, optimizer, batch: seen.extend(optimizer.param_groups))
    by_kind = {group["kind"]: group for group in seen}
    # LoRA's own rate is split LoRA+ style into A and B groups (tests/test_train.py checks how).
    adapter_kinds = {"lora_A", "lora_B"} if method == "lora" else {"adapter"}
    assert set(by_kind) == adapter_kinds | {"modules_to_save"}
    rate = default_learning_rate(pm.configs["default"], pm)
    assert all(by_kind[kind]["base_lr"] == rate for kind in adapter_kinds)
    assert by_kind["modules_to_save"]["initial_lr"] == TRAINED_COPY_LEARNING_RATE == 1e-3
    copies = {id(p) for n, p in pm.trainable_parameters().items() if ".copies.default." in n}
    assert {id(p) for p in by_kind["modules_to_save"]["params"]} == copies
    assert not copies & {id(p) for kind in adapter_kinds for p in by_kind[kind]["params"]}
