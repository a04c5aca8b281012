"""Checkpoints (M10): a saved file, or any weight file in a saved folder, that holds
base-model weights beside the adapter. Keys are matched to the live model's tensors by
name across wrapper levels and by shape, never by loading the file into the model."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..checkpoint import Checkpoint, Entries, read_entries
from ..probe import Context
from ..report import Finding, human_size, listing, many, tensor_bytes
from ..views import Inventory

# Wrapper levels that differ between the places a key can be written from.
_WRAPPER_SEGMENTS = {"base_model", "model", "module", "base_layer", "_orig_mod", "state_dict", "model_state_dict"}
_KINDS = ("adapter", "base", "unknown")


class _KeyIndex:
    """Tells checkpoint keys apart: "adapter", "base" (a base-model tensor of the same
    shape) or "unknown", matching names across wrapper levels (base_model.model., module.,
    adapter names) and by dotted suffix."""

    def __init__(self, model: nn.Module, inv: Inventory) -> None:
        self.drop = _WRAPPER_SEGMENTS | inv.adapter_names
        self.index: dict[str, tuple[str, tuple[int, ...] | None]] = {}
        named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
        for name, tensor in named:
            kind = "adapter" if isinstance(tensor, nn.Parameter) and inv.is_adapter(tensor) else "base"
            parts = self._canonical(name).split(".")
            for start in range(len(parts) - 1):  # every dotted suffix of two or more parts
                self.index.setdefault(".".join(parts[start:]), (kind, tuple(tensor.shape)))
        for key in inv.file_keys:
            self.index[self._canonical(key)] = ("adapter", None)

    def _canonical(self, key: str) -> str:
        return ".".join(s for s in key.split(".") if s not in self.drop)

    def classify(self, entries: Entries) -> dict[str, list[str]]:
        """Kind -> the keys of ``entries`` of that kind."""
        classes: dict[str, list[str]] = {kind: [] for kind in _KINDS}
        for key, (shape, _) in entries.items():
            parts = self._canonical(key).split(".")
            suffixes = (".".join(parts[i:]) for i in range(len(parts)))
            hit = next((self.index[s] for s in suffixes if s in self.index), None)
            kind = "unknown" if hit is None or (hit[1] is not None and hit[1] != shape) else hit[0]
            classes[kind].append(key)
        return classes


def check_m10(ctx: Context) -> list[Finding]:
    """A checkpoint file, or a file in a checkpoint folder, that holds base-model weights."""
    if ctx.checkpoint is None:
        return []
    checkpoint, index = ctx.checkpoint, _KeyIndex(ctx.model, ctx.inv)
    per_file: dict[Path, dict[str, list[str]]] = {}
    sizes = dict.fromkeys(_KINDS, 0)
    for file in checkpoint.files:
        try:
            entries = read_entries(file)
        except ValueError as e:
            if not checkpoint.is_folder:
                raise  # the one file asked for: the caller must hear it cannot be read
            ctx.notes.append(f"M10: {checkpoint.label(file)} in {checkpoint.path} was not checked: {e}")
            continue
        per_file[file] = index.classify(entries)
        for kind, keys in per_file[file].items():
            sizes[kind] += sum(entries[k][1] for k in keys)
    if not per_file:
        return []  # every file was refused, and each refusal is in the notes
    keys = {kind: [k for classes in per_file.values() for k in classes[kind]] for kind in _KINDS}
    adapter_only = tensor_bytes(ctx.inv.params_of(*set(ctx.inv.methods.values())))
    total = sum(file.stat().st_size for file in per_file)
    what = _what(checkpoint, per_file)
    size_is = f"{'the file is' if not checkpoint.is_folder else 'together'} {human_size(total)}"
    if keys["base"]:
        ratio = f", {total / adapter_only:.0f}x the adapter-only size ({human_size(adapter_only)})" \
            if adapter_only else ""
        return [Finding(
            "M10", "error", _where(checkpoint, per_file, "base"),
            f"{what} holds {many(len(keys['base']), 'base-model tensor')} ({human_size(sizes['base'])})"
            f"{_in_files(checkpoint, per_file, 'base')} besides {many(len(keys['adapter']), 'adapter tensor')} "
            f"({human_size(sizes['adapter'])}); {size_is}{ratio}. The base weights are already on every user's disk: "
            "each saved run copies the whole model again.",
            "save the adapter only: pm.save(folder) (peftkit) or model.save_pretrained(folder) on the PEFT model; "
            "by hand, save {n: p for n, p in model.named_parameters() if p.requires_grad}.")]
    unknown = keys["unknown"]
    if unknown and adapter_only and sizes["unknown"] > 10 * adapter_only:
        return [Finding(
            "M10", "warning", _where(checkpoint, per_file, "unknown"),
            f"{what} holds tensors that match no parameter of this model "
            f"({many(len(unknown), 'tensor')}, {human_size(sizes['unknown'])}"
            f"{_in_files(checkpoint, per_file, 'unknown')}): more than 10x its adapter "
            f"({human_size(adapter_only)}). Is it a whole model?",
            "save the adapter only (pm.save(folder) / save_pretrained on the PEFT model).")]
    skipped = (f"; training state not read: {listing(checkpoint.label(p) for p in checkpoint.skipped)}"
               if checkpoint.skipped else "")
    ctx.notes.append(f"M10: {what} is {human_size(total)}: {many(len(keys['adapter']), 'adapter tensor')}, "
                     f"{len(unknown)} unmatched, no base weights{skipped}.")
    return []


def _what(checkpoint: Checkpoint, per_file: dict[Path, dict[str, list[str]]]) -> str:
    """The file's name, or the folder's with the weight files read in it."""
    if not checkpoint.is_folder:
        return checkpoint.path.name
    files = [checkpoint.label(f) for f in per_file]
    return f"{checkpoint.path.name}/ ({many(len(files), 'weight file')}: {listing(files, 3)})"


def _where(checkpoint: Checkpoint, per_file: dict[Path, dict[str, list[str]]], kind: str) -> str:
    """The checkpoint and, per file, the first keys of ``kind``."""
    hits = {f: classes[kind] for f, classes in per_file.items() if classes[kind]}
    if not checkpoint.is_folder:
        return f"{checkpoint.path}: {listing(next(iter(hits.values())), 3)}"
    return f"{checkpoint.path}: " + "; ".join(f"{checkpoint.label(f)}: {listing(k, 2)}" for f, k in hits.items())


def _in_files(checkpoint: Checkpoint, per_file: dict[Path, dict[str, list[str]]], kind: str) -> str:
    """' in a.safetensors (3 tensors), b.safetensors (2 tensors)' for a folder; '' for one file."""
    if not checkpoint.is_folder:
        return ""
    counts = [f"{checkpoint.label(f)} ({many(len(c[kind]), 'tensor')})" for f, c in per_file.items() if c[kind]]
    return f" in {listing(counts, 3)}"
