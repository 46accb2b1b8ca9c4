"""The tokenizer check every study model passes before any arm runs: a fixed text must become exactly the ids the
right GGUF conversion gives (transformers 5.25 here; 5.17 converts Gemma 3's tokenizer as a Unigram model with no
merges and splits this text into 190 pieces), and the tokenizer files' digest goes into the results."""

from __future__ import annotations

import hashlib
from pathlib import Path

KNOWN_TEXT = ('The "assert" statement\n**********************\n\nAssert statements are a convenient way to insert '
              'debugging assertions into a program:\n\n   assert_stmt ::= "assert" expression ["," expression]\n')
# add_special_tokens=False; measured with transformers 5.25.0 on the packaged GGUFs' conversions.
KNOWN_IDS = {
    "gemma3-270m": [818, 623, 10640, 236775, 5456, 107, 6430, 60654, 108, 22042, 11461, 659, 496, 13139, 1595, 531,
                    7934, 63114, 83616, 1131, 496, 1948, 236787, 108, 139, 10640, 236779, 14030, 205565, 623, 10640,
                    236775, 5619, 870, 4337, 5619, 236842, 107],
    "smollm2-135m": [504, 476, 3391, 18, 4814, 198, 16540, 5398, 828, 198, 198, 46923, 7868, 359, 253, 11541, 970,
                     288, 7258, 33665, 35560, 618, 253, 1578, 42, 39892, 2897, 79, 302, 13059, 13558, 45, 476, 3391,
                     18, 4352, 933, 14460, 4352, 77, 198],
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


def tokenizer_digest(folder) -> str:
    """sha256 (16 hex digits) over the folder's tokenizer files, by name and content."""
    h = hashlib.sha256()
    for name in TOKENIZER_FILES:
        path = Path(folder) / name
        if path.is_file():
            h.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def known_answer(name: str, folder) -> dict:
    """{"status": "pass" | "fail" | "no known answer", ...}: the fixed text's ids from the folder's tokenizer
    against the known ones for the model `name`."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok(KNOWN_TEXT, add_special_tokens=False)["input_ids"]
    want = KNOWN_IDS.get(name)
    out = {"tokens": len(ids), "bos_id": tok.bos_token_id, "digest": tokenizer_digest(folder),
           "class": type(tok).__name__}
    if want is None:
        return {**out, "status": "no known answer"}
    if ids == want:
        return {**out, "status": "pass"}
    first = next((i for i, (a, b) in enumerate(zip(ids, want)) if a != b), min(len(ids), len(want)))
    return {**out, "status": "fail", "expected_tokens": len(want), "first_difference": first}
