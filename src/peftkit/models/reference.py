"""A small GPT-style decoder that peftkit's demos and tests run without downloads.

Pre-LayerNorm blocks with learned absolute positions, written out explicitly so the
whole model reads in one sitting. It follows the Hugging Face causal-LM conventions
that adapters depend on: ``attention_mask`` covers past + current tokens, labels are
shifted inside ``forward``, the KV cache is a tuple over layers of ``(key, value)``,
and ``generate`` returns prompt + new tokens.

Shapes: B = batch, T = current tokens, P = cached (past) tokens,
H = heads, D = head_dim = hidden_size / H, V = vocab_size.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from .. import generation, masks
from . import folder

KeyValue = Tuple[Tensor, Tensor]
PastKeyValues = Tuple[KeyValue, ...]


@dataclass
class ReferenceConfig:
    """Sizes of a :class:`ReferenceDecoder`; the defaults match :class:`ByteTokenizer`."""

    vocab_size: int = 260
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 512
    max_positions: int = 512
    layer_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True

    model_type: ClassVar[str] = "peftkit-reference"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads",
                     "intermediate_size", "max_positions"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ReferenceConfig.{name} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})"
            )
        if not self.layer_norm_eps > 0:
            raise ValueError(f"layer_norm_eps must be > 0, got {self.layer_norm_eps!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": self.model_type, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ReferenceConfig":
        data = dict(data)
        model_type = data.pop("model_type", cls.model_type)
        if model_type != cls.model_type:
            raise ValueError(f"model_type is {model_type!r}, expected {cls.model_type!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown ReferenceConfig field(s): {', '.join(unknown)}; "
                f"known fields are {', '.join(sorted(known))}"
            )
        return cls(**data)


@dataclass
class ReferenceOutput:
    """``loss`` is a scalar or None; ``logits`` is (B, T, V); ``past_key_values`` is
    a tuple over layers of (key, value), each (B, H, P + T, D), or None."""

    loss: Optional[Tensor]
    logits: Tensor
    past_key_values: Optional[PastKeyValues] = None


class SelfAttention(nn.Module):
    """Multi-head scaled dot-product attention with explicit masking.

    out = o(softmax(q kᵀ / sqrt(D) masked) v), with keys and values ordered
    [past, current]. The four projections are plain ``nn.Linear`` named
    ``q``, ``k``, ``v``, ``o`` so that adapters can target them by name.
    """

    def __init__(self, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.q = nn.Linear(hidden_size, hidden_size)
        self.k = nn.Linear(hidden_size, hidden_size)
        self.v = nn.Linear(hidden_size, hidden_size)
        self.o = nn.Linear(hidden_size, hidden_size)

    def _split_heads(self, x: Tensor) -> Tensor:
        batch, seq, _ = x.shape
        return x.view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        hidden: Tensor,
        allowed: Tensor,
        past_key_value: Optional[KeyValue] = None,
    ) -> Tuple[Tensor, KeyValue]:
        """hidden (B, T, C); allowed (B, 1, T, P + T) bool, True where a query may
        look. Returns the output (B, T, C) and this layer's cache (B, H, P + T, D)."""
        query = self._split_heads(self.q(hidden))
        key = self._split_heads(self.k(hidden))
        value = self._split_heads(self.v(hidden))
        if past_key_value is not None:
            # torch.cat builds new tensors: the caller's cache stays untouched.
            key = torch.cat([past_key_value[0], key], dim=2)
            value = torch.cat([past_key_value[1], value], dim=2)
        present = (key, value)

        scores = query @ key.transpose(-1, -2) / math.sqrt(self.head_dim)
        # A finite fill instead of -inf: a query that may see nothing (a pad query)
        # gets a uniform softmax, not NaN, and real rows still give masked keys
        # exactly zero weight because exp(min - max) underflows to 0.
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        context = scores.softmax(dim=-1) @ value
        batch, _, seq, _ = context.shape
        context = context.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim)
        return self.o(context), present


class FeedForward(nn.Module):
    """down(GELU(up(x))): C -> intermediate_size -> C."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.up = nn.Linear(hidden_size, intermediate_size)
        self.act = nn.GELU()
        self.down = nn.Linear(intermediate_size, hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(self.act(self.up(x)))


class DecoderBlock(nn.Module):
    """Pre-LayerNorm block: h = x + attn(ln_attn(x)); out = h + mlp(ln_mlp(h))."""

    def __init__(self, config: ReferenceConfig) -> None:
        super().__init__()
        self.ln_attn = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = SelfAttention(config.hidden_size, config.num_heads)
        self.ln_mlp = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = FeedForward(config.hidden_size, config.intermediate_size)

    def forward(
        self,
        hidden: Tensor,
        allowed: Tensor,
        past_key_value: Optional[KeyValue] = None,
    ) -> Tuple[Tensor, KeyValue]:
        attn_out, present = self.attn(self.ln_attn(hidden), allowed, past_key_value)
        hidden = hidden + attn_out
        hidden = hidden + self.mlp(self.ln_mlp(hidden))
        return hidden, present


class ReferenceDecoder(nn.Module):
    """GPT-style causal language model: embeddings -> blocks -> LayerNorm -> lm_head.

    ``lm_head.weight`` is the same Parameter as ``embed_tokens.weight`` when
    ``config.tie_word_embeddings``.

    With ``gradient_checkpointing`` set (``peftkit.enable_gradient_checkpointing`` sets
    it), a training forward with grad enabled keeps only each block's inputs and recomputes
    the block in backward; see ``peftkit.checkpointing``.
    """

    peft_default_targets: ClassVar[Tuple[str, ...]] = ("q", "v")
    peft_attention_targets: ClassVar[Tuple[str, ...]] = ("q", "k", "v", "o")
    # Bottleneck adapter sites (patterns as in ``peftkit.sites.ADAPTER_SITES``).
    peft_adapter_sites: ClassVar[dict[str, str]] = {"attention_output": r"attn\.o", "ffn_output": "mlp", "ffn": "mlp"}

    def __init__(self, config: ReferenceConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_positions = nn.Embedding(config.max_positions, config.hidden_size)
        self.layers = nn.ModuleList(DecoderBlock(config) for _ in range(config.num_layers))
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.gradient_checkpointing = False
        self.apply(self._init_weights)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # GPT-2's scheme: small normal weights keep the initial logits near uniform.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def forward(
        self,
        input_ids: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
        position_ids: Optional[Tensor] = None,
        inputs_embeds: Optional[Tensor] = None,
        past_key_values: Optional[Sequence[KeyValue]] = None,
        use_cache: bool = False,
    ) -> ReferenceOutput:
        """Run the decoder on T new tokens.

        Args:
            input_ids: (B, T) token ids; give this or ``inputs_embeds``, not both.
            attention_mask: (B, P + T), 1 for real tokens and 0 for padding, covering
                the cached tokens too. None means every token is real.
            labels: (B, T) targets aligned with the inputs; the logits at t are scored
                against labels[t + 1], -100 is ignored, and the loss is the mean over
                the scored tokens.
            position_ids: (B, T). By default each row counts only its real tokens
                (mask cumsum - 1, clamped at 0), so a padded row sits exactly where it
                would alone; without a mask, positions are P + arange(T). Packed rows
                (``peftkit.packing``): with no mask and no cache, a position that does not
                follow the one before it (t != t-1 + 1) starts a new segment, and each
                token attends causally within its own segment only, as transformers'
                variable-length path does.
            inputs_embeds: (B, T, C) token embeddings in place of ``input_ids``.
            past_key_values: one (key, value) per layer, each (B, H, P, D): the cache
                returned by an earlier call with ``use_cache``, or any keys and values
                to attend to first (prefix tuning hands its prefix in this way, with the
                mask and positions extended, as it does to a transformers model).
            use_cache: return the updated cache in ``past_key_values``.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        batch, seq, _ = inputs_embeds.shape
        device = inputs_embeds.device

        past_length = self._check_past(past_key_values, batch)
        if attention_mask is not None and tuple(attention_mask.shape) != (batch, past_length + seq):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, expected "
                f"(batch, past + current tokens) = ({batch}, {past_length + seq})"
            )

        if position_ids is None:
            if attention_mask is not None:
                position_ids = masks.position_ids(attention_mask, seq)
            else:
                position_ids = torch.arange(past_length, past_length + seq, device=device)
                position_ids = position_ids.unsqueeze(0).expand(batch, seq)
        if seq and int(position_ids.max()) >= self.config.max_positions:
            raise ValueError(
                f"position {int(position_ids.max())} is beyond max_positions "
                f"({self.config.max_positions})"
            )

        hidden = inputs_embeds + self.embed_positions(position_ids)
        allowed = self._allowed_keys(attention_mask, batch, seq, past_length, device)
        if attention_mask is None and past_length == 0:
            allowed = self._within_segments(allowed, position_ids)
        presents = []
        # Only a training forward that will be differentiated gains from recomputing.
        checkpointed = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for index, layer in enumerate(self.layers):
            past = past_key_values[index] if past_key_values is not None else None
            if checkpointed:
                # Non-reentrant: gradients reach the adapters inside the block even when
                # ``hidden`` needs none (frozen embeddings), and a prefix handed in as
                # ``past`` gets its gradient as well.
                hidden, present = torch.utils.checkpoint.checkpoint(
                    layer, hidden, allowed, past, use_reentrant=False)
            else:
                hidden, present = layer(hidden, allowed, past)
            presents.append(present)
        logits = self.lm_head(self.norm(hidden))

        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                labels[:, 1:].reshape(-1).to(device),
                ignore_index=-100,
            )
        return ReferenceOutput(loss=loss, logits=logits,
                               past_key_values=tuple(presents) if use_cache else None)

    def _check_past(self, past_key_values: Optional[Sequence[KeyValue]], batch: int) -> int:
        """Validate the cache and return its length P."""
        if past_key_values is None:
            return 0
        if len(past_key_values) != self.config.num_layers:
            raise ValueError(
                f"past_key_values has {len(past_key_values)} layers, the model has "
                f"{self.config.num_layers}"
            )
        key = past_key_values[0][0]
        expected = (batch, self.config.num_heads, key.shape[2], self.config.head_dim)
        if tuple(key.shape) != expected:
            raise ValueError(f"past key has shape {tuple(key.shape)}, expected {expected}")
        return key.shape[2]

    @staticmethod
    def _allowed_keys(
        attention_mask: Optional[Tensor],
        batch: int,
        seq: int,
        past_length: int,
        device: torch.device,
    ) -> Tensor:
        """(B, 1, T, P + T) bool: past and current keys are visible when not in the
        future of the query and not padding."""
        total = past_length + seq
        query_index = torch.arange(past_length, total, device=device)
        causal = torch.arange(total, device=device)[None, :] <= query_index[:, None]
        allowed = causal[None, None].expand(batch, 1, seq, total)
        if attention_mask is not None:
            allowed = allowed & attention_mask.bool()[:, None, None, :]
        return allowed

    @staticmethod
    def _within_segments(allowed: Tensor, position_ids: Tensor) -> Tensor:
        """``allowed`` (B, 1, T, T) restricted to each query's segment of packed rows, where
        a segment starts wherever a position does not follow the one before it; unchanged
        when no row restarts."""
        starts = torch.diff(torch.atleast_2d(position_ids), dim=-1) != 1
        if not bool(starts.any()):
            return allowed
        segment = F.pad(starts.long().cumsum(-1), (1, 0))  # (B, T): 0 up to the first restart, then 1, ...
        return allowed & (segment[:, None, :, None] == segment[:, None, None, :])

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        attention_mask: Optional[Tensor] = None,
        max_new_tokens: int = 20,
        do_sample: bool = False,
        temperature: float = 1.0,
        eos_token_id: Optional[int] = None,
        pad_token_id: Optional[int] = None,
    ) -> Tensor:
        """Extend each row of ``input_ids`` (B, T) by up to ``max_new_tokens`` tokens.

        Greedy by default; with ``do_sample`` draws from softmax(logits / temperature).
        Batches must be left-padded (the last column of ``attention_mask`` all ones),
        because the next token is read from the last position. Once a row emits
        ``eos_token_id`` it is filled with ``pad_token_id`` (default: the eos id), and
        generation stops early when every row has finished. Returns the prompt plus the
        new tokens, (B, T + new), as a LongTensor.
        """
        return generation.decode(self, input_ids, attention_mask, max_new_tokens=max_new_tokens,
                                 do_sample=do_sample, temperature=temperature,
                                 eos_ids=() if eos_token_id is None else (eos_token_id,),
                                 pad_token_id=pad_token_id)

    def _stored_state(self) -> dict[str, Tensor]:
        """The state dict as saved: a tied ``lm_head.weight`` is stored once, as the embedding."""
        return {name: tensor for name, tensor in self.state_dict().items()
                if not (self.config.tie_word_embeddings and name == "lm_head.weight")}

    def save_pretrained(self, directory: Union[str, os.PathLike]) -> None:
        """Write ``config.json`` and ``model.safetensors`` into ``directory``, committed
        together (a crash at any point leaves the old pair or the new one)."""
        tensors = {name: tensor.detach().contiguous() for name, tensor in self._stored_state().items()}
        folder.write(directory, self.config.to_dict(), tensors)

    @classmethod
    def from_pretrained(cls, directory: Union[str, os.PathLike]) -> "ReferenceDecoder":
        """Load a model written by :meth:`save_pretrained`, in the dtype it was saved in."""
        config_data, tensors = folder.read(directory)
        model = cls(ReferenceConfig.from_dict(config_data))
        folder.check_matches(tensors, model._stored_state(), directory)
        model.to(tensors["embed_tokens.weight"].dtype)
        # strict=False only because a tied lm_head.weight is absent by design;
        # every other key was checked above.
        model.load_state_dict(tensors, strict=False)
        return model
