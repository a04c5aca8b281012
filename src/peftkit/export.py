"""Export a LoRA adapter as a GGUF LoRA adapter that llama.cpp applies with ``--lora``.

llama.cpp adds to every adapted weight W (out, in) of the base model

    h = W x + s · B (A x),    s = alpha / r    (r read from the shape of A)

and reads A, B and alpha from a GGUF file laid out as llama.cpp's own
``convert_lora_to_gguf.py`` writes it:

    general.architecture = "llama", general.type = "adapter", adapter.type = "lora",
    adapter.lora.alpha (float32)
    blk.N.attn_q.weight.lora_a     A  (r, in)      one pair per adapted weight, named after
    blk.N.attn_q.weight.lora_b     B  (out, r)     the base tensor (attn_k, attn_v,
                                                   attn_output, ffn_gate, ffn_up, ffn_down)

Shapes are torch's row-major ones; GGUF lists dimensions innermost first, so its header
says [in, r] and [r, out] (gguf-py reverses the numpy shape when it writes).

Two facts the layout does not show, and both fail silently when missed:

- Scale. llama.cpp knows only s = alpha / r. rsLoRA trains with s = alpha / sqrt(r), so
  alpha' = s · r is written; and a file without alpha is applied with s = 1.
- Rotary layout. Hugging Face's Llama rotates the pairs of rows (i, i + d/2) of each head
  (head size d) of the q and k projections; llama.cpp's converter reorders those rows so
  the pairs are adjacent, (2i, 2i + 1). B A must be reordered the same way, which is a
  reordering of the rows of B: within each head, new row 2i + j = old row j·d/2 + i. The
  query projection has ``head_count`` heads, the key projection ``head_count_kv``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .specs.lora import LoraConfig
from .formats.adapter_folder import LAYER_PREFIX, read_tensors
from .formats.gguf import LLAMA_LORA_TENSORS, GgufError, gguf_package, read_header, write_lora_adapter
from .adapter_files import read_config

_LORA_KEY = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.(\w+\.\w+)\.lora_([AB])\.weight")
_DTYPES = {"float32": np.float32, "float16": np.float16}


class ExportError(ValueError):
    """An adapter or a base model that cannot become a llama.cpp LoRA file; says how to fix it."""


@dataclass(frozen=True)
class BaseShape:
    """What the export needs to know about the base model.

    ``weights`` maps a llama.cpp tensor name to its torch shape (out, in); it is used to
    catch an adapter made for another model before llama.cpp does (it refuses the file
    only when the first token is evaluated).
    """

    source: str
    head_count: int
    head_count_kv: int
    weights: dict[str, tuple[int, int]]


@dataclass(frozen=True)
class GgufLoraSummary:
    """What a written GGUF LoRA file holds (read back from the file itself)."""

    path: Path
    tensors: int
    layers: int
    targets: list[str]
    rank: int
    alpha: float
    dtype: str
    size: int


# -- the base model -------------------------------------------------------------------
def _require_gguf() -> None:
    try:
        gguf_package()
    except ImportError as e:
        raise ExportError(f"exporting to GGUF {e}") from e


def _base_from_gguf(path: Path) -> BaseShape:
    try:
        header = read_header(path)
    except GgufError as e:
        raise ExportError(f"{e}; pass the base model's .gguf file or its transformers folder as --model.") from e
    metadata = header.metadata
    arch = metadata.get("general.architecture")
    if arch != "llama":
        raise ExportError(f"{path} is a {arch!r} model; peftkit exports LoRA adapters for llama-architecture "
                          "models only (Llama, SmolLM, TinyLlama, ...).")
    head_count = metadata.get("llama.attention.head_count")
    if head_count is None:
        raise ExportError(f"{path} has no llama.attention.head_count; it is not a complete llama.cpp model. "
                          "Pass the base model's transformers folder (with config.json) as --model instead.")
    # llama.cpp's own default when the key is absent: no grouped-query attention.
    head_count_kv = metadata.get("llama.attention.head_count_kv", head_count)
    if not isinstance(head_count, int) or not isinstance(head_count_kv, int):
        raise ExportError(f"{path} gives per-layer head counts; peftkit exports adapters for models with one "
                          "head count for every layer.")
    weights = {name: t.shape for name, t in header.tensors.items() if len(t.shape) == 2}
    return BaseShape(str(path), head_count, head_count_kv, weights)


def _base_from_config(folder: Path) -> BaseShape:
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportError(f"cannot read {path} ({e}); pass the base model's .gguf file or its transformers "
                          "folder as --model.") from e
    if not isinstance(config, dict):
        raise ExportError(f"{path} does not hold a JSON object of model settings; it is corrupt. Copy or "
                          "download it again, or pass the base model's .gguf file as --model.")
    if config.get("model_type") != "llama":
        raise ExportError(f"{folder} is a {config.get('model_type')!r} model; peftkit exports LoRA adapters for "
                          "llama-architecture models only (Llama, SmolLM, TinyLlama, ...).")
    missing = [k for k in ("num_attention_heads", "hidden_size", "intermediate_size", "num_hidden_layers")
               if not isinstance(config.get(k), int)]
    if missing:
        raise ExportError(f"{path} lacks {missing}: the head counts and sizes are needed to lay the adapter out "
                          "for llama.cpp. Pass the base model's .gguf file as --model instead.")
    heads, hidden = config["num_attention_heads"], config["hidden_size"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    ffn = config["intermediate_size"]
    per_layer = {"attn_q": (heads * head_dim, hidden), "attn_k": (kv_heads * head_dim, hidden),
                 "attn_v": (kv_heads * head_dim, hidden), "attn_output": (hidden, heads * head_dim),
                 "ffn_gate": (ffn, hidden), "ffn_up": (ffn, hidden), "ffn_down": (hidden, ffn)}
    weights = {f"blk.{n}.{t}.weight": shape for n in range(config["num_hidden_layers"]) for t, shape in per_layer.items()}
    return BaseShape(str(folder), heads, kv_heads, weights)


def read_base(base: str | Path | None, config: LoraConfig) -> BaseShape:
    """Head counts and weight shapes of the base model: from ``base`` (a .gguf file or a
    transformers folder), else from the adapter's ``base_model_name_or_path`` when that
    names a local file or folder. Nothing is downloaded."""
    if base is None:
        recorded = config.base_model_name_or_path
        if not recorded or not Path(recorded).exists():
            raise ExportError(
                "the base model's head counts are needed to lay out the q and k projections for llama.cpp, "
                f"and the adapter records no local base model (base_model_name_or_path={recorded!r}). "
                "Pass --model BASE: the base model's .gguf file or its transformers folder.")
        base = recorded
    base = Path(base)
    if base.is_file():
        return _base_from_gguf(base)
    if base.is_dir():
        return _base_from_config(base)
    raise ExportError(f"base model {base} does not exist; pass the base model's .gguf file or its "
                      "transformers folder as --model.")


# -- the adapter ----------------------------------------------------------------------
def _lora_pairs(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """llama.cpp base tensor name -> {"A": (r, in), "B": (out, r)}; anything llama.cpp
    cannot apply is an error that names the module."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    refused: list[str] = []
    for key, tensor in tensors.items():
        match = _LORA_KEY.fullmatch(key)
        if match is None or match.group(2) not in LLAMA_LORA_TENSORS:
            refused.append(key.removeprefix(LAYER_PREFIX))
            continue
        layer, module, which = match.groups()
        pairs.setdefault(f"blk.{layer}.{LLAMA_LORA_TENSORS[module]}.weight", {})[which] = tensor
    if refused:
        shown = ", ".join(refused[:4]) + (" ..." if len(refused) > 4 else "")
        raise ExportError(
            f"llama.cpp cannot apply these adapter tensors: {shown} ({len(refused)} in all). It takes a LoRA "
            f"only on the decoder layers' {', '.join(LLAMA_LORA_TENSORS)} (no embeddings, no lm_head, no trained "
            "biases). Train with target_modules limited to those (e.g. 'all-linear'), or merge the adapter "
            "with 'peftkit merge' and convert the merged model instead.")
    for name, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise ExportError(f"the adapter has only lora_{''.join(pair)} for {name}; the file is incomplete.")
    return pairs


def _check_shapes(pairs: dict[str, dict[str, torch.Tensor]], r: int, base: BaseShape) -> None:
    for name, pair in sorted(pairs.items()):
        a, b = pair["A"], pair["B"]
        if a.shape[0] != r or b.shape[1] != r:
            raise ExportError(f"{name}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not have the "
                              f"config's rank r={r}; llama.cpp reads r from the shapes, so the scale would be wrong.")
        expected = base.weights.get(name)
        if expected is None:
            raise ExportError(f"{name} is not a weight of the base model {base.source}; was the adapter trained "
                              "on another model?")
        if (b.shape[0], a.shape[1]) != expected:
            raise ExportError(f"{name}: the adapter's update is {(b.shape[0], a.shape[1])} but the base weight in "
                              f"{base.source} is {expected} (out, in); was the adapter trained on another model?")


def _permute_rotary_rows(b: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder the rows of B (out, r) from Hugging Face's half-split rotary layout to
    llama.cpp's interleaved one (as llama.cpp's convert_hf_to_gguf does to the q and k
    weights): per head of d rows, row j·d/2 + i moves to 2i + j."""
    out, r = b.shape
    return b.reshape(n_head, 2, out // n_head // 2, r).transpose(1, 2).reshape(out, r)


def _gguf_tensors(pairs: dict[str, dict[str, torch.Tensor]], base: BaseShape,
                  dtype: type) -> list[tuple[str, np.ndarray]]:
    heads = {"attn_q": base.head_count, "attn_k": base.head_count_kv}
    arrays = []
    for name in sorted(pairs, key=lambda n: (int(n.split(".")[1]), n)):
        a, b = pairs[name]["A"].float(), pairs[name]["B"].float()
        n_head = heads.get(name.split(".")[2])
        if n_head is not None:
            b = _permute_rotary_rows(b, n_head)
        arrays.append((f"{name}.lora_a", a.numpy().astype(dtype)))
        arrays.append((f"{name}.lora_b", b.numpy().astype(dtype)))
    return arrays


def gguf_alpha(config: LoraConfig) -> float:
    """The alpha that makes llama.cpp's alpha / r equal the scale the adapter was trained with:
    alpha itself, or for rsLoRA (s = alpha / sqrt(r)) s · r = alpha · sqrt(r)."""
    return config.alpha * math.sqrt(config.r) if config.use_rslora else float(config.alpha)


def export_gguf_lora(adapter_dir: str | Path, out_path: str | Path, *, base: str | Path | None = None,
                     dtype: str = "float32", overwrite: bool = False) -> Path:
    """Write the LoRA adapter in ``adapter_dir`` as a llama.cpp GGUF LoRA file.

    Args:
        adapter_dir: a peftkit or Hugging Face PEFT LoRA folder for a llama-architecture model.
        out_path: the .gguf file to write (atomically).
        base: the base model's .gguf file or transformers folder, for its head counts and
            weight shapes; default: the adapter's ``base_model_name_or_path`` if it is local.
        dtype: ``"float32"`` or ``"float16"`` for the A and B tensors.
        overwrite: replace an existing ``out_path``.

    Raises ``ExportError`` (a ValueError) or ``AdapterFileError`` with the problem and the fix.
    """
    out_path = Path(out_path)
    _require_gguf()  # fail before any work when the writer is missing
    if dtype not in _DTYPES:
        raise ExportError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}.")
    if out_path.is_dir():
        raise ExportError(f"{out_path} is a folder; pass the path of the .gguf file to write.")
    if out_path.exists() and not overwrite:
        raise ExportError(f"{out_path} already exists; pass overwrite=True (--overwrite) to replace it.")
    config = read_config(adapter_dir)
    if not isinstance(config, LoraConfig):
        raise ExportError(f"{adapter_dir} is a {config.peft_type} adapter; llama.cpp applies only LoRA adapters "
                          "(--lora). Export a LoRA adapter, or serve this one with peftkit.")
    pairs = _lora_pairs(read_tensors(adapter_dir))
    if not pairs:
        raise ExportError(f"{adapter_dir} holds no LoRA weights.")
    shape = read_base(base, config)
    _check_shapes(pairs, config.r, shape)
    arrays = _gguf_tensors(pairs, shape, _DTYPES[dtype])
    out_path.parent.mkdir(parents=True, exist_ok=True)
    return write_lora_adapter(out_path, "llama", gguf_alpha(config), dtype, arrays)


def read_gguf_lora(path: str | Path) -> GgufLoraSummary:
    """Summarise a GGUF LoRA file from its own contents (what llama.cpp will see)."""
    header = read_header(path)
    lora_a = [t for name, t in header.tensors.items() if name.endswith(".lora_a")]
    return GgufLoraSummary(
        path=Path(path), tensors=len(header.tensors),
        layers=len({name.split(".")[1] for name in header.tensors}),
        targets=sorted({name.split(".")[2] for name in header.tensors}),
        rank=lora_a[0].shape[0] if lora_a else 0,
        alpha=float(header.metadata.get("adapter.lora.alpha", float("nan"))),
        dtype=", ".join(sorted(header.tensor_types())),
        size=Path(path).stat().st_size,
    )
