"""Setups the doctor's tests share, written the way tutorials and hurried scripts write
them: hand-made LoRA, bottleneck adapters, soft prompts and prefixes with knobs that plant
a mistake, a Hugging Face PEFT LoRA, and helpers to build optimizers and batches and to
pick findings out of a report."""

from __future__ import annotations


import pytest
import torch
from helpers import HandLora, tiny_llama, tiny_reference
from torch import nn

from peftkit.doctor import DoctorReport, Finding

peft = pytest.importorskip("peft")


def hand_lora_model(**knobs) -> nn.Module:
    model = tiny_reference().requires_grad_(False)
    for layer in model.layers:
        layer.attn.q = HandLora(layer.attn.q, 4, 8, **knobs)
        layer.attn.v = HandLora(layer.attn.v, 4, 8, **knobs)
    return model


class HandAdapter(nn.Module):
    """A bottleneck adapter; ``residual=False`` is the mistake: up(relu(down(h))) alone."""

    def __init__(self, hidden: int, bottleneck: int, residual: bool):
        super().__init__()
        self.down, self.up, self.residual = nn.Linear(hidden, bottleneck), nn.Linear(bottleneck, hidden), residual
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h):
        delta = self.up(torch.relu(self.down(h)))
        return h + delta if self.residual else delta


def hand_adapter_model(residual: bool) -> nn.Module:
    model = tiny_reference().requires_grad_(False)
    for layer in model.layers:
        layer.mlp = nn.Sequential(layer.mlp, HandAdapter(64, 8, residual))
    return model


class HandPrompt(nn.Module):
    """Soft prompt around a decoder; ``place="end"`` and ``mask_value=0`` plant M7."""

    def __init__(self, lm: nn.Module, n: int = 4, place: str = "front", mask_value: int = 1):
        super().__init__()
        self.lm = lm.requires_grad_(False)
        self.prompt = nn.Parameter(torch.randn(n, 64) * 0.02)
        self.place, self.mask_value = place, mask_value

    def forward(self, input_ids, attention_mask=None):
        embeds = self.lm.embed_tokens(input_ids)
        batch, n = input_ids.shape[0], self.prompt.shape[0]
        prompt = self.prompt.expand(batch, -1, -1)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        prompt_mask = torch.full((batch, n), self.mask_value, dtype=mask.dtype)
        if self.place == "front":
            embeds, mask = torch.cat([prompt, embeds], 1), torch.cat([prompt_mask, mask], 1)
        else:
            embeds, mask = torch.cat([embeds, prompt], 1), torch.cat([mask, prompt_mask], 1)
        return self.lm(inputs_embeds=embeds, attention_mask=mask)


class HandPrefix(nn.Module):
    """Prefix keys/values handed to the reference decoder as its cache; ``mask_at="end"``
    extends the attention mask at the wrong end (M11)."""

    def __init__(self, lm: nn.Module, n: int = 3, mask_at: str = "front"):
        super().__init__()
        self.lm = lm.requires_grad_(False)
        config = lm.config
        self.prefix = nn.Parameter(torch.randn(config.num_layers, 2, config.num_heads, n, config.head_dim))
        self.mask_at = mask_at

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        batch, n = input_ids.shape[0], self.prefix.shape[3]
        past = tuple((kv[0].expand(batch, -1, -1, -1), kv[1].expand(batch, -1, -1, -1)) for kv in self.prefix)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        ones = torch.ones(batch, n, dtype=mask.dtype)
        mask = torch.cat([ones, mask], 1) if self.mask_at == "front" else torch.cat([mask, ones], 1)
        return self.lm(input_ids=input_ids, attention_mask=mask, past_key_values=past, position_ids=position_ids)


def peft_lora(targets=("q_proj", "v_proj"), r=8, **kwargs):
    config = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), **kwargs)
    return peft.get_peft_model(tiny_llama(), config)


def adamw(model: nn.Module, lr: float = 2e-4) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)


def lm_batch(vocab: int = 128) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def flagged(report: DoctorReport, mistake: str, *severities: str) -> list[Finding]:
    return [f for f in report.findings if f.id == mistake and (not severities or f.severity in severities)]
