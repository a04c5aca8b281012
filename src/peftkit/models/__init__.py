"""A small reference decoder and byte tokenizer for demos and tests; needs only torch
and safetensors."""

from .reference import ReferenceConfig, ReferenceDecoder, ReferenceOutput
from .tokenizer import ByteTokenizer

__all__ = ["ByteTokenizer", "ReferenceConfig", "ReferenceDecoder", "ReferenceOutput"]
