"""Item by item on real checkpoints: MiniLM (a transformers folder, classification) and
SmolLM2 (a Q4_1 GGUF file, Llama with grouped-query attention, generation). Each loads,
attaches with its architecture's default targets, is the identity at init, trains a few
steps on real reviews with the loss going down, saves, reloads in peftkit and in Hugging
Face PEFT with the same logits, and merges with equal outputs."""

from __future__ import annotations

import copy

import pytest
import torch

import peftkit
from peftkit import LoraConfig, PrefixConfig
from peftkit.data import build_dataset, collate
from peftkit.loading import load_model
from peftkit.methods.base import AdapterModule
from peftkit.learning_rates import default_learning_rate

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def train_steps(pm, batch: dict, steps: int) -> list[float]:
    """``steps`` AdamW steps on one batch at the method's default rate, dropout off (so the
    loss may only go down because the adapter learned); returns the losses."""
    optimizer = torch.optim.AdamW([p for _, ps in pm.parameter_groups() for _, p in ps],
                                  lr=default_learning_rate(pm.configs[pm.active_adapter], pm))
    losses = []
    for _ in range(steps):
        loss = pm(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def logits(model, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def check_file_round_trips(pm, fresh, batch: dict, folder) -> None:
    """Saved and reloaded in peftkit: bit-equal logits. In Hugging Face PEFT: the same function,
    judged against the float64 logits of the same base and adapter: PEFT's float32 logits are as
    close to them as peftkit's (both round differently in float32: peftkit folds s B A into the
    weight of each product, PEFT adds it after), and a misread tensor would be far off."""
    expected = logits(pm, batch)
    pm.save(folder)
    torch.testing.assert_close(logits(peftkit.load(fresh(), folder), batch), expected, rtol=0, atol=0)
    hf = logits(peft.PeftModel.from_pretrained(fresh(), folder).eval(), batch)
    exact = logits(peftkit.load(fresh().double(), folder), batch)
    ours, theirs = ((t.double() - exact).abs().max().item() for t in (expected, hf))
    assert ours <= 1e-4 * exact.abs().max().item(), ours
    assert theirs <= 2 * ours + 1e-5, (theirs, ours)


# -- MiniLM: a transformers folder, sentiment classification ----------------------------
@pytest.fixture(scope="module")
def minilm(minilm_folder):
    return load_model(minilm_folder, task="classification", num_labels=2)


@pytest.fixture(scope="module")
def review_batch(minilm, reviews):
    train, _ = reviews
    dataset = build_dataset("classification", [{"text": r["text"], "label": r["label"]} for r in train[:16]],
                            minilm.encode, eos_id=None, max_length=64, classes=["negative", "positive"])
    return collate(dataset.examples, minilm.pad_id)


def test_minilm_loads_from_its_folder_with_its_tokenizer(minilm):
    model = minilm.model
    assert type(model).__name__ == "BertForSequenceClassification"
    assert sum(p.numel() for p in model.bert.parameters()) == 22_713_216  # all-MiniLM-L6-v2
    ids = minilm.encode("A great film.")
    assert ids[0] == minilm.tokenizer.cls_token_id and ids[-1] == minilm.tokenizer.sep_token_id
    assert minilm.decode(ids) == "a great film."  # an uncased vocabulary


def test_minilm_lora_end_to_end(minilm, review_batch, tmp_path):
    fresh = lambda: copy.deepcopy(minilm.model)  # noqa: E731
    base = logits(minilm.model, review_batch)
    pm = peftkit.attach(fresh(), LoraConfig())
    assert sorted({p.split(".")[-1] for p in pm.target_paths["default"]}) == ["query", "value"]
    # The new head, and the pooler that feeds it, train in full.
    assert pm.trained_copy_paths["default"] == ["bert.pooler", "classifier"]
    torch.testing.assert_close(logits(pm, review_batch), base, rtol=0, atol=0)  # identity at init

    losses = train_steps(pm, review_batch, steps=8)
    assert losses[-1] < losses[0] - 0.01, losses
    check_file_round_trips(pm, fresh, review_batch, tmp_path / "adapter")

    unmerged = logits(pm, review_batch)
    merged = pm.merge_and_unload()
    assert not any(isinstance(m, AdapterModule) for m in merged.modules())
    torch.testing.assert_close(logits(merged, review_batch), unmerged, rtol=1e-5, atol=1e-5)


# -- SmolLM2: a GGUF file, generation ------------------------------------------------------
@pytest.fixture
def completion_batch(smollm2, reviews):
    from bench import rotten_tomatoes

    train, _ = reviews
    records = rotten_tomatoes.completion_records(train[:4], smollm2.tokenizer)
    dataset = build_dataset("completion", records, smollm2.encode, eos_id=smollm2.eos_id, max_length=96)
    return collate(dataset.examples, smollm2.pad_id)


def test_smollm2_loads_from_its_gguf_file(smollm2, smollm2_gguf):
    model = smollm2.model
    # Named by its file, as an adapter trained on it records it (no "other base model" warning).
    assert model.config.name_or_path == str(smollm2_gguf)
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (9, 3)
    assert model.config.num_hidden_layers == 30
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    text = "The film is a delight."
    assert smollm2.decode(smollm2.encode(text)).strip() == text
    assert smollm2.tokenizer.chat_template  # the instruct model's template came with the file


def test_smollm2_lora_end_to_end(smollm2, _smollm2_loaded, completion_batch, tmp_path):
    fresh = lambda: copy.deepcopy(_smollm2_loaded.model)  # noqa: E731
    base = logits(smollm2.model, completion_batch)
    pm = peftkit.attach(smollm2.model, LoraConfig())
    assert sorted({p.split(".")[-1] for p in pm.target_paths["default"]}) == ["q_proj", "v_proj"]
    torch.testing.assert_close(logits(pm, completion_batch), base, rtol=0, atol=0)

    losses = train_steps(pm, completion_batch, steps=6)
    assert losses[-1] < losses[0] - 0.05, losses
    check_file_round_trips(pm, fresh, completion_batch, tmp_path / "adapter")

    unmerged = logits(pm, completion_batch)
    merged = pm.merge_and_unload()
    torch.testing.assert_close(logits(merged, completion_batch), unmerged, rtol=1e-4, atol=1e-3)  # logits reach ~30


def test_smollm2_prefix_follows_its_grouped_query_attention(smollm2, _smollm2_loaded, completion_batch,
                                                            tmp_path):
    """A prefix holds keys and values for the 3 key/value heads, not the 9 query heads; PEFT
    reads the file with the same geometry and gives the same logits."""
    pm = peftkit.attach(smollm2.model, PrefixConfig(num_virtual_tokens=4))
    encoder = pm.input_adapters["prefix"]
    assert (encoder.num_layers, encoder.num_kv_heads, encoder.kv_dim) == (30, 3, 3 * 64)
    with torch.no_grad():
        for _, param in encoder.adapter_parameters():
            param.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    length = int(completion_batch["attention_mask"][0].sum())  # PEFT numbers padded rows by column
    batch = {k: v[:1, :length] for k, v in completion_batch.items()}
    check_file_round_trips(pm, lambda: copy.deepcopy(_smollm2_loaded.model), batch, tmp_path / "prefix")


def test_gguf_model_merges_into_a_folder_that_generates_the_same_tokens(smollm2, completion_batch, tmp_path,
                                                                        smollm2_gguf):
    """``peftkit merge`` on the GGUF: a safetensors transformers folder that from_pretrained
    loads and that generates the same greedy tokens as the unmerged adapter."""
    from peftkit.cli import main

    pm = peftkit.attach(smollm2.model, LoraConfig(target_modules="all-linear"))
    train_steps(pm, completion_batch, steps=4)
    pm.save(tmp_path / "adapter")
    prompt = completion_batch["input_ids"][:1, : int((completion_batch["labels"][0] == -100).sum())]
    with torch.no_grad():
        unmerged = pm.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False)

    assert main(["merge", "--model", str(smollm2_gguf), "--adapter", str(tmp_path / "adapter"),
                 "--out", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", local_files_only=True).eval()
    with torch.no_grad():
        again = merged.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False)
    assert again.tolist() == unmerged.tolist()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "merged", local_files_only=True)
    assert tokenizer.decode(again[0]) == smollm2.tokenizer.decode(unmerged[0])


def test_info_and_compare_read_a_gguf_header(smollm2_gguf, minilm_folder, capsys):
    from peftkit.cli import main

    assert main(["info", str(smollm2_gguf)]) == 0
    out = capsys.readouterr().out
    assert "9 query, 3 key/value" in out and "134,515,008" in out and "210 x Q4_1" in out
    assert main(["info", str(minilm_folder)]) == 0
    assert "BertModel (bert)" in capsys.readouterr().out
    assert main(["compare", "--model", str(smollm2_gguf)]) == 0
    out = capsys.readouterr().out
    # LoRA r=8 on q_proj (576 -> 576) and v_proj (576 -> 192) of 30 layers: 8 * (576 + 576 + 576 + 192) * 30
    assert f"{8 * (576 + 576 + 576 + 192) * 30:,}" in out
