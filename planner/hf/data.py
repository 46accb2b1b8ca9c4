"""Training data through Hugging Face datasets: local JSON / JSONL / text files read with datasets.load_dataset,
their records rendered with the tokenizer's chat template and labelled for loss on the responses only, and the
collator a transformers Trainer pads batches with.

Record shapes (one per record; a file may mix them):
  {"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}, ...]}   chat
  {"prompt": ..., "completion": ...}   or   {"instruction": ..., "input": ... (optional), "output": ...}
  {"text": ...}   plain text, every token trained (a .txt file gives one such record per paragraph)
Chat and instruction records go through tokenizer.apply_chat_template (FALLBACK_CHAT_TEMPLATE where the tokenizer
has none); labels are -100 on everything but the assistant turns. The tokenization itself is plain Python over
records (planner.train.data.sft_examples), so it needs no datasets and `lqplan train --data` uses it too."""

from __future__ import annotations

import functools
from pathlib import Path

from ..errors import UserError
from ..fsio import TEXT_CAP, check_regular, read_paragraphs
from ..train.data import (
    FALLBACK_CHAT_TEMPLATE,
    IGNORE_INDEX,
    RECORD_SHAPES,
    pad_examples,
    padding_id,
    record_tokens,
    sft_examples,
)

__all__ = ["FALLBACK_CHAT_TEMPLATE", "IGNORE_INDEX", "RECORD_SHAPES", "collator", "load_records", "pad_examples",
           "record_tokens", "sft_dataset", "sft_examples"]
BUILDERS = {".json": "json", ".jsonl": "json", ".txt": "text", ".text": "text", ".md": "text"}
FIX = "pass a local .json / .jsonl file of records or a .txt file"


def _check_file(path: Path, option: str) -> str:
    """The datasets builder for `path`, after the checks that give a clearer message than the builder would."""
    if not path.exists():
        hub = not path.is_absolute() and len(path.parts) == 2 and not path.suffix  # "org/name": a hub id
        hint = " (datasets on the hub are not downloaded: save one as JSONL first, Dataset.to_json)" if hub else ""
        raise UserError(f"{option} {path} does not exist{hint}; {FIX}")
    if path.is_dir():
        raise UserError(f"{option} {path} is a folder; {FIX}")
    builder = BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise UserError(f"{option} {path} has the unknown file type {path.suffix or '(none)'!r}; {FIX} "
                        f"(one of {', '.join(BUILDERS)})")
    check_regular(path, FIX, option, TEXT_CAP)  # a FIFO never hangs the read, a device never fills the memory
    try:
        with path.open("rb") as f:
            head = f.read(4096)
    except OSError as e:
        raise UserError(f"cannot read {option} {path}: {e.strerror or e}; pass a readable file") from None
    if not head.strip():
        raise UserError(f"{option} {path} is empty; give it at least one record ({RECORD_SHAPES})")
    if b"\0" in head:
        raise UserError(f"{option} {path} looks binary; {FIX} (UTF-8)")
    return builder


def load_records(path, *, option: str = "--data", cache_dir=None, progress: bool = True) -> list[dict]:
    """The records of a local file, read with datasets.load_dataset: .json / .jsonl with the "json" builder (JSON
    Lines, or one JSON array or object), .txt / .md with the "text" builder, one {"text"} record per paragraph
    (split on blank lines, as --text splits). Local paths only, never a hub download; every unusable file is a
    one-line UserError naming `option`. cache_dir: datasets' cache (default: its own, ~/.cache/huggingface)."""
    path = Path(path)
    builder = _check_file(path, option)
    if builder == "text":  # paragraphs exactly as --text reads them (any line-end convention)
        return [{"text": p} for p in read_paragraphs(path, option, FIX)]
    try:
        import datasets
    except ImportError:
        raise UserError(f"{option} reads files with the datasets library; pip install -e \".[hf]\"") from None
    if not progress:
        datasets.disable_progress_bars()
    try:
        table = datasets.load_dataset(builder, data_files=str(path.resolve()), split="train",
                                      cache_dir=None if cache_dir is None else str(cache_dir))
    except Exception as e:  # noqa: BLE001 — datasets wraps the parser's error (pyarrow, UnicodeDecodeError)
        cause = e.__cause__ or e
        reason = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        kind = "JSON / JSON Lines" if builder == "json" else "UTF-8 text"
        raise UserError(f"{option} {path} cannot be read as {kind} ({reason}); fix the file, or {FIX}") from None
    records = table.to_list()
    if not records:
        raise UserError(f"{option} {path} has no records; give it at least one ({RECORD_SHAPES})")
    return records


def sft_dataset(tokenizer, data, max_len: int = 512, *, pack: bool = False, cache_dir=None):
    """A datasets.Dataset of {"input_ids", "labels"} for a Trainer (pad its batches with collator(tokenizer)).
    `data`: a file path (load_records), or records: a list of dicts, or a datasets.Dataset you loaded yourself
    (from the hub, say). Each record is BOS + its first max_len - 1 tokens, or with pack=True all records are
    joined and cut into such blocks (planner.train.data.sft_examples)."""
    try:
        import datasets
    except ImportError:
        raise UserError("sft_dataset builds a datasets.Dataset; pip install -e \".[hf]\"") from None

    if isinstance(data, (str, Path)):
        records, source = load_records(data, option="data file", cache_dir=cache_dir), str(data)
    else:
        records, source = list(data), "the training records"
    return datasets.Dataset.from_list(sft_examples(tokenizer, records, max_len, pack, source))


def collator(tokenizer):
    """The data collator for a Trainer: right-pads a batch, labels -100 and attention 0 on the padding."""
    return functools.partial(pad_examples, pad_id=padding_id(tokenizer))
