"""Fine-tune the LoRA adapters of a quantized model on real text.

Objectives:
  causal  — next-token cross-entropy on contiguous blocks of `max_len` tokens (causal LMs).
  distill — for encoders without a head (the embedded all-MiniLM-L6-v2): match the full-precision teacher.
            loss = MSE between student and teacher last hidden states over non-padding tokens
                   + (1 − cosine) between their mean-pooled sentence embeddings.
AdamW over the trainable (adapter) parameters only, gradient accumulation, optional gradient checkpointing,
bf16 autocast on GPU, a tqdm bar with loss and tokens/s, and a periodic evaluation callback.

The same losses work inside a Hugging Face Trainer: causal LMs need nothing special (labels = input_ids), and
`DistillationTrainer` (a Trainer with compute_loss overridden; created lazily to keep imports light) distills.
"""

from __future__ import annotations

import functools
import math
import random
import time

import torch
import torch.nn.functional as F

from .apply import trainable_parameters
from .errors import UserError
from .evaluate import mean_pool, model_device

OBJECTIVES = ("auto", "causal", "distill")


# ---- losses ---------------------------------------------------------------------------------------------------
def distill_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor,
                 attention_mask: torch.Tensor) -> torch.Tensor:
    """MSE of token states over non-padding tokens + (1 − cos) of mean-pooled embeddings, averaged over the batch."""
    s, t = student_hidden.float(), teacher_hidden.float()
    mask = attention_mask.unsqueeze(-1).to(s.dtype)
    mse = ((s - t) ** 2 * mask).sum() / (mask.sum() * s.shape[-1]).clamp_min(1)
    cos = F.cosine_similarity(mean_pool(s, attention_mask), mean_pool(t, attention_mask), dim=-1)
    return mse + (1 - cos).mean()


def distill_step_loss(student, teacher, batch: dict) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.no_grad():
        target = teacher(**inputs).last_hidden_state
    return distill_loss(student(**inputs).last_hidden_state, target, inputs["attention_mask"])


def causal_step_loss(model, batch: dict) -> torch.Tensor:
    out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=batch["input_ids"])
    return out.loss


# ---- data -----------------------------------------------------------------------------------------------------
def causal_blocks(tokenizer, texts, max_len: int) -> torch.Tensor:
    """All texts tokenized, joined by the tokenizer's end-of-text (or separator) token, cut into (N, max_len)."""
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if sep is not None:
            ids.append(sep)
    n = len(ids) // max_len
    if n == 0:
        raise UserError(f"the training text has {len(ids)} tokens, fewer than one block of max_len={max_len}; "
                        "pass more text or a smaller max_len")
    return torch.tensor(ids[: n * max_len], dtype=torch.long).view(n, max_len)


def detect_objective(model) -> str:
    name = type(model).__name__
    if name.endswith(("ForCausalLM", "LMHeadModel")) or getattr(getattr(model, "config", None), "is_decoder", False):
        return "causal"
    return "distill"


class _Batches:
    """Endless, seeded stream of micro-batches (a reshuffle after each pass over the data)."""

    def __init__(self, objective, tokenizer, texts, batch_size, max_len, seed):
        self.objective, self.tokenizer, self.batch_size, self.max_len = objective, tokenizer, batch_size, max_len
        self.rng = random.Random(seed)
        self.items = causal_blocks(tokenizer, texts, max_len) if objective == "causal" else list(texts)
        self.order, self.pos = [], 0

    def _indices(self):
        out = []
        while len(out) < self.batch_size:
            if self.pos >= len(self.order):
                self.order = list(range(len(self.items)))
                self.rng.shuffle(self.order)
                self.pos = 0
            out.append(self.order[self.pos])
            self.pos += 1
        return out

    def next(self, device) -> dict:
        idx = self._indices()
        if self.objective == "causal":
            ids = self.items[idx]
            return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}
        enc = self.tokenizer([self.items[i] for i in idx], padding=True, truncation=True, max_length=self.max_len,
                             return_tensors="pt")
        return {k: v.to(device) for k, v in enc.items()}


# ---- the loop -------------------------------------------------------------------------------------------------
def _checkpointing(model, enable: bool) -> None:
    """Turn activation (gradient) checkpointing on or off; transformers 5 renamed the methods."""
    if enable:
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        elif hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            raise UserError("gradient_checkpointing needs a Hugging Face model; pass gradient_checkpointing=False")
    elif hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


def train(model, tokenizer, texts, *, objective: str = "auto", teacher=None, steps: int = 100, batch_size: int = 8,
          max_len: int = 128, lr: float = 2e-4, weight_decay: float = 0.0, grad_accum: int = 1,
          max_grad_norm: float | None = 1.0, warmup_steps: int = 0, schedule: str = "constant",
          gradient_checkpointing: bool = False, bf16: bool | str = "auto", eval_fn=None, eval_every: int = 0,
          log_every: int = 1, seed: int = 0, progress: bool = True) -> list[dict]:
    """Fine-tune the trainable parameters (the adapters after apply_plan) for `steps` optimizer steps of
    `grad_accum` micro-batches of `batch_size` sequences each.

    eval_fn(model) -> float is called before training, every `eval_every` steps and after the last step.
    Returns the history: one dict per logged step {step, loss, tokens_per_s, lr, [eval]}; step 0 holds the
    initial evaluation. bf16="auto": autocast to bf16 on CUDA, fp32 on CPU."""
    if objective not in OBJECTIVES:
        raise UserError(f"objective={objective!r} is not supported; use one of {OBJECTIVES}")
    if objective == "auto":
        objective = detect_objective(model)
    if objective == "distill" and teacher is None:
        raise UserError("objective 'distill' needs the full-precision teacher model; pass teacher=<model>")
    if steps < 1 or batch_size < 1 or grad_accum < 1:
        raise UserError("steps, batch_size and grad_accum must be >= 1")
    if schedule not in ("constant", "cosine"):
        raise UserError(f"schedule={schedule!r} is not supported; use 'constant' or 'cosine'")
    params = trainable_parameters(model)
    if not params:
        raise UserError("the model has no trainable parameters; apply a plan with adapters (rank > 0) first")
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise UserError("no training text was given; pass a non-empty list of strings")

    device = model_device(model)
    use_bf16 = (device.type == "cuda") if bf16 == "auto" else bool(bf16)
    torch.manual_seed(seed)
    data = _Batches(objective, tokenizer, texts, batch_size, max_len, seed)
    if teacher is not None:
        teacher.eval()
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

    def factor(step):
        warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
        if schedule == "cosine":
            return warm * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))
        return warm

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    if gradient_checkpointing:
        _checkpointing(model, True)

    history: list[dict] = []
    if eval_fn is not None:
        history.append({"step": 0, "eval": float(eval_fn(model))})
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=f"train ({objective})", unit="step", dynamic_ncols=True)
    model.train()
    try:
        for step in range(1, steps + 1):
            start = time.perf_counter()
            total_loss, tokens = 0.0, 0
            for _ in range(grad_accum):
                batch = data.next(device)
                tokens += int(batch["attention_mask"].sum())
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                    loss = (causal_step_loss(model, batch) if objective == "causal"
                            else distill_step_loss(model, teacher, batch))
                (loss / grad_accum).backward()
                total_loss += float(loss.detach()) / grad_accum
            if max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            rate = tokens / max(time.perf_counter() - start, 1e-9)
            record = {"step": step, "loss": total_loss, "tokens_per_s": rate, "lr": scheduler.get_last_lr()[0]}
            if eval_fn is not None and ((eval_every and step % eval_every == 0) or step == steps):
                record["eval"] = float(eval_fn(model))
                model.train()
            if step % log_every == 0 or step == steps or "eval" in record:
                history.append(record)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{total_loss:.4f}", tok_s=f"{rate:.0f}")
    finally:
        if bar is not None:
            bar.close()
        if gradient_checkpointing:
            _checkpointing(model, False)
        model.eval()
    return history


# ---- command helper -------------------------------------------------------------------------------------------
def finetune(plan, model=None, out_dir=None, *, init: str = "loftq", steps: int = 100, batch_size: int = 8,
             max_len: int = 128, lr: float = 2e-4, grad_accum: int = 1, gradient_checkpointing: bool = False,
             device=None, eval_every: int = 0, eval_texts: int = 64, texts=None, tokenizer=None,
             progress: bool = True) -> dict:
    """What a `finetune` command does: load the model folder (default: the plan's model.source), apply the plan,
    fine-tune the adapters on the real-text train split (or `texts`), evaluate on held-out text before and after
    (perplexity for causal LMs, embedding cosine to the full-precision model for encoders), and, with `out_dir`,
    save the quantized model (save_quantized) plus metrics.json. `tokenizer`: default, the folder's own.
    Returns the metrics and the history."""
    from pathlib import Path

    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    from .apply import apply_plan, quantized_bytes, resolve_device
    from .evaluate import embedding_cosine, perplexity, real_text_splits
    from .fsio import write_json
    from .plan import Plan

    plan = plan if isinstance(plan, Plan) else Plan.load(plan)
    folder = model or plan.model.get("source")
    if not folder or not (Path(folder) / "config.json").is_file():
        raise UserError(f"model folder {folder!r} not found; pass model=<the Hugging Face folder the plan was "
                        "made for>")
    dev = resolve_device(device)
    architectures = AutoConfig.from_pretrained(folder).architectures or []
    causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
    loader = AutoModelForCausalLM if causal else AutoModel
    if tokenizer is None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot load a tokenizer from {folder} ({type(e).__name__}); pass tokenizer=...") from None
    student = loader.from_pretrained(folder, dtype=torch.float32)
    splits = real_text_splits()
    held = splits["heldout"][:eval_texts]
    teacher = None
    if causal:
        metric = "perplexity"
        evaluate = lambda m: perplexity(m, tokenizer, held, max_len=max_len, stride=max(1, max_len // 2))  # noqa: E731
    else:
        metric = "embedding_cosine"
        teacher = AutoModel.from_pretrained(folder, dtype=torch.float32).to(dev).eval()
        evaluate = lambda m: embedding_cosine(m, teacher, tokenizer, held, max_len=max_len)  # noqa: E731
    apply_plan(student, plan, model_path=folder, device=dev, init=init, progress=progress)
    history = train(student, tokenizer, texts or splits["train"], objective="causal" if causal else "distill",
                    teacher=teacher, steps=steps, batch_size=batch_size, max_len=max_len, lr=lr,
                    grad_accum=grad_accum, gradient_checkpointing=gradient_checkpointing, eval_fn=evaluate,
                    eval_every=eval_every, progress=progress)
    evals = [h["eval"] for h in history if "eval" in h]
    result = {"metric": metric, "before": evals[0], "after": evals[-1], "init": init, "steps": steps,
              "quantized_bytes": quantized_bytes(student), "plan_bytes": plan.totals.get("bytes"),
              "history": history}
    if out_dir is not None:
        from .export import save_quantized

        out = Path(out_dir)
        result["saved"] = str(save_quantized(student, plan, out / "quantized"))
        write_json(out / "metrics.json", result)
    return result


# ---- Hugging Face Trainer -------------------------------------------------------------------------------------
def text_dataset(tokenizer, texts, max_len: int = 128) -> list[dict]:
    """Tokenized examples for a Trainer (pad them with transformers.DataCollatorWithPadding)."""
    return [dict(tokenizer(t, truncation=True, max_length=max_len)) for t in texts if t and t.strip()]


@functools.cache
def _distillation_trainer_class():
    from transformers import Trainer

    class DistillationTrainer(Trainer):
        """A Trainer whose loss is distill_loss against a frozen full-precision `teacher` (pass teacher=...)."""

        def __init__(self, *args, teacher=None, **kwargs):
            if teacher is None:
                raise UserError("DistillationTrainer needs the full-precision teacher; pass teacher=<model>")
            super().__init__(*args, **kwargs)
            self.teacher = teacher.eval()

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
            self.teacher.to(inputs["input_ids"].device)
            out = model(**inputs)
            with torch.no_grad():
                target = self.teacher(**inputs).last_hidden_state
            loss = distill_loss(out.last_hidden_state, target, inputs["attention_mask"])
            return (loss, out) if return_outputs else loss

    return DistillationTrainer


def __getattr__(name):
    if name == "DistillationTrainer":
        return _distillation_trainer_class()
    raise AttributeError(name)
