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

import torch
from transformers.pytorch_utils import Conv1D

from quant.weighting import check_fisher

from ..corpus import CalibText, load_calib
from ..errors import UserError
from ..fsio import remove_stale_temps, write_bytes
from ..model.config import positions
from ..model.discover import is_causal_lm
from ..model.weights import read_header_table
from ..model.hfload import auto_config, auto_tokenizer, check_tokenizer_fits, pretrained

log = logging.getLogger("lqplan")


def _find_modules(model: torch.nn.Module, names: list[str]) -> dict[str, torch.nn.Module]:
    modules = dict(model.named_modules())
    out = {}
    for name in names:
        mod = modules.get(name)
        if mod is None:  # tolerate a base-model prefix difference ("bert.encoder…" vs "encoder…")
            hits = [m for k, m in modules.items() if k and (k.endswith("." + name) or name.endswith("." + k))]
            mod = hits[0] if len(hits) == 1 else None
        if mod is None or not hasattr(mod, "weight"):
            raise UserError(f"planned matrix {name} not found in the model for Fisher calibration; "
                            "re-run discovery with this model")
        out[name] = mod
    return out


def _simcse_loss(model, batch):
    def embed():
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp_min(1), dim=-1)

    a, b = embed(), embed()  # dropout makes the two views differ
    logits = a @ b.T / 0.05
    return torch.nn.functional.cross_entropy(logits, torch.arange(len(a), device=logits.device))


def compute_fisher(folder: Path, names: list[str], calib: CalibText, max_tokens: int = 16384, seq_len: int = 128,
                   batch_size: int = 16, device: str = "cpu", progress=None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Row/column Fisher weights for each planned matrix (module path) of the model in `folder`."""
    from transformers import AutoModel, AutoModelForCausalLM

    tokenizer = auto_tokenizer(folder, "Fisher calibration needs the model's tokenizer files in the folder, or run "
                                       "without --calib")
    config = auto_config(folder)
    check_tokenizer_fits(tokenizer, config, folder)
    limit = positions(config)
    if limit is not None:
        seq_len = min(seq_len, limit)  # a model with fewer positions than the window: its own length
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batches, tokens = [], 0
    for i in range(0, len(calib.texts), batch_size):
        enc = tokenizer(calib.texts[i:i + batch_size], truncation=True, max_length=seq_len, padding=True,
                        return_tensors="pt")
        batches.append(enc)
        tokens += int(enc["attention_mask"].sum())
        if tokens >= max_tokens:
            break
    if not batches:
        raise UserError("the calibration text produced no tokens; pass a longer --calib file")
    if tokens < max_tokens:  # plan.json records --calib-tokens: it must be what the Fisher weights were made from
        raise UserError(f"--calib-tokens {max_tokens} is more than the calibration text holds ({tokens} tokens at "
                        f"{seq_len} per paragraph); pass --calib-tokens {tokens} or fewer, or a longer --calib file")

    causal = is_causal_lm(config)
    if not causal and len(calib.texts) < 2:  # SimCSE's loss contrasts the sentences of a batch: one has no gradient
        raise UserError(f"the calibration text {calib.name} has {len(calib.texts)} paragraph; an encoder's Fisher "
                        "weights need at least 2 (separate them with a blank line), or run without --calib")
    cls = AutoModelForCausalLM if causal else AutoModel
    model = pretrained(cls, folder, dtype=torch.float32).to(device)
    modules_of = _find_modules(model, names)
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
        # causal: one example at a time, each cut to its own tokens (padding on either side never enters)
        pieces = ([{k: v[i:i + 1, enc["attention_mask"][i].bool()] for k, v in enc.items()}
                   for i in range(len(enc["input_ids"]))] if causal else [enc])
        for piece in pieces:
            if causal and piece["input_ids"].shape[1] < 2:
                continue  # a one-token paragraph has nothing to predict
            model.zero_grad(set_to_none=True)
            loss = model(**piece, labels=piece["input_ids"]).loss if causal else _simcse_loss(model, piece)
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


def get_fisher(source, matrices, calib: str, cache_dir: Path, tokens: int, device, progress: bool):
    """Fisher row/column weights for the calibration source, computed once and reused from the cache."""
    text = load_calib(calib)
    key = f"{text.name.replace('/', '_')[-40:]}-{text.digest}-{tokens}"
    path = Path(cache_dir) / source.fingerprint.split(":")[-1][:24] / "fisher" / f"{key}.safetensors"
    names = [m.name for m in matrices]
    if path.parent.is_dir():
        remove_stale_temps(path.parent)  # leftovers of a killed run's write
    if path.exists():
        weights = load_fisher(path)
        if all(n in weights for n in names) and _usable(weights, matrices):
            log.info("fisher: reusing %s", path)
            return weights, key
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = lambda it: tqdm(it, desc="fisher", unit="batch", dynamic_ncols=True)  # noqa: E731
    weights = compute_fisher(source.folder, names, text, max_tokens=tokens, device=str(device), progress=bar)
    save_fisher(path, weights, {"calib": text.name, "digest": text.digest, "tokens": tokens})
    return weights, key
