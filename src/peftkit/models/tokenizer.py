"""Byte-level tokenizer for the reference decoder: no vocabulary file, no downloads.

UTF-8 bytes are ids 0..255; four special tokens follow: pad=256, bos=257, eos=258,
sep=259, so ``vocab_size`` is 260, the default of ``ReferenceConfig``.
"""

from __future__ import annotations

from typing import Iterable, Optional, Union

import torch

_PADDING_SIDES = ("left", "right")


class ByteTokenizer:
    """Maps text to UTF-8 byte ids and back, and pads batches like a Hugging Face tokenizer."""

    pad_token_id = 256
    bos_token_id = 257
    eos_token_id = 258
    sep_token_id = 259
    vocab_size = 260
    special_tokens = {256: "<pad>", 257: "<bos>", 258: "<eos>", 259: "<sep>"}

    def __init__(self, padding_side: str = "right") -> None:
        _check_padding_side(padding_side)
        self.padding_side = padding_side

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        if add_bos:
            ids.insert(0, self.bos_token_id)
        if add_eos:
            ids.append(self.eos_token_id)
        return ids

    def decode(self, ids: Union[Iterable[int], torch.Tensor], skip_special_tokens: bool = True) -> str:
        """Invalid UTF-8 (a sequence cut inside a character, say) becomes U+FFFD.
        Kept special tokens are written as ``<pad>``, ``<bos>``, ``<eos>``, ``<sep>``."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        pieces: list[str] = []
        run = bytearray()
        for token in ids:
            token = int(token)
            if 0 <= token < 256:
                run.append(token)
                continue
            if token not in self.special_tokens:
                raise ValueError(f"token id {token} is outside the vocabulary (0..{self.vocab_size - 1})")
            if not skip_special_tokens:
                # Decode the bytes so far on their own: a special token ends a byte run.
                pieces.append(run.decode("utf-8", errors="replace"))
                run.clear()
                pieces.append(self.special_tokens[token])
        pieces.append(run.decode("utf-8", errors="replace"))
        return "".join(pieces)

    def batch_decode(self, rows: Union[Iterable[Iterable[int]], torch.Tensor],
                     skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(row, skip_special_tokens=skip_special_tokens) for row in rows]

    def __call__(
        self,
        texts: Union[str, list[str]],
        padding_side: Optional[str] = None,
        return_tensors: Optional[str] = "pt",
        add_bos: bool = False,
        add_eos: bool = False,
    ) -> dict:
        """Encode one text or a batch, padded to the longest with ``pad_token_id``.

        ``padding_side`` defaults to ``self.padding_side``; use "left" for generation.
        Returns ``input_ids`` and ``attention_mask`` (1 real, 0 pad), each (B, T):
        LongTensors with ``return_tensors="pt"``, lists of lists with None.
        """
        if isinstance(texts, str):
            texts = [texts]
        if not texts:
            raise ValueError("texts is empty")
        padding_side = self.padding_side if padding_side is None else padding_side
        _check_padding_side(padding_side)
        if return_tensors not in ("pt", None):
            raise ValueError(f"return_tensors must be 'pt' or None, got {return_tensors!r}")

        encoded = [self.encode(text, add_bos=add_bos, add_eos=add_eos) for text in texts]
        length = max(len(ids) for ids in encoded)
        input_ids, attention_mask = [], []
        for ids in encoded:
            pad = [self.pad_token_id] * (length - len(ids))
            mask = [1] * len(ids)
            zeros = [0] * len(pad)
            if padding_side == "left":
                input_ids.append(pad + ids)
                attention_mask.append(zeros + mask)
            else:
                input_ids.append(ids + pad)
                attention_mask.append(mask + zeros)
        if return_tensors == "pt":
            return {
                "input_ids": torch.tensor(input_ids, dtype=torch.long),
                "attention_mask": torch.tensor(attention_mask, dtype=torch.long),
            }
        return {"input_ids": input_ids, "attention_mask": attention_mask}


def _check_padding_side(padding_side: str) -> None:
    if padding_side not in _PADDING_SIDES:
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
