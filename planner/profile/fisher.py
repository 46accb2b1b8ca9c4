"""Fisher weights from calibration text: mean squared gradients of a self-supervised loss w.r.t. each planned
matrix, reduced to LQ-LoRA's row/column form F_ij ≈ r_i·c_j.

Losses: causal LMs use next-token cross-entropy. Encoders without a language-model head (the embedded
all-MiniLM-L6-v2) use the unsupervised SimCSE objective their family is trained with: two dropout views of each
sentence, InfoNCE over the batch (temperature 0.05) on mean-pooled embeddings.

Causal LMs accumulate the squared gradient of each example's own loss (one backward per sequence, padding cut
off), the empirical Fisher E_x[(∇ log p(x))²] as LQ-LoRA computes it. SimCSE's loss only exists over a batch (the
other sentences are its negatives), so encoders accumulate the squared gradient of each mini-batch's loss.

Reduction: r = row means of F and c = column means of F divided by the overall mean, so r·cᵀ keeps F's row and
column sums (the independence fit of a non-negative matrix); weights are floored in quant.decompose.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import NamedTuple

import torch

from quant.weighting import check_fisher

from ..corpus import CalibText, load_calib
from ..errors import UserError
from ..fsio import remove_stale_temps, write_bytes
from ..model.config import positions
from ..model.discover import is_causal_lm, same_module
from ..model.hfload import auto_config, check_tokenizer_fits, pretrained
from ..model.tokenizer import bos_id, load_tokenizer, short_digest, tokenizer_digest
from ..model.weights import read_header_table

log = logging.getLogger("lqplan")


def find_modules(model: torch.nn.Module, names: list[str]) -> dict[str, torch.nn.Module]:
    modules = dict(model.named_modules())
    out = {}
    for name in names:
        mod = modules.get(name)
        if mod is None:  # tolerate a base-model prefix difference ("bert.encoder…" vs "encoder…")
            hits = [m for k, m in modules.items() if k and same_module(k, name)]
            mod = hits[0] if len(hits) == 1 else None
        if mod is None or not hasattr(mod, "weight"):
            raise UserError(f"planned matrix {name} not found in the model for calibration; "
                            "re-run discovery with this model")
        out[name] = mod
    return out


def simcse_loss(model, batch):
    def embed():
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp_min(1), dim=-1)

    a, b = embed(), embed()  # dropout makes the two views differ
    logits = a @ b.T / 0.05
    return torch.nn.functional.cross_entropy(logits, torch.arange(len(a), device=logits.device))


def calibration_batches(tokenizer, texts: list[str], causal: bool, max_tokens: int, seq_len: int,
                        batch_size: int) -> tuple[list[dict], int]:
    """The calibration paragraphs as padded batches of at most seq_len tokens each, until max_tokens are reached;
    returns (batches, tokens). A causal LM's paragraphs start with BOS where the tokenizer has one, whether or not
    the tokenizer adds it by itself (Gemma's does, SmolLM2's does not), as in training and evaluation; an
    encoder's get the tokenizer's own special tokens ([CLS] … [SEP])."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    bos = bos_id(tokenizer) if causal else None
    batches, tokens = [], 0
    for i in range(0, len(texts), batch_size):
        chunk = texts[i:i + batch_size]
        if bos is None:
            enc = tokenizer(chunk, truncation=True, max_length=seq_len, padding=True, return_tensors="pt")
        else:
            rows = [[bos, *x] for x in tokenizer(chunk, add_special_tokens=False, truncation=True,
                                                 max_length=seq_len - 1)["input_ids"]]
            enc = {"input_ids": torch.full((len(rows), max(map(len, rows))), tokenizer.pad_token_id or 0),
                   "attention_mask": torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)}
            for j, row in enumerate(rows):  # padded on the right; each causal example is cut to its own tokens
                enc["input_ids"][j, :len(row)] = torch.tensor(row)
                enc["attention_mask"][j, :len(row)] = 1
        batches.append(enc)
        tokens += int(enc["attention_mask"].sum())
        if tokens >= max_tokens:
            break
    return batches, tokens


def calib_batches(folder: Path, calib: CalibText, max_tokens: int, seq_len: int, batch_size: int,
                  needs: str = "Fisher calibration", tokenizer=None) -> list:
    """The calibration text tokenized by the model's own tokenizer (`tokenizer`: default, the folder's, checked by
    planner.model.tokenizer) into padded batches (calibration_batches), until `max_tokens` real tokens are reached;
    every calibration statistic (Fisher weights, output statistics) is made from these batches."""
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(folder)
    config = auto_config(folder)
    check_tokenizer_fits(tokenizer, config, folder)
    limit = positions(config)
    if limit is not None:
        seq_len = min(seq_len, limit)  # a model with fewer positions than the window: its own length
    causal = is_causal_lm(config)
    if not causal and len(calib.texts) < 2:  # SimCSE's loss contrasts the sentences of a batch: one has no gradient
        raise UserError(f"the calibration text {calib.name} has {len(calib.texts)} paragraph; {needs} of an encoder "
                        "needs at least 2 (separate them with a blank line), or run without --calib")
    batches, tokens = calibration_batches(tokenizer, calib.texts, causal, max_tokens, seq_len, batch_size)
    if not batches:
        raise UserError(f"the calibration text produced no tokens; {needs} needs a longer --calib file")
    if tokens < max_tokens:  # plan.json records --calib-tokens: it must be what the statistics were made from
        raise UserError(f"--calib-tokens {max_tokens} is more than the calibration text holds ({tokens} tokens at "
                        f"{seq_len} per paragraph); pass --calib-tokens {tokens} or fewer, or a longer --calib file")
    return batches


def load_calib_model(folder: Path, device: str):
    """(model in fp32 on `device`, causal): the causal-LM class for decoders, the bare encoder otherwise."""
    from transformers import AutoModel, AutoModelForCausalLM

    causal = is_causal_lm(auto_config(folder))
    cls = AutoModelForCausalLM if causal else AutoModel
    return pretrained(cls, folder, dtype=torch.float32).to(device), causal


def example_pieces(enc: dict, causal: bool) -> list[dict]:
    """Causal LMs: one piece per example, each cut to its own tokens (padding on either side never enters).
    Encoders: the padded batch as it is."""
    if not causal:
        return [enc]
    return [{k: v[i:i + 1, enc["attention_mask"][i].bool()] for k, v in enc.items()}
            for i in range(len(enc["input_ids"]))]


def compute_fisher(folder: Path, names: list[str], calib: CalibText, max_tokens: int = 16384, seq_len: int = 128,
                   batch_size: int = 16, device: str = "cpu", progress=None,
                   tokenizer=None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Row/column Fisher weights for each planned matrix (module path) of the model in `folder` (`tokenizer`:
    default, the folder's own)."""
    from transformers.pytorch_utils import Conv1D  # here, not at import: it loads much of transformers

    batches = calib_batches(folder, calib, max_tokens, seq_len, batch_size, tokenizer=tokenizer)
    model, causal = load_calib_model(folder, device)
    modules_of = find_modules(model, names)
    params = {n: m.weight for n, m in modules_of.items()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    sums = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}

    model.train()  # dropout on: SimCSE needs it; for causal LMs it matches the fine-tuning regime
    torch.manual_seed(0)
    counted = 0
    for enc in (progress(batches) if progress else batches):
        enc = {k: v.to(device) for k, v in enc.items()}
        for piece in example_pieces(enc, causal):
            if causal and piece["input_ids"].shape[1] < 2:
                continue  # a one-token paragraph has nothing to predict
            model.zero_grad(set_to_none=True)
            loss = model(**piece, labels=piece["input_ids"]).loss if causal else simcse_loss(model, piece)
            if not math.isfinite(float(loss.detach())):
                raise UserError("the calibration loss is not finite; check the model weights and the calibration "
                                "text")
            loss.backward()
            for n, p in params.items():
                sums[n] += p.grad.float().pow(2)
            counted += 1

    if not counted:
        raise UserError(f"the calibration text {calib.name} has no paragraph of 2 or more tokens; pass a longer "
                        "--calib file")
    out = {}
    for n, s in sums.items():
        if not bool(s.sum() > 0):
            raise UserError(f"the calibration text {calib.name} gave no gradient to matrix {n}; pass more text (more "
                            "paragraphs) with --calib, or run without it")
        f = s / counted
        if isinstance(modules_of[n], Conv1D):
            f = f.t()  # GPT-2's Conv1D stores (in, out); the plan's rows are output features
        mean = f.mean().clamp_min(torch.finfo(torch.float32).tiny)
        out[n] = (f.mean(dim=1).cpu(), (f.mean(dim=0) / mean).cpu())
    return out


def save_fisher(path: Path, weights: dict[str, tuple[torch.Tensor, torch.Tensor]], meta: dict) -> None:
    from safetensors.torch import save

    tensors = {}
    for n, (r, c) in weights.items():
        tensors[f"{n}.rows"] = r.contiguous()
        tensors[f"{n}.cols"] = c.contiguous()
    # Serialised in memory (a few vectors per matrix) and written by write_bytes: a full disk then raises OSError,
    # which fsio turns into a one-line message (safetensors' own writer raises its SafetensorError instead).
    write_bytes(path, save(tensors, metadata={k: str(v) for k, v in meta.items()}))


def load_fisher(path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        read_header_table(Path(path))
        t = load_file(str(path))
        names = sorted({k.rsplit(".", 1)[0] for k in t})
        return {n: (t[f"{n}.rows"], t[f"{n}.cols"]) for n in names}
    except (SafetensorError, OSError, KeyError, UserError):
        # a damaged cache entry is not the user's input: an empty result makes the caller recompute it
        logging.getLogger("lqplan.fisher").warning("ignoring unreadable Fisher cache %s (it will be recomputed)", path)
        return {}


def _usable(weights, matrices) -> bool:
    """Cached weights the profile can use (shapes, finite, non-negative, not all zero); else they are recomputed."""
    try:
        for m in matrices:
            check_fisher(weights[m.name], tuple(m.shape))
    except ValueError as e:
        log.warning("ignoring the cached Fisher weights (%s); recomputing them", e)
        return False
    return True


class Fisher(NamedTuple):
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]
    key: str        # names the calibration text, its token count and the tokenizer (profile cache keys use it)
    tokenizer: str  # the tokenizer's digest (planner.model.tokenizer)


def get_fisher(source, matrices, calib: str, cache_dir: Path, tokens: int, device, progress: bool) -> Fisher:
    """Fisher row/column weights for the calibration source, computed once and reused from the cache. The key
    names the tokenizer too: the model fingerprint covers the weights only, and another tokenizer gives other
    gradients from the same text."""
    text = load_calib(calib)
    tokenizer = load_tokenizer(source.folder)
    digest = tokenizer_digest(tokenizer)
    key = f"{text.name.replace('/', '_')[-40:]}-{text.digest}-{tokens}-tok_{short_digest(digest)}"
    path = Path(cache_dir) / source.fingerprint.split(":")[-1][:24] / "fisher" / f"{key}.safetensors"
    names = [m.name for m in matrices]
    if path.parent.is_dir():
        remove_stale_temps(path.parent)  # leftovers of a killed run's write
    if path.exists():
        weights = load_fisher(path)
        if all(n in weights for n in names) and _usable(weights, matrices):
            log.info("fisher: reusing %s", path)
            return Fisher(weights, key, digest)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = lambda it: tqdm(it, desc="fisher", unit="batch", dynamic_ncols=True)  # noqa: E731
    weights = compute_fisher(source.folder, names, text, max_tokens=tokens, device=str(device), progress=bar,
                             tokenizer=tokenizer)
    save_fisher(path, weights, {"calib": text.name, "digest": text.digest, "tokens": tokens, "tokenizer": digest})
    return Fisher(weights, key, digest)
