"""Where a run computes and in what precision: the device, the frozen base's dtype, mixed
precision through ``torch.autocast`` and, for float16, a gradient scaler.

The policy, as Hugging Face PEFT and transformers' Trainer have it:

- the frozen base is stored in ``dtype`` (bfloat16 by default on a GPU that has it,
  float32 on a CPU), so a 1B model costs 2 GB of weights rather than 4;
- adapter weights stay in float32 on a half-precision base (``PeftModel.add_adapter``'s
  ``adapter_dtype``, PEFT's ``autocast_adapter_dtype``): AdamW's updates of 1e-4 x a weight
  of 1 vanish in bfloat16's 8-bit mantissa (its spacing near 1 is 2^-7);
- the forward and backward run under ``torch.autocast`` in the base's dtype, so every
  matmul is a half-precision one and the loss is reduced in float32;
- float16, whose range ends at 65504 and whose gradients underflow below 6e-8, trains
  with ``torch.amp.GradScaler``: the loss is scaled up before backward, the gradients are
  unscaled before clipping, and a step whose gradients overflowed is skipped.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HALF = (torch.bfloat16, torch.float16)
DEVICES = "auto, cpu, cuda, cuda:N or mps"


class PrecisionError(ValueError):
    """A device that is not there, or a dtype the device cannot compute in."""


def dtype_named(name: str) -> torch.dtype:
    """``"bfloat16"`` -> torch.bfloat16 (also ``"bf16"``, ``"fp16"``, ``"fp32"``)."""
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    key = aliases.get(name, name)
    if key not in DTYPES:
        raise PrecisionError(f"dtype {name!r} is not one of {', '.join(DTYPES)}; pass one of them.")
    return DTYPES[key]


def resolve_device(spec: str = "auto") -> torch.device:
    """The device ``spec`` names, checked to be there: ``auto`` is CUDA, then MPS, then CPU."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):
        raise PrecisionError(f"device {spec!r} is not a device; pass {DEVICES}.") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise PrecisionError(f"--device {spec}: this machine has no CUDA GPU that torch can use (torch "
                                 f"{torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); pass "
                                 "--device cpu, or install a CUDA build of torch on a machine with an NVIDIA GPU.")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise PrecisionError(f"--device {spec}: this machine has {count} CUDA GPU(s), numbered 0 to {count - 1}; "
                                 "pass one of those.")
        return device
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise PrecisionError(f"--device {spec}: MPS (Apple silicon) is not available here; pass --device cpu "
                                 "or --device auto.")
        return device
    raise PrecisionError(f"device {spec!r} is not supported; pass {DEVICES}.")


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """The frozen base's dtype: ``auto`` is bfloat16 on a CUDA GPU that computes in it
    (Ampere and newer) and float32 elsewhere (a CPU's bfloat16 matmuls are rarely faster, and
    MPS's bfloat16 support depends on the macOS version); a dtype the device cannot take is
    refused with the fix."""
    if spec == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    dtype = dtype_named(spec)
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        name = torch.cuda.get_device_name(device)
        raise PrecisionError(f"--dtype bfloat16: {name} cannot compute in bfloat16 (it needs compute capability "
                             "8.0, Ampere, or newer); pass --dtype float16 (trained with a gradient scaler) or "
                             "--dtype float32.")
    return dtype


def base_dtype(model: nn.Module) -> torch.dtype:
    """The dtype most of the model's frozen floating-point weight elements are stored in
    (an NF4 layer's 4-bit codes are not floating point: its bias, the embeddings and the norms
    decide); float32 when none is frozen."""
    counts: dict[torch.dtype, int] = {}
    for param in model.parameters():
        if not param.requires_grad and param.is_floating_point():
            counts[param.dtype] = counts.get(param.dtype, 0) + param.numel()
    return max(counts, key=counts.get) if counts else torch.float32


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (peftkit trains on one device)."""
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def place(model: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Move ``model`` to ``device`` and store its floating-point parameters in ``dtype``, in
    place. Each is converted through ``.data``, so a weight tied to another (GPT-2's head and
    embedding) stays one tensor. Buffers keep their dtype, as transformers' own loading in a
    dtype leaves them: rotary inverse frequencies in bfloat16 would put a position of 4000 off
    by most of a radian. A quantized weight (a tensor subclass) keeps its 4-bit form."""
    model.to(device)
    for tensor in model.parameters():
        if tensor.is_floating_point() and tensor.dtype != dtype and _plain(tensor):
            tensor.data = tensor.data.to(dtype)
    return model


def _plain(tensor: torch.Tensor) -> bool:
    return type(tensor) in (torch.Tensor, nn.Parameter) and type(tensor.data) is torch.Tensor


@dataclass(frozen=True)
class Precision:
    """How one model trains: on ``device``, its base in ``dtype``; under autocast in that dtype
    when it is a half type; float16 with a gradient scaler."""

    device: torch.device
    dtype: torch.dtype

    @classmethod
    def of(cls, model: nn.Module) -> "Precision":
        """The policy a model set up by hand implies: its device and its base's dtype."""
        return cls(model_device(model), base_dtype(model))

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return self.dtype if self.dtype in HALF else None

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """Forward (and the backward autograd derives from it) in the base's half dtype."""
        if self.autocast_dtype is None:
            yield
            return
        with torch.autocast(self.device.type, dtype=self.autocast_dtype):
            yield

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """A scaler for float16 (bfloat16 has float32's range and needs none)."""
        return torch.amp.GradScaler(self.device.type) if self.dtype == torch.float16 else None

    def move(self, batch: dict) -> dict:
        """The batch's tensors on this device (the CPU's stay where they are)."""
        return {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                for k, v in batch.items()}
