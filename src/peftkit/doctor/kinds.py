"""The method families the doctor's probes tell apart, by PEFT type name. What it says of
each (a readable name, the learning-rate floor of M9) comes from ``peftkit.registry``."""

from __future__ import annotations

from ..specs.adapter import AdapterConfig
from ..specs.lora import LoraConfig
from ..specs.prefix import PrefixConfig
from ..specs.prompt import PromptConfig

LORA, PROMPT, PREFIX, BOTTLENECK = (LoraConfig.peft_type, PromptConfig.peft_type, PrefixConfig.peft_type,
                                    AdapterConfig.peft_type)
P_TUNING = "P_TUNING"  # Hugging Face PEFT's; peftkit does not implement it (registry.OTHER_PEFT_METHODS)
PROMPT_METHODS = (PROMPT, P_TUNING)
