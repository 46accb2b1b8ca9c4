"""Evaluation on real text: perplexity for causal LMs, embedding cosine to the full-precision model for encoders.

Text: `real_text_splits()` — the Python language reference topics shipped with CPython (pydoc_data.topics), split
by sorted topic name exactly as planner.corpus.pydoc_splits does (every 5th topic held out, the next calibration,
the rest train), so held-out text is never seen by calibration or fine-tuning.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from ..corpus import real_text_splits
from ..devices import resolve_device
from ..dist import all_sum, joined_shard
from ..errors import UserError
from ..model.discover import is_causal_lm
from ..fsio import user_path
from ..model.hfload import auto_config, check_tokenizer_fits, check_window, pretrained
from ..model.resolve import resolve_model
from ..model.tokenizer import bos_id, load_tokenizer, tokenizer_digest
from ..plan.train_memory import EVAL_WINDOWS
from .export import load_quantized
from .losses import mean_pool


def model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return next(model.buffers()).device


def _check_texts(texts) -> list[str]:
    if isinstance(texts, str):
        texts = [texts]
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise UserError("no evaluation text was given; pass a non-empty list of strings")
    return texts


@dataclass(frozen=True)
class EvalWindows:
    """A token stream cut into causal-LM evaluation windows: windows of `max_len` tokens every `stride` tokens,
    each scoring only the tokens not scored before (all context kept). Where the tokenizer has a BOS token
    (`bos`), every window starts with it (context, not scored) and holds max_len - 1 text tokens, so the first text
    token is scored too, as the model sees text in training. spans: (start, end, new) per window: text tokens
    ids[start:end], of which the last `new` are scored."""
    ids: torch.Tensor
    spans: tuple[tuple[int, int, int], ...]
    bos: int | None
    max_len: int
    stride: int

    @property
    def prefix(self) -> int:
        return 0 if self.bos is None else 1

    @property
    def scored(self) -> int:
        """Tokens scored over all windows (without BOS the first token has no context and is not scored)."""
        return sum(new for _, _, new in self.spans) - (1 - self.prefix if self.spans and self.spans[0][0] == 0 else 0)

    def digest(self) -> str:
        """sha256 (16 hex digits) of the token ids (int64, little-endian), BOS, max_len and stride: equal digests,
        equal windows."""
        h = hashlib.sha256(self.ids.to(torch.int64).numpy().astype("<i8").tobytes())
        h.update(f"|bos={self.bos}|L={self.max_len}|S={self.stride}".encode())
        return h.hexdigest()[:16]

    def shard(self, rank: int, world: int) -> "EvalWindows":
        """Every world-th window from `rank` (data-parallel evaluation)."""
        return replace(self, spans=self.spans[rank::world])

    def batches(self, batch_size: int):
        """(input_ids, attention_mask, labels) per `batch_size` windows, right-padded; labels are -100 except at
        the scored tokens (labels[:, t] is the token at position t; next_token_targets() shifts them)."""
        for i in range(0, len(self.spans), batch_size):
            group = self.spans[i:i + batch_size]
            cols = self.prefix + max(e - s for s, e, _ in group)
            batch = torch.zeros(len(group), cols, dtype=torch.long)
            labels = torch.full((len(group), cols), -100, dtype=torch.long)
            mask = torch.zeros(len(group), cols, dtype=torch.long)
            for row, (s, e, new) in enumerate(group):
                n = self.prefix + e - s
                if self.prefix:
                    batch[row, 0] = self.bos
                batch[row, self.prefix:n] = self.ids[s:e]
                mask[row, :n] = 1
                labels[row, n - new:n] = self.ids[e - new:e]
            yield batch, mask, labels


def next_token_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions, targets): the bool mask of the (batch, seq) positions whose logits predict a scored token, and
    those tokens in the same (row-major) order, so logits[positions] scores against targets."""
    following = labels[:, 1:]
    positions = torch.zeros_like(labels, dtype=torch.bool)
    positions[:, :-1] = following != -100
    return positions, following[following != -100]


def eval_windows(tokenizer, texts, max_len: int, stride: int, max_tokens: int | None = None) -> EvalWindows:
    """`texts` joined by blank lines, tokenized without special tokens (the first `max_tokens` tokens where
    given) and cut into EvalWindows."""
    texts = _check_texts(texts)
    if not 0 < stride <= max_len:
        raise UserError(f"stride={stride} must be in 1..max_len ({max_len}); e.g. stride = max_len // 2")
    bos = bos_id(tokenizer)
    prefix = 0 if bos is None else 1
    width = max_len - prefix  # text tokens per window
    stride = min(stride, width)  # a stride past the window would leave tokens unscored
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if ids.numel() < 2 - prefix or width < 1:
        raise UserError("evaluation text has fewer than 2 tokens; pass more text")
    spans = []
    prev_end = 0
    for start in range(0, ids.numel() - 1 + prefix, stride):
        end = min(start + width, ids.numel())
        spans.append((start, end, end - prev_end))
        prev_end = end
        if end == ids.numel():
            break
    return EvalWindows(ids, tuple(spans), bos, max_len, stride)


@torch.no_grad()
def perplexity(model, tokenizer, texts, max_len: int = 512, stride: int = 256, batch_size: int = EVAL_WINDOWS,
               device=None, shard: bool = False) -> float:
    """exp(mean next-token NLL) over `texts` joined by blank lines, scored in the sliding BOS-first windows of
    eval_windows (EvalWindows says how).

    shard=True inside a joined process group (DDP): each rank scores every world-th window and the sums are
    all-reduced, so every rank returns the whole text's perplexity for 1/world of the work. Every rank must call."""
    windows = eval_windows(tokenizer, texts, max_len, stride)
    device = device or model_device(model)
    rank, world = joined_shard() if shard else (0, 1)
    windows = windows.shard(rank, world)
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    try:
        for batch, mask, labels in windows.batches(batch_size):
            logits = model(input_ids=batch.to(device), attention_mask=mask.to(device)).logits
            for row in range(labels.shape[0]):
                # One window's scored positions at a time, as a view (they are one contiguous run): the fp32 copy
                # and log-softmax are that slice's, never the whole batch's logits (the largest tensors of an
                # evaluation; planner.plan.train_memory counts them).
                positions, targets = next_token_targets(labels[row:row + 1])
                scored = positions[0].nonzero().flatten()
                if scored.numel():
                    a, b = int(scored[0]), int(scored[-1]) + 1
                    nll += float(F.cross_entropy(logits[row, a:b].float(), targets.to(device), reduction="sum"))
                    count += targets.numel()
            del logits  # not alive while the next batch's logits are computed
    finally:
        model.train(was_training)
    if world > 1:
        nll, count = all_sum([nll, count], device)
    return math.exp(nll / count)


@torch.no_grad()
def sentence_embeddings(model, tokenizer, texts, max_len: int = 128, batch_size: int = 32, device=None) -> torch.Tensor:
    """Mean-pooled last hidden states (fp32), one row per text."""
    texts = _check_texts(texts)
    device = device or model_device(model)
    was_training = model.training
    model.eval()
    out = []
    try:
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=max_len,
                            return_tensors="pt").to(device)
            hidden = model(**enc).last_hidden_state.float()
            out.append(mean_pool(hidden, enc["attention_mask"]).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


def embedding_cosine(student, teacher, tokenizer, texts, max_len: int = 128, batch_size: int = 32,
                     shard: bool = False) -> float:
    """Mean cosine similarity between the student's and the teacher's mean-pooled sentence embeddings.
    shard=True: as perplexity's (each rank embeds every world-th text; every rank must call)."""
    texts = _check_texts(texts)
    rank, world = joined_shard() if shard else (0, 1)
    mine = texts[rank::world]
    total = 0.0
    if mine:  # a rank can be left without text when there are fewer texts than ranks
        s = sentence_embeddings(student, tokenizer, mine, max_len, batch_size)
        t = sentence_embeddings(teacher, tokenizer, mine, max_len, batch_size)
        total = float(F.cosine_similarity(s, t, dim=-1).double().sum())
    if world > 1:
        (total,) = all_sum([total], model_device(student))
    return total / len(texts)


def evaluate_quantized(folder, model=None, *, eval_texts: int = 64, max_len: int = 128, device=None,
                       tokenizer=None, texts=None) -> dict:
    """Evaluate a quantized model saved by save_quantized against its full-precision model (`model`, default: the
    plan's model.source; `tokenizer`, default: that folder's) on the held-out split (or `texts`): perplexity of both (causal
    LMs) or the embedding cosine of the quantized model to the full-precision one (encoders).
    Returns {metric, quantized, full_precision, texts}."""
    from transformers import AutoModel, AutoModelForCausalLM

    if eval_texts < 1 or max_len < 2:
        raise UserError(f"eval_texts={eval_texts} and max_len={max_len} must be >= 1 and >= 2")
    dev = resolve_device(device)
    quantized, plan = load_quantized(folder, device=dev)
    source = model or plan.model.get("source")
    if not source or not (user_path(source, "--model") / "config.json").is_file():
        raise UserError(f"the full-precision model folder {source!r} was not found; pass --model <the Hugging Face "
                        "folder the plan was made for>")

    # the full-precision folder is checked as `plan` checks it (config, headers, special files), and must be
    # the model the plan was made for: another would give meaningless numbers, not an error
    fp_source = resolve_model(user_path(source, "--model"))
    plan.check_model(fp_source.fingerprint)
    config = auto_config(fp_source.folder)
    check_window(max_len, config)
    if tokenizer is None:
        tokenizer = load_tokenizer(source)
    check_tokenizer_fits(tokenizer, config, source)
    digest = tokenizer_digest(tokenizer)
    # `texts` (--eval-text): the caller's paragraphs, all of them; else the first eval_texts built-in held-out ones
    held = _check_texts(texts) if texts is not None else real_text_splits()["heldout"][:eval_texts]

    causal = is_causal_lm(quantized.config)
    loader = AutoModelForCausalLM if causal else AutoModel
    fp = pretrained(loader, fp_source.folder, dtype=torch.float32).to(dev).eval()
    if causal:
        ppl = dict(max_len=max_len, stride=max(1, max_len // 2))
        return {"metric": "perplexity", "quantized": perplexity(quantized, tokenizer, held, **ppl),
                "full_precision": perplexity(fp, tokenizer, held, **ppl), "texts": len(held), "tokenizer": digest}
    return {"metric": "embedding_cosine", "quantized": embedding_cosine(quantized, fp, tokenizer, held, max_len),
            "full_precision": 1.0, "texts": len(held), "tokenizer": digest}
