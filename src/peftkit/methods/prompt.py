"""Prompt tuning (Lester et al. 2021): N learned rows prepended to the input embeddings.

For adapter a the soft prompt is P_a, (N, token_dim). The model reads
[P_a ; E(x)] (B, N + T, token_dim) in place of E(x) (B, T, token_dim); the attention
mask, labels and positions are extended to match in ``peftkit.masks``. The prompt is
stored in float32, as Hugging Face PEFT does, and cast to the model's dtype when used.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .base import AdapterModule

# Enough rows to estimate the spread of a vocabulary's embeddings without embedding all of it.
_SCALE_SAMPLE = 1024


class PromptEncoder(AdapterModule):
    """The soft prompts of every prompt-tuning adapter of one model.

    Args:
        token_dim: width of the model's input embeddings.
    """

    adapter_tables = {"embeddings": "virtual_tokens"}
    single_active = True
    method_label = "prompt-tuning"

    def __init__(self, token_dim: int) -> None:
        super().__init__()
        self.token_dim = token_dim
        self.embeddings = nn.ParameterDict()

    def add_adapter(self, name: str, init: torch.Tensor) -> None:
        """Create adapter ``name`` with the prompt ``init`` (N, token_dim), copied as float32."""
        if init.dim() != 2 or init.shape[1] != self.token_dim:
            raise ValueError(f"a prompt must be (num_virtual_tokens, {self.token_dim}), got {tuple(init.shape)}.")
        self.embeddings[name] = nn.Parameter(init.detach().to(torch.float32).clone())

    def num_virtual_tokens(self, name: str) -> int:
        return self.embeddings[name].shape[0]

    def forward(self, name: str, batch: int, dtype: torch.dtype) -> torch.Tensor:
        """The prompt of adapter ``name`` for every row: (batch, N, token_dim) in ``dtype``."""
        prompt = self.embeddings[name].to(dtype)
        return prompt.unsqueeze(0).expand(batch, -1, -1)

    # -- adapter protocol -------------------------------------------------
    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        # Hugging Face PEFT's one key for every prompt-learning method.
        return {"prompt_embeddings": self.embeddings[name]}

    def load_adapter_state_dict(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.embeddings[name].copy_(tensors["prompt_embeddings"])

    def extra_repr(self) -> str:
        return f"token_dim={self.token_dim}, prompts={ {n: p.shape[0] for n, p in self.embeddings.items()} }"


def text_token_ids(token_ids: list[int], num_virtual_tokens: int) -> torch.Tensor:
    """The ids of an init text, repeated or cut to exactly ``num_virtual_tokens`` (as PEFT does)."""
    if not token_ids:
        raise ValueError("the init text encodes to no tokens; give a non-empty init_text.")
    repeats = math.ceil(num_virtual_tokens / len(token_ids))
    return torch.tensor((token_ids * repeats)[:num_virtual_tokens], dtype=torch.long)


def init_token_ids(config, vocab_size: int) -> torch.Tensor | None:
    """The N token ids a ``"vocab"`` or ``"text"`` init starts from (None for ``"random"``).

    ``"vocab"`` draws N ids uniformly from the vocabulary, ``"text"`` encodes
    ``config.init_text`` with ``config.tokenizer.encode`` (repeated or cut to N), both as
    PEFT does for prompts. ``config`` is a PromptConfig or PrefixConfig.
    """
    n = config.num_virtual_tokens
    if config.init == "text":
        ids = text_token_ids(list(config.tokenizer.encode(config.init_text)), n)
        if int(ids.max()) >= vocab_size:
            raise ValueError(
                f"the tokenizer gives id {int(ids.max())} for init_text, but the model's vocabulary "
                f"has {vocab_size} entries; use the model's own tokenizer."
            )
        return ids
    if config.init == "vocab":
        return torch.randint(0, vocab_size, (n,))
    return None


def initial_prompt(config: Any, embed: nn.Module) -> torch.Tensor:
    """The starting prompt (N, token_dim) for ``config``.

    ``embed`` is the model's input-embedding module (callable on ids, with
    ``num_embeddings``). ``"vocab"`` and ``"text"`` take the embeddings of the ids
    ``init_token_ids`` gives. ``"random"`` draws from a normal distribution with the
    spread of the model's own token embeddings, so the prompt starts at the scale the
    first layer expects (PEFT's N(0, 1) can be tens of times larger than real
    embeddings, e.g. GPT-2's).
    """
    vocab_size = embed.num_embeddings
    device = next(embed.parameters()).device
    n = config.num_virtual_tokens
    with torch.no_grad():
        ids = init_token_ids(config, vocab_size)
        if ids is not None:
            return embed(ids.to(device)).float()
        sample = embed(torch.randint(0, vocab_size, (min(vocab_size, _SCALE_SAMPLE),), device=device)).float()
        return torch.randn(n, sample.shape[1], device=device) * sample.std()
