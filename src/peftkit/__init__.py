"""peftkit: parameter-efficient fine-tuning that makes the classic PEFT mistakes impossible.

    import peftkit
    pm = peftkit.attach(model, peftkit.LoraConfig(r=8, alpha=16))
    pm.save("out/adapter")
    pm = peftkit.load(fresh_model, "out/adapter")
"""

from .specs.adapter import AdapterConfig
from .specs.lora import LoraConfig
from .specs.prefix import PrefixConfig
from .specs.prompt import PromptConfig
from .doctor import DoctorReport, Finding, doctor
from .formats.adapter_folder import AdapterFileError
from .methods.lora import LoraEmbedding, LoraFunction, LoraLinear
from .model import PeftModel, attach, load
from .checkpointing import enable_gradient_checkpointing, gradient_checkpointing_enabled
from .registry import config_from_dict

__version__ = "0.1.0"

__all__ = [
    "AdapterConfig",
    "AdapterFileError",
    "DoctorReport",
    "Finding",
    "LoraConfig",
    "LoraEmbedding",
    "LoraFunction",
    "LoraLinear",
    "PeftModel",
    "PrefixConfig",
    "PromptConfig",
    "attach",
    "config_from_dict",
    "doctor",
    "enable_gradient_checkpointing",
    "gradient_checkpointing_enabled",
    "load",
]
