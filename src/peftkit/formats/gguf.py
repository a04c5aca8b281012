"""GGUF files, as llama.cpp and Ollama keep models and LoRA adapters: the header reader
and the LoRA adapter writer.

A GGUF file (little-endian, v2/v3) is

    "GGUF", version (u32), tensor count (u64), metadata count (u64)
    metadata: key (string), value type (u32), value     a string is a u64 length + UTF-8 bytes;
                                                        an array an item type (u32), a count (u64), items
    tensor infos: name (string), n_dims (u32), dims (u64 each, innermost first),
                  ggml type (u32), data offset (u64)
    padding to ``general.alignment`` (default 32), then the tensor data

The gguf package (gguf-py, llama.cpp's own) supplies the constants, the writer and the
tensor names; it is imported on first use, as peftkit runs without it.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import atomic

class GgufError(ValueError):
    """A file that is not a readable GGUF file; the message says what is wrong with it."""


def gguf_package():
    """The gguf module, or an ImportError whose message completes "... needs" sentences."""
    try:
        import gguf
    except ImportError as e:
        raise ImportError("needs the gguf package: pip install gguf (or pip install 'peftkit[gguf]').") from e
    return gguf


@dataclass(frozen=True)
class GgufTensor:
    shape: tuple[int, ...]  # torch order, outermost first: a weight is (out, in)
    type: str               # ggml storage type: "F32", "F16", "Q4_1" ...


@dataclass(frozen=True)
class GgufHeader:
    """What a GGUF file's header says. ``metadata`` holds every scalar, string and numeric
    array; arrays of strings (the vocabulary, the merges) are stepped over and left out."""

    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, GgufTensor]

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def tensor_types(self) -> dict[str, int]:
        """Storage type -> how many tensors use it, e.g. {"Q4_1": 210, "F32": 61}."""
        counts: dict[str, int] = {}
        for tensor in self.tensors.values():
            counts[tensor.type] = counts.get(tensor.type, 0) + 1
        return counts


_STRING, _ARRAY = 8, 9  # GGUF value types with a length prefix
_LEFT_OUT = object()    # stands for a string array


class _Cursor:
    """Reads GGUF values from a buffer, moving forward."""

    def __init__(self, buf, scalars: dict[int, np.dtype]) -> None:
        self.buf, self.pos, self.scalars = buf, 0, scalars

    def numbers(self, dtype: np.dtype, count: int) -> np.ndarray:
        values = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
        self.pos += dtype.itemsize * count
        return values

    def u32(self) -> int:
        return int(self.numbers(np.dtype("<u4"), 1)[0])

    def u64(self) -> int:
        return int(self.numbers(np.dtype("<u8"), 1)[0])

    def string(self) -> str:
        n = self.u64()
        if self.pos + n > len(self.buf):
            raise ValueError("a string runs past the end of the file")
        self.pos += n
        return bytes(self.buf[self.pos - n:self.pos]).decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype != _ARRAY:
            return self.numbers(self.scalars[vtype], 1)[0].item()
        item, count = self.u32(), self.u64()
        if item in self.scalars:  # read at once: a vocabulary's scores are 50k floats
            return self.numbers(self.scalars[item], count).tolist()
        if item == _STRING:  # stepped over, not decoded: the vocabulary and the merges
            for _ in range(count):
                n = self.u64()  # not `self.pos += self.u64()`: that adds to the position before the read
                self.pos += n
            return _LEFT_OUT
        items = [self.value(item) for _ in range(count)]  # arrays of arrays
        return _LEFT_OUT if any(v is _LEFT_OUT for v in items) else items


def read_header(path: str | Path) -> GgufHeader:
    """Parse the header of the GGUF file ``path`` (no tensor data is read) and check that
    the file holds all the tensor data the header promises.

    Raises GgufError for a file that is not GGUF, truncated or corrupt, and ImportError when
    the gguf package is missing. gguf.GGUFReader is not used: it builds a numpy view per
    vocabulary entry, seconds for a 50k-token model, to reach a few numbers.
    """
    path = Path(path)
    gguf = gguf_package()
    scalars = {int(t): np.dtype(d).newbyteorder("<") for t, d in gguf.GGUFReader.gguf_scalar_to_np.items()}
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            cursor = _Cursor(buf, scalars)
            magic, cursor.pos = bytes(buf[:4]), 4
            version = cursor.u32()
            if magic != b"GGUF" or version not in (2, 3):
                raise GgufError(f"{path} is not a GGUF v2/v3 file (magic {magic!r}, version {version})")
            n_tensors, n_kv = cursor.u64(), cursor.u64()
            metadata = {}
            for _ in range(n_kv):
                key = cursor.string()
                value = cursor.value(cursor.u32())
                if value is not _LEFT_OUT:
                    metadata[key] = value
            infos = []
            for _ in range(n_tensors):
                name = cursor.string()
                shape = tuple(int(d) for d in reversed(cursor.numbers(np.dtype("<u8"), cursor.u32())))
                infos.append((name, shape, gguf.GGMLQuantizationType(cursor.u32()), cursor.u64()))
            alignment = metadata.get(gguf.Keys.General.ALIGNMENT, gguf.GGUF_DEFAULT_ALIGNMENT)
            data_start, size = -(-cursor.pos // alignment) * alignment, len(buf)
    except GgufError:
        raise
    except (ValueError, KeyError, IndexError, ArithmeticError, OSError) as e:  # numpy and mmap raise ValueError
        raise GgufError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e}); "
                        "it is truncated or corrupt") from e
    tensors = {}
    for name, shape, ggml_type, offset in infos:
        block, type_size = gguf.GGML_QUANT_SIZES[ggml_type]
        end = data_start + offset + int(np.prod(shape, dtype=np.int64)) * type_size // block
        if end > size:
            raise GgufError(f"{path} is not a readable GGUF file (tensor {name} ends at byte {end}, the file "
                            f"at {size}); it is truncated or corrupt")
        tensors[name] = GgufTensor(shape, ggml_type.name)
    return GgufHeader(path, metadata, tensors)


def write_lora_adapter(out_path: str | Path, architecture: str, alpha: float, dtype: str,
                       arrays: list[tuple[str, np.ndarray]]) -> Path:
    """Write a GGUF LoRA adapter as llama.cpp's convert_lora_to_gguf.py does:
    ``general.type = "adapter"``, ``adapter.type = "lora"``, ``adapter.lora.alpha``, and the
    ``<base tensor>.lora_a`` / ``.lora_b`` arrays (``dtype`` "float32" or "float16").
    Written beside ``out_path`` and renamed into place, so a failure leaves no file (or the
    previous one)."""
    gguf = gguf_package()
    out_path = Path(out_path)
    with atomic.replacing(out_path) as tmp:
        writer = gguf.GGUFWriter(tmp, architecture)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "float32" else gguf.LlamaFileType.MOSTLY_F16)
        for name, array in arrays:
            writer.add_tensor(name, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return out_path
