"""Mixed-adapter batches: ``pm(..., adapter_names=[...])`` and ``pm.generate(..., adapter_names=
[...])`` run each row with its own LoRA adapter ("__base__": none), and each row equals that
adapter run alone; what cannot be mixed, or is asked for wrongly, is refused with its fix."""

from __future__ import annotations

import pytest
import torch
from helpers import BUILDERS, model_output, randomize_adapters, tiny_gpt2, tiny_llama, tiny_reference

import peftkit
from peftkit.methods import lora
from peftkit.methods.base import NO_ADAPTER, RowAdapters

ATOL = 1e-5


def three_loras(model, wide: str | None = "all-linear") -> peftkit.PeftModel:
    """Adapters "a" (``wide`` targets, r 4), "b" (the default q,v, r 8) and "c" (``wide``, r 2),
    each with random weights, "a" active."""
    pm = peftkit.attach(model, peftkit.LoraConfig(r=4, alpha=8, target_modules=wide), "a")
    pm.add_adapter(peftkit.LoraConfig(r=8, alpha=16), "b")
    pm.add_adapter(peftkit.LoraConfig(r=2, alpha=4, target_modules=wide), "c")
    randomize_adapters(pm)
    pm.set_adapter("a")
    return pm


def alone(pm: peftkit.PeftModel, name: str, run):
    """``run()`` with adapter ``name`` alone active ("__base__": every adapter off)."""
    if name == NO_ADAPTER:
        with pm.disable_adapter():
            return run()
    before = list(pm.active_adapters)
    pm.set_adapter(name)
    try:
        return run()
    finally:
        pm.set_adapter(before)


def assert_rows_match_alone(pm, ids, names, **kwargs):
    with torch.no_grad():
        mixed = model_output_with(pm, ids, adapter_names=names, **kwargs)
        for row, name in enumerate(names):
            single = alone(pm, name, lambda: model_output_with(pm, ids, **kwargs))
            torch.testing.assert_close(mixed[row], single[row], rtol=0, atol=ATOL, msg=f"row {row} ({name})")


def model_output_with(pm, ids, **kwargs):
    out = pm(input_ids=ids, **kwargs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


INTERLEAVED = ["a", "b", NO_ADAPTER, "c", "a", "b"]  # groups of scattered rows: index_select / index_add_
CONTIGUOUS = ["a", "a", "b", "b", NO_ADAPTER, "c"]  # groups of consecutive rows: views


@pytest.fixture(params=["grouped", "stacked"])
def lora_path(request, monkeypatch):
    """Each LoRA layer's mixed-batch path: per adapter group, or all adapters stacked (few tokens)."""
    monkeypatch.setattr(lora, "STACKED_UP_TO", 0 if request.param == "grouped" else 1 << 40)
    return request.param


@pytest.mark.parametrize("order", [INTERLEAVED, CONTIGUOUS], ids=["interleaved", "contiguous"])
@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_each_row_equals_its_adapter_alone(arch, order, lora_path):
    pm = three_loras(BUILDERS[arch]())
    ids = torch.randint(0, 128, (len(order), 9), generator=torch.Generator().manual_seed(0))
    assert_rows_match_alone(pm, ids, order)
    assert pm.active_adapters == ["a"]  # the call leaves the active adapters as they were


def test_embedding_lora_and_trained_bias_rows_equal_their_adapter_alone(lora_path):
    pm = peftkit.attach(tiny_llama(), peftkit.LoraConfig(r=4, alpha=8, target_modules=["embed_tokens", "q_proj"]), "emb")
    pm.add_adapter(peftkit.LoraConfig(r=4, alpha=8, target_modules=["embed_tokens"]), "emb2")
    randomize_adapters(pm)
    ids = torch.randint(0, 128, (4, 7), generator=torch.Generator().manual_seed(1))
    assert_rows_match_alone(pm, ids, ["emb2", "emb", NO_ADAPTER, "emb"])

    gpt2 = peftkit.attach(tiny_gpt2(), peftkit.LoraConfig(r=4, alpha=8, target_modules=["c_attn"], bias="lora_only"), "x")
    gpt2.add_adapter(peftkit.LoraConfig(r=4, alpha=8, target_modules=["c_attn"], bias="lora_only"), "y")
    randomize_adapters(gpt2)
    assert_rows_match_alone(gpt2, ids, ["y", "x", "y", NO_ADAPTER])


def test_rows_on_a_quantized_base_equal_their_adapter_alone(lora_path):
    from peftkit.quantize import quantize_base

    model = tiny_llama()
    quantize_base(model)
    pm = three_loras(model)
    ids = torch.randint(0, 128, (4, 6), generator=torch.Generator().manual_seed(2))
    assert_rows_match_alone(pm, ids, ["c", NO_ADAPTER, "a", "b"])


def test_other_active_adapters_are_off_for_a_mixed_batch():
    """A bottleneck adapter (or a prompt) that is active but not named runs on no row."""
    pm = three_loras(tiny_llama(), wide="attention")
    pm.add_adapter(peftkit.AdapterConfig(bottleneck=8), "bottleneck")
    randomize_adapters(pm)
    pm.set_adapter(["a", "bottleneck"])
    ids = torch.randint(0, 128, (3, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        mixed = model_output_with(pm, ids, adapter_names=["a", NO_ADAPTER, "b"])
        for row, name in enumerate(["a", NO_ADAPTER, "b"]):
            single = alone(pm, name, lambda: model_output_with(pm, ids))
            torch.testing.assert_close(mixed[row], single[row], rtol=0, atol=ATOL)
    assert pm.active_adapters == ["a", "bottleneck"]


def test_rows_group_by_adapter_once_per_batch():
    """One group per adapter, a view for consecutive rows and one index tensor otherwise,
    shared by every layer; "__base__" rows are in no group."""
    rows = RowAdapters(["a", "b", "a", "a", NO_ADAPTER, "b"])
    groups = rows.groups(6, torch.device("cpu"))
    assert [name for name, _ in groups] == ["a", "b"]
    assert groups[0][1].tolist() == [0, 2, 3] and groups[1][1].tolist() == [1, 5]
    assert rows.groups(6, torch.device("cpu")) is groups
    assert RowAdapters(["a", "a", "b"]).groups(3, torch.device("cpu")) == [("a", slice(0, 2)), ("b", slice(2, 3))]
    # inside generate, 2 beams per prompt: transformers repeats each row twice in a row
    expanded = RowAdapters(["a", "b", "a"], expanded=True).groups(6, torch.device("cpu"))
    assert expanded[0][1].tolist() == [0, 1, 4, 5] and expanded[1][1] == slice(2, 4)
    with pytest.raises(ValueError, match="names 3 rows but a layer got a batch of 6"):
        RowAdapters(["a", "b", "a"]).groups(6, torch.device("cpu"))


# -- generate ---------------------------------------------------------------------------------


def greedy(pm, ids, mask, **kwargs):
    return pm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                       pad_token_id=0, **kwargs)


@pytest.mark.parametrize("build", [tiny_llama, tiny_reference], ids=["llama", "reference"])
def test_generate_gives_each_row_its_adapters_greedy_tokens(build, lora_path):
    pm = three_loras(build())
    names = ["b", NO_ADAPTER, "a", "c"]
    ids = torch.randint(1, 128, (4, 8), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # a left-padded row
    ids = ids.masked_fill(mask == 0, 0)
    kwargs = {} if build is tiny_reference else {"eos_token_id": None}
    mixed = greedy(pm, ids, mask, adapter_names=names, **kwargs)
    for row, name in enumerate(names):
        single = alone(pm, name, lambda: greedy(pm, ids, mask, **kwargs))
        assert mixed[row].tolist() == single[row].tolist(), (row, name)
    assert all(m.row_adapters is None for m in pm.modules() if hasattr(m, "row_adapters"))


def test_generate_with_beams_gives_each_beam_its_rows_adapter(lora_path):
    pm = three_loras(tiny_llama())
    names = ["c", "a", NO_ADAPTER]
    ids = torch.randint(1, 128, (3, 6), generator=torch.Generator().manual_seed(5))
    settings = dict(num_beams=2, num_return_sequences=2, eos_token_id=None)
    mixed = greedy(pm, ids, torch.ones_like(ids), adapter_names=names, **settings)
    assert mixed.shape[0] == 6
    for row, name in enumerate(names):
        single = alone(pm, name, lambda: greedy(pm, ids, torch.ones_like(ids), **settings))
        assert mixed[2 * row:2 * row + 2].tolist() == single[2 * row:2 * row + 2].tolist(), (row, name)


# -- what is refused ------------------------------------------------------------------------


@pytest.fixture
def pm():
    return three_loras(tiny_llama(), wide="attention")  # leaves the MLPs free for a bottleneck adapter


@pytest.fixture
def ids4():
    return torch.randint(0, 128, (4, 5), generator=torch.Generator().manual_seed(6))


def test_unknown_adapter_names_the_known_ones(pm, ids4):
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['typo'\].*\['a', 'b', 'c'\].*'__base__'"):
        pm(input_ids=ids4, adapter_names=["a", "typo", "b", "a"])
    with pytest.raises(ValueError, match="unknown adapter"):
        pm.generate(input_ids=ids4, adapter_names=["a", "typo", "b", "a"], max_new_tokens=2)


def test_one_name_per_row(pm, ids4):
    with pytest.raises(ValueError, match="has 3 names for a batch of 4 rows"):
        pm(input_ids=ids4, adapter_names=["a", "b", "c"])
    with pytest.raises(ValueError, match="has 5 names for a batch of 4 rows"):
        pm.generate(ids4, adapter_names=["a"] * 5, max_new_tokens=2)
    with pytest.raises(TypeError, match="one adapter name per row"):
        pm(input_ids=ids4[:1], adapter_names="a")  # a str is not a list of names


def test_training_mode_is_refused(pm, ids4):
    pm.train()
    with pytest.raises(ValueError, match=r"for inference.*training mode; call pm.eval\(\)"):
        pm(input_ids=ids4, adapter_names=["a", "b", "c", "a"])
    pm.eval()
    assert model_output_with(pm, ids4, adapter_names=["a", "b", "c", "a"]).shape[0] == 4


def test_merged_adapters_are_refused(pm, ids4):
    pm.merge()
    with pytest.raises(ValueError, match=r"merged into the base weights.*pm.unmerge\(\)"):
        pm(input_ids=ids4, adapter_names=["a", "b", "c", "a"])
    pm.unmerge()
    model_output_with(pm, ids4, adapter_names=["a", "b", "c", "a"])


@pytest.mark.parametrize("config, why", [
    (peftkit.PromptConfig(num_virtual_tokens=3), "virtual tokens"),
    (peftkit.PrefixConfig(num_virtual_tokens=3), "virtual tokens"),
    (peftkit.AdapterConfig(bottleneck=8), "its modules run on the whole batch"),
], ids=["prompt", "prefix", "bottleneck"])
def test_methods_that_cannot_mix_rows_are_refused_with_the_fix(pm, ids4, config, why):
    pm.add_adapter(config, "other")
    pm.set_adapter("a")
    with pytest.raises(ValueError, match=rf"adapter 'other' .*{why}.*pm.set_adapter\('other'\)"):
        pm(input_ids=ids4, adapter_names=["a", "other", "b", "a"])
    assert all(m.row_adapters is None for m in pm.modules() if hasattr(m, "row_adapters"))


def test_adapters_with_modules_to_save_are_refused():
    from helpers import tiny_bert_classifier

    pm = peftkit.attach(tiny_bert_classifier(), peftkit.LoraConfig(r=4), "cls")
    with pytest.raises(ValueError, match=r"'cls' .*modules_to_save"):
        pm(input_ids=torch.zeros(2, 4, dtype=torch.long), adapter_names=["cls", NO_ADAPTER])


def test_base_is_not_an_adapter_name():
    with pytest.raises(ValueError, match="'__base__' names the base model"):
        peftkit.attach(tiny_llama(), peftkit.LoraConfig(r=4), NO_ADAPTER)


def test_state_comes_back_after_an_error_inside_the_call(pm, ids4):
    with pytest.raises(IndexError):
        pm(input_ids=ids4 + 1000, adapter_names=["a", "b", "c", "a"])  # ids past the vocabulary
    assert all(m.row_adapters is None for m in pm.modules() if hasattr(m, "row_adapters"))
    torch.testing.assert_close(model_output(pm, ids4), alone(pm, "a", lambda: model_output(pm, ids4)))
