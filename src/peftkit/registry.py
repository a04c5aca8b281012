"""The methods peftkit implements: one record each, declared once, read by everything else.

A record says what a method is (its config class and PEFT type name), how it is put on a
model (its attacher), whether it works at the input side (virtual tokens in front of the
input) and whether it folds into the weights, the learning rate it trains well with and
the doctor's too-low floor (M9), and which command-line options set its config.
``model.py``, the file format, the training loop, the doctor and the command line ask this
module; none of them lists the methods. A new method is its module in ``methods/``, its
config class, its attacher, its file fields (``formats.peft_config``) and one record in
``METHODS``.

Learning rates, one table with its sources (the default, and the floor below which the
adapter barely moves in a normal run; full fine-tuning's 1e-5 to 5e-5 is the classic slip):
- LoRA: Hu et al. (2021) fine-tune RoBERTa-base (hidden 768) with 4e-4 to 5e-4,
  RoBERTa-large (1024) with 3e-4 to 4e-4 and GPT-2 with 2e-4; QLoRA (Dettmers et al. 2023)
  uses 2e-4 for 7B and 13B models and 1e-4 for 33B and 65B; Hugging Face PEFT's guides use
  1e-4 to 3e-4. Default 2e-4 at hidden size 4096, scaled with the width by the training
  loop (``train.default_learning_rate``); floor 5e-5, half the lowest of these.
- Bottleneck adapters: Pfeiffer et al. (2021, AdapterFusion) and AdapterHub train them with
  1e-4, Houlsby et al. (2019) sweep 3e-5 to 3e-3; a zero-initialised up-projection, like
  LoRA's B, barely moves at a full fine-tuning rate. Default and floor 1e-4.
- Prompt tuning: Lester et al. (2021) train the prompt with 0.3 (Adafactor), Hugging Face
  PEFT's guide with 3e-2; at LoRA's 2e-4 a prompt barely leaves its initialisation.
  Default 3e-2; floor 1e-3, thirty times below the guide.
- Prefix tuning: Li & Liang (2021) train the prefix (through their MLP) with 5e-5 and up,
  PEFT's guide with 1e-2. Default 1e-2; floor 5e-5, the paper's rate.
- P-tuning (Liu et al. 2021; Hugging Face PEFT has it, peftkit does not): a prompt-side
  method, floor 1e-3 as for prompt tuning. The doctor still recognises it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import attachers
from .config import AdapterConfig, LoraConfig, PeftConfig, PrefixConfig, PromptConfig
from .formats import peft_config as files


@dataclass(frozen=True)
class Method:
    """One method, as everything outside its own module sees it.

    Attributes:
        name: the ``--method`` value, e.g. ``"lora"``.
        label: how reports name it, e.g. ``"LoRA"``.
        config_class: its config dataclass; ``config_class.peft_type`` names it in files.
        attach: ``(peft_model, config, adapter name, paths trained in full) -> target paths``.
        input_side: True when it adds virtual tokens in front of the input (prompt, prefix):
            at most one such adapter runs at a time, and it lives outside the model tree.
        mergeable: True when it folds into the base weights (``merge_and_unload``).
        learning_rate: the default rate (see the module docstring).
        learning_rate_floor: below it, the doctor warns (M9).
        cli_options: ``peftkit train`` option (argparse dest) -> config field it sets.
        to_file: ``(config, ModelFacts) -> adapter_config.json fields`` (formats.peft_config).
        from_file: ``(fields, path) -> config``, refusing what it cannot honour.
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
    from_file: Callable[..., PeftConfig]

    @property
    def peft_type(self) -> str:
        return self.config_class.peft_type


METHODS: tuple[Method, ...] = (
    Method("lora", "LoRA", LoraConfig, attachers.attach_lora, input_side=False, mergeable=True,
           learning_rate=2e-4, learning_rate_floor=5e-5,
           cli_options={"r": "r", "alpha": "alpha", "dropout": "dropout", "targets": "target_modules",
                        "rslora": "use_rslora"},
           to_file=files.lora_to_peft, from_file=files.lora_from_peft),
    Method("adapter", "bottleneck-adapter", AdapterConfig, attachers.attach_bottleneck, input_side=False,
           mergeable=False, learning_rate=1e-4, learning_rate_floor=1e-4,
           cli_options={"bottleneck": "bottleneck", "placement": "placement", "activation": "activation",
                        "dropout": "dropout", "targets": "target_modules"},
           to_file=files.bottleneck_to_peft, from_file=files.bottleneck_from_peft),
    Method("prefix", "prefix-tuning", PrefixConfig, attachers.attach_prefix, input_side=True, mergeable=False,
           learning_rate=1e-2, learning_rate_floor=5e-5,
           cli_options={"virtual_tokens": "num_virtual_tokens", "projection_dim": "projection_dim",
                        "init": "init", "init_text": "init_text"},
           to_file=files.prefix_to_peft, from_file=files.prefix_from_peft),
    Method("prompt", "prompt-tuning", PromptConfig, attachers.attach_prompt, input_side=True, mergeable=False,
           learning_rate=3e-2, learning_rate_floor=1e-3,
           cli_options={"virtual_tokens": "num_virtual_tokens", "init": "init", "init_text": "init_text"},
           to_file=files.prompt_to_peft, from_file=files.prompt_from_peft),
)

# Hugging Face PEFT methods peftkit does not implement but the doctor recognises in a PEFT
# model: PEFT type -> (label, learning-rate floor).
OTHER_PEFT_METHODS: dict[str, tuple[str, float]] = {"P_TUNING": ("p-tuning", 1e-3)}


def method_named(name: str) -> Method:
    """The record whose ``--method`` name is ``name``."""
    for method in METHODS:
        if method.name == name:
            return method
    raise ValueError(f"unknown method {name!r}; peftkit has {[m.name for m in METHODS]}.")


def method_of_type(peft_type: str) -> Method:
    """The record of PEFT type ``peft_type`` (``"LORA"``, ``"PREFIX_TUNING"``, ...)."""
    for method in METHODS:
        if method.peft_type == peft_type:
            return method
    raise ValueError(f"unknown peft_type {peft_type!r}; peftkit reads {sorted(m.peft_type for m in METHODS)}.")


def method_for(config: Any) -> Method:
    """The record of ``config``'s class; a TypeError for anything that is not a method config."""
    for method in METHODS:
        if type(config) is method.config_class:
            return method
    raise TypeError(f"unsupported config type {type(config).__name__}; "
                    f"peftkit attaches {[m.config_class.__name__ for m in METHODS]}.")


def config_from_dict(data: dict[str, Any]) -> PeftConfig:
    """Build the right config class from a dict that names its ``peft_type``."""
    return method_of_type(data.get("peft_type")).config_class.from_dict(data)


def method_label(peft_type: str) -> str:
    """How reports name the method of ``peft_type`` (peftkit's or another PEFT method)."""
    if peft_type in OTHER_PEFT_METHODS:
        return OTHER_PEFT_METHODS[peft_type][0]
    return method_of_type(peft_type).label


def learning_rate_floor(peft_type: str) -> float | None:
    """The doctor's M9 floor for ``peft_type``; None for a type it knows no floor for."""
    if peft_type in OTHER_PEFT_METHODS:
        return OTHER_PEFT_METHODS[peft_type][1]
    try:
        return method_of_type(peft_type).learning_rate_floor
    except ValueError:
        return None
