"""Method configurations: one dataclass per method, validated on construction.

A config says *what* to attach; it never touches a model. Validation that needs the
model (does a target exist, is the rank below the layer's size) happens in
``targets.py`` when the config is attached.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

TargetSpec = list[str] | str | None
"""A list of module names (exact or dotted suffix), one regex string (full match),
a preset (``"attention"``, ``"all-linear"``), or None for the architecture default."""

BIAS_MODES = ("none", "lora_only")


def _check_positive_int(owner: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}.{name} must be a positive integer, got {value!r}.")


def _is_real(value: Any) -> bool:
    """A finite int or float (not a bool, a string, NaN or infinity)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_dropout(owner: str, value: Any) -> None:
    if not _is_real(value) or not 0.0 <= value < 1.0:
        raise ValueError(f"{owner}.dropout must be a number in [0, 1), got {value!r}.")


def _check_flag(owner: str, name: str, value: Any) -> None:
    # "false" in a JSON file is a string, and bool("false") is True: only real booleans pass.
    if not isinstance(value, bool):
        raise ValueError(f"{owner}.{name} must be true or false, got {value!r}.")


class _DictMixin:
    """JSON round trip shared by the method configs; unknown fields are errors.

    Every method config also has ``modules_to_save``: modules trained in full and saved with
    the adapter (Hugging Face PEFT's name). None picks the classification head
    (``classifier`` or ``score``, with BERT's ``pooler`` or DistilBERT's ``pre_classifier``
    that feeds it) of a sequence-classification model and nothing otherwise; ``[]`` trains
    no module in full.
    """

    peft_type: ClassVar[str]

    def _check_modules_to_save(self) -> None:
        names = self.modules_to_save
        if isinstance(names, (tuple, set)):
            self.modules_to_save = names = sorted(names)
        if names is not None and (not isinstance(names, list)
                                  or not all(isinstance(n, str) and n for n in names)):
            raise ValueError(f"{type(self).__name__}.modules_to_save must be None or a list of module "
                             f"names, got {names!r}.")

    def to_dict(self) -> dict[str, Any]:
        return {"peft_type": self.peft_type, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        data = dict(data)
        peft_type = data.pop("peft_type", cls.peft_type)
        if peft_type != cls.peft_type:
            raise ValueError(f"expected peft_type {cls.peft_type!r}, got {peft_type!r}.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; known fields are {sorted(known)}.")
        return cls(**data)


def lora_scaling(alpha: float, r: int, use_rslora: bool = False) -> float:
    """The factor s in h = W x + s · B A x: alpha / r, or alpha / sqrt(r) with rsLoRA
    (Kalajdzievski 2023). The one place the formula is written."""
    return alpha / (math.sqrt(r) if use_rslora else r)


@dataclass
class LoraConfig(_DictMixin):
    """Low-rank adaptation: h = W x + s · B A x with s = alpha / r (alpha / sqrt(r) with rsLoRA).

    Args:
        r: rank of the update; A is (r, in), B is (out, r).
        alpha: numerator of the scaling s.
        dropout: dropout probability on the LoRA input path only (W x never sees it).
        target_modules: which modules get LoRA; see ``TargetSpec``.
        use_rslora: scale by alpha / sqrt(r) (rank-stabilised LoRA, Kalajdzievski 2023),
            which keeps the update's magnitude steady as r grows.
        bias: ``"none"`` keeps every bias frozen; ``"lora_only"`` trains the biases of
            the targeted layers (they are then saved with the adapter).
        modules_to_save: modules trained in full beside the adapter (see ``_DictMixin``).
        base_model_name_or_path, task_type: recorded in the adapter file for the reader.
    """

    peft_type: ClassVar[str] = "LORA"

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: TargetSpec = None
    use_rslora: bool = False
    bias: str = "none"
    modules_to_save: list[str] | None = None
    base_model_name_or_path: str | None = None
    task_type: str | None = None

    def __post_init__(self) -> None:
        self._check_modules_to_save()
        _check_positive_int("LoraConfig", "r", self.r)
        if not _is_real(self.alpha) or self.alpha <= 0:
            raise ValueError(
                f"LoraConfig.alpha must be a finite positive number, got {self.alpha!r} "
                "(a common choice is alpha = 2 * r)."
            )
        _check_dropout("LoraConfig", self.dropout)
        _check_flag("LoraConfig", "use_rslora", self.use_rslora)
        if self.bias not in BIAS_MODES:
            raise ValueError(
                f"LoraConfig.bias must be one of {BIAS_MODES}, got {self.bias!r}."
            )
        if isinstance(self.target_modules, (tuple, set)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.target_modules, list):
            if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
                raise ValueError(
                    "LoraConfig.target_modules must be a non-empty list of module names, a "
                    f"regex string, a preset or None; got {self.target_modules!r}."
                )
        elif isinstance(self.target_modules, str):
            if not self.target_modules.strip():
                raise ValueError("LoraConfig.target_modules is an empty string; pass module names, a regex, "
                                 "a preset ('attention', 'all-linear') or None for the architecture's default.")
        elif self.target_modules is not None:
            raise ValueError(f"LoraConfig.target_modules has an unsupported type: {self.target_modules!r}.")

    @property
    def scaling(self) -> float:
        """The factor s in h = W x + s · B A x."""
        return lora_scaling(self.alpha, self.r, self.use_rslora)


PLACEMENTS = ("houlsby", "pfeiffer", "parallel")
ACTIVATIONS = ("relu", "gelu", "silu")
PROMPT_INITS = ("random", "vocab", "text")


def _check_token_init(config: PrefixConfig | PromptConfig) -> None:
    """The init fields prompt and prefix tuning share: init, init_text, tokenizer."""
    name = type(config).__name__
    if config.init not in PROMPT_INITS:
        raise ValueError(f"{name}.init must be one of {PROMPT_INITS}, got {config.init!r}.")
    if config.init == "text" and (not config.init_text or config.tokenizer is None):
        raise ValueError(f"{name}(init='text') needs init_text and a tokenizer to encode it.")


@dataclass
class AdapterConfig(_DictMixin):
    """Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020; He et al. 2022).

    Each adapter computes h + up(act(down(h))) (serial placements) with down (bottleneck,
    hidden) random and up (hidden, bottleneck) starting at zero, so the model is unchanged
    at init.

    Args:
        bottleneck: the adapter's inner size.
        placement: ``"houlsby"`` after the attention output projection and after the
            feed-forward output; ``"pfeiffer"`` after the feed-forward output only;
            ``"parallel"`` beside the feed-forward block, added with ``scaling``.
        activation: ``"relu"``, ``"gelu"`` or ``"silu"``.
        dropout: dropout inside the adapter, after the activation.
        scaling: factor on the parallel adapter's output (ignored by serial placements).
        target_modules: explicit module names to put adapters after (serial) or beside
            (parallel); None finds them from the architecture.
    """

    peft_type: ClassVar[str] = "BOTTLENECK_ADAPTER"

    bottleneck: int = 64
    placement: str = "pfeiffer"
    activation: str = "relu"
    dropout: float = 0.0
    scaling: float = 1.0
    target_modules: list[str] | None = None
    modules_to_save: list[str] | None = None
    base_model_name_or_path: str | None = None
    task_type: str | None = None

    def __post_init__(self) -> None:
        self._check_modules_to_save()
        _check_positive_int("AdapterConfig", "bottleneck", self.bottleneck)
        if self.placement not in PLACEMENTS:
            raise ValueError(f"AdapterConfig.placement must be one of {PLACEMENTS}, got {self.placement!r}.")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"AdapterConfig.activation must be one of {ACTIVATIONS}, got {self.activation!r}.")
        _check_dropout("AdapterConfig", self.dropout)
        if not _is_real(self.scaling):
            raise ValueError(f"AdapterConfig.scaling must be a finite number, got {self.scaling!r}.")
        if self.target_modules is not None and (
                not isinstance(self.target_modules, list) or not self.target_modules
                or not all(isinstance(t, str) and t for t in self.target_modules)):
            raise ValueError("AdapterConfig.target_modules must be None or a non-empty list of module "
                             f"names, got {self.target_modules!r}.")


@dataclass
class PrefixConfig(_DictMixin):
    """Prefix tuning (Li & Liang 2021): learned keys and values of ``num_virtual_tokens``
    positions in every attention layer, shaped by the model's key/value heads.

    Args:
        num_virtual_tokens: prefix length.
        projection_dim: when set, the prefix is produced by an MLP (embedding ->
            projection_dim -> 2 * layers * kv_dim) while training, which Li & Liang found
            more stable; it is folded into plain tensors for saving and inference.
        init: how the prefix starts. ``"vocab"``: the keys and values the model itself
            computes for N tokens drawn from its vocabulary, so the prefix starts as a
            (random) real-text prefix, at the scale every layer expects (Li & Liang's init
            from real words). ``"text"``: those of ``init_text`` encoded by ``tokenizer``
            (repeated or cut to length). ``"random"``: N(0, 1), as PEFT. ``None`` (the
            default) is decided when the prefix is attached: ``"random"`` with
            projection_dim or on a sequence classifier, else ``"vocab"``. A language model
            keeps its pretrained output head, and N(0, 1) keys, far off its own scale,
            wreck its first outputs (SmolLM2's first loss 8-11 against 1.1); a classifier's
            head is new anyway, and there N(0, 1) trained better on a validation split
            (bench/defaults_study.py --study prefix).
        init_text, tokenizer: for ``init="text"``; the tokenizer is used once and never saved.
    """

    peft_type: ClassVar[str] = "PREFIX_TUNING"

    num_virtual_tokens: int = 20
    projection_dim: int | None = None
    init: str | None = None
    init_text: str | None = None
    tokenizer: Any = dataclasses.field(default=None, repr=False, compare=False)
    modules_to_save: list[str] | None = None
    base_model_name_or_path: str | None = None
    task_type: str | None = None

    def __post_init__(self) -> None:
        self._check_modules_to_save()
        _check_positive_int("PrefixConfig", "num_virtual_tokens", self.num_virtual_tokens)
        if self.projection_dim is not None:
            _check_positive_int("PrefixConfig", "projection_dim", self.projection_dim)
        if self.init is None and self.projection_dim is not None:
            self.init = "random"
        if self.init is not None:  # else decided at attach time (see init above)
            _check_token_init(self)
        if self.projection_dim is not None and self.init != "random":
            raise ValueError(
                f"PrefixConfig(init={self.init!r}) sets the prefix itself, but with projection_dim an "
                "MLP produces it; drop projection_dim or use init='random'."
            )

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data.pop("tokenizer")  # an object, not data: used once at init, never saved
        return data


@dataclass
class PromptConfig(_DictMixin):
    """Prompt tuning (Lester et al. 2021): ``num_virtual_tokens`` learned embeddings
    prepended to the input embeddings.

    Args:
        num_virtual_tokens: prompt length.
        init: ``"random"``, ``"vocab"`` (embeddings of sampled vocabulary tokens) or
            ``"text"`` (the embeddings of ``init_text`` encoded by ``tokenizer``, repeated
            or cut to length).
        init_text, tokenizer: for ``init="text"``; the tokenizer is used once and never saved.
    """

    peft_type: ClassVar[str] = "PROMPT_TUNING"

    num_virtual_tokens: int = 20
    init: str = "random"
    init_text: str | None = None
    tokenizer: Any = dataclasses.field(default=None, repr=False, compare=False)
    modules_to_save: list[str] | None = None
    base_model_name_or_path: str | None = None
    task_type: str | None = None

    def __post_init__(self) -> None:
        self._check_modules_to_save()
        _check_positive_int("PromptConfig", "num_virtual_tokens", self.num_virtual_tokens)
        _check_token_init(self)

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data.pop("tokenizer")  # an object, not data: used once at init, never saved
        return data


PeftConfig = LoraConfig | AdapterConfig | PrefixConfig | PromptConfig
"""Any method config."""

__all__ = [
    "AdapterConfig", "LoraConfig", "PeftConfig", "PrefixConfig", "PromptConfig", "TargetSpec", "lora_scaling",
]
