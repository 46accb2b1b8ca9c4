"""Training batches: causal LMs' contiguous token blocks, encoders' padded sentences; a seeded,
resumable stream of global micro-batches split across data-parallel ranks."""

from __future__ import annotations

import random

import torch

from ..errors import UserError
from ..model.discover import is_causal_lm


def bos_id(tokenizer) -> int | None:
    """The token a sequence must start with for this model: the tokenizer's BOS (Gemma, Llama), None where it has
    none (BERT / MiniLM; their numbers stay as they were). A decoder trained with BOS first scores text without it
    as out of distribution (Gemma 3 270M: perplexity 75 without, 39 with, on held-out pydoc prose)."""
    return getattr(tokenizer, "bos_token_id", None)


def causal_blocks(tokenizer, texts, max_len: int) -> torch.Tensor:
    """All texts tokenized, joined by the tokenizer's end-of-text (or separator) token, cut into (N, max_len).
    Where the tokenizer has a BOS token every block is BOS + max_len - 1 text tokens: a decoder pretrained with BOS
    first (Gemma, Llama) is then fine-tuned on what it is evaluated on (planner.train.evaluate.perplexity)."""
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    bos = bos_id(tokenizer)
    width = max_len if bos is None else max_len - 1
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if sep is not None:
            ids.append(sep)
    n = len(ids) // width if width > 0 else 0
    if n == 0:
        raise UserError(f"the training text has {len(ids)} tokens, fewer than one block of max_len={max_len}; "
                        "pass more text or a smaller max_len")
    blocks = torch.tensor(ids[: n * width], dtype=torch.long).view(n, width)
    if bos is not None:
        blocks = torch.cat([torch.full((n, 1), bos, dtype=torch.long), blocks], dim=1)
    return blocks


def detect_objective(model) -> str:
    """"causal" for a causal LM (planner.model.discover.is_causal_lm) loaded with its LM head, else "distill"."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    causal = head is not None and is_causal_lm(getattr(model, "config", None) or {})
    return "causal" if causal else "distill"


class Batches:
    """Endless, seeded stream of global micro-batches (a reshuffle after each pass over the data); rank r of a
    world of w keeps rows [r·batch_size, (r+1)·batch_size) of each. Its position is part of a checkpoint."""

    def __init__(self, objective, tokenizer, texts, batch_size, max_len, seed, rank=0, world=1):
        self.objective, self.tokenizer, self.batch_size, self.max_len = objective, tokenizer, batch_size, max_len
        self.rank, self.world = rank, world
        self.rng = random.Random(seed)
        self.items = causal_blocks(tokenizer, texts, max_len) if objective == "causal" else list(texts)
        self.order, self.pos = [], 0

    def _indices(self, count):
        out = []
        while len(out) < count:
            if self.pos >= len(self.order):
                self.order = list(range(len(self.items)))
                self.rng.shuffle(self.order)
                self.pos = 0
            out.append(self.order[self.pos])
            self.pos += 1
        return out

    def next(self, device) -> tuple[dict, int, int]:
        """(this rank's batch, non-padding tokens of the global micro-batch, its rows)."""
        idx = self._indices(self.batch_size * self.world)
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        if self.objective == "causal":
            ids = self.items[idx[mine]]
            return ({"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)},
                    len(idx) * self.max_len, len(idx))
        # Every rank tokenizes the whole global micro-batch: the same padding as a 1-process run, and its counts.
        enc = self.tokenizer([self.items[i] for i in idx], padding=True, truncation=True, max_length=self.max_len,
                             return_tensors="pt")
        tokens = int(enc["attention_mask"].sum())
        return {k: v[mine].to(device) for k, v in enc.items()}, tokens, len(idx)

    def state(self) -> dict:
        version, internal, gauss = self.rng.getstate()
        return {"rng": [version, list(internal), gauss], "order": list(self.order), "pos": self.pos}

    def load_state(self, state: dict) -> None:
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.order, self.pos = list(state["order"]), int(state["pos"])


def text_dataset(tokenizer, texts, max_len: int = 128) -> list[dict]:
    """Tokenized examples for a Trainer (pad them with transformers.DataCollatorWithPadding)."""
    return [dict(tokenizer(t, truncation=True, max_length=max_len)) for t in texts if t and t.strip()]
