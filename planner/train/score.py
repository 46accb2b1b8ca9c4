"""A causal LM scored against its full-precision model, token by token, on held-out text: KL(fp ‖ model) averaged
over the scored tokens, the perplexity of both and their top-1 agreement, on the same BOS-first windows
(planner.train.evaluate.eval_windows) for both models.

PlanScorer runs the full-precision model once and then scores plan after plan (or any model) without it:
- The head of both models is fed only the hidden states of the scored positions (a forward pre-hook), so logits
  exist for the scored tokens alone, (tokens, vocab) per batch.
- The full-precision pass keeps those final hidden states (tokens x hidden, fp32: 9 MiB for 4,096 tokens of a
  576-wide model) and the output head; the rest of the model is freed. Each later batch recomputes the exact fp
  logits as head(hidden): the same module on the same tensor as in the pass, hence the same numbers. Where the
  model changes the head's output afterwards (e.g. Gemma 2's logit soft-capping), which the first batch detects,
  the full-precision model is kept and run again per batch instead.
- The full-precision model is loaded whole (fp32) for the pass, or, with stream=True (default: when its fp32
  weights exceed STREAM_ABOVE_BYTES), streamed one layer block at a time (planner.train.reference), so it never
  needs its full fp32 copy in memory.
- Plans are built from the checkpoint's shards (planner.train.build.build_student, the layers exactly as
  apply_plan makes them), so the full-precision model is never in memory beside the quantized one.

Memory, at most: max(full-precision pass, quantized model) + the cached hidden states and fp head + one batch's
logits (batches are sized to keep one batch's (tokens, vocab) fp32 logits near LOGITS_BYTES; the KL works through
them in row chunks).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..corpus import real_text_splits
from ..devices import dequant_backend_from_env, resolve_device
from ..errors import UserError
from ..model.config import positions
from ..model.discover import is_causal_lm
from ..model.hfload import auto_config, check_tokenizer_fits, check_window, pretrained
from ..model.resolve import resolve_model
from ..model.tokenizer import load_tokenizer, tokenizer_digest
from ..plan.document import Plan
from ..profile.cache import DEFAULT_CACHE
from ..profile.objective import plan_calibration, plan_objective
from .apply import LayerRecipe
from .build import build_student
from .evaluate import eval_windows, next_token_targets
from .finetune import peak_memory
from .reference import streamed_reference, text_digest

SCHEMA = "lqplan.evaluate/1"
DEFAULT_EVAL_TOKENS = 4096
DEFAULT_MAX_LEN = 512
STREAM_ABOVE_BYTES = 4 * 2**30  # fp32 weights above this: the full-precision pass streams layer by layer
LOGITS_BYTES = 2**28  # a batch's fp32 logits of its scored tokens are kept near this
CHUNK_ELEMENTS = 2**24  # vocabulary entries per KL chunk (64 MiB per fp32 temporary)
HELDOUT = "pydoc-heldout"  # the text source name of real_text_splits()["heldout"]


@torch.no_grad()
def divergence_sums(fp_logits: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> dict:
    """Sums over the rows (tokens) of fp32 logits (tokens, vocab): KL(fp ‖ model) from the fp32 log-softmax of both,
    the NLL of `targets` under each, and the count of equal argmaxes, each accumulated in float64."""
    rows = max(1, CHUNK_ELEMENTS // max(1, fp_logits.shape[-1]))
    kl = nll_fp = nll = 0.0
    agree = 0
    for i in range(0, fp_logits.shape[0], rows):
        lp = F.log_softmax(fp_logits[i:i + rows].float(), dim=-1)
        lq = F.log_softmax(logits[i:i + rows].float(), dim=-1)
        t = targets[i:i + rows].unsqueeze(1)
        terms = lp.exp() * (lp - lq)
        terms = torch.where(lp == -math.inf, 0.0, terms)  # p = 0 contributes nothing, even where q = 0 too
        kl += float(terms.sum(dtype=torch.float64))
        nll_fp -= float(lp.gather(1, t).sum(dtype=torch.float64))
        nll -= float(lq.gather(1, t).sum(dtype=torch.float64))
        agree += int((lp.argmax(-1) == lq.argmax(-1)).sum())
    return {"kl": kl, "nll_fp": nll_fp, "nll": nll, "agree": agree, "tokens": int(fp_logits.shape[0])}


class _ScoredHead:
    """Forward pre-hook on a causal LM's output head: the head gets only the hidden states at `positions` (a
    (batch, seq) bool mask), so the model's logits come out as (scored tokens, vocab); the input is kept."""

    def __init__(self, model):
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is None:
            raise UserError(f"{type(model).__name__} has no output head (get_output_embeddings); evaluate --plan "
                            "scores causal language models")
        self.head, self.positions, self.hidden = head, None, None
        self.handle = head.register_forward_pre_hook(self)

    def __call__(self, module, args):
        if self.positions is None:  # a direct call of the head: leave its input alone
            return None
        hidden = args[0][self.positions.to(args[0].device)]
        self.hidden = hidden
        return (hidden, *args[1:])

    def logits(self, model, batch, mask, positions, device) -> torch.Tensor:
        self.positions = positions
        try:
            out = model(input_ids=batch.to(device), attention_mask=mask.to(device), use_cache=False).logits
        finally:
            self.positions = None
        if out.dim() != 2 or out.shape[0] != int(positions.sum()):
            raise UserError(f"{type(model).__name__} does not apply its output head to the final hidden states "
                            "as transformers' causal LMs do; score it with perplexity (evaluate --quantized)")
        return out.float()

    def remove(self) -> None:
        self.handle.remove()


class _LayerMemo:
    """A LayerRecipe whose layers are built once per (matrix, configuration, method, initialisation) and reused:
    plans of one model share most of their layers, and a scored layer is only read, never trained, so one instance
    serves every plan that holds it."""

    def __init__(self, recipe: LayerRecipe, weights_key: str | None, store: dict):
        self.recipe, self.weights_key, self.store = recipe, weights_key, store
        self.reused = 0

    def layer(self, entry, w, bias, alpha, dropout, adapter_dtype):
        r = self.recipe
        key = (entry.name, entry.point, r.methods[entry.name], r.init, r.iters, r.solver.key, self.weights_key,
               r.rounding, alpha, dropout, adapter_dtype)
        if key in self.store:
            self.reused += 1
        else:
            self.store[key] = r.layer(entry, w, bias, alpha, dropout, adapter_dtype)
        return self.store[key]

    def progress(self, entries):
        return self.recipe.progress(entries)


def _fp32_bytes(source) -> int:
    return sum(4 * math.prod(e.shape) for e in source.tensors.values() if e.dtype.startswith(("F", "BF")))


def plan_digest(plan: Plan) -> str:
    """sha256 (16 hex digits) of the plan's canonical JSON: the same plan, the same digest, however it is saved."""
    return hashlib.sha256(json.dumps(plan.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def versions() -> dict:
    import transformers

    from .. import __version__

    return {"lqplan": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


class PlanScorer:
    """The full-precision model of `model` (a folder, alias or ModelSource; see the module docstring for how it
    is run once and kept) and the evaluation windows, ready to score plan after plan:
    `texts` (default: the built-in held-out pydoc prose; `text_source` names it in results), cut to the first
    `eval_tokens` tokens (None: all), in windows of `max_len` tokens (BOS first; default 512, or the model's positions where fewer) every `stride`
    (default max_len // 2),
    `batch_size` windows per forward (default: LOGITS_BYTES of logits per batch).
    reuse_layers: keep every quantized layer built and reuse it in later plans that hold the same (matrix,
    configuration, initialisation); costs the memory of the distinct layers of all plans scored (packed weights and
    fp32 adapters: for SmolLM2-135M at rank 8, about 40 MiB per 2-bit and 65 MiB per 4-bit configuration that plans
    use on every matrix).

    score(plan) -> the result document (evaluate.json's content); score_model(model) -> the metrics of any causal
    LM with this tokenizer, e.g. the full-precision model itself (KL exactly 0)."""

    def __init__(self, model=None, *, texts=None, text_source: str | None = None,
                 eval_tokens: int | None = DEFAULT_EVAL_TOKENS, max_len: int | None = None,
                 stride: int | None = None, batch_size: int | None = None, device=None, stream: bool | None = None,
                 tokenizer=None, progress: bool = False, reuse_layers: bool = True):
        if eval_tokens is not None and eval_tokens < 2:
            raise UserError(f"--eval-tokens {eval_tokens} must be at least 2, e.g. 4096")
        if max_len is not None and max_len < 2:
            raise UserError(f"--max-len {max_len} must be at least 2, e.g. 512")
        if batch_size is not None and batch_size < 1:
            raise UserError(f"--batch-size {batch_size} must be at least 1 (or left out: sized to the vocabulary)")
        self.source = model if hasattr(model, "fingerprint") else resolve_model(model)
        self.config = auto_config(self.source.folder)
        if max_len is None:  # DEFAULT_MAX_LEN, or the model's own length where it has fewer positions
            max_len = min(DEFAULT_MAX_LEN, positions(self.config) or DEFAULT_MAX_LEN)
        check_window(max_len, self.config)
        if not is_causal_lm(self.config):
            raise UserError(f"{self.source.name} is not a causal language model; KL and perplexity need one (an "
                            "encoder's plan is scored by `lqplan train`'s embedding cosine)")
        tokenizer = tokenizer or load_tokenizer(self.source.folder)
        check_tokenizer_fits(tokenizer, self.config, self.source.folder)
        self.tokenizer_digest = tokenizer_digest(tokenizer)  # before a call leaves padding settings on it
        held = real_text_splits()["heldout"] if texts is None else [texts] if isinstance(texts, str) else texts
        self.windows = eval_windows(tokenizer, held, max_len, stride or max(1, max_len // 2), eval_tokens)
        self.text = {"source": HELDOUT if texts is None else (text_source or "texts"), "text_digest": text_digest(
            [t for t in held if t and t.strip()])}
        self.device = resolve_device(device)
        self.progress = progress
        self._layers = {} if reuse_layers else None
        vocab = self.config.get_text_config().vocab_size
        self.batch_size = batch_size or max(1, LOGITS_BYTES // (4 * vocab * self.windows.stride))
        self.stream = _fp32_bytes(self.source) > STREAM_ABOVE_BYTES if stream is None else bool(stream)
        t = time.perf_counter()
        self._fp_pass()
        self.fp_seconds = time.perf_counter() - t

    def _batches(self):
        batches = self.windows.batches(self.batch_size)
        if self.progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, total=math.ceil(len(self.windows.spans) / self.batch_size), desc="score",
                           unit="batch", dynamic_ncols=True, leave=False)
        return batches

    def _load_fp(self):
        if self.stream:
            return streamed_reference(self.source, self.config, causal=True, device=self.device)
        from transformers import AutoModelForCausalLM

        return pretrained(AutoModelForCausalLM, self.source.folder, dtype=torch.float32).to(self.device).eval()

    @torch.no_grad()
    def _fp_pass(self) -> None:
        """Run the full-precision model over every batch once: keep the final hidden states at the scored positions,
        and whether head(hidden) reproduces its logits (then the model is dropped and only the head kept)."""
        fp = self._load_fp()
        hook = _ScoredHead(fp)
        self._hidden, self._fp = [], None
        reproduces = True
        try:
            for i, (batch, mask, labels) in enumerate(self._batches()):
                positions, _ = next_token_targets(labels)
                logits = hook.logits(fp, batch, mask, positions, self.device)
                if i == 0:
                    reproduces = torch.equal(hook.head(hook.hidden).float(), logits)
                self._hidden.append(hook.hidden)
        finally:
            hook.remove()
        self._head = hook.head
        if not reproduces:
            self._hidden, self._fp = None, fp  # recomputed per batch: the model post-processes its head's output

    def _fp_logits(self, index: int, batch, mask, positions) -> torch.Tensor:
        if self._fp is None:
            return self._head(self._hidden[index]).float()
        hook = _ScoredHead(self._fp)
        try:
            return hook.logits(self._fp, batch, mask, positions, self.device)
        finally:
            hook.remove()

    @torch.no_grad()
    def score_model(self, model) -> dict:
        """KL(fp ‖ model) per scored token, both perplexities (and mean NLLs) and top-1 agreement on the windows."""
        was_training = model.training
        model.eval()
        hook = _ScoredHead(model)
        sums = {"kl": 0.0, "nll_fp": 0.0, "nll": 0.0, "agree": 0, "tokens": 0}
        try:
            for i, (batch, mask, labels) in enumerate(self._batches()):
                positions, targets = next_token_targets(labels)
                logits = hook.logits(model, batch, mask, positions, self.device)
                part = divergence_sums(self._fp_logits(i, batch, mask, positions), logits, targets.to(self.device))
                for k, v in part.items():
                    sums[k] += v
        finally:
            hook.remove()
            model.train(was_training)
        n = sums["tokens"]
        return {"kl": sums["kl"] / n, "top1_agreement": sums["agree"] / n,
                "perplexity": {"full_precision": math.exp(sums["nll_fp"] / n), "quantized": math.exp(sums["nll"] / n)},
                "nll": {"full_precision": sums["nll_fp"] / n, "quantized": sums["nll"] / n}, "tokens": n}

    def score(self, plan, *, plan_path=None, cache_dir=DEFAULT_CACHE) -> dict:
        """Build `plan`'s quantized model with its initial adapters (LoftQ / LQ-LoRA as the plan was profiled: its
        iterations, solver and the weights of its objective, planner.profile.objective.plan_calibration, read from
        or computed into `cache_dir`) and score it. Returns the result document: model, plan, tokens, metrics,
        timings, peak memory and versions."""
        if not isinstance(plan, Plan):
            plan_path = plan_path or plan
            plan = Plan.load(plan)
        plan.check_model(self.source.fingerprint)
        weights, weights_key = plan_calibration(plan, self.source, Path(cache_dir), self.device, self.progress)
        recipe = LayerRecipe.of(plan, fisher=weights)
        build = recipe if self._layers is None else _LayerMemo(recipe, weights_key, self._layers)
        t = time.perf_counter()
        student = build_student(self.source, plan, self.config, build, causal=True, device=self.device,
                                dtype=torch.float32, backend=dequant_backend_from_env(), progress=self.progress)
        build_seconds = time.perf_counter() - t
        t = time.perf_counter()
        metrics = self.score_model(student)
        score_seconds = time.perf_counter() - t
        del student
        w = self.windows
        return {
            "schema": SCHEMA,
            "model": {"name": self.source.name, "source": str(self.source.folder),
                      "fingerprint": self.source.fingerprint,
                      "architecture": (self.source.config.get("architectures") or ["?"])[0]},
            "plan": {"path": None if plan_path is None else str(plan_path), "digest": plan_digest(plan),
                     "bits_per_param": plan.totals.get("bits_per_param"), "bytes": plan.totals.get("bytes"),
                     "predicted_error": plan.totals.get("error"), "matrices": len(plan.matrices),
                     "init": recipe.init, "iters": recipe.iters, "solver": recipe.solver.key,
                     "objective": plan_objective(plan.method), "weights_key": weights_key,
                     "rounding": recipe.rounding,
                     "layers_reused": getattr(build, "reused", 0)},
            "tokens": {**self.text, "tokenizer": self.tokenizer_digest, "scored": metrics["tokens"],
                       "windows": len(w.spans), "max_len": w.max_len, "stride": w.stride, "bos": w.bos,
                       "batch_size": self.batch_size, "digest": w.digest()},
            "kl": metrics["kl"], "top1_agreement": metrics["top1_agreement"],
            "perplexity": metrics["perplexity"], "nll": metrics["nll"],
            "full_precision_pass": {"streamed": self.stream, "head_cached": self._fp is None},
            "seconds": {"full_precision": round(self.fp_seconds, 3), "quantize": round(build_seconds, 3),
                        "score": round(score_seconds, 3)},
            "device": str(self.device), **peak_memory(self.device), "versions": versions(),
        }
