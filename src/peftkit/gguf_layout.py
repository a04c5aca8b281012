"""How llama.cpp names and lays out the weights of a Hugging Face model: the architecture,
the tensor names, the row order of the rotary projections, and the shapes of the base model.

Both GGUF exports read it: the LoRA adapter (``export.py``) and the merged model
(``merged_gguf.py``).

- Names come from gguf-py's own tensor-name map (``gguf.get_tensor_name_map``), the table
  llama.cpp's converter uses: ``model.layers.3.self_attn.q_proj`` -> ``blk.3.attn_q.weight``
  for a Llama, ``model.layers.3.self_attn.qkv_proj`` -> ``blk.3.attn_qkv.weight`` for a Phi-3.
- Rows. Hugging Face models rotate the pairs of rows (i, i + d/2) of each head (head size d)
  of q and k. llama.cpp's Llama rotates adjacent pairs (2i, 2i + 1), so its converter
  reorders those rows (``LlamaModel.permute``): within each head, new row 2i + j = old row
  j·d/2 + i. Architectures whose llama.cpp code rotates halves as Hugging Face does (Qwen2,
  Qwen3, Gemma 2, Phi-3) keep the rows as they are. ``ROTARY_ROWS`` says which is which
  for the architectures checked against a real llama.cpp; for any other one the q and k rows
  are refused, since a wrong order fails silently.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .formats.gguf import GgufError, gguf_package, read_header

INTERLEAVED, AS_IS = "interleaved", "as-is"
# llama.cpp architecture -> the row order of q and k in its GGUF files; each one is checked by
# tests/real/test_gguf_architectures.py against llama.cpp itself
# (Mistral's GGUF architecture is "llama".)
ROTARY_ROWS = {"llama": INTERLEAVED, "qwen2": AS_IS, "qwen3": AS_IS, "gemma2": AS_IS, "phi3": AS_IS}
# Hugging Face model_type -> llama.cpp architecture, where the names differ (as the converter
# maps them: Mistral's weights are a Llama's).
_HF_TO_LLAMA_CPP = {"mistral": "llama", "gemma3_text": "gemma3"}
_ROTARY_TENSORS = ("attn_q", "attn_k", "attn_qkv")


class LayoutError(ValueError):
    """A base model whose llama.cpp layout cannot be known; says what to pass instead."""


@dataclass(frozen=True)
class GgufBase:
    """What a GGUF export needs to know about the base model.

    ``weights`` maps a llama.cpp tensor name to its torch shape (out, in); it catches an
    adapter made for another model before llama.cpp does (llama.cpp refuses the file only when
    the first token is evaluated, and a same-shaped mismatch not at all).
    """

    source: str
    architecture: str  # llama.cpp's name: "llama", "qwen2", "gemma2" ...
    block_count: int
    head_count: int
    head_count_kv: int
    weights: dict[str, tuple[int, int]]

    def tensor_name(self, module: str) -> str | None:
        """The llama.cpp weight of the Hugging Face module ``module`` (e.g.
        ``model.layers.0.self_attn.q_proj``), or None when llama.cpp has no such tensor."""
        name = _name_map(self.architecture, self.block_count).get_name(module)
        return None if name is None else f"{name}.weight"

    def rotary_heads(self, tensor: str) -> int | None:
        """How many heads the rows of ``tensor`` (a llama.cpp weight name) must be reordered in,
        or None when they are kept as they are. Raises LayoutError for q or k of an
        architecture whose order is not known."""
        kind = tensor.split(".")[2] if tensor.startswith("blk.") else ""
        if kind not in _ROTARY_TENSORS:
            return None
        order = ROTARY_ROWS.get(self.architecture)
        if order is None:
            raise LayoutError(
                f"{tensor}: peftkit has not checked how llama.cpp orders the rotary rows of q and k for the "
                f"{self.architecture!r} architecture (checked: {', '.join(sorted(ROTARY_ROWS))}), and a wrong "
                "order fails silently. Train without q/k targets (e.g. v_proj, o_proj and the MLP), or merge "
                "with 'peftkit merge' and convert the merged model with llama.cpp's convert_hf_to_gguf.py.")
        if order == AS_IS:
            return None
        if kind == "attn_qkv":  # no converter of an interleaved architecture fuses them
            raise LayoutError(f"{tensor}: a fused qkv weight in an interleaved-rotary architecture is not supported.")
        return self.head_count if kind == "attn_q" else self.head_count_kv


@functools.lru_cache(maxsize=8)
def _name_map(architecture: str, block_count: int):
    """gguf-py's name map (about 60 ms to build, so built once per model)."""
    return gguf_package().get_tensor_name_map(_architectures()[architecture], block_count)


def _architectures() -> dict:
    """llama.cpp architecture name -> gguf.MODEL_ARCH."""
    gguf = gguf_package()
    return {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}


def to_llama_cpp_rows(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder the rows of ``rows`` (out, ...) from Hugging Face's half-split rotary layout
    to llama.cpp's interleaved one: per head of d rows, row j·d/2 + i moves to 2i + j. Used on
    a weight (out, in), or on a LoRA B (out, r), since (P B) A = P (B A)."""
    out = rows.shape[0]
    rest = rows.shape[1:]
    return rows.reshape(n_head, 2, out // n_head // 2, *rest).transpose(1, 2).reshape(out, *rest)


def llama_cpp_architecture(model_type: str | None, source: str) -> str:
    """The llama.cpp architecture of a Hugging Face ``model_type``, or LayoutError."""
    arch = _HF_TO_LLAMA_CPP.get(model_type or "", model_type)
    if arch not in _architectures():
        raise LayoutError(f"{source} is a {model_type!r} model, which llama.cpp has no architecture for "
                          "(gguf-py names none of that name); it cannot run in llama.cpp.")
    return arch


# -- reading the base model -------------------------------------------------------------
def base_from_gguf(path: Path) -> GgufBase:
    try:
        header = read_header(path)
    except GgufError as e:
        raise LayoutError(f"{e}; pass the base model's .gguf file or its transformers folder as --model.") from e
    metadata = header.metadata
    arch = header.architecture
    if metadata.get("general.type") == "adapter":
        raise LayoutError(f"{path} is a LoRA adapter, not a model; pass the base model's .gguf file as --model.")
    if arch not in _architectures():
        raise LayoutError(f"{path} is a {arch!r} model, an architecture this gguf package does not know; "
                          "upgrade it (pip install -U gguf).")
    head_count = metadata.get(f"{arch}.attention.head_count")
    block_count = metadata.get(f"{arch}.block_count")
    if head_count is None or block_count is None:
        raise LayoutError(f"{path} has no {arch}.attention.head_count or {arch}.block_count; it is not a complete "
                          "llama.cpp model. Pass the base model's transformers folder (with config.json) as "
                          "--model instead.")
    # llama.cpp's own default when the key is absent: no grouped-query attention.
    head_count_kv = metadata.get(f"{arch}.attention.head_count_kv", head_count)
    if not isinstance(head_count, int) or not isinstance(head_count_kv, int):
        raise LayoutError(f"{path} gives per-layer head counts; peftkit exports for models with one head count "
                          "for every layer.")
    weights = {name: t.shape for name, t in header.tensors.items() if len(t.shape) == 2}
    return GgufBase(str(path), arch, int(block_count), head_count, head_count_kv, weights)


def base_from_config(folder: Path) -> GgufBase:
    """The layout from a transformers folder's config.json alone: the model is built on the
    meta device (no weights read, no memory used) to list its linear layers."""
    path = folder / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LayoutError(f"cannot read {path} ({e}); pass the base model's .gguf file or its transformers "
                          "folder as --model.") from e
    if not isinstance(raw, dict):
        raise LayoutError(f"{path} does not hold a JSON object of model settings; it is corrupt. Copy or "
                          "download it again, or pass the base model's .gguf file as --model.")
    arch = llama_cpp_architecture(raw.get("model_type"), str(folder))
    # Read from the file, not from the config class: a missing count would take a default.
    if not isinstance(raw.get("num_attention_heads"), int) or not isinstance(raw.get("num_hidden_layers"), int):
        raise LayoutError(f"{path} lacks num_attention_heads or num_hidden_layers: the head counts are needed to "
                          "lay the weights out for llama.cpp. Pass the base model's .gguf file as --model instead.")
    try:
        import transformers
    except ImportError as e:
        raise LayoutError("reading a transformers folder needs transformers: pip install transformers, or pass "
                          "the base model's .gguf file as --model.") from e
    try:
        config = transformers.AutoConfig.for_model(**raw)
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, TypeError) as e:
        raise LayoutError(f"transformers cannot build the model described by {path} ({e}); pass the base "
                          "model's .gguf file as --model instead.") from e
    heads = raw["num_attention_heads"]
    base = GgufBase(str(folder), arch, raw["num_hidden_layers"], heads,
                    raw.get("num_key_value_heads") or heads, {})
    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            name = base.tensor_name(module_name)
            if name is not None:
                base.weights[name] = tuple(module.weight.shape)
    return base


def read_base(base: str | Path | None, recorded: str | None) -> GgufBase:
    """The layout of the base model ``base`` (a .gguf file or a transformers folder), else of
    the adapter's recorded ``base_model_name_or_path`` when that names a local file or
    folder. Nothing is downloaded."""
    if base is None:
        if not recorded or not Path(recorded).exists():
            raise LayoutError(
                "the base model's head counts are needed to lay out the weights for llama.cpp, and the adapter "
                f"records no local base model (base_model_name_or_path={recorded!r}). Pass --model BASE: the "
                "base model's .gguf file or its transformers folder.")
        base = recorded
    base = Path(base)
    if base.is_file():
        return base_from_gguf(base)
    if base.is_dir():
        return base_from_config(base)
    raise LayoutError(f"base model {base} does not exist; pass the base model's .gguf file or its "
                      "transformers folder as --model.")


def check_same_model(base: GgufBase, recorded: str | None) -> None:
    """When the adapter records a local base model other than ``base``, both must have the
    same architecture and head counts: the shapes alone do not show 8 heads of 64 against
    16 of 32, and the q/k row order depends on it."""
    if not recorded or Path(recorded).resolve() == Path(base.source).resolve() or not Path(recorded).exists():
        return
    try:
        trained = read_base(recorded, None)
    except LayoutError:
        return  # the record is not readable; the shapes are still checked
    mine = (base.architecture, base.head_count, base.head_count_kv)
    theirs = (trained.architecture, trained.head_count, trained.head_count_kv)
    if mine != theirs:
        raise LayoutError(
            f"the adapter was trained on {recorded} ({theirs[0]}, {theirs[1]} query / {theirs[2]} key-value heads) "
            f"but the base given is {base.source} ({mine[0]}, {mine[1]} / {mine[2]}): it is another model. Pass "
            "the GGUF of the model the adapter was trained on.")
