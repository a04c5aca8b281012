"""End to end on a real model: a peftkit LoRA on SmolLM2-135M (Llama, 9 query and 3 key/value
heads), exported with ``export_gguf_lora`` and applied by llama.cpp, changes the logits as it
does in torch.

torch runs SmolLM2 as transformers loads it from the Q4_1 GGUF (dequantized to float32);
llama.cpp runs a float32 GGUF of the same weights. The quantity compared is the change the
adapter makes, (adapted - base) logits, on the last positions of 16 fixed tokens.
The shared pieces (the float32 copy, llama.cpp's logits, adapters with random B) are in
llama_cpp_models.py, the fixtures in conftest.py.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
pytest.importorskip("llama_cpp")
transformers = pytest.importorskip("transformers")

from llama_cpp_models import (  # noqa: E402
    COMPARED, Q4_GGUF, TOKENS, compare, llama_cpp_logits, relative_size, require_smollm2, save_prompt_adapter,
    train_like_adapter)

require_smollm2()

from peftkit import LoraConfig  # noqa: E402
from peftkit import export as export_module  # noqa: E402
from peftkit.cli import main  # noqa: E402
from peftkit.export import ExportError, export_gguf_lora  # noqa: E402


# -- the base model in torch and in llama.cpp ------------------------------------------
@pytest.fixture(scope="module")
def torch_base(smollm) -> np.ndarray:
    with torch.no_grad():
        return smollm(input_ids=torch.tensor([TOKENS])).logits[0].numpy()


@pytest.fixture(scope="module")
def cpp_base(base_gguf, tmp_path_factory) -> np.ndarray:
    return llama_cpp_logits(base_gguf, None, tmp_path_factory.mktemp("cpp"))


# -- the adapter does in llama.cpp what it does in torch ------------------------------
def test_the_float32_copy_is_the_model_transformers_loads(torch_base, cpp_base):
    cosine, ratio = compare(torch_base, cpp_base)
    print(f"\nbase model, torch vs llama.cpp: cosine {cosine:.7f}, norm ratio {ratio:.5f}, "
          f"max |diff| {np.abs(torch_base - cpp_base).max():.4f}")
    assert cosine > 0.9999 and abs(ratio - 1) < 1e-3, (cosine, ratio)
    assert (torch_base[-COMPARED:].argmax(-1) == cpp_base[-COMPARED:].argmax(-1)).all()


@pytest.mark.parametrize("rslora", [False, True], ids=["alpha-over-r", "rslora"])
def test_llama_cpp_applies_the_exported_adapter_as_torch_does(
        smollm, base_gguf, torch_base, cpp_base, tmp_path, rslora):
    config = LoraConfig(r=8, alpha=16, target_modules="all-linear", use_rslora=rslora,
                        base_model_name_or_path=str(base_gguf))  # the export finds the base from it
    adapted = train_like_adapter(smollm, config, tmp_path / "adapter")
    out = export_gguf_lora(tmp_path / "adapter", tmp_path / "adapter.gguf")

    scale = 16 / math.sqrt(8) if rslora else 16 / 8
    assert gguf.GGUFReader(out).fields["adapter.lora.alpha"].contents() == pytest.approx(scale * 8)
    torch_delta = adapted - torch_base
    # Not a no-op: the change is a visible share of the logits (measured: 9.8%, 22% with rsLoRA),
    # far above the engines' disagreement on the base model (see the test above).
    assert relative_size(torch_delta, torch_base) > 0.03
    cosine, ratio = compare(torch_delta, llama_cpp_logits(base_gguf, out, tmp_path) - cpp_base)
    print(f"\n{'rslora' if rslora else 'alpha/r'}: change {relative_size(torch_delta, torch_base):.3f} of the "
          f"logits, cosine {cosine:.6f}, norm ratio {ratio:.4f}")
    assert cosine > 0.999
    assert abs(ratio - 1) < 0.03  # a wrong alpha keeps the direction but not the size


def test_q_and_k_need_the_rotary_row_order(smollm, base_gguf, torch_base, cpp_base, tmp_path, monkeypatch):
    """With LoRA on q and k only, the whole change depends on their row order: exported
    without llama.cpp's rotary permutation, the adapter does something else. (q and k act
    through the softmax, so a larger B is needed for a visible change.)"""
    config = LoraConfig(r=8, alpha=16, target_modules=["q_proj", "k_proj"])
    adapted = train_like_adapter(smollm, config, tmp_path / "adapter", b_std=0.1)
    torch_delta = adapted - torch_base
    assert relative_size(torch_delta, torch_base) > 0.01  # measured: 2.2%

    permuted = export_gguf_lora(tmp_path / "adapter", tmp_path / "qk.gguf", base=base_gguf)
    monkeypatch.setattr(export_module, "to_llama_cpp_rows", lambda b, n_head: b)
    plain = export_gguf_lora(tmp_path / "adapter", tmp_path / "qk-unpermuted.gguf", base=base_gguf)
    right, _ = compare(torch_delta, llama_cpp_logits(base_gguf, permuted, tmp_path) - cpp_base)
    wrong, _ = compare(torch_delta, llama_cpp_logits(base_gguf, plain, tmp_path) - cpp_base)
    print(f"\nq,k only: cosine {right:.6f} permuted, {wrong:.6f} without the permutation")
    assert right > 0.999
    # Measured -0.59 (with other random adapters it ranged from -0.6 to 0.83; right stayed > 0.9998).
    assert wrong < 0.5


def test_float16_export_matches_float32(small_adapter, base_gguf, tmp_path):
    f32 = gguf.GGUFReader(export_gguf_lora(small_adapter, tmp_path / "a32.gguf", base=base_gguf))
    f16 = gguf.GGUFReader(export_gguf_lora(small_adapter, tmp_path / "a16.gguf", base=base_gguf, dtype="float16"))
    assert {t.tensor_type.name for t in f16.tensors} == {"F16"}
    for a, b in zip(f32.tensors, f16.tensors, strict=True):
        assert a.name == b.name
        np.testing.assert_allclose(a.data, b.data.astype(np.float32), rtol=1e-3, atol=1e-6)


def test_a_transformers_folder_serves_as_base_like_the_gguf(smollm, small_adapter, base_gguf, tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(smollm.config.to_dict()))
    from_gguf = gguf.GGUFReader(export_gguf_lora(small_adapter, tmp_path / "a.gguf", base=base_gguf))
    from_folder = gguf.GGUFReader(export_gguf_lora(small_adapter, tmp_path / "b.gguf", base=tmp_path / "hf"))
    for a, b in zip(from_gguf.tensors, from_folder.tensors, strict=True):
        assert a.name == b.name and np.array_equal(a.data, b.data)


def test_cli_export_prints_the_summary_and_the_llama_cpp_command(small_adapter, base_gguf, tmp_path, capsys):
    out = tmp_path / "cli.gguf"
    args = ["export", "--adapter", str(small_adapter), "--gguf", str(out), "--model", str(base_gguf)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "420 (210 LoRA pairs, rank 4, F32)" in printed  # 7 projections in each of 30 layers
    assert "alpha written  8 " in printed
    assert f"llama-cli -m {base_gguf} --lora {out}" in printed
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err


# -- refusals: clear, and nothing left on disk ----------------------------------------
def _assert_refused(call, out: Path, *fragments: str) -> None:
    before = sorted(out.parent.iterdir()) if out.parent.exists() else None
    with pytest.raises(ExportError) as caught:
        call()
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message, message
    after = sorted(out.parent.iterdir()) if out.parent.exists() else None
    assert after == before, "the failed export left files behind"


def test_a_prompt_tuning_adapter_is_refused(smollm, base_gguf, tmp_path):
    save_prompt_adapter(smollm, tmp_path / "prompt")
    out = tmp_path / "out" / "prompt.gguf"
    _assert_refused(lambda: export_gguf_lora(tmp_path / "prompt", out, base=base_gguf), out,
                    "PROMPT_TUNING", "only LoRA")
    assert not out.parent.exists()


def test_a_lora_on_the_embeddings_is_refused_by_name(smollm, base_gguf, tmp_path):
    train_like_adapter(smollm, LoraConfig(r=4, alpha=8, target_modules=["embed_tokens", "q_proj"]),
                       tmp_path / "adapter")
    out = tmp_path / "embed.gguf"
    _assert_refused(lambda: export_gguf_lora(tmp_path / "adapter", out, base=base_gguf), out,
                    "model.embed_tokens", "linear weights of the decoder layers", "peftkit merge")


def test_the_recorded_base_model_serves_without_model(small_adapter, base_gguf, tmp_path):
    """The adapter records the GGUF its model was loaded from, as PEFT records name_or_path;
    the export reads the head counts from it (Q4_1: the shapes are the same)."""
    recorded = json.loads((small_adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(recorded) == Q4_GGUF
    from_record = gguf.GGUFReader(export_gguf_lora(small_adapter, tmp_path / "a.gguf"))
    from_base = gguf.GGUFReader(export_gguf_lora(small_adapter, tmp_path / "b.gguf", base=base_gguf))
    for a, b in zip(from_record.tensors, from_base.tensors, strict=True):
        assert a.name == b.name and np.array_equal(a.data, b.data)


def test_missing_head_counts_are_a_clear_error(smollm, small_adapter, tmp_path):
    unrecorded = tmp_path / "unrecorded"
    shutil.copytree(small_adapter, unrecorded)
    config_file = unrecorded / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "base_model_name_or_path": None}))
    out = tmp_path / "heads.gguf"
    _assert_refused(lambda: export_gguf_lora(unrecorded, out), out, "head counts", "--model BASE")
    config = json.loads(json.dumps(smollm.config.to_dict()))
    del config["num_attention_heads"]
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text(json.dumps(config))
    _assert_refused(lambda: export_gguf_lora(unrecorded, out, base=tmp_path / "base"), out,
                    "num_attention_heads", "head counts")


def test_a_base_llama_cpp_cannot_run_is_refused(small_adapter, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "config.json").write_text(json.dumps({"model_type": "my-own-model", "n_head": 12}))
    out = tmp_path / "mine.gguf"
    _assert_refused(lambda: export_gguf_lora(small_adapter, out, base=tmp_path / "mine"), out,
                    "'my-own-model'", "llama.cpp has no architecture")


def test_an_adapter_gguf_given_as_the_base_is_refused(small_adapter, base_gguf, tmp_path):
    adapter = export_gguf_lora(small_adapter, tmp_path / "a.gguf", base=base_gguf)
    out = tmp_path / "out.gguf"
    _assert_refused(lambda: export_gguf_lora(small_adapter, out, base=adapter), out,
                    "is a LoRA adapter, not a model")


def test_a_base_that_is_not_gguf_is_refused(small_adapter, tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"not a model")
    out = tmp_path / "out.gguf"
    _assert_refused(lambda: export_gguf_lora(small_adapter, out, base=tmp_path / "model.gguf"), out,
                    "not a GGUF", "--model")


def test_an_existing_file_is_kept_unless_overwrite(small_adapter, base_gguf, tmp_path):
    out = tmp_path / "taken.gguf"
    out.write_bytes(b"keep me")
    _assert_refused(lambda: export_gguf_lora(small_adapter, out, base=base_gguf), out,
                    "already exists", "overwrite")
    assert out.read_bytes() == b"keep me"
    export_gguf_lora(small_adapter, out, base=base_gguf, overwrite=True)
    assert gguf.GGUFReader(out).fields["general.type"].contents() == "adapter"
    assert [p.name for p in tmp_path.iterdir()] == ["taken.gguf"]


def test_a_failed_write_leaves_nothing(small_adapter, base_gguf, tmp_path, monkeypatch):
    out = tmp_path / "broken.gguf"

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", fail)
    with pytest.raises(OSError, match="disk full"):
        export_gguf_lora(small_adapter, out, base=base_gguf)
    assert list(tmp_path.iterdir()) == []
