"""The tokenizer check every study model passes before any arm runs: a packaged model's tokenizer must give its
known answer (planner.model.packaged: the exact ids of a fixed text, BOS/EOS, whether BOS is added; transformers
5.17 converts Gemma 3's tokenizer as a Unigram model with no merges), and the tokenizer's digest
(planner.model.tokenizer, the same one plans and train reports record) goes into the results. A study reports a
failure as a status and skips the model, rather than stopping the other models' work."""

from __future__ import annotations

from ..model.packaged import KNOWN_TEXT, PACKAGED
from ..model.tokenizer import known_answer_error, read_tokenizer, tokenizer_digest


def known_answer(name: str, folder) -> dict:
    """{"status": "pass" | "fail" | "no known answer", ...}: the folder's tokenizer against the known answer of the
    packaged model `name` ("problem" says what differs on a failure)."""
    tok = read_tokenizer(folder)
    out = {"tokens": len(tok(KNOWN_TEXT, add_special_tokens=False)["input_ids"]), "bos_id": tok.bos_token_id,
           "digest": tokenizer_digest(tok), "class": type(tok).__name__}
    spec = PACKAGED.get(name)
    if spec is None:
        return {**out, "status": "no known answer"}
    out["expected_tokens"] = len(spec.known.ids)
    problem = known_answer_error(tok, spec.known)
    return {**out, "status": "fail", "problem": problem} if problem else {**out, "status": "pass"}
