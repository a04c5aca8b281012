"""Load the base model and tokenizer a user names on the command line.

``--model`` takes ``reference`` (the built-in reference decoder, already taught the demo's
task A by peftkit's own code and cached), a folder written by
``ReferenceDecoder.save_pretrained``, a local transformers folder (config.json +
safetensors weights + tokenizer files), or a single ``.gguf`` file as llama.cpp and Ollama
keep them (transformers dequantizes it to float32 and builds its tokenizer from the same
file; needs the ``gguf`` package). Nothing is downloaded: transformers is always called
with ``local_files_only=True``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from .formats.gguf import GgufError, GgufHeader, read_header
from .models import ByteTokenizer, ReferenceConfig, ReferenceDecoder

REFERENCE = "reference"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


class ModelLoadError(ValueError):
    """A model path that cannot be loaded, with what to do about it."""


@dataclass
class LoadedModel:
    """A base model with the text codec that goes with it.

    ``task`` is ``"causal-lm"`` or ``"classification"``; ``classes`` names the labels of a
    classification head.
    """

    model: nn.Module
    tokenizer: Any
    source: str
    task: str = "causal-lm"

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        for candidate in (getattr(tok, "pad_token_id", None), getattr(tok, "eos_token_id", None)):
            if candidate is not None:
                return int(candidate)
        return 0

    @property
    def eos_id(self) -> int | None:
        eos = getattr(self.tokenizer, "eos_token_id", None)
        return None if eos is None else int(eos)

    def encode(self, text: str) -> list[int]:
        """Token ids with the model's usual start tokens (BOS, or BERT's [CLS] ... [SEP])."""
        if isinstance(self.tokenizer, ByteTokenizer):
            return self.tokenizer.encode(text, add_bos=True)
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def cache_dir() -> Path:
    """Where peftkit keeps what it builds once (``$PEFTKIT_CACHE`` or ~/.cache/peftkit)."""
    root = os.environ.get("PEFTKIT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "peftkit"
    return Path(root)


def reference_base(progress: bool = True) -> Path:
    """The reference decoder trained on task A, built by peftkit's own code on first use."""
    from .pretrain import BASE_STEPS, BASE_SEED, pretrain_base

    folder = cache_dir() / f"reference-task-a-s{BASE_SEED}-n{BASE_STEPS}"
    if (folder / "model.safetensors").is_file():
        return folder
    model = pretrain_base(BASE_STEPS, BASE_SEED, progress)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".reference-", dir=folder.parent))
    try:
        model.save_pretrained(staging)
        os.replace(staging, folder)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (folder / "model.safetensors").is_file():  # another process may have won the race
            raise
    return folder


def _read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"{folder} has no config.json; --model takes 'reference', a model folder "
                             "(config.json + weights + tokenizer) or a .gguf file.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path} is not valid JSON ({e}).") from e


def load_model(path: str | Path, *, task: str = "causal-lm", num_labels: int | None = None,
               progress: bool = True) -> LoadedModel:
    """Load ``path`` (see the module docstring) for ``task``."""
    if str(path) == REFERENCE:
        path = reference_base(progress)
    folder = Path(path)
    if not folder.exists():
        raise ModelLoadError(f"model path {folder} does not exist; pass 'reference', a local model folder "
                             "or a .gguf file.")
    gguf_file = gguf_file_in(folder)
    if gguf_file is not None:
        return _load_gguf(gguf_file, task, num_labels)
    if not folder.is_dir():
        raise ModelLoadError(f"model path {folder} is a file but not a .gguf file; pass the folder that holds "
                             "config.json and the weights, or a .gguf file.")
    config = _read_config(folder)
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise ModelLoadError(f"{folder} has a config.json but no weights ({' or '.join(WEIGHT_FILES[:2])}); "
                             "copy the weights in, or pass the folder that has them.")
    if config.get("model_type") == ReferenceConfig.model_type:
        if task != "causal-lm":
            raise ModelLoadError("the reference decoder has no classification head; use a transformers "
                                 "model (e.g. BertForSequenceClassification) for {'text', 'label'} data.")
        return LoadedModel(ReferenceDecoder.from_pretrained(folder), ByteTokenizer(), str(folder))
    return _load_transformers(folder, task, num_labels)


def _load_transformers(folder: Path, task: str, num_labels: int | None) -> LoadedModel:
    try:
        import transformers
    except ImportError as e:
        raise ModelLoadError("loading a transformers model folder needs transformers: pip install 'peftkit[hf]'.") from e
    auto = transformers.AutoModelForSequenceClassification if task == "classification" else transformers.AutoModelForCausalLM
    kwargs: dict[str, Any] = {"local_files_only": True}
    if num_labels is not None:
        kwargs["num_labels"] = num_labels
    try:
        model = auto.from_pretrained(folder, **kwargs)
    except ValueError as e:  # transformers' words for an architecture without that head
        raise ModelLoadError(f"{folder}: transformers cannot build a {task} model from it ({e}).") from e
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{folder} has no tokenizer files (tokenizer.json or vocab files) ({e}).") from e
    return LoadedModel(model.eval(), tokenizer, str(folder), task)


# -- GGUF ---------------------------------------------------------------------------
GGUF_SUFFIX = ".gguf"


def gguf_file_in(path: Path) -> Path | None:
    """The GGUF file that ``path`` names: the file itself, or the only .gguf in a folder
    that has no config.json (a folder as Ollama-style downloads leave it)."""
    if path.is_file():
        return path if path.suffix.lower() == GGUF_SUFFIX else None
    if path.is_dir() and not (path / "config.json").is_file():
        found = sorted(path.glob(f"*{GGUF_SUFFIX}"))
        if len(found) > 1:
            raise ModelLoadError(f"{path} holds several .gguf files ({[f.name for f in found]}); pass one of them.")
        return found[0] if found else None
    return None


def read_gguf_header(path: str | Path) -> GgufHeader:
    """Parse a GGUF file's header (no weights are dequantized), or say why it cannot be read."""
    try:
        header = read_header(path)
    except ImportError as e:
        raise ModelLoadError(f"{path} is a GGUF file; reading it {e}") from e
    except GgufError as e:
        raise ModelLoadError(f"{e}. Copy or download it again.") from e
    if not header.architecture:
        raise ModelLoadError(f"{path} has no general.architecture field; it is not a model GGUF (an adapter?).")
    return header


def _supported_gguf_architectures() -> list[str]:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return [a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer")]


def _check_gguf(path: Path) -> GgufHeader:
    """The header of a GGUF that transformers can dequantize, or a clear error."""
    header = read_gguf_header(path)
    if header.metadata.get("general.type") == "adapter":
        raise ModelLoadError(f"{path} is a GGUF adapter (LoRA), not a model; pass the base model's .gguf as "
                             "--model.")
    try:
        supported = _supported_gguf_architectures()
    except ImportError as e:
        raise ModelLoadError("loading a .gguf file needs transformers: pip install 'peftkit[hf]'.") from e
    if header.architecture not in supported:
        raise ModelLoadError(
            f"{path}: transformers cannot dequantize GGUF architecture {header.architecture!r} (it reads "
            f"{supported}). Convert the original checkpoint to a transformers folder and pass that instead.")
    return header


def _load_gguf(path: Path, task: str, num_labels: int | None) -> LoadedModel:
    """Dequantize a GGUF file into a float32 transformers model, tokenizer from the same file."""
    _check_gguf(path)
    import transformers

    auto = transformers.AutoModelForSequenceClassification if task == "classification" else transformers.AutoModelForCausalLM
    kwargs: dict[str, Any] = {"local_files_only": True, "gguf_file": path.name}
    if num_labels is not None:
        kwargs["num_labels"] = num_labels
    try:
        model = auto.from_pretrained(path.parent, **kwargs)
        tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    except (ValueError, KeyError, RuntimeError) as e:
        raise ModelLoadError(f"{path}: transformers could not build a {task} model from this GGUF ({e}).") from e
    _forget_gguf_quantization(model)
    # The file, not its folder: an adapter trained on it records the file, and loads back on
    # it (merge, generate) without a "trained on another base model" warning.
    model.config.name_or_path = str(path)
    return LoadedModel(model.eval(), tokenizer, str(path), task)


def _forget_gguf_quantization(model: nn.Module) -> None:
    """transformers marks a model read from GGUF as quantized and then refuses to
    ``save_pretrained`` it, although its weights are plain float32 tensors by now. Drop the
    mark, so that a merged model can be written as a safetensors folder."""
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def gguf_config(path: str | Path) -> dict[str, Any]:
    """The transformers config dict a GGUF file describes, from its header alone, with
    transformers' own table of GGUF names (``llama.block_count`` -> ``num_hidden_layers``).
    The output head is tied to the embeddings when the file stores no ``output.weight``."""
    header = _check_gguf(Path(path))
    from transformers.modeling_gguf_pytorch_utils import GGUF_CONFIG_MAPPING

    arch = header.architecture
    config: dict[str, Any] = {"model_type": arch}
    for gguf_name, hf_name in GGUF_CONFIG_MAPPING.get(arch, {}).items():
        value = header.metadata.get(f"{arch}.{gguf_name}")
        if hf_name is not None and value is not None:
            config[hf_name] = value
    if "vocab_size" not in config and "token_embd.weight" in header.tensors:
        config["vocab_size"] = header.metadata.get("tokenizer.ggml.vocab_size")
    config["tie_word_embeddings"] = "output.weight" not in header.tensors
    return {k: v for k, v in config.items() if v is not None}


def save_model_folder(loaded: LoadedModel, folder: str | Path) -> Path:
    """Write ``loaded.model`` (and its tokenizer) as a model folder that ``load_model`` and,
    for transformers models, ``from_pretrained`` read: safetensors weights, built aside and
    renamed into place so a crash leaves no half-written folder."""
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise ModelLoadError(f"{folder} is not empty; pick a new folder for the model.")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        if isinstance(loaded.model, ReferenceDecoder):
            loaded.model.save_pretrained(staging)
        else:
            loaded.model.save_pretrained(staging, safe_serialization=True)
            loaded.tokenizer.save_pretrained(staging)
        if folder.exists():
            folder.rmdir()
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


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
        if path.is_dir():
            facts["size on disk"] = f"{sum(f.stat().st_size for f in path.iterdir() if f.is_file()) / 2**20:.1f} MB"
    targets = architecture_targets(model, DEFAULT_TARGETS, "peft_default_targets")
    facts["default LoRA targets"] = ", ".join(targets) if targets else "none known: pass --targets"
    return {k: v for k, v in facts.items() if v is not None}


def _stored_dtypes(folder: Path) -> str:
    """The dtypes of a folder's safetensors weights, read from the file header."""
    from safetensors import SafetensorError, safe_open

    file = folder / "model.safetensors"
    if not file.is_file():
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


def meta_model(path: str | Path) -> nn.Module:
    """The model's module tree on the meta device (shapes only, no memory, no weights read),
    from a model folder, a bare config.json, a .gguf file, or 'reference'."""
    import torch

    if str(path) == REFERENCE:
        config = ReferenceConfig().to_dict()
    elif gguf_file_in(Path(path)) is not None:
        config = gguf_config(gguf_file_in(Path(path)))
    else:
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise ModelLoadError(f"{path} is neither a model folder nor a config.json file.")
        try:
            config = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise ModelLoadError(f"{file} is not valid JSON ({e}).") from e
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
