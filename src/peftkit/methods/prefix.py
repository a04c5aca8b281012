"""Prefix tuning (Li & Liang 2021): learned keys and values in every attention layer.

For adapter a and layer l, every query also attends to N learned positions with keys
K_l and values V_l, each (num_kv_heads, N, head_dim). The key/value heads are the
model's (``num_key_value_heads`` under grouped-query attention), so the prefix is as
small as the model's own cache.

Storage follows Hugging Face PEFT: one tensor (N, num_layers * 2 * kv_dim) with
kv_dim = num_kv_heads * head_dim, whose row t is viewed as (num_layers * 2, heads,
head_dim); entry 2l is layer l's key and 2l + 1 its value. A PEFT prefix therefore loads
unchanged.

With ``projection_dim`` the prefix is produced while training by an MLP,
prefix = W2 tanh(W1 E + b1) + b2 with E (N, kv_dim), W1 (projection_dim, kv_dim) and
W2 (num_layers * 2 * kv_dim, projection_dim), which Li & Liang found trains more stably
than the raw tensor. ``fold`` replaces the MLP by the tensor it produces; files always
hold that tensor.
"""

from __future__ import annotations


import torch
from torch import nn

from .base import AdapterModule

KeyValues = tuple[tuple[torch.Tensor, torch.Tensor], ...]
"""One (key, value) per layer, each (batch, num_kv_heads, N, head_dim)."""


class PrefixEncoder(AdapterModule):
    """The prefixes of every prefix-tuning adapter of one model.

    Args:
        num_layers: attention layers of the model.
        num_kv_heads: key/value heads per layer (fewer than query heads under GQA).
        head_dim: width of one head.
    """

    adapter_tables = {"prefix": "virtual_tokens", "embedding": "virtual_tokens", "mlp": "virtual_tokens"}
    single_active = True
    method_label = "prefix-tuning"

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.prefix = nn.ParameterDict()      # plain adapters: (N, num_layers * 2 * kv_dim)
        self.embedding = nn.ParameterDict()   # reparameterised adapters: E (N, kv_dim) ...
        self.mlp = nn.ModuleDict()            # ... and the MLP that maps it to the prefix

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def width(self) -> int:
        """Columns of the stored prefix: a key and a value of kv_dim for every layer."""
        return self.num_layers * 2 * self.kv_dim

    def add_adapter(self, name: str, num_virtual_tokens: int, projection_dim: int | None = None,
                    device: torch.device | None = None, initial: KeyValues | None = None) -> None:
        """Create adapter ``name``, starting from the per-layer keys and values ``initial``
        (each (1, num_kv_heads, N, head_dim)) when given. Otherwise, as in PEFT, the prefix
        (or E) starts N(0, 1) and the MLP's layers get nn.Linear's default init. Stored in
        float32, cast to the model's dtype when used."""
        if initial is not None:
            if projection_dim is not None:
                raise ValueError("a prefix produced by an MLP (projection_dim) cannot start from given keys and values.")
            self.prefix[name] = nn.Parameter(self.flatten(initial).float().to(device))
            return
        if projection_dim is None:
            self.prefix[name] = nn.Parameter(torch.randn(num_virtual_tokens, self.width, device=device))
            return
        self.embedding[name] = nn.Parameter(torch.randn(num_virtual_tokens, self.kv_dim, device=device))
        self.mlp[name] = nn.Sequential(
            nn.Linear(self.kv_dim, projection_dim), nn.Tanh(), nn.Linear(projection_dim, self.width),
        ).to(device)

    def num_virtual_tokens(self, name: str) -> int:
        table = self.prefix if name in self.prefix else self.embedding
        return table[name].shape[0]

    def flat(self, name: str) -> torch.Tensor:
        """The prefix of adapter ``name`` in PEFT's layout, (N, num_layers * 2 * kv_dim)."""
        if name in self.mlp:
            return self.mlp[name](self.embedding[name])
        return self.prefix[name]

    def forward(self, name: str, batch: int, dtype: torch.dtype) -> KeyValues:
        """Per-layer (key, value), each (batch, num_kv_heads, N, head_dim) in ``dtype``.

        The batch dimension is a broadcast view: one prefix serves every row.
        """
        flat = self.flat(name).to(dtype)
        n = flat.shape[0]
        # (N, L * 2 * H * D) -> (L * 2, H, N, D): the same split as PEFT's get_prompt.
        stacked = flat.view(n, self.num_layers * 2, self.num_kv_heads, self.head_dim).permute(1, 2, 0, 3)
        # Split first, then broadcast each piece over the batch. Indexing a tensor already
        # broadcast over the batch costs, in backward, a zero-filled (L * 2, batch, H, N, D)
        # gradient per key and per value (12 x 12 MB a step on MiniLM at batch 32, 3 % of
        # the step); unbind's backward is one stack of (H, N, D) pieces.
        pieces = [t.unsqueeze(0).expand(batch, -1, -1, -1) for t in stacked.unbind(0)]
        return tuple((pieces[2 * layer], pieces[2 * layer + 1]) for layer in range(self.num_layers))

    def flatten(self, key_values: KeyValues) -> torch.Tensor:
        """The inverse of ``forward`` for one row: per-layer (key, value), each
        (1, num_kv_heads, N, head_dim), to PEFT's layout (N, num_layers * 2 * kv_dim)."""
        expected = (1, self.num_kv_heads, self.head_dim)
        if len(key_values) != self.num_layers or any(
                (t.shape[0], t.shape[1], t.shape[3]) != expected for kv in key_values for t in kv):
            raise ValueError(f"expected {self.num_layers} layers of keys and values shaped "
                             f"(1, {self.num_kv_heads}, N, {self.head_dim}).")
        stacked = torch.stack([t[0] for kv in key_values for t in kv])  # (L * 2, H, N, D)
        return stacked.permute(2, 0, 1, 3).reshape(stacked.shape[2], -1)

    def fold(self, name: str) -> None:
        """Replace adapter ``name``'s MLP by the prefix it produces (for inference, or to
        keep training the plain tensor). Outputs are unchanged; the MLP is gone."""
        if name not in self.mlp:
            return
        with torch.no_grad():
            folded = self.mlp[name](self.embedding[name])
        self.prefix[name] = nn.Parameter(folded, requires_grad=self.embedding[name].requires_grad)
        del self.mlp[name], self.embedding[name]

    # -- adapter protocol -------------------------------------------------
    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        # Files hold the folded prefix under PEFT's key, whatever the parameterisation.
        return {"prompt_embeddings": self.flat(name).detach()}

    def load_adapter_state_dict(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        self.fold(name)  # a saved prefix is the folded tensor
        with torch.no_grad():
            self.prefix[name].copy_(tensors["prompt_embeddings"])

    def extra_repr(self) -> str:
        return (f"num_layers={self.num_layers}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"prefixes={ {n: self.num_virtual_tokens(n) for n in self.adapter_names} }")
