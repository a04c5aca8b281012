"""The llama.cpp layout of a Hugging Face model (gguf_layout.py) without llama.cpp: the names
gguf-py gives, the rotary row order written out index by index, and the refusals. The
architectures themselves are checked against llama.cpp in tests/real/test_gguf_architectures.py."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("gguf")
pytest.importorskip("transformers")

from peftkit.gguf_layout import (  # noqa: E402
    GgufBase, LayoutError, base_from_config, llama_cpp_architecture, read_base, to_llama_cpp_rows)


def test_rows_move_to_llama_cpp_s_interleaved_order_index_by_index():
    n_head, d, r = 3, 8, 2
    rows = torch.randn(n_head * d, r, dtype=torch.float64)
    moved = to_llama_cpp_rows(rows, n_head)
    for h in range(n_head):
        for i in range(d // 2):
            for j in range(2):  # llama.cpp row 2i + j of head h is Hugging Face's row j·d/2 + i
                assert torch.equal(moved[h * d + 2 * i + j], rows[h * d + j * d // 2 + i])


@pytest.mark.parametrize(("model_type", "module", "tensor"), [
    ("llama", "model.layers.2.self_attn.q_proj", "blk.2.attn_q.weight"),
    ("mistral", "model.layers.0.mlp.gate_proj", "blk.0.ffn_gate.weight"),
    ("qwen2", "model.layers.1.self_attn.o_proj", "blk.1.attn_output.weight"),
    ("phi3", "model.layers.0.self_attn.qkv_proj", "blk.0.attn_qkv.weight"),
    ("phi3", "model.layers.0.mlp.gate_up_proj", "blk.0.ffn_up.weight"),
    ("gemma2", "model.layers.3.mlp.down_proj", "blk.3.ffn_down.weight"),
])
def test_names_come_from_gguf_py_s_map(model_type, module, tensor):
    base = GgufBase("x", llama_cpp_architecture(model_type, "x"), 4, 4, 2, {})
    assert base.tensor_name(module) == tensor


def test_only_llama_s_q_and_k_rows_are_reordered():
    llama = GgufBase("x", "llama", 2, 8, 2, {})
    assert llama.rotary_heads("blk.0.attn_q.weight") == 8
    assert llama.rotary_heads("blk.0.attn_k.weight") == 2
    assert llama.rotary_heads("blk.0.attn_v.weight") is None
    for arch in ("qwen2", "qwen3", "gemma2", "phi3"):
        assert GgufBase("x", arch, 2, 8, 2, {}).rotary_heads("blk.0.attn_q.weight") is None


def test_q_and_k_of_an_unchecked_architecture_are_refused_and_the_rest_allowed():
    base = GgufBase("x", "starcoder2", 2, 8, 2, {})
    assert base.rotary_heads("blk.0.ffn_up.weight") is None
    with pytest.raises(LayoutError, match="not checked how llama.cpp orders the rotary rows.*'starcoder2'"):
        base.rotary_heads("blk.0.attn_k.weight")


def test_a_model_type_llama_cpp_lacks_is_refused():
    with pytest.raises(LayoutError, match="'bert-of-mine' model, which llama.cpp has no architecture for"):
        llama_cpp_architecture("bert-of-mine", "folder")


def test_a_transformers_folder_gives_the_shapes_of_every_linear_weight(tmp_path):
    config = {"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100}
    (tmp_path / "config.json").write_text(json.dumps(config))
    base = base_from_config(tmp_path)
    assert (base.architecture, base.head_count, base.head_count_kv, base.block_count) == ("qwen2", 4, 2, 2)
    assert base.weights["blk.1.attn_k.weight"] == (16, 32)  # 2 heads of 8
    assert base.weights["blk.0.ffn_down.weight"] == (32, 48)
    assert len(base.weights) == 2 * 7 + 1  # and the output head


def test_a_missing_base_is_a_clear_error(tmp_path):
    with pytest.raises(LayoutError, match="records no local base model.*--model BASE"):
        read_base(None, "some/hub-name")
    with pytest.raises(LayoutError, match="does not exist"):
        read_base(tmp_path / "nothing", None)
