"""Load the base model and tokenizer a user names on the command line.

``--model`` takes ``reference`` (the built-in reference decoder, already taught the demo's
task A by peftkit's own code and cached), a folder written by
``ReferenceDecoder.save_pretrained``, or a local transformers folder (config.json +
safetensors weights + tokenizer files). Nothing is downloaded: transformers is always
called with ``local_files_only=True``.
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
    from .demo import BASE_STEPS, BASE_SEED, pretrain_base

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
        raise ModelLoadError(f"{folder} has no config.json; --model takes 'reference' or a model folder.")
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
        raise ModelLoadError(f"model path {folder} does not exist; pass 'reference' or a local model folder.")
    if not folder.is_dir():
        raise ModelLoadError(f"model path {folder} is a file; pass the folder that holds config.json and the weights.")
    config = _read_config(folder)
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise ModelLoadError(f"{folder} has a config.json but no weights ({' or '.join(WEIGHT_FILES[:2])}).")
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


def meta_model(path: str | Path) -> nn.Module:
    """The model's module tree on the meta device (shapes only, no memory, no weights read),
    from a model folder, a bare config.json, or 'reference'."""
    import torch

    if str(path) == REFERENCE:
        config = ReferenceConfig().to_dict()
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
    with torch.device("meta"):
        try:
            return transformers.AutoModelForCausalLM.from_config(hf_config)
        except ValueError:  # encoders such as BERT have no causal-LM head: count the bare model
            return transformers.AutoModel.from_config(hf_config)
