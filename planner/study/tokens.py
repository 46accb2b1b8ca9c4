"""The tokenizer check every study model passes before any arm runs (the packaged models' known answer,
planner.model.packaged), and the tokenizer digest the results record."""

from __future__ import annotations

from ..model.packaged import PACKAGED, packaged_spec
from ..model.known_answer import known_answer_error, read_tokenizer
from ..model.tokenizer import tokenizer_digest


def known_answer(name: str, folder) -> dict:
    """{"status": "pass" | "fail" | "no known answer", "problem", "tokens", "digest", ...} for the folder's
    tokenizer: the known answer of the packaged model the folder was assembled from, or of the alias `name`."""
    tok = read_tokenizer(folder)
    spec = packaged_spec(folder) or PACKAGED.get(name)
    out = {"digest": tokenizer_digest(tok), "class": type(tok).__name__, "bos_id": tok.bos_token_id,
           "eos_id": tok.eos_token_id}
    if spec is None:
        return {**out, "status": "no known answer", "tokens": None}
    problem = known_answer_error(tok, spec.known)
    return {**out, "status": "fail" if problem else "pass", "problem": problem, "model": spec.alias,
            "tokens": len(tok(spec.known.text, add_special_tokens=False)["input_ids"]),
            "expected_tokens": len(spec.known.ids)}
