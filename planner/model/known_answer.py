"""Reading a tokenizer from local files, and the known answer a packaged model's tokenizer must give: the layer
below both the checked loader (planner.model.tokenizer) and the packaged models (planner.model.packaged).

Why a known answer: a GGUF file carries its tokenizer as a vocabulary with scores and merges, and transformers
rebuilds a tokenizer from them. transformers 5.17 rebuilds Gemma 3's as a Unigram model without merges. That
tokenizer splits words into fragments: the first pydoc topic becomes 493 tokens instead of 250. The weights stay
byte-identical, so nothing about them reveals it. Each packaged model therefore names a short text and the exact
ids its right tokenizer gives (planner.model.packaged)."""

from __future__ import annotations

from dataclasses import dataclass

from .hfload import SAFE


@dataclass(frozen=True)
class KnownAnswer:
    """A text and the exact ids (no special tokens added) the model's right tokenizer splits it into; its BOS and
    EOS ids (the tokens every sequence starts with and texts are joined by); and whether the tokenizer puts BOS
    first by itself when asked for special tokens (the GGUF's add_bos_token: Gemma's does, SmolLM2's does not)."""
    text: str
    ids: tuple[int, ...]
    bos: int | None
    eos: int | None
    adds_bos: bool


def read_tokenizer(where, gguf_file: str | None = None):
    """AutoTokenizer from a local folder (or a GGUF file in it), never the network, never remote code."""
    from transformers import AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    return AutoTokenizer.from_pretrained(str(where), **SAFE, **kwargs)


def known_answer_error(tokenizer, known: KnownAnswer) -> str | None:
    """None when `tokenizer` gives the known answer, else what it gave instead (for the message)."""
    ids = tuple(tokenizer(known.text, add_special_tokens=False)["input_ids"])
    if ids != known.ids:
        kind = _model_type(tokenizer)
        shown = ", ".join(map(str, ids[:6])) + (", …" if len(ids) > 6 else "")
        return (f"splits {known.text!r} into {len(ids)} tokens ({shown}) instead of the {len(known.ids)} the model "
                f"was trained with" + (f" (it was rebuilt as a {kind} model)" if kind else ""))
    got = (tokenizer.bos_token_id, tokenizer.eos_token_id)
    if got != (known.bos, known.eos):
        return f"has BOS/EOS ids {got[0]}/{got[1]} instead of the model's {known.bos}/{known.eos}"
    special = tuple(tokenizer(known.text)["input_ids"])
    if special != ((known.bos,) if known.adds_bos else ()) + known.ids:
        added = [i for i in special if i not in known.ids]
        return (f"adds special tokens {added} to a text where the model's tokenizer adds "
                f"{[known.bos] if known.adds_bos else 'none'}")
    return None


def _model_type(tokenizer) -> str | None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    return type(backend.model).__name__
