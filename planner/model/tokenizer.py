"""A model's tokenizer: loaded in one place (local files only, no remote code), named by a digest that every
result depending on tokens records, and, for the packaged models, checked against a known answer
(planner.model.known_answer says why).

The digest is sha256 over the tokenizer as the tokenizers library serialises it (tokenizer.json's content: model
with vocabulary and merges, normalizer, pre-tokenizer, post-processor, added tokens), with the per-call truncation
and padding state left out, plus the special-token ids. It is the same bytes on every load and save by the same
library version. tokenizer_config.json is not hashed as a file: transformers records in it how the tokenizer was
loaded (`local_files_only`), so two saves of one tokenizer differ there."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..errors import UserError
from .known_answer import read_tokenizer
from .packaged import check_folder_tokenizer

SPECIAL_TOKENS = ("bos", "eos", "pad", "unk", "sep", "cls")


def bos_id(tokenizer) -> int | None:
    """The token a sequence must start with for this model: the tokenizer's BOS (Gemma, Llama), None where it has
    none (BERT / MiniLM; their numbers stay as they were). A decoder trained with BOS first scores text without it
    as out of distribution (Gemma 3 270M: perplexity 75 without, 39 with, on held-out pydoc prose). Every caller
    puts it first itself: some tokenizers add it (Gemma), others do not (SmolLM2)."""
    return getattr(tokenizer, "bos_token_id", None)


def load_tokenizer(folder, *, required: bool = True):
    """The tokenizer of a model folder, for every stage that turns text into ids. A packaged model's folder
    (planner.model.packaged) is checked against its known answer: a wrong conversion raises UserError naming the
    fix. `required=False`: None where the folder has no loadable tokenizer (a wrong one still raises)."""
    try:
        tokenizer = read_tokenizer(folder)
    except Exception as e:  # transformers raises many types for a missing or broken tokenizer
        if not required:
            return None
        raise UserError(f"cannot load the tokenizer from {folder} ({type(e).__name__}); the model folder needs its "
                        "tokenizer files (tokenizer.json or the vocabulary files, and tokenizer_config.json)") from None
    check_folder_tokenizer(Path(folder), tokenizer)
    return tokenizer


def tokenizer_digest(tokenizer) -> str:
    """"sha256:<hex>" naming what `tokenizer` turns text into (see the module docstring)."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # a call with truncation=/padding= leaves its settings on the backend: they are not part of the tokenizer
        padding, truncation = backend.padding, backend.truncation
        backend.no_padding()
        backend.no_truncation()
        try:
            h.update(backend.to_str().encode("utf-8"))
        finally:
            if padding is not None:
                backend.enable_padding(**padding)
            if truncation is not None:
                backend.enable_truncation(**truncation)
    else:  # a slow (Python) tokenizer: its vocabulary in id order
        vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
        h.update(json.dumps(vocab, ensure_ascii=False).encode("utf-8"))
    special = {name: getattr(tokenizer, f"{name}_token_id", None) for name in SPECIAL_TOKENS}
    h.update(b"\0" + json.dumps(special, sort_keys=True).encode("utf-8"))
    return "sha256:" + h.hexdigest()


def short_digest(digest: str) -> str:
    """The first 12 hex digits of a digest, for cache keys and file names."""
    return digest.split(":")[-1][:12]
