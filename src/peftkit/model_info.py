"""Readable facts about a model that ``peftkit info`` shows, from its config, its GGUF
header or its safetensors header alone: no weights are read."""

from __future__ import annotations

from pathlib import Path

from .loading import REFERENCE, ModelLoadError, gguf_file_in, meta_model, read_gguf_header, weights_file


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
