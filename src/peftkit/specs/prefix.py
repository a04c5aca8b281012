"""Prefix tuning, declared: its config, how it is put on a model, its adapter_config.json
fields, its learning rate, and its record.

Learning rate, with sources: Li & Liang (2021) train the prefix (through their MLP) with
5e-5 and up, Hugging Face PEFT's guide with 1e-2. Default 1e-2; the doctor's floor 5e-5, the
paper's rate (M9).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from .. import integrations, validate
from ..config import MethodConfig
from ..formats import peft_config as files
from ..methods.prefix import PrefixEncoder
from ..methods.prompt import init_token_ids
from .common import Method, check_input_side_supported, check_token_init, check_virtual_tokens


@dataclass
class PrefixConfig(MethodConfig):
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
            default) is decided when the prefix is attached (``settle``): ``"random"`` with
            projection_dim or on a sequence classifier, else ``"vocab"``. A language model
            keeps its pretrained output head, and N(0, 1) keys, far off its own scale,
            wreck its first outputs (SmolLM2's first loss 8-11 against 1.1); a classifier's
            head is new anyway, and there N(0, 1) trained better on a validation split
            (bench/defaults_study.py --study prefix).
        init_text, tokenizer: for ``init="text"``; the tokenizer is used once and never saved.
        modules_to_save, base_model_name_or_path, task_type: see ``MethodConfig``.
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
        validate.positive_int("PrefixConfig", "num_virtual_tokens", self.num_virtual_tokens)
        if self.projection_dim is not None:
            validate.positive_int("PrefixConfig", "projection_dim", self.projection_dim)
        if self.init is None and self.projection_dim is not None:
            self.init = "random"
        check_token_init(self)  # init None is decided at attach time (see init above)
        if self.projection_dim is not None and self.init != "random":
            raise ValueError(
                f"PrefixConfig(init={self.init!r}) sets the prefix itself, but with projection_dim an "
                "MLP produces it; drop projection_dim or use init='random'."
            )


def settle(config: PrefixConfig, model: nn.Module) -> PrefixConfig:
    """Decide an open ``init``: ``"random"`` (N(0, 1)) on a sequence classifier, whose head is
    new anyway, else ``"vocab"`` (the model's own keys and values of vocabulary tokens), so
    that a language model's first outputs stay its own (PrefixConfig's docstring has why)."""
    if config.init is not None:
        return config
    return dataclasses.replace(config, init="random" if integrations.is_sequence_classifier(model) else "vocab")


def attach(peft_model: Any, config: PrefixConfig, name: str, trained_in_full: list[str]) -> list[str]:
    """Learn N keys and values per attention layer (M11); ``config`` is settled."""
    model = peft_model.base_model
    check_input_side_supported(model, "prefix tuning")
    if integrations.cache_argument(model) is None:
        raise ValueError(
            f"prefix tuning hands the prefix to the model as the start of its KV cache, but "
            f"{type(model).__name__}.forward takes no cache (cache / past_key_values)."
        )
    layers, kv_heads, head_dim = integrations.attention_geometry(model)
    width, kv_dim = 2 * layers * kv_heads * head_dim, kv_heads * head_dim  # as PrefixEncoder stores them
    size = config.num_virtual_tokens * width
    if config.projection_dim is not None:  # E (N, kv_dim) and the MLP kv_dim -> projection_dim -> width
        size = config.num_virtual_tokens * kv_dim + (kv_dim + 1 + width) * config.projection_dim + width
    check_virtual_tokens(model, config, size)
    encoders = peft_model.input_adapters
    if "prefix" not in encoders:
        encoders["prefix"] = PrefixEncoder(layers, kv_heads, head_dim)
    device = next(model.parameters()).device
    ids = init_token_ids(config, model.get_input_embeddings().num_embeddings)
    # Li & Liang's init from real words: the keys and values the model gives those tokens.
    initial = None if ids is None else integrations.token_key_values(model, ids.to(device)[None])
    encoders["prefix"].add_adapter(name, config.num_virtual_tokens, config.projection_dim, device, initial)
    return []


# -- adapter_config.json: Hugging Face PEFT's PrefixTuningConfig ------------------------------
# A saved prefix is always the folded tensor, whether PEFT trained it through an MLP or not.
_INFORMATIONAL = files.PROMPT_LEARNING_INFORMATIONAL | {"encoder_hidden_size", "prefix_projection", "init_weights"}


def to_file(config: PrefixConfig, facts: files.ModelFacts) -> dict[str, Any]:
    """As PEFT does for grouped-query attention, ``token_dim`` is num_kv_heads * head_dim and
    ``num_attention_heads`` the key/value heads. The file holds the folded prefix, so it is
    described as unprojected (``prefix_projection: false``) whatever peftkit trained with."""
    kv_dim = facts.num_kv_heads * facts.head_dim
    return {
        **files.prompt_learning_fields(config, facts), "peft_type": "PREFIX_TUNING",
        "token_dim": kv_dim, "num_attention_heads": facts.num_kv_heads, "encoder_hidden_size": kv_dim,
        "prefix_projection": False, "init_weights": None,
    }


def from_file(data: dict[str, Any], path: Path) -> PrefixConfig:
    # The saved prefix replaces any init, so none is computed (a "vocab" init runs the model).
    return PrefixConfig(**files.prompt_learning_kwargs(data, path, _INFORMATIONAL), init="random")


METHOD = Method(
    "prefix", "prefix-tuning", PrefixConfig, attach, input_side=True, mergeable=False,
    learning_rate=1e-2, learning_rate_floor=5e-5, settle=settle,
    cli_options={"virtual_tokens": "num_virtual_tokens", "projection_dim": "projection_dim",
                 "init": "init", "init_text": "init_text"},
    to_file=to_file, from_file=from_file,
)
