"""Training batches: causal LMs' contiguous token blocks, encoders' padded sentences, and records (chat messages,
prompt/completion, instruction/output, text) tokenized with the chat template and labelled for loss on the
responses only; a seeded, resumable stream of global micro-batches split across data-parallel ranks."""

from __future__ import annotations

import logging
import random

import torch

from ..errors import UserError
from ..model.discover import is_causal_lm
from ..model.tokenizer import bos_id

log = logging.getLogger("lqplan")
IGNORE_INDEX = -100  # the label the loss skips (torch's cross_entropy and transformers' default)
RECORD_SHAPES = "messages (chat), prompt + completion, instruction (+ input) + output, or text"
# The chat template of a tokenizer without one: "### Role:" headers, messages apart by a blank line. Each assistant
# turn ends with EOS (where the tokenizer has one) so the model learns to stop; the separator comes before a message,
# never after, so a response's span is its text and EOS only, and the generation prompt ends on a newline.
FALLBACK_CHAT_TEMPLATE = (
    "{%- for m in messages -%}"
    "{{ ('\\n\\n' if not loop.first else '') + '### ' + (m['role'] | capitalize) + ':\\n' + m['content'] }}"
    "{%- if m['role'] == 'assistant' and eos_token %}{{ eos_token }}{% endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}{{ '\\n\\n### Assistant:\\n' }}{% endif -%}")


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


def is_records(texts) -> bool:
    """Training data given as records (dicts, e.g. read by planner.hf.data.load_records) rather than plain texts."""
    return any(isinstance(t, dict) for t in texts)


def check_records_objective(texts, causal: bool) -> None:
    """Records train a causal LM on its responses; an encoder's distillation has no responses to learn."""
    if not causal and is_records(texts):
        raise UserError("training records (--data) need a causal LM, the loss is on their responses; for an encoder "
                        "pass plain text (--text)")


def record_messages(record: dict, where: str) -> list[dict] | None:
    """The conversation a record holds, or None for a plain `text` record. Fields left None count as absent
    (datasets gives every record of a file every field any record has)."""
    if record.get("messages") is not None:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise UserError(f"{where}: 'messages' must be a non-empty list of {{\"role\", \"content\"}} objects")
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        for m in messages:
            if not (isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise UserError(f"{where}: every message needs a string 'role' and 'content' (one has {sorted(m)})")
        if messages[0]["role"] == "assistant":  # a response needs a prompt to follow (and templates one to render)
            raise UserError(f"{where}: the conversation starts with an assistant message; put the user's (or a "
                            "system) message first")
        if not any(m["role"] == "assistant" for m in messages):
            raise UserError(f"{where}: the conversation has no assistant message, so nothing to learn; add the "
                            "response or drop the record")
        return messages
    prompt, completion = record.get("prompt"), record.get("completion")
    if isinstance(prompt, str) and isinstance(completion, str):
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    instruction, extra, output = record.get("instruction"), record.get("input"), record.get("output")
    if isinstance(instruction, str) and isinstance(output, str):
        user = instruction + (f"\n\n{extra}" if isinstance(extra, str) and extra.strip() else "")
        return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    if isinstance(record.get("text"), str):
        return None
    fields = sorted(k for k, v in record.items() if v is not None)
    raise UserError(f"{where} has none of the record shapes {RECORD_SHAPES} (its fields: {fields}); rename its "
                    "fields to one of them")


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _render(tokenizer, messages: list[dict], generation: bool, where: str) -> str:
    from jinja2 import TemplateError

    template = None if getattr(tokenizer, "chat_template", None) else FALLBACK_CHAT_TEMPLATE
    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=generation)
    except (TemplateError, ValueError, TypeError) as e:  # e.g. a template whose roles must alternate
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{where}: the chat template refused the conversation ({reason}); fix the record's roles "
                        "or their order") from None


def _shared(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def chat_tokens(tokenizer, messages: list[dict], where: str) -> tuple[list[int], list[int]]:
    """(ids, labels) of a conversation: its chat-template rendering tokenized once; labels are the ids on each
    assistant turn as the template renders it (its text and end-of-turn marker), -100 elsewhere. A turn's span
    is found by rendering prefix by prefix: the conversation before it with the generation prompt ends where it
    starts, the conversation through it ends where it stops; each boundary is the length of its prefix's own
    tokenization (a token that straddles one counts to the part after it)."""
    full = _render(tokenizer, messages, False, where)
    ids = _ids(tokenizer, full)
    labels = [IGNORE_INDEX] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start, end = _render(tokenizer, messages[:i], True, where), _render(tokenizer, messages[:i + 1], False, where)
        if not (full.startswith(start) and full.startswith(end) and len(start) <= len(end)):
            raise UserError(f"{where}: the chat template renders message {i} differently once later messages "
                            "follow, so its response tokens cannot be found; give each assistant turn its own record")
        a, b = _shared(_ids(tokenizer, start), ids), _shared(_ids(tokenizer, end), ids)
        labels[a:b] = ids[a:b]
    return ids, labels


def record_tokens(tokenizer, record, where: str = "record") -> tuple[list[int], list[int]]:
    """(ids, labels) of one record, without BOS (sft_examples puts it first, once, where the tokenizer has one):
    chat / instruction records through the chat template with labels on the responses only (chat_tokens), a
    `text` record (or a plain string) all labelled and ended by EOS (or SEP), as causal_blocks joins texts."""
    if isinstance(record, str):
        record = {"text": record}
    if not isinstance(record, dict):
        raise UserError(f"{where} is a {type(record).__name__}; each record must be a JSON object ({RECORD_SHAPES})")
    messages = record_messages(record, where)
    if messages is not None:
        ids, labels = chat_tokens(tokenizer, messages, where)
    else:
        sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        ids = _ids(tokenizer, record["text"]) + ([sep] if sep is not None and record["text"].strip() else [])
        labels = list(ids)
    bos = bos_id(tokenizer)
    if bos is not None and ids[:1] == [bos]:  # templates that write BOS themselves (Gemma, Llama 3)
        ids, labels = ids[1:], labels[1:]
    return ids, labels


def sft_examples(tokenizer, records, max_len: int, pack: bool = False,
                 source: str = "the training records") -> list[dict]:
    """Training examples {"input_ids", "labels"} of records (dicts of one of the RECORD_SHAPES; strings count as
    text records), each of at most max_len tokens: BOS first where the tokenizer has one, then the record's first
    tokens; pack=True joins all records' tokens and cuts them into such blocks instead (the last may be shorter).
    Examples left without a labelled token to predict are dropped (logged); none left is a UserError."""
    records = list(records)
    if not records:
        raise UserError(f"{source} has no records; give it at least one ({RECORD_SHAPES})")
    pieces = [record_tokens(tokenizer, r, f"record {i} of {source}") for i, r in enumerate(records)]
    bos = bos_id(tokenizer)
    head, width = ([], max_len) if bos is None else ([bos], max_len - 1)
    if pack:
        ids = [t for p in pieces for t in p[0]]
        labels = [t for p in pieces for t in p[1]]
        pieces = [(ids[i:i + width], labels[i:i + width]) for i in range(0, len(ids), width)]
    examples = [{"input_ids": head + ids[:width], "labels": [IGNORE_INDEX] * len(head) + labels[:width]}
                for ids, labels in pieces]
    # labels[0] is never a target: position 0 predicts position 1
    kept = [e for e in examples if any(t != IGNORE_INDEX for t in e["labels"][1:])]
    if not kept:
        raise UserError(f"no example of {source} has a response token within max_len={max_len}; raise --max-len "
                        "or shorten the prompts")
    if len(kept) < len(examples):
        log.warning("%d of %d examples of %s have no response token within max_len=%d and are left out",
                    len(examples) - len(kept), len(examples), source, max_len)
    return kept


def padding_id(tokenizer) -> int:
    """The id padding is filled with (its label is -100 and its attention 0, so any id would do)."""
    return next(t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if t is not None)


def pad_examples(examples, pad_id: int) -> dict[str, torch.Tensor]:
    """A batch of examples right-padded to the longest: input_ids, attention_mask (0 on padding) and labels (-100
    on padding; an example without labels is labelled with its ids). The collator of planner.hf.data."""
    width = max(len(e["input_ids"]) for e in examples)

    def pad(seq, value):
        seq = list(seq)
        return seq + [value] * (width - len(seq))

    return {"input_ids": torch.tensor([pad(e["input_ids"], pad_id) for e in examples], dtype=torch.long),
            "attention_mask": torch.tensor([pad([1] * len(e["input_ids"]), 0) for e in examples], dtype=torch.long),
            "labels": torch.tensor([pad(e.get("labels", e["input_ids"]), IGNORE_INDEX) for e in examples],
                                   dtype=torch.long)}


class Batches:
    """Endless, seeded stream of global micro-batches (a reshuffle after each pass over the data); rank r of a
    world of w keeps rows [r·batch_size, (r+1)·batch_size) of each. Its position is part of a checkpoint.
    Causal LMs train on token blocks of plain texts, or on sft_examples of records (pack: see there)."""

    def __init__(self, objective, tokenizer, texts, batch_size, max_len, seed, rank=0, world=1, pack=False):
        self.objective, self.tokenizer, self.batch_size, self.max_len = objective, tokenizer, batch_size, max_len
        self.rank, self.world = rank, world
        self.rng = random.Random(seed)
        self.records = objective == "causal" and is_records(texts)
        if self.records:
            self.items, self.pad = sft_examples(tokenizer, texts, max_len, pack), padding_id(tokenizer)
        else:
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
        """(this rank's batch, non-padding tokens of the global micro-batch (records: labelled targets), its rows)."""
        idx = self._indices(self.batch_size * self.world)
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        if self.records:
            # Padded to the global micro-batch's longest; the count is its labelled targets (the loss's normaliser).
            enc = pad_examples([self.items[i] for i in idx], self.pad)
            targets = int((enc["labels"][:, 1:] != IGNORE_INDEX).sum())
            return {k: v[mine].to(device) for k, v in enc.items()}, targets, len(idx)
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
