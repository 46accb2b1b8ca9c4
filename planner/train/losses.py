"""Training losses: next-token cross-entropy for causal LMs (over every token, or over the labelled ones: responses
only); for encoders, distillation of the full-precision teacher (token-state MSE + (1 - cosine) of mean-pooled
embeddings)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .data import IGNORE_INDEX


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of token states over non-padding tokens (sentence-transformers' pooling for all-MiniLM-L6-v2)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp_min(1e-9)


def distill_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, attention_mask: torch.Tensor,
                 tokens: float | None = None, rows: float | None = None) -> torch.Tensor:
    """MSE of token states over non-padding tokens + (1 − cos) of mean-pooled embeddings, averaged over the batch.

    `tokens` / `rows` are the normalisers (default: this batch's non-padding tokens and rows). A data-parallel
    rank holding a slice of a larger batch passes that batch's counts divided by the world size, so that DDP's
    average of the ranks' gradients equals the gradient of the whole batch's loss."""
    s, t = student_hidden.float(), teacher_hidden.float()
    mask = attention_mask.unsqueeze(-1).to(s.dtype)
    tokens = mask.sum() if tokens is None else torch.as_tensor(tokens, dtype=s.dtype, device=s.device)
    rows = s.shape[0] if rows is None else rows
    mse = ((s - t) ** 2 * mask).sum() / (tokens * s.shape[-1]).clamp_min(1)
    cos = F.cosine_similarity(mean_pool(s, attention_mask), mean_pool(t, attention_mask), dim=-1)
    return mse + (1 - cos).sum() / rows


def distill_step_loss(student, teacher, batch: dict, tokens: float | None = None,
                      rows: float | None = None) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.no_grad():
        target = teacher(**inputs).last_hidden_state
    return distill_loss(student(**inputs).last_hidden_state, target, inputs["attention_mask"], tokens, rows)


def causal_step_loss(model, batch: dict) -> torch.Tensor:
    # use_cache=False: training never reads a generation cache, and under gradient checkpointing transformers would
    # warn before turning it off itself
    out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=batch["input_ids"],
                use_cache=False)
    return out.loss


def masked_causal_loss(model, batch: dict, tokens: float) -> torch.Tensor:
    """Next-token cross-entropy summed over the labelled targets (labels != -100; labels[:, t] is predicted at
    t - 1, as transformers' own loss shifts) and divided by `tokens`. A data-parallel rank passes the global
    micro-batch's labelled targets over the world size: every target then weighs the same whichever rank holds
    it, and DDP's mean of the gradients is the whole batch's."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    # The labels shift, not the logits (as transformers' loss does): no copy of the largest activation but its fp32 one.
    targets = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    return loss / tokens
