"""A LoRA adapter merged into its base model's GGUF file: one GGUF that llama.cpp, Ollama and
LM Studio run with no adapter, in f32, bf16, f16 or q8_0.

Every tensor of the base file is read (dequantized to float32 by gguf-py when the base is
quantized), the adapted weights get their update, and the tensor is stored in the chosen
type:

    W' = W + s · P (B A),    s = alpha / r (alpha / sqrt(r) with rsLoRA)

where W is the base weight in llama.cpp's layout and P the rotary row reordering that
llama.cpp's converter applies to q and k (``gguf_layout``; the identity elsewhere). The
base's metadata (architecture settings, tokenizer) is copied as it is, and the chat template
the adapter was trained with, when it saved one, replaces the base's.

The base must be a GGUF file: it carries the tokenizer and settings in llama.cpp's words.
From a transformers folder, write the merged folder (``peftkit merge --out``) and convert it
with llama.cpp's ``convert_hf_to_gguf.py``.

Tensors are written one at a time (gguf-py's tensor-info then tensor-data protocol), so the
peak memory is about one float32 tensor, not the model; the file is built beside ``out`` and
renamed into place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .export import ExportError, lora_pairs
from .formats import atomic
from .formats.adapter_folder import read_chat_template
from .formats.gguf import gguf_package
from .gguf_layout import to_llama_cpp_rows

GGUF_TYPES = ("f32", "bf16", "f16", "q8_0")


@dataclass(frozen=True)
class MergedGguf:
    path: Path
    gguf_type: str
    merged: int        # weights that received an update
    tensors: int
    fell_back: list[str]  # weights stored in f16 because their rows do not fill q8_0 blocks
    size: int


def _types(gguf, gguf_type: str):
    """(storage type of 2-D weights, general.file_type) for ``gguf_type``."""
    q, f = gguf.GGMLQuantizationType, gguf.LlamaFileType
    return {"f32": (q.F32, f.ALL_F32), "bf16": (q.BF16, f.MOSTLY_BF16), "f16": (q.F16, f.MOSTLY_F16),
            "q8_0": (q.Q8_0, f.MOSTLY_Q8_0)}[gguf_type]


def _storage_type(gguf, shape: tuple[int, ...], wanted):
    """llama.cpp's converter's rule: 1-D tensors (norms, biases) stay float32; a weight whose
    rows do not split into whole quantization blocks falls back to f16."""
    q = gguf.GGMLQuantizationType
    if len(shape) < 2:
        return q.F32
    block, _ = gguf.GGML_QUANT_SIZES[wanted]
    return wanted if shape[-1] % block == 0 else q.F16


def write_merged_gguf(adapter_dir: str | Path, base_gguf: str | Path, out: str | Path, *,
                      gguf_type: str = "f16", overwrite: bool = False) -> MergedGguf:
    """Write the LoRA in ``adapter_dir`` merged into ``base_gguf`` as the GGUF file ``out``.

    Raises ExportError (a ValueError) naming the problem and the fix: an unknown type, a base
    that is not a GGUF model, an adapter llama.cpp's layout cannot take (see export.py), an
    existing ``out`` without ``overwrite``.
    """
    try:
        gguf = gguf_package()
    except ImportError as e:
        raise ExportError(f"writing a merged GGUF {e}") from e
    out, base_gguf = Path(out), Path(base_gguf)
    if gguf_type not in GGUF_TYPES:
        raise ExportError(f"--gguf-type must be one of {', '.join(GGUF_TYPES)}, got {gguf_type!r}.")
    if not base_gguf.is_file() or base_gguf.suffix != ".gguf":
        raise ExportError(f"a merged GGUF is written from the base model's GGUF file (its tokenizer and settings), "
                          f"and {base_gguf} is not a .gguf file. Pass --model BASE.gguf, or write the merged model "
                          "as a folder (--out) and convert it with llama.cpp's convert_hf_to_gguf.py.")
    if out.is_dir():
        raise ExportError(f"{out} is a folder; pass the path of the .gguf file to write.")
    if out.exists() and not overwrite:
        raise ExportError(f"{out} already exists; pass --overwrite to replace it.")
    config, layout, pairs = lora_pairs(adapter_dir, base_gguf)
    scale = config.alpha / (math.sqrt(config.r) if config.use_rslora else config.r)
    wanted, file_type = _types(gguf, gguf_type)
    template = read_chat_template(adapter_dir)

    reader = gguf.GGUFReader(base_gguf)
    out.parent.mkdir(parents=True, exist_ok=True)
    fell_back: list[str] = []
    with atomic.replacing(out) as tmp:
        writer = gguf.GGUFWriter(tmp, layout.architecture)
        for key, field in reader.fields.items():
            # GGUF.* describe the file itself; the writer adds the architecture, the file type is ours.
            if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type") or (
                    template is not None and key == gguf.Keys.Tokenizer.CHAT_TEMPLATE):
                continue
            sub_type = field.types[1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), field.types[0], sub_type)
        writer.add_file_type(file_type)
        if template is not None:
            writer.add_chat_template(template)
        plan = []
        for tensor in reader.tensors:
            shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))  # torch order
            kind = _storage_type(gguf, shape, wanted)
            if kind != wanted and len(shape) >= 2:
                fell_back.append(tensor.name)
            block, type_size = gguf.GGML_QUANT_SIZES[kind]
            writer.add_tensor_info(tensor.name, shape, np.dtype(np.float32),
                                   int(np.prod(shape)) // block * type_size, raw_dtype=kind)
            plan.append((tensor, shape, kind))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for tensor, shape, kind in plan:
            weight = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
            weight = weight.reshape(shape)
            pair = pairs.get(tensor.name)
            if pair is not None:
                weight = weight + scale * _update(pair, layout.rotary_heads(tensor.name))
            writer.write_tensor_data(gguf.quants.quantize(weight, kind))
        writer.close()
    return MergedGguf(out, gguf_type, len(pairs), len(plan), fell_back, out.stat().st_size)


def _update(pair, n_head: int | None) -> np.ndarray:
    """B A (out, in) in float32, its rows in llama.cpp's order."""
    update = pair["B"].float() @ pair["A"].float()
    if n_head is not None:
        update = to_llama_cpp_rows(update, n_head)
    return update.numpy()
