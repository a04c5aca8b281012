"""Helpers shared by the prompt- and prefix-tuning tests: padded batches, the padded-batch
exactness check (M11), and a generation loop that recomputes the whole sequence."""

from __future__ import annotations

import torch

PAD = 0
ROW_LENGTHS = (7, 4, 5)


def rows(seed: int = 0, lengths=ROW_LENGTHS, vocab: int = 128) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=generator) for n in lengths]


def pad(rows_: list[torch.Tensor], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask), each (B, max length), padded on ``side`` with PAD."""
    width = max(len(r) for r in rows_)
    ids = torch.full((len(rows_), width), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows_):
        span = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, span], mask[i, span] = r, 1
    return ids, mask


def hidden(output) -> torch.Tensor:
    """Logits of a task model, hidden states of a bare encoder."""
    return output.logits if hasattr(output, "logits") else output.last_hidden_state


@torch.no_grad()
def real_token_outputs(model, ids: torch.Tensor, mask: torch.Tensor, side: str, offset: int) -> list[torch.Tensor]:
    """Per row, the outputs on its real tokens; ``offset`` virtual positions lead the outputs."""
    out = hidden(model(input_ids=ids, attention_mask=mask))
    width = ids.shape[1]
    picked = []
    for i, n in enumerate(mask.sum(1).tolist()):
        start = offset + (width - n if side == "left" else 0)
        picked.append(out[i, start:start + n])
    return picked


def assert_padded_batch_exact(model, offset: int, rows_=None, atol: float = 1e-5) -> float:
    """Each row alone gives the same outputs on its real tokens as inside a left-padded and a
    right-padded batch. Returns the largest difference seen."""
    rows_ = rows() if rows_ is None else rows_
    alone = [real_token_outputs(model, r[None], torch.ones(1, len(r), dtype=torch.long), "right", offset)[0]
             for r in rows_]
    worst = 0.0
    for side in ("left", "right"):
        ids, mask = pad(rows_, side)
        for i, got in enumerate(real_token_outputs(model, ids, mask, side, offset)):
            torch.testing.assert_close(got, alone[i], rtol=0, atol=atol,
                                       msg=lambda m: f"row {i}, {side} padding: {m}")
            worst = max(worst, (got - alone[i]).abs().max().item())
    return worst


@torch.no_grad()
def greedy_by_recomputing(model, ids: torch.Tensor, mask: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding without any cache: every step runs the whole sequence again."""
    for _ in range(steps):
        next_ids = hidden(model(input_ids=ids, attention_mask=mask))[:, -1].argmax(-1)
        ids = torch.cat([ids, next_ids[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids
