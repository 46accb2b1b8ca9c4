"""Text that ships with every CPython, split once: the pydoc prose's train / calibration / held-out
splits, calibration sources, user text files (paragraphs split on blank lines) and chat records made from prose."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from .fsio import read_paragraphs

BUILTIN_SOURCES = ("pydoc",)


@dataclass
class CalibText:
    name: str
    texts: list[str]

    @property
    def digest(self) -> str:
        h = hashlib.sha256()
        for t in self.texts:
            h.update(t.encode("utf-8") + b"\0")
        return h.hexdigest()[:16]


def pydoc_splits() -> dict[str, list[str]]:
    """Real English prose shipped with every CPython (the language reference's topics), split by topic name:
    every 5th topic (sorted) is held out for evaluation, every 5th starting at 1 is calibration, the rest train.
    Each topic is cut into paragraphs of at least 200 characters."""
    from pydoc_data.topics import topics

    splits = {"train": [], "calib": [], "heldout": []}
    for i, name in enumerate(sorted(topics)):
        split = "heldout" if i % 5 == 0 else "calib" if i % 5 == 1 else "train"
        para = ""
        for line in topics[name].splitlines():
            para = (para + " " + line.strip()).strip() if line.strip() else para
            if not line.strip() and len(para) >= 200:
                splits[split].append(para)
                para = ""
        if len(para) >= 40:
            splits[split].append(para)
    return splits


def load_calib(spec: str) -> CalibText:
    """`spec` is a built-in source name ("pydoc") or a path to a UTF-8 plain-text file (paragraphs split on
    blank lines)."""
    if spec in BUILTIN_SOURCES:
        return CalibText("pydoc", pydoc_splits()["calib"])
    path = Path(spec)
    paragraphs = read_paragraphs(path, "calibration file", f"pass a UTF-8 text file or one of {BUILTIN_SOURCES}")
    return CalibText(str(path), paragraphs)


_SENTENCE_END = re.compile(r"(?<=[.!?:])\s+")


def _chunk(paragraph: str, max_chars: int) -> list[str]:
    """Cut a long paragraph at sentence ends into pieces of at most ~max_chars (a single long sentence stays)."""
    if len(paragraph) <= max_chars:
        return [paragraph]
    pieces, current = [], ""
    for sentence in _SENTENCE_END.split(paragraph):
        if current and len(current) + 1 + len(sentence) > max_chars:
            pieces.append(current)
            current = sentence
        else:
            current = f"{current} {sentence}".strip()
    if current:
        pieces.append(current)
    return pieces


def real_text_splits(max_chars: int = 1000) -> dict[str, list[str]]:
    """{"train", "heldout", "calib"}: lists of paragraphs (>= 200 characters where the source allows, at most
    ~max_chars, cut at sentence ends) of real English prose; deterministic. Some topics repeat paragraphs of
    others, so paragraphs that also occur in the held-out split are removed from train and calib."""

    splits = pydoc_splits()
    held = set(splits["heldout"])
    splits = {k: v if k == "heldout" else [p for p in v if p not in held] for k, v in splits.items()}
    return {split: [piece for p in paras for piece in _chunk(p, max_chars)] for split, paras in splits.items()}


def read_text_file(path, option: str = "--text") -> list[str]:
    """Paragraphs (split on blank lines) of a UTF-8 plain-text file: training text (--text) or evaluation text
    (--eval-text); the error message names the option."""
    what = "training text file" if option == "--text" else "evaluation text file"
    return read_paragraphs(Path(path), what, f"pass a UTF-8 text file or leave {option} out (built-in pydoc text)")


def chat_records(paragraphs: list[str] | None = None) -> list[dict]:
    """Prompt/completion records from prose (default: the pydoc train split): the first sentence asks, the rest of
    the paragraph answers; a paragraph of one sentence makes none. The HF-route benches fine-tune on these."""
    if paragraphs is None:
        paragraphs = real_text_splits()["train"]
    records = []
    for p in paragraphs:
        head, _, rest = p.partition(". ")
        if rest:
            records.append({"prompt": head + ".", "completion": rest})
    return records
