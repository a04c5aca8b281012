"""Target selection: names, suffixes, regex, presets, per-architecture defaults, rank checks."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import tiny_bert, tiny_gpt2, tiny_llama, tiny_reference
from torch import nn

import peftkit
from peftkit.adapter_files import adapter_tensors
from peftkit.targets import find_targets


def paths(model, spec):
    return sorted(t.path for t in find_targets(model, spec))


def leaf_set(model, spec):
    return {p.rsplit(".", 1)[-1] for p in paths(model, spec)}


@pytest.mark.parametrize("builder,expected", [
    (tiny_llama, {"q_proj", "v_proj"}),
    (tiny_gpt2, {"c_attn"}),
    (tiny_bert, {"query", "value"}),
    (tiny_reference, {"q", "v"}),
])
def test_architecture_defaults(builder, expected):
    model = builder()
    assert leaf_set(model, None) == expected
    assert len(paths(model, None)) == 2 * len(expected) or builder is tiny_gpt2
    pm = peftkit.attach(model, peftkit.LoraConfig(r=4))  # target_modules omitted
    assert pm.target_paths["default"] == paths(pm.base_model, None)


def test_suffix_and_exact_names():
    model = tiny_llama()
    assert paths(model, ["self_attn.q_proj"]) == paths(model, ["q_proj"])
    assert paths(model, ["model.layers.0.self_attn.q_proj"]) == ["model.layers.0.self_attn.q_proj"]
    # "proj" is not a dotted suffix of "q_proj": no accidental substring matching.
    with pytest.raises(ValueError, match="'proj'"):
        find_targets(model, ["proj"])


def test_regex_is_a_full_match():
    model = tiny_llama()
    assert paths(model, r"model\.layers\.1\.self_attn\.(q|v)_proj") == [
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    with pytest.raises(ValueError, match="regex 'q_proj' matches no module"):
        find_targets(model, "q_proj")


def test_presets():
    llama = tiny_llama()
    assert leaf_set(llama, "attention") == {"q_proj", "k_proj", "v_proj", "o_proj"}
    all_linear = leaf_set(llama, "all-linear")
    assert all_linear == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert "lm_head" not in {p for p in paths(llama, "all-linear")}
    gpt2 = tiny_gpt2()
    attention = paths(gpt2, "attention")
    assert all(".attn." in p for p in attention) and len(attention) == 4  # not mlp.c_proj
    assert {t.kind for t in find_targets(gpt2, "all-linear")} == {"conv1d"}
    assert "lm_head" not in paths(gpt2, "all-linear")
    assert leaf_set(tiny_reference(), "all-linear") == {"q", "k", "v", "o", "up", "down"}


def test_name_matching_nothing_is_an_error_listing_candidates():
    with pytest.raises(ValueError) as err:
        peftkit.attach(tiny_llama(), peftkit.LoraConfig(target_modules=["q_proj", "query"]))
    message = str(err.value)
    assert "'query'" in message and "M4" in message and "v_proj" in message


def test_name_of_unwrappable_module_is_explained():
    with pytest.raises(ValueError, match="LlamaAttention"):
        find_targets(tiny_llama(), ["self_attn"])


def test_unknown_architecture_without_targets_is_an_error():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match="no default LoRA targets"):
        peftkit.attach(model, peftkit.LoraConfig(r=2))
    pm = peftkit.attach(model, peftkit.LoraConfig(r=2, target_modules=["0"]))
    assert pm.target_paths["default"] == ["0"]


def test_rank_at_or_above_layer_size_is_an_error():
    model = tiny_llama()  # k/v projections are 64 -> 32 (grouped-query attention)
    with pytest.raises(ValueError, match=r"r=32 is too high .*min\(in, out\) = 32"):
        peftkit.attach(model, peftkit.LoraConfig(r=32, target_modules=["v_proj"]))
    # nothing was attached by the failed call
    assert not any(isinstance(m, peftkit.LoraLinear) for m in model.modules())


def test_rank_heavy_layer_warns():
    model = tiny_llama()
    with pytest.warns(UserWarning, match="M5"):
        peftkit.attach(model, peftkit.LoraConfig(r=16, target_modules=["v_proj"]))  # 16*(64+32) > 0.5*64*32
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        peftkit.attach(tiny_llama(), peftkit.LoraConfig(r=4, target_modules=["v_proj"]))


def test_embedding_is_targeted_only_by_name():
    model = tiny_llama()
    assert all(t.kind != "embedding" for t in find_targets(model, "all-linear"))
    kinds = {t.path: t.kind for t in find_targets(model, ["embed_tokens", "q_proj"])}
    assert kinds["model.embed_tokens"] == "embedding"


def test_minimal_saved_names_select_the_same_modules():
    gpt2 = tiny_gpt2()
    pm = peftkit.attach(gpt2, peftkit.LoraConfig(r=2, target_modules="attention"))
    names = pm.saved_target_names("default")
    assert names == ["attn.c_proj", "c_attn"]  # "c_proj" alone would also catch mlp.c_proj
    fresh = tiny_gpt2()
    assert paths(fresh, names) == sorted(pm.target_paths["default"])
    assert torch.is_tensor(next(iter(adapter_tensors(pm, "default").values())))
