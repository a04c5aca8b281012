"""A GGUF base read straight into a 4-bit NF4 model, one tensor at a time.

transformers reads a GGUF file by dequantizing every tensor into one float32 state dict and
only then building the model, so a 7B file costs 28 GB on its way to any smaller form. Here
the model is built on the meta device (no memory), and each tensor of the file is
dequantized, renamed and reordered by transformers' own GGUF tables (the tensor-name map
and the per-architecture processors, which undo llama.cpp's q/k permutation), then stored
at once: a linear weight of the blocks as ``nf4.Nf4Linear``, anything else in ``dtype``.
The peak is the final model plus one tensor in float32.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import integrations
from .nf4 import Nf4Linear, check_scheme


class StreamingUnsupported(Exception):
    """This file or architecture needs transformers' own (whole-file) loader."""


def load_gguf_quantized(path: Path, auto_class: Any, dtype: torch.dtype, scheme: str, **config_kwargs) -> nn.Module:
    """The model of GGUF file ``path`` as ``auto_class`` (AutoModelForCausalLM, ...), its block
    linears NF4, everything else in ``dtype``. Raises ``StreamingUnsupported`` when a tensor
    of the model is left unfilled (an architecture whose file lacks what its class needs)."""
    import transformers
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor,
                                                          get_gguf_hf_weights_map, load_gguf_checkpoint)

    check_scheme(scheme)
    config = transformers.AutoConfig.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True,
                                                     **config_kwargs)
    with torch.device("meta"):
        model = auto_class.from_config(config, dtype=dtype)
    parsed = load_gguf_checkpoint(path, return_tensors=False)
    parsed.pop("tokenizer", None)  # its vocabulary as Python objects: not needed to place tensors
    processor = TENSOR_PROCESSORS.get(parsed["config"]["model_type"], TensorProcessor)(config=parsed["config"])
    names = get_gguf_hf_weights_map(model, processor)
    head = integrations.output_head(model)
    for tensor in GGUFReader(path).tensors:
        result = processor.process(weights=dequantize(tensor.data, tensor.tensor_type), name=tensor.name,
                                   tensor_key_mapping=names, parsed_parameters=parsed)
        if result.name not in names:
            continue  # tensors the model has no place for (llama.cpp's rope frequencies)
        owner_path, leaf = names[result.name].rsplit(".", 1)
        owner = model.get_submodule(owner_path)
        weights = result.weights  # a fresh array, unless the file stores it plain (then a read-only view)
        value = torch.from_numpy(weights if weights.flags.writeable else np.copy(weights))
        if leaf == "weight" and isinstance(owner, nn.Linear) and owner is not head:
            bias = owner.bias if owner.bias is not None and not owner.bias.is_meta else None
            quantized = Nf4Linear(value.to(dtype), bias)
            quantized.pending_bias = owner.bias is not None and bias is None  # its bias comes later
            model.set_submodule(owner_path, quantized)
        elif getattr(owner, "pending_bias", False) and leaf == "bias":
            owner.bias = nn.Parameter(value.to(dtype), requires_grad=False)
            owner.pending_bias = False
        else:
            setattr(owner, leaf, nn.Parameter(value.to(dtype), requires_grad=False))
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    _rebuild_meta_buffers(model)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise StreamingUnsupported(f"not in the file: {left[:3]}")
    return model


def _rebuild_meta_buffers(model: nn.Module) -> None:
    """Buffers computed at construction (rotary inverse frequencies) are meta after a meta
    build: their modules are built again on the CPU, from the model's config."""
    for path, module in list(model.named_modules()):
        if path and any(b.is_meta for b in module.buffers(recurse=False)) and not list(module.parameters()):
            try:
                model.set_submodule(path, type(module)(config=model.config))
            except TypeError as e:
                raise StreamingUnsupported(f"{path} ({type(module).__name__}) cannot be rebuilt: {e}") from e
