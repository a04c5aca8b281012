"""Export a LoRA adapter as a GGUF LoRA adapter that llama.cpp applies with ``--lora``.

llama.cpp adds to every adapted weight W (out, in) of the base model

    h = W x + s · B (A x),    s = alpha / r    (r read from the shape of A)

and reads A, B and alpha from a GGUF file laid out as llama.cpp's own
``convert_lora_to_gguf.py`` writes it:

    general.architecture = the base's ("llama", "qwen2", ...), general.type = "adapter",
    adapter.type = "lora", adapter.lora.alpha (float32)
    blk.N.attn_q.weight.lora_a     A  (r, in)      one pair per adapted weight, named after
    blk.N.attn_q.weight.lora_b     B  (out, r)     the base tensor (gguf-py's name map,
                                                   see gguf_layout.py)

Shapes are torch's row-major ones; GGUF lists dimensions innermost first, so its header
says [in, r] and [r, out] (gguf-py reverses the numpy shape when it writes).

Two facts the layout does not show, and both fail silently when missed:

- Scale. llama.cpp knows only s = alpha / r. rsLoRA trains with s = alpha / sqrt(r), so
  alpha' = s · r is written; and a file without alpha is applied with s = 1.
- Rotary layout. Where llama.cpp's converter reorders the rows of q and k (Llama, Mistral),
  B A must be reordered the same way, which is a reordering of the rows of B
  (``gguf_layout.to_llama_cpp_rows``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .specs.lora import LoraConfig
from .formats.adapter_folder import LAYER_PREFIX, read_tensors
from .formats.gguf import gguf_package, read_header, write_lora_adapter
from .adapter_files import read_config
from .gguf_layout import GgufBase, LayoutError, check_same_model, read_base, to_llama_cpp_rows

_LORA_KEY = re.compile(re.escape(LAYER_PREFIX) + r"(.+)\.lora_([AB])\.weight")
_DTYPES = {"float32": np.float32, "float16": np.float16}


class ExportError(ValueError):
    """An adapter or a base model that cannot become a llama.cpp file; says how to fix it."""


@dataclass(frozen=True)
class GgufLoraSummary:
    """What a written GGUF LoRA file holds (read back from the file itself)."""

    path: Path
    architecture: str
    tensors: int
    layers: int
    targets: list[str]
    rank: int
    alpha: float
    dtype: str
    size: int


def _require_gguf() -> None:
    try:
        gguf_package()
    except ImportError as e:
        raise ExportError(f"exporting to GGUF {e}") from e


# -- the adapter ----------------------------------------------------------------------
def _lora_modules(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Hugging Face module name -> {"A": (r, in), "B": (out, r)}; anything but a LoRA pair
    of a linear layer (an embedding LoRA, a trained bias, a DoRA magnitude) is an error
    that names it."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    refused: list[str] = []
    for key, tensor in tensors.items():
        match = _LORA_KEY.fullmatch(key)
        if match is None:
            refused.append(key.removeprefix(LAYER_PREFIX))
            continue
        module, which = match.groups()
        modules.setdefault(module, {})[which] = tensor
    _refuse(refused)
    for module, pair in modules.items():
        if set(pair) != {"A", "B"}:
            raise ExportError(f"the adapter has only lora_{''.join(pair)} for {module}; the file is incomplete.")
    return modules


def _refuse(names: list[str]) -> None:
    if names:
        shown = ", ".join(names[:4]) + (" ..." if len(names) > 4 else "")
        raise ExportError(
            f"llama.cpp cannot apply these adapter tensors: {shown} ({len(names)} in all). It takes a LoRA only "
            "on the linear weights of the decoder layers (no embeddings, no lm_head, no trained biases). "
            "Train with target_modules limited to those (e.g. 'all-linear'), or merge the adapter with "
            "'peftkit merge' and convert the merged model instead.")


def _by_tensor(modules: dict[str, dict[str, torch.Tensor]], base: GgufBase) -> dict[str, dict[str, torch.Tensor]]:
    """The same pairs keyed by the llama.cpp weight each one adapts (``blk.N.attn_q.weight``)."""
    pairs, refused = {}, []
    for module, pair in modules.items():
        name = base.tensor_name(module)
        if name is None or not name.startswith("blk."):
            refused.append(f"{module} (llama.cpp's {base.architecture!r} has "
                           f"{'no such weight' if name is None else name})")
            continue
        pairs[name] = pair
    _refuse(refused)
    return pairs


def check_shapes(pairs: dict[str, dict[str, torch.Tensor]], r: int, base: GgufBase) -> None:
    """Each pair has the config's rank and the shape of the base weight it adapts."""
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


def _block_order(name: str) -> tuple[int, str]:
    return int(name.split(".")[1]), name


def _gguf_tensors(pairs: dict[str, dict[str, torch.Tensor]], base: GgufBase,
                  dtype: type) -> list[tuple[str, np.ndarray]]:
    arrays = []
    for name in sorted(pairs, key=_block_order):
        a, b = pairs[name]["A"].float(), pairs[name]["B"].float()
        n_head = base.rotary_heads(name)
        if n_head is not None:
            b = to_llama_cpp_rows(b, n_head)
        arrays.append((f"{name}.lora_a", a.numpy().astype(dtype)))
        arrays.append((f"{name}.lora_b", b.numpy().astype(dtype)))
    return arrays


def lora_pairs(adapter_dir: str | Path, base: str | Path | None) -> tuple[LoraConfig, GgufBase, dict]:
    """Read a LoRA folder and its base model's layout, and pair them up: (config, base,
    {llama.cpp weight name: {"A", "B"}}), every check made; ExportError otherwise."""
    config = read_config(adapter_dir)
    if not isinstance(config, LoraConfig):
        raise ExportError(f"{adapter_dir} is a {config.peft_type} adapter; llama.cpp applies only LoRA adapters "
                          "(--lora). Export a LoRA adapter, or serve this one with peftkit.")
    modules = _lora_modules(read_tensors(adapter_dir))
    if not modules:
        raise ExportError(f"{adapter_dir} holds no LoRA weights.")
    try:
        layout = read_base(base, config.base_model_name_or_path)
        check_same_model(layout, config.base_model_name_or_path)
    except LayoutError as e:
        raise ExportError(str(e)) from e
    pairs = _by_tensor(modules, layout)
    check_shapes(pairs, config.r, layout)
    try:
        for name in pairs:
            layout.rotary_heads(name)
    except LayoutError as e:
        raise ExportError(str(e)) from e
    return config, layout, pairs


def gguf_alpha(config: LoraConfig) -> float:
    """The alpha that makes llama.cpp's alpha / r equal the scale the adapter was trained with:
    alpha itself, or for rsLoRA (s = alpha / sqrt(r)) s · r = alpha · sqrt(r)."""
    return config.alpha * math.sqrt(config.r) if config.use_rslora else float(config.alpha)


def export_gguf_lora(adapter_dir: str | Path, out_path: str | Path, *, base: str | Path | None = None,
                     dtype: str = "float32", overwrite: bool = False) -> Path:
    """Write the LoRA adapter in ``adapter_dir`` as a llama.cpp GGUF LoRA file.

    Args:
        adapter_dir: a peftkit or Hugging Face PEFT LoRA folder, for a model of any architecture
            llama.cpp runs (see gguf_layout.py).
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
    config, layout, pairs = lora_pairs(adapter_dir, base)
    arrays = _gguf_tensors(pairs, layout, _DTYPES[dtype])
    out_path.parent.mkdir(parents=True, exist_ok=True)
    return write_lora_adapter(out_path, layout.architecture, gguf_alpha(config), dtype, arrays)


def read_gguf_lora(path: str | Path) -> GgufLoraSummary:
    """Summarise a GGUF LoRA file from its own contents (what llama.cpp will see)."""
    header = read_header(path)
    lora_a = [t for name, t in header.tensors.items() if name.endswith(".lora_a")]
    return GgufLoraSummary(
        path=Path(path), architecture=header.architecture, tensors=len(header.tensors),
        layers=len({name.split(".")[1] for name in header.tensors}),
        targets=sorted({name.split(".")[2] for name in header.tensors}),
        rank=lora_a[0].shape[0] if lora_a else 0,
        alpha=float(header.metadata.get("adapter.lora.alpha", float("nan"))),
        dtype=", ".join(sorted(header.tensor_types())),
        size=Path(path).stat().st_size,
    )
