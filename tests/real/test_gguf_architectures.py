"""GGUF LoRA adapters for every checked architecture, applied by a real llama.cpp: Llama,
Mistral, Qwen2, Qwen3, Gemma 2 and Phi-3, on small random-weight models (llama_cpp_models.py).

For each architecture: llama.cpp runs the float32 GGUF of the model as torch does (so the
test file itself is right), and the change a peftkit adapter makes to the logits in torch
is the change llama.cpp makes with the exported adapter, all-linear and on q and k alone
(which only the right rotary row order gets right: a Llama's rows are reordered, the
others' are not).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("gguf")
pytest.importorskip("llama_cpp")

from llama_cpp_models import (  # noqa: E402
    ARCHITECTURES, Q4_GGUF, TOKENS, compare, llama_cpp_logits, random_model, relative_size, require_smollm2,
    tokenizer_fields, train_like_adapter, write_gguf)

require_smollm2()  # the models' tokenizer is SmolLM2's

from peftkit import LoraConfig  # noqa: E402
from peftkit.export import ExportError, export_gguf_lora, read_gguf_lora  # noqa: E402
from peftkit.gguf_layout import GgufBase  # noqa: E402

# The q and k projections of each architecture: Phi-3 fuses them with v.
QK = {"phi3": ["qkv_proj"]}


@pytest.fixture(scope="module")
def tokenizer():
    return tokenizer_fields(Q4_GGUF)


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def arch_model(request, tokenizer, tmp_path_factory):
    """(model type, torch model, its GGUF, torch base logits, llama.cpp base logits)."""
    model_type = request.param
    model = random_model(model_type)
    folder = tmp_path_factory.mktemp(model_type)
    path = write_gguf(model, folder / f"{model_type}.gguf", tokenizer)
    with torch.no_grad():
        torch_base = model(input_ids=torch.tensor([TOKENS])).logits[0].numpy()
    return model_type, model, path, torch_base, llama_cpp_logits(path, None, folder)


def test_llama_cpp_runs_each_model_as_torch_does(arch_model):
    model_type, _, _, torch_base, cpp_base = arch_model
    cosine, ratio = compare(torch_base, cpp_base)
    print(f"\n{model_type} base, torch vs llama.cpp: cosine {cosine:.7f}, norm ratio {ratio:.5f}")
    assert cosine > 0.9999 and abs(ratio - 1) < 1e-3, (model_type, cosine, ratio)


@pytest.mark.parametrize("targets", ["all-linear", "q,k"])
def test_llama_cpp_applies_the_exported_adapter_as_torch_does(arch_model, targets, tmp_path, monkeypatch):
    model_type, model, path, torch_base, cpp_base = arch_model
    modules = "all-linear" if targets == "all-linear" else QK.get(model_type, ["q_proj", "k_proj"])
    # q and k act through the softmax: a larger B makes their change visible.
    adapted = train_like_adapter(model, LoraConfig(r=8, alpha=16, target_modules=modules), tmp_path / "adapter",
                                 b_std=0.2 if targets == "q,k" else 0.03)
    torch_delta = adapted - torch_base
    assert relative_size(torch_delta, torch_base) > 0.02  # not a no-op
    out = export_gguf_lora(tmp_path / "adapter", tmp_path / "adapter.gguf", base=path)
    assert read_gguf_lora(out).architecture == ("llama" if model_type == "mistral" else model_type)
    cosine, ratio = compare(torch_delta, llama_cpp_logits(path, out, tmp_path) - cpp_base)
    print(f"\n{model_type} {targets}: change {relative_size(torch_delta, torch_base):.3f} of the logits, "
          f"cosine {cosine:.6f}, norm ratio {ratio:.4f}")
    assert cosine > 0.999 and abs(ratio - 1) < 0.03, (model_type, targets, cosine, ratio)
    if targets == "q,k" and model_type != "phi3":  # the other row order must fail (Phi-3's q, k, v are fused)
        heads = {"attn_q": model.config.num_attention_heads, "attn_k": model.config.num_key_value_heads}
        monkeypatch.setattr(GgufBase, "rotary_heads",
                            lambda self, name: None if model_type in ("llama", "mistral") else heads[name.split(".")[2]])
        flipped = export_gguf_lora(tmp_path / "adapter", tmp_path / "flipped.gguf", base=path)
        wrong, _ = compare(torch_delta, llama_cpp_logits(path, flipped, tmp_path) - cpp_base)
        print(f"  with the other row order: cosine {wrong:.4f}")
        assert wrong < 0.99


def test_an_adapter_for_another_architecture_is_refused(tokenizer, tmp_path):
    """A Qwen2 adapter (q, k, v biases in the base, no reorder) on a Llama GGUF of the same
    shapes: the names and shapes agree, only the recorded base tells them apart."""
    qwen2, llama = random_model("qwen2"), random_model("llama")
    qwen2_folder = tmp_path / "qwen2-hf"
    qwen2.config.save_pretrained(qwen2_folder)
    llama_gguf = write_gguf(llama, tmp_path / "llama.gguf", tokenizer)
    train_like_adapter(qwen2, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"],
                                         base_model_name_or_path=str(qwen2_folder)), tmp_path / "adapter")
    with pytest.raises(ExportError, match=r"trained on .*qwen2-hf \(qwen2.*but the base given is .*llama.gguf"):
        export_gguf_lora(tmp_path / "adapter", tmp_path / "out.gguf", base=llama_gguf)
    assert not (tmp_path / "out.gguf").exists()


def test_a_base_with_other_head_counts_is_refused(tokenizer, tmp_path):
    """8 heads of 8 against 4 of 16: the same shapes, a different rotary reorder."""
    trained_on = random_model("llama")
    trained_on.config.save_pretrained(tmp_path / "hf")
    other = random_model("llama")
    other.config.num_attention_heads, other.config.num_key_value_heads = 8, 4
    other.config.head_dim = 8
    other_gguf = write_gguf(other, tmp_path / "other.gguf", tokenizer)
    train_like_adapter(trained_on, LoraConfig(r=4, alpha=8, target_modules=["q_proj"],
                                              base_model_name_or_path=str(tmp_path / "hf")), tmp_path / "adapter")
    with pytest.raises(ExportError, match=r"4 query / 2 key-value heads.*8 / 4"):
        export_gguf_lora(tmp_path / "adapter", tmp_path / "out.gguf", base=other_gguf)
