"""The probe harness: running a model without changing it, and watching what it does.

Probes run in eval mode under ``torch.no_grad()`` (``untouched``), on copies of single
layers that share the frozen weights (``copy_sharing_frozen``) or through
``torch.func.functional_call`` with replaced tensors; module modes and the random-number
generator state come back on exit. ``Context`` carries what every check reads, and
``attempt`` turns a probe that cannot run into a note rather than a pass.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, fields, is_dataclass
from functools import cached_property
from typing import Any

import torch
from torch import Tensor, nn

from .batch import BatchLabels, read_labels
from .checkpoint import Checkpoint
from .inventory import embedding_weight
from .kinds import PREFIX, PROMPT, PROMPT_METHODS
from .views import Inventory, SequenceProbe

# Probe sizes: 2 rows (so batch effects show) of 6 tokens.
ROWS, TOKENS = 2, 6
_CACHE_KEYWORDS = ("past_key_values", "past_key_value", "cache", "prefix_key_values")


# -- running without changing anything ----------------------------------------------------
@contextlib.contextmanager
def untouched(model: nn.Module) -> Iterator[None]:
    """Eval mode, the RNG forked and warnings from the probes kept quiet; every module's
    mode comes back on exit."""
    modes = [(m, m.training) for m in model.modules()]
    devices = sorted({p.device.index for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.eval()
        try:
            yield
        finally:
            for module, training in modes:
                module.training = training


@contextlib.contextmanager
def training_mode(model: nn.Module) -> Iterator[None]:
    """Train mode (gradient checkpointing only runs in it), except modules with running
    statistics, which would update them."""
    modes = [(m, m.training) for m in model.modules()]
    for module in model.modules():
        module.training = not getattr(module, "track_running_stats", False)
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def copy_sharing_frozen(module: nn.Module, adapter: set[int]) -> nn.Module:
    """A deep copy of ``module`` that shares (does not copy) its non-adapter tensors."""
    memo = {id(t): t for t in itertools.chain(module.parameters(), module.buffers()) if id(t) not in adapter}
    return copy.deepcopy(module, memo)


# -- calling a model and reading what it returns ---------------------------------------------
def call(model: nn.Module, batch: Any) -> Any:
    """``model`` on a batch given as keyword arguments, positional ones or one tensor."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _output_tensors(output: Any) -> list[Tensor]:
    """The tensors a model returned: itself, a mapping's or dataclass's values, a tuple's items."""
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, Mapping):
        values = list(output.values())
    elif is_dataclass(output):
        values = [getattr(output, f.name) for f in fields(output)]
    else:
        values = list(output) if isinstance(output, (tuple, list)) else []
    return [v for v in values if isinstance(v, Tensor)]


def main_tensor(output: Any) -> Tensor | None:
    """Logits (or the first tensor) of a model output."""
    for key in ("logits", "last_hidden_state"):
        value = output.get(key) if isinstance(output, Mapping) else getattr(output, key, None)
        if isinstance(value, Tensor):
            return value
    return next(iter(_output_tensors(output)), None)


def scalar_loss(output: Any) -> Tensor:
    """The model's loss, or the mean of every floating output when it returns none."""
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    if isinstance(loss, Tensor):
        return loss
    # No loss: every floating output counts (a pooler output as much as the hidden states),
    # so that no adapter looks unused only because the doctor ignored what it feeds.
    tensors = [t for t in _output_tensors(output) if t.is_floating_point()]
    if not tensors:
        raise TypeError(f"the model returned {type(output).__name__}, with no loss and no tensor to differentiate.")
    return sum(t.float().mean() for t in tensors)


def tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance of a probe comparison in ``dtype``."""
    return 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2


def differs(a: Tensor, b: Tensor, scale: Tensor | None = None) -> bool:
    """max |a - b| > tolerance · max |scale| (``scale`` defaults to ``b``)."""
    scale = (b if scale is None else scale).detach().float().abs().max().clamp_min(1e-6)
    return bool((a.detach().float() - b.detach().float()).abs().max() > tolerance(a.dtype) * scale)


# -- the input side: one forward on random ids, watched ---------------------------------------
class _Watcher:
    """Hooks that watch one forward: the input embeddings the transformer received, the
    token embeddings, and a key/value cache handed in before the first token."""

    def __init__(self) -> None:
        self.inputs_embeds: Tensor | None = None
        self.embedded: Tensor | None = None
        self.cache_seen = False
        self.cache_length = 0
        self.cache_tensors: list[Tensor] = []

    def before(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.inputs_embeds is None and isinstance(kwargs.get("inputs_embeds"), Tensor):
            self.inputs_embeds = kwargs["inputs_embeds"]
        # Only the first module handed a cache counts: a model may make its own empty cache
        # and pass it down, and later layers see it filled by earlier ones.
        cache = next((kwargs[k] for k in _CACHE_KEYWORDS if kwargs.get(k) is not None), None)
        if cache is not None and not self.cache_seen:
            self.cache_seen = True
            self.cache_tensors = _tensors_in(cache)
            self.cache_length = max((t.shape[-2] for t in self.cache_tensors if t.dim() >= 3), default=0)

    def after_embedding(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self.embedded is None and isinstance(output, Tensor):
            self.embedded = output

    @contextlib.contextmanager
    def watching(self, model: nn.Module, embedding: nn.Module) -> Iterator[None]:
        handles = [m.register_forward_pre_hook(self.before, with_kwargs=True) for m in model.modules()]
        handles.append(embedding.register_forward_hook(self.after_embedding))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


def _tensors_in(obj: Any, depth: int = 0) -> list[Tensor]:
    """The tensors inside a cache: tuples of (key, value), or a transformers Cache object."""
    if isinstance(obj, Tensor):
        return [obj]
    if depth > 4:
        return []
    if isinstance(obj, (tuple, list)):
        return [t for item in obj for t in _tensors_in(item, depth + 1)]
    if isinstance(obj, Mapping):
        return [t for item in obj.values() for t in _tensors_in(item, depth + 1)]
    if hasattr(obj, "layers"):  # transformers >= 4.56: Cache.layers[i].keys / .values
        return [t for layer in obj.layers for t in _tensors_in([getattr(layer, "keys", None),
                                                               getattr(layer, "values", None)], depth + 1)]
    if hasattr(obj, "key_cache"):
        return _tensors_in([obj.key_cache, obj.value_cache], depth + 1)
    return []


def lm_inputs(inv: Inventory, rows: int = ROWS, tokens: int = TOKENS) -> dict[str, Tensor]:
    """Random ``input_ids`` (rows, tokens) from the model's vocabulary, all attended."""
    weight = embedding_weight(inv.embedding)
    ids = torch.randint(0, weight.shape[0], (rows, tokens), generator=torch.Generator().manual_seed(0))
    ids = ids.to(weight.device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def probe_sequence(model: nn.Module, inv: Inventory, notes: list[str]) -> SequenceProbe | None:
    """Run the model once on random ids, watching its input side; parameters nobody claimed
    that feed added input positions (a soft prompt) or a cache handed in (a prefix) are
    claimed as prompt or prefix parameters."""
    if inv.embedding is None:
        return None
    inputs = lm_inputs(inv)
    embedding_params = {id(p) for p in inv.embedding.parameters()}
    unclaimed = [p for i, p in inv.params.items()
                 if p.requires_grad and not inv.is_adapter(p) and i not in embedding_params]
    failures = []
    for with_grad in ([True, False] if unclaimed else [False]):
        watcher = _Watcher()
        try:
            with torch.set_grad_enabled(with_grad), watcher.watching(model, inv.embedding):
                output = call(model, inputs)
        except Exception as e:  # the model may not take input_ids; say so, never guess
            failures.append(f"{type(e).__name__}: {e}")
            continue
        seq = watcher.inputs_embeds if watcher.inputs_embeds is not None else watcher.embedded
        if with_grad:
            _claim_feeders(inv, unclaimed, seq, watcher.cache_tensors, inputs["input_ids"].shape[1])
        main = main_tensor(output)
        return SequenceProbe(inputs["input_ids"], None if seq is None else seq.detach(),
                             None if watcher.embedded is None else watcher.embedded.detach(),
                             None if main is None else main.detach(), watcher.cache_length)
    if unclaimed or inv.declares(*PROMPT_METHODS, PREFIX):  # else nothing needed the probe
        notes.append(f"the model could not be run on input_ids, so prompts and prefixes (M7, M11) were not "
                     f"probed ({failures[-1]}).")
    return None


def _claim_feeders(inv: Inventory, candidates: list[nn.Parameter], seq: Tensor | None,
                   cache: list[Tensor], tokens: int) -> None:
    if seq is not None and seq.requires_grad and seq.shape[1] > tokens:
        for param in _feeding([seq], candidates):
            inv.claim(param, PROMPT)
    for param in _feeding([t for t in cache if t.requires_grad], candidates):
        inv.claim(param, PREFIX)


def _feeding(outputs: list[Tensor], candidates: list[nn.Parameter]) -> list[nn.Parameter]:
    """The candidates that ``outputs`` depend on (through autograd)."""
    outputs = [t for t in outputs if t.requires_grad]
    if not outputs or not candidates:
        return []
    with torch.enable_grad():
        total = sum(t.float().sum() for t in outputs)
        grads = torch.autograd.grad(total, candidates, allow_unused=True, retain_graph=True)
    return [p for p, g in zip(candidates, grads) if g is not None]


# -- what every check reads -------------------------------------------------------------------
@dataclass
class Context:
    """The model and what came with it, the inventory of its adapters, and the notes the
    checks add to."""

    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    batch: Any
    checkpoint: Checkpoint | None
    inv: Inventory
    notes: list[str]
    training: bool  # the model's mode as given (probes run in eval mode)
    tokenizer: Any = None
    train_on: str | None = None  # which tokens the loss is meant to be on; None: not known
    chat_template: str | None = None  # the template recorded for export

    @cached_property
    def labels(self) -> BatchLabels | None:
        """The batch's token labels, read once (a batch whose labels cannot be read is noted once)."""
        return read_labels(self.batch, self.notes)

    def optimizer_params(self) -> dict[int, nn.Parameter]:
        if self.optimizer is None:
            return {}
        return {id(p): p for group in self.optimizer.param_groups for p in group["params"]}

    def training_state(self, params: list[nn.Parameter]) -> str:
        """'trained' (the optimizer has stepped them), 'untrained' (it has not) or
        'unknown' (no optimizer, or one that keeps no state, like SGD without momentum)."""
        if self.optimizer is None:
            return "unknown"
        if any(self.optimizer.state.get(p) for p in params):
            return "trained"
        stateless = isinstance(self.optimizer, torch.optim.SGD) and all(
            not g.get("momentum") for g in self.optimizer.param_groups)
        held = self.optimizer_params()
        return "unknown" if stateless or not any(id(p) in held for p in params) else "untrained"


def attempt(ctx: Context, what: str, probe: Callable[[], Any]) -> Any:
    """``probe()``, or None with a note when the model cannot run it (a layer that takes
    another input than the doctor gives it, say): a check that could not run is reported,
    never passed."""
    try:
        return probe()
    except Exception as e:
        ctx.notes.append(f"{what} could not be probed ({type(e).__name__}: {e}).")
        return None
