"""The record that declares a method, and the pieces prompt and prefix tuning share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from .. import integrations, validate
from ..config import MethodConfig


@dataclass(frozen=True)
class Method:
    """One method, as everything outside its declaration sees it.

    Attributes:
        name: the ``--method`` value, e.g. ``"lora"``.
        label: how reports name it, e.g. ``"LoRA"``.
        config_class: its config dataclass; ``config_class.peft_type`` names it in files.
        attach: ``(peft_model, config, adapter name, paths trained in full) -> adapted paths``.
            It puts the adapter's modules in place and never changes which parameters train:
            ``PeftModel`` derives that from the protocol after every change (M1).
        input_side: True when it adds virtual tokens in front of the input (prompt, prefix):
            at most one such adapter runs at a time, and it lives outside the model tree.
        mergeable: True when it folds into the base weights (``merge_and_unload``).
        learning_rate: the default rate; the declaration cites its sources.
        learning_rate_floor: below it, the doctor warns (M9).
        cli_options: ``peftkit train`` option (argparse dest) -> config field it sets.
        to_file: ``(config, formats.peft_config.ModelFacts) -> adapter_config.json fields``.
        from_file: ``(fields, path) -> config``, refusing what it cannot honour.
        settle: ``(config, model) -> config`` with the choices the config leaves to the model
            made (prefix tuning's init); None when there are none.
        rate_for_model: ``(model) -> default rate`` where it depends on the model (LoRA's on
            the width); None when ``learning_rate`` is the rate.
    """

    name: str
    label: str
    config_class: type
    attach: Callable[..., list[str]]
    input_side: bool
    mergeable: bool
    learning_rate: float
    learning_rate_floor: float
    cli_options: dict[str, str]
    to_file: Callable[..., dict[str, Any]]
    from_file: Callable[..., MethodConfig]
    settle: Callable[[MethodConfig, nn.Module], MethodConfig] | None = None
    rate_for_model: Callable[[nn.Module], float] | None = None

    @property
    def peft_type(self) -> str:
        return self.config_class.peft_type


# -- prompt and prefix tuning ----------------------------------------------------------------
TOKEN_INITS = ("random", "vocab", "text")


def check_token_init(config: MethodConfig) -> None:
    """The init fields prompt and prefix tuning share: init (None: decided at attach time),
    init_text, tokenizer."""
    name = type(config).__name__
    if config.init is not None:
        validate.one_of(name, "init", config.init, TOKEN_INITS)
    if config.init_text is not None and not isinstance(config.init_text, str):
        raise validate.InvalidValue(name, "init_text", "None or a string", config.init_text)
    if config.init == "text" and (not config.init_text or config.tokenizer is None):
        raise ValueError(f"{name}(init='text') needs init_text and a tokenizer to encode it.")


def check_virtual_tokens(model: nn.Module, config: MethodConfig, adapter_size: int) -> None:
    """Before anything is allocated: ``num_virtual_tokens`` must leave the model room for its
    input (below its ``max_position_embeddings``, where the config says it), and the adapter,
    ``adapter_size`` parameters, must be smaller than the model it adapts (a prompt that big
    is not parameter-efficient, and a typo such as 20000000 would exhaust memory)."""
    name, n = type(config).__name__, config.num_virtual_tokens
    positions = integrations.max_positions(model)
    if positions is not None and n >= positions:
        raise ValueError(f"{name}.num_virtual_tokens={n} leaves no room for the input: the model reads "
                         f"at most {positions} positions; use far fewer (PEFT's guides use 8 to 100).")
    base = sum(p.numel() for p in model.parameters())
    if adapter_size > base:
        raise ValueError(f"{name} with num_virtual_tokens={n}"
                         + (f", projection_dim={config.projection_dim}" if getattr(config, "projection_dim", None) else "")
                         + f" would have {adapter_size:,} parameters, more than the {base:,} of the model it "
                         "adapts; use fewer virtual tokens (or a smaller projection_dim).")


def check_input_side_supported(model: nn.Module, method: str) -> None:
    """Prompt and prefix tuning rewrite a decoder's or an encoder's input, not a seq2seq pair's."""
    if integrations.is_encoder_decoder(model):
        raise ValueError(f"peftkit's {method} supports decoder-only and encoder-only models; "
                         f"{type(model).__name__} is an encoder-decoder.")
