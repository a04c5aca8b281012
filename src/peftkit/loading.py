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
import pickle
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .formats.gguf import GgufError, GgufHeader, read_header
from .models import ByteTokenizer, ReferenceConfig, ReferenceDecoder
from .precision import place

REFERENCE = "reference"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


NO_REFERENCE_HEAD = ("the reference decoder has no classification head; use a transformers model "
                     "(e.g. BertForSequenceClassification) for {'text', 'label'} data.")


class ModelLoadError(ValueError):
    """A model path that cannot be loaded, with what to do about it."""


@dataclass
class LoadedModel:
    """A base model with the text codec that goes with it.

    ``task`` is ``"causal-lm"`` or ``"classification"``; ``classes`` names the labels of a
    classification head. ``tokenizer`` is None for a transformers folder without tokenizer
    files: pre-tokenized ``{"input_ids"}`` data trains, merges and exports without one, and
    only encoding or decoding text asks for it (``ModelLoadError``).
    """

    model: nn.Module
    tokenizer: Any
    source: str
    task: str = "causal-lm"

    @property
    def pad_id(self) -> int:
        # Without a tokenizer the model's config says the special ids (transformers keeps them there too).
        tok = self.tokenizer if self.tokenizer is not None else getattr(self.model, "config", None)
        for candidate in (getattr(tok, "pad_token_id", None), getattr(tok, "eos_token_id", None)):
            if candidate is not None:
                return int(candidate)
        return 0

    @property
    def vocab_size(self) -> int:
        """How many token ids the model reads: the rows of its input embedding (data with a
        larger id is refused, ``data.build_dataset(vocab_size=...)``)."""
        return int(self.model.get_input_embeddings().num_embeddings)

    @property
    def eos_id(self) -> int | None:
        source = self.tokenizer if self.tokenizer is not None else getattr(self.model, "config", None)
        eos = getattr(source, "eos_token_id", None)
        return int(eos) if isinstance(eos, int) else None

    def _require_tokenizer(self) -> None:
        if self.tokenizer is None:
            raise ModelLoadError(f"{self.source} has no tokenizer files (tokenizer.json or vocab files), and "
                                 "text must be encoded: add them to the folder, or give the data as "
                                 '{"input_ids": [...]} lines, which need none.')

    def encode(self, text: str) -> list[int]:
        """Token ids with the model's usual start tokens (BOS, or BERT's [CLS] ... [SEP])."""
        self._require_tokenizer()
        if isinstance(self.tokenizer, ByteTokenizer):
            return self.tokenizer.encode(text, add_bos=True)
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        self._require_tokenizer()
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


def read_model_config(file: Path) -> dict:
    """The JSON object in a model's ``config.json``, or ModelLoadError naming the file."""
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except OSError as e:
        raise ModelLoadError(f"cannot read {file} ({e.strerror}).") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{file} is not valid JSON ({e}); it is truncated or corrupt. "
                             "Copy or download it again.") from e
    if not isinstance(config, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(config), "a number")
        raise ModelLoadError(f"{file} holds {kind}, not a JSON object of model settings; it is corrupt. "
                             "Copy or download it again.")
    return config


def _read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"{folder} has no config.json; --model takes 'reference', a model folder "
                             "(config.json + weights + tokenizer) or a .gguf file.")
    return read_model_config(path)


def weights_file(folder: Path) -> Path:
    """The weights file of a model folder (the first of ``WEIGHT_FILES`` there), or ModelLoadError."""
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise ModelLoadError(f"{folder} has a config.json but no weights ({' or '.join(WEIGHT_FILES[:2])}); "
                         "copy the weights in, or pass the folder that has them.")


def load_model(path: str | Path, *, task: str = "causal-lm", num_labels: int | None = None,
               progress: bool = True, dtype: torch.dtype | None = None, quantize: str | None = None,
               meta: bool = False) -> LoadedModel:
    """Load ``path`` (see the module docstring) for ``task``, on the CPU; with ``dtype``, its
    floating-point weights are stored in it (a transformers folder is read straight into it,
    so a 1B model never costs its float32 4 GB); with ``quantize="nf4"``, its linear layers
    are then made 4-bit (``quantize.quantize_base``), the missing library refused first.

    ``meta=True`` builds the same module tree on the meta device, in ``dtype`` (float32 when
    None), and reads no weights, only the config and the tokenizer: what the ranks other than
    0 of an FSDP2 run hold until rank 0 broadcasts their shards (``distributed.shard``). A
    .gguf file has no config to build from, so it is read whole even then."""
    if quantize is not None:
        from .quantize import check_scheme
        check_scheme(quantize)
    if meta and quantize is None:
        loaded = _load_on_meta(path, task, num_labels, progress, dtype or torch.float32)
        if loaded is not None:
            return loaded
    loaded = _load(path, task, num_labels, progress, dtype, quantize)
    if dtype is not None:
        place(loaded.model, torch.device("cpu"), dtype)
    if quantize is not None:
        from .quantize import quantize_base
        quantize_base(loaded.model, quantize)
    return loaded


def _load(path: str | Path, task: str, num_labels: int | None, progress: bool,
          dtype: torch.dtype | None, quantize: str | None) -> LoadedModel:
    if str(path) == REFERENCE:
        path = reference_base(progress)
    folder = Path(path)
    if not folder.exists():
        raise ModelLoadError(f"model path {folder} does not exist; pass 'reference', a local model folder "
                             "or a .gguf file.")
    gguf_file = gguf_file_in(folder)
    if gguf_file is not None:
        return _load_gguf(gguf_file, task, num_labels, dtype, quantize)
    if not folder.is_dir():
        raise ModelLoadError(f"model path {folder} is a file but not a .gguf file; pass the folder that holds "
                             "config.json and the weights, or a .gguf file.")
    config = _read_config(folder)
    weights = weights_file(folder)
    if config.get("model_type") == ReferenceConfig.model_type:
        if task != "causal-lm":
            raise ModelLoadError(NO_REFERENCE_HEAD)
        try:
            model = ReferenceDecoder.from_pretrained(folder)
        except (OSError, ValueError, TypeError) as e:
            where = "" if str(folder) in str(e) else f"{folder / 'config.json'}: "
            raise ModelLoadError(f"{where}{e}. Copy or download the model folder again.") from e
        return LoadedModel(model, ByteTokenizer(), str(folder))
    return _load_transformers(folder, weights, task, num_labels, dtype)


def _load_on_meta(path: str | Path, task: str, num_labels: int | None, progress: bool,
                  dtype: torch.dtype) -> LoadedModel | None:
    """``load_model(meta=True)`` for a model folder or 'reference'; None for a .gguf file."""
    folder = reference_base(progress) if str(path) == REFERENCE else Path(path)
    if not folder.is_dir() or gguf_file_in(folder) is not None:
        return None
    # Refused as rank 0 refuses it: a rank must not start the run that rank 0 stops.
    config, _ = _read_config(folder), weights_file(folder)
    if config.get("model_type") == ReferenceConfig.model_type:
        if task != "causal-lm":
            raise ModelLoadError(NO_REFERENCE_HEAD)
        with torch.device("meta"):
            model = ReferenceDecoder(ReferenceConfig.from_dict(config)).to(dtype)
        return LoadedModel(model.eval(), ByteTokenizer(), str(folder))
    import transformers

    auto = transformers.AutoModelForSequenceClassification if task == "classification" else transformers.AutoModelForCausalLM
    labels = {} if num_labels is None else {"num_labels": num_labels}
    hf_config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True, **labels)
    with torch.device("meta"):
        model = auto.from_config(hf_config, dtype=dtype)
    return LoadedModel(model.eval(), _tokenizer_in(folder), str(folder), task)


def _tokenizer_in(folder: Path):
    """The folder's tokenizer, or None when it has none: fine for token-id data
    (``LoadedModel.encode`` says so when text needs one)."""
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError):
        return None


def _load_transformers(folder: Path, weights: Path, task: str, num_labels: int | None,
                       dtype: torch.dtype | None = None) -> LoadedModel:
    try:
        import transformers
    except ImportError as e:
        raise ModelLoadError("loading a transformers model folder needs transformers: pip install 'peftkit[hf]'.") from e
    auto = transformers.AutoModelForSequenceClassification if task == "classification" else transformers.AutoModelForCausalLM
    kwargs: dict[str, Any] = {"local_files_only": True}
    if num_labels is not None:
        kwargs["num_labels"] = num_labels
    if dtype is not None:
        kwargs["dtype"] = dtype
    from safetensors import SafetensorError

    try:
        model = auto.from_pretrained(folder, **kwargs)
    except (SafetensorError, OSError, EOFError, pickle.UnpicklingError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{weights} cannot be read ({type(e).__name__}: {e}); it is truncated or corrupt. "
                             "Copy or download it again.") from e
    except RuntimeError as e:  # torch's zip reader, or weights of other shapes than config.json's
        raise ModelLoadError(f"{folder}: transformers could not load the weights ({e}); {weights.name} is "
                             "truncated or corrupt, or does not match config.json. Copy or download the "
                             "model again.") from e
    except ValueError as e:  # transformers' words for an architecture without that head
        raise ModelLoadError(f"{folder}: transformers cannot build a {task} model from it ({e}).") from e
    return LoadedModel(model.eval(), _tokenizer_in(folder), str(folder), task)


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


def _load_gguf(path: Path, task: str, num_labels: int | None, dtype: torch.dtype | None = None,
               quantize: str | None = None) -> LoadedModel:
    """Dequantize a GGUF file into a transformers model, tokenizer from the same file: with
    ``quantize``, tensor by tensor straight into NF4 (``gguf_loading``), else through
    transformers' loader into float32."""
    _check_gguf(path)
    import transformers

    from .gguf_loading import StreamingUnsupported, load_gguf_quantized

    auto = transformers.AutoModelForSequenceClassification if task == "classification" else transformers.AutoModelForCausalLM
    kwargs: dict[str, Any] = {"local_files_only": True, "gguf_file": path.name}
    if num_labels is not None:
        kwargs["num_labels"] = num_labels
    try:
        model = None
        if quantize is not None:
            labels = {} if num_labels is None else {"num_labels": num_labels}
            try:
                model = load_gguf_quantized(path, auto, dtype or torch.float32, quantize, **labels)
            except StreamingUnsupported:
                model = None  # transformers' whole-file loader, then quantized by load_model
        if model is None:
            # With a dtype, transformers converts each tensor as it reads it: a bf16 state dict.
            model = auto.from_pretrained(path.parent, **kwargs, **({"dtype": dtype} if dtype else {}))
            _forget_gguf_quantization(model)
        tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    except (ValueError, KeyError, RuntimeError) as e:
        raise ModelLoadError(f"{path}: transformers could not build a {task} model from this GGUF ({e}).") from e
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
