"""Readable facts about a model that ``peftkit info`` shows, from its config, its GGUF
header or its safetensors header alone, and its module tree on the meta device: no weights
are read."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .loading import (
    REFERENCE, ModelLoadError, gguf_config, gguf_file_in, read_gguf_header, read_model_config, weights_file,
)
from .models import ReferenceConfig, ReferenceDecoder


def meta_model(path: str | Path) -> nn.Module:
    """The model's module tree on the meta device (shapes only, no memory, no weights read),
    from a model folder, a bare config.json, a .gguf file, or 'reference'."""
    if str(path) == REFERENCE:
        config = ReferenceConfig().to_dict()
    elif gguf_file_in(Path(path)) is not None:
        config = gguf_config(gguf_file_in(Path(path)))
    else:
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise ModelLoadError(f"{path} is neither a model folder nor a config.json file.")
        config = read_model_config(file)
    if config.get("model_type") == ReferenceConfig.model_type:
        with torch.device("meta"):
            return ReferenceDecoder(ReferenceConfig.from_dict(config))
    try:
        import transformers
    except ImportError as e:
        raise ModelLoadError("a transformers config needs transformers: pip install 'peftkit[hf]'.") from e
    fields = {k: v for k, v in config.items() if k != "model_type"}
    try:
        hf_config = transformers.AutoConfig.for_model(config.get("model_type", ""), **fields)
    except ValueError as e:
        raise ModelLoadError(f"{path}: unknown or missing model_type {config.get('model_type')!r} ({e}).") from e
    declared = getattr(transformers, (config.get("architectures") or [""])[0], None)
    with torch.device("meta"):
        if isinstance(declared, type) and hasattr(declared, "_from_config"):
            return declared._from_config(hf_config)  # the class the checkpoint was saved from
        try:
            return transformers.AutoModelForCausalLM.from_config(hf_config)
        except ValueError:  # encoders such as BERT have no causal-LM head: count the bare model
            return transformers.AutoModel.from_config(hf_config)



def describe_model(path: str | Path) -> dict[str, str]:
    """Readable facts of a model folder, .gguf file or 'reference': kind, architecture,
    shape, parameters, storage and size, and peftkit's default LoRA targets for it."""
    from . import integrations
    from .targets import DEFAULT_TARGETS, architecture_targets

    path = Path(path)
    gguf_file = gguf_file_in(path) if str(path) != REFERENCE else None
    model = meta_model(path)
    value = lambda *names: integrations.config_value(model, *names)  # noqa: E731
    facts = {
        "kind": ("GGUF file (dequantized to float32 on load)" if gguf_file else
                 "peftkit's reference decoder" if str(path) == REFERENCE else "model folder"),
        "architecture": f"{type(model).__name__} ({integrations.model_type(model)})",
        "layers": integrations.num_layers(model),
        "hidden size": value("hidden_size", "n_embd", "d_model"),
        "attention heads": f"{integrations.num_attention_heads(model)} query, "
                           f"{value('num_key_value_heads') or integrations.num_attention_heads(model)} key/value",
        "vocabulary": value("vocab_size"),
        "parameters": f"{sum(p.numel() for p in model.parameters()):,}",
    }
    if gguf_file:
        types = read_gguf_header(gguf_file).tensor_types()
        facts["storage"] = ", ".join(f"{n} x {t}" for t, n in sorted(types.items(), key=lambda kv: -kv[1]))
        facts["size on disk"] = f"{gguf_file.stat().st_size / 2**20:.1f} MB"
    elif path.is_dir():
        facts["storage"] = _stored_dtypes(path)
        facts["size on disk"] = f"{sum(f.stat().st_size for f in path.iterdir() if f.is_file()) / 2**20:.1f} MB"
    targets = architecture_targets(model, DEFAULT_TARGETS, "peft_default_targets")
    facts["default LoRA targets"] = ", ".join(targets) if targets else "none known: pass --targets"
    return {k: v for k, v in facts.items() if v is not None}


def _stored_dtypes(folder: Path) -> str:
    """The dtypes of a folder's safetensors weights, read from the file header."""
    from safetensors import SafetensorError, safe_open

    file = weights_file(folder)
    if file.name != "model.safetensors":
        return "(sharded or not safetensors)"
    counts: dict[str, int] = {}
    try:
        with safe_open(file, framework="pt") as weights:
            for name in weights.keys():
                dtype = weights.get_slice(name).get_dtype()
                counts[dtype] = counts.get(dtype, 0) + 1
    except SafetensorError as e:
        raise ModelLoadError(f"{file} is not a readable safetensors file ({e}); it is truncated or corrupt. "
                             "Copy or download it again.") from e
    return ", ".join(f"{n} x {t}" for t, n in sorted(counts.items(), key=lambda kv: -kv[1]))
