"""Prompt tuning, declared: its config, how it is put on a model, its adapter_config.json
fields, its learning rate, and its record.

Learning rate, with sources: Lester et al. (2021) train the prompt with 0.3 (Adafactor),
Hugging Face PEFT's guide with 3e-2; at LoRA's 2e-4 a prompt barely leaves its
initialisation. Default 3e-2; the doctor's floor 1e-3, thirty times below the guide (M9).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from .. import integrations, validate
from ..config import MethodConfig
from ..formats import peft_config as files
from ..methods.prompt import PromptEncoder, initial_prompt
from .common import TOKEN_INITS, Method, check_input_side_supported, check_token_init, check_virtual_tokens


@dataclass
class PromptConfig(MethodConfig):
    """Prompt tuning (Lester et al. 2021): ``num_virtual_tokens`` learned embeddings
    prepended to the input embeddings.

    Args:
        num_virtual_tokens: prompt length.
        init: ``"random"``, ``"vocab"`` (embeddings of sampled vocabulary tokens) or
            ``"text"`` (the embeddings of ``init_text`` encoded by ``tokenizer``, repeated
            or cut to length).
        init_text, tokenizer: for ``init="text"``; the tokenizer is used once and never saved.
        modules_to_save, base_model_name_or_path, task_type: see ``MethodConfig``.
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
        validate.positive_int("PromptConfig", "num_virtual_tokens", self.num_virtual_tokens)
        if self.init is None:
            raise validate.InvalidValue("PromptConfig", "init", f"one of {TOKEN_INITS}", None)
        check_token_init(self)


def attach(peft_model: Any, config: PromptConfig, name: str, trained_in_full: list[str]) -> list[str]:
    """Learn N embeddings that are prepended to the input embeddings (M7)."""
    model = peft_model.base_model
    check_input_side_supported(model, "prompt tuning")
    if not integrations.accepts_argument(model, "inputs_embeds"):
        raise ValueError(f"prompt tuning feeds embeddings, but {type(model).__name__}.forward "
                         "takes no inputs_embeds.")
    embed = model.get_input_embeddings()
    check_virtual_tokens(model, config, config.num_virtual_tokens * embed.embedding_dim)
    init = initial_prompt(config, embed)
    encoders = peft_model.input_adapters
    if "prompt" not in encoders:
        encoders["prompt"] = PromptEncoder(init.shape[1])
    encoders["prompt"].add_adapter(name, init)
    return []


# -- adapter_config.json: Hugging Face PEFT's PromptTuningConfig ------------------------------
_INITS = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT"}  # PEFT's names
# The init is a record only: the saved prompt replaces whatever it would give.
_INFORMATIONAL = files.PROMPT_LEARNING_INFORMATIONAL | {
    "prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path", "tokenizer_kwargs",
}


def to_file(config: PromptConfig, facts: files.ModelFacts) -> dict[str, Any]:
    """The init is only a record (the saved prompt replaces it). PEFT refuses a ``TEXT``
    init without a tokenizer it can load, so ``TEXT`` is written only when the tokenizer
    has a ``name_or_path``, and ``RANDOM`` otherwise."""
    tokenizer_name = getattr(config.tokenizer, "name_or_path", None) or None
    init = _INITS[config.init] if config.init != "text" or tokenizer_name else "RANDOM"
    return {
        **files.prompt_learning_fields(config, facts), "peft_type": "PROMPT_TUNING",
        "token_dim": facts.token_dim, "num_attention_heads": facts.num_attention_heads,
        "prompt_tuning_init": init,
        "prompt_tuning_init_text": config.init_text if init == "TEXT" else None,
        "tokenizer_name_or_path": tokenizer_name if init == "TEXT" else None,
        "tokenizer_kwargs": None,
    }


def from_file(data: dict[str, Any], path: Path) -> PromptConfig:
    return PromptConfig(**files.prompt_learning_kwargs(data, path, _INFORMATIONAL))


METHOD = Method(
    "prompt", "prompt-tuning", PromptConfig, attach, input_side=True, mergeable=False,
    learning_rate=3e-2, learning_rate_floor=1e-3,
    cli_options={"virtual_tokens": "num_virtual_tokens", "init": "init", "init_text": "init_text"},
    to_file=to_file, from_file=from_file,
)
