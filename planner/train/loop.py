"""The training loop: fine-tune the LoRA adapters of a quantized model on real text, as set by a TrainSettings.

Objectives:
  causal  — next-token cross-entropy on contiguous blocks of `max_len` tokens (causal LMs); given records (chat,
            prompt/completion, instruction/output: planner.train.data.sft_examples), on their responses only.
  distill — for encoders without a head (the embedded all-MiniLM-L6-v2): match the full-precision teacher.
            loss = MSE between student and teacher last hidden states over non-padding tokens
                   + (1 − cosine) between their mean-pooled sentence embeddings.
AdamW over the trainable (adapter) parameters only, gradient accumulation, optional gradient checkpointing,
bf16 autocast on GPU, a tqdm bar with loss and tokens/s, and a periodic evaluation callback. A non-finite loss
stops the run (UserError) before its optimizer step, so no checkpoint or saved model ever holds that state.

Crash safety: with `checkpoint_dir` and save_every, the TrainState (adapters, optimizer, LR scheduler, step, data
position, history, RNG states) is written atomically (temp + rename) to checkpoint_dir/checkpoint.pt; resume=True
continues from it, so the loss trajectory continues exactly (on CPU, bit for bit).

Data parallel: under torchrun (WORLD_SIZE > 1) the model is wrapped in DistributedDataParallel (gloo on CPU,
NCCL on CUDA; planner.train.parallel). Every rank draws the same global micro-batch of batch_size × world
sequences and keeps its own slice; losses are normalised by the global micro-batch, so the gradients (and the loss
curve) equal a 1-process run with batch_size × world. Only rank 0 writes files and shows progress.

The same losses work inside a Hugging Face Trainer: causal LMs need nothing special (labels = input_ids), and
planner.train.hf.DistillationTrainer distills.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..dist import RankInfo, all_sum
from ..errors import UserError
from .apply import trainable_parameters
from .checkpoint import CHECKPOINT, TrainState, clean_stale_temps
from .data import Batches, check_records_objective, detect_objective, is_records
from .evaluate import model_device
from .losses import causal_step_loss, distill_step_loss, masked_causal_loss
from .parallel import join_data_parallel
from .settings import TrainSettings

log = logging.getLogger("lqplan")
OBJECTIVES = ("auto", "causal", "distill")


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



def resolve_objective(model, objective: str, teacher) -> str:
    """'auto' -> the model's own objective (causal LMs: causal; encoders: distill); distill needs the teacher."""
    if objective not in OBJECTIVES:
        raise UserError(f"objective={objective!r} is not supported; use one of {OBJECTIVES}")
    if objective == "auto":
        objective = detect_objective(model)
    if objective == "distill" and teacher is None:
        raise UserError("objective 'distill' needs the full-precision teacher model; pass teacher=<model>")
    return objective


def lr_factor(settings: TrainSettings):
    """LambdaLR's multiplier after `step` scheduler steps: a linear warm-up, then constant or a cosine to 0 at the
    last step. A plain function on purpose: LambdaLR leaves functions out of its state_dict (the checkpoint)."""
    steps, warmup, cosine = settings.steps, settings.warmup_steps, settings.schedule == "cosine"

    def factor(step):
        warm = min(1.0, (step + 1) / warmup) if warmup else 1.0
        if cosine:
            return warm * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))
        return warm

    return factor


@dataclass(frozen=True)
class Forward:
    """How this rank computes a micro-batch's loss: `runner` is the model or its DDP wrapper."""

    runner: torch.nn.Module
    objective: str
    teacher: torch.nn.Module | None
    info: RankInfo
    device: torch.device
    bf16: bool

    def loss(self, batch: dict, global_tokens: int, global_rows: int) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            # Normalised by the global micro-batch: DDP's mean of the ranks' gradients is then the whole batch's.
            world = self.info.world
            if self.objective == "causal" and "labels" in batch:
                return masked_causal_loss(self.runner, batch, global_tokens / world)
            if self.objective == "causal":
                return causal_step_loss(self.runner, batch)
            return distill_step_loss(self.runner, self.teacher, batch, global_tokens / world, global_rows / world)


def accumulate(fwd: Forward, data: Batches, grad_accum: int) -> tuple[float, int]:
    """One optimizer step's gradients: backward over `grad_accum` micro-batches. Returns the global batch's mean
    loss and its tokens (all ranks together)."""
    mean_loss, tokens = 0.0, 0
    for micro in range(grad_accum):
        batch, global_tokens, global_rows = data.next(fwd.device)
        tokens += int(batch["attention_mask"].sum())
        # no_sync: DDP all-reduces the gradients once per optimizer step, in the last micro-batch's backward.
        last = micro == grad_accum - 1
        with fwd.runner.no_sync() if fwd.info.active and not last else contextlib.nullcontext():
            loss = fwd.loss(batch, global_tokens, global_rows)
            (loss / grad_accum).backward()
        mean_loss += float(loss.detach()) / grad_accum
    if fwd.info.active:
        mean_loss, tokens = all_sum([mean_loss, tokens], fwd.device)
        mean_loss, tokens = mean_loss / fwd.info.world, int(tokens)
    return mean_loss, tokens


def resume(state: TrainState, path: Path, info: RankInfo, device) -> None:
    """Continue `state` from the checkpoint at `path` when there is one; drop temp files of killed writes."""
    if state.load(path, info, device):
        log.info("resumed from %s at step %d", path, state.step)
    else:
        log.info("no checkpoint at %s: starting from step 1", path)
    if info.main:
        clean_stale_temps(path.parent)


def make_optimizer(s: TrainSettings, params):
    """torch's AdamW or SGD, or bitsandbytes' 8-bit (optionally paged) AdamW, whose moments take 2 bytes per
    adapter parameter instead of 8 (an optional extra: pip install -e ".[bnb]")."""
    if s.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    if s.optimizer == "sgd":
        return torch.optim.SGD(params, lr=s.lr, weight_decay=s.weight_decay)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise UserError(f"--optimizer {s.optimizer} needs bitsandbytes: pip install -e \".[bnb]\" (a CUDA machine), "
                        "or use --optimizer adamw") from None
    cls = bnb.optim.PagedAdamW8bit if s.optimizer == "paged_adamw8bit" else bnb.optim.AdamW8bit
    return cls(params, lr=s.lr, weight_decay=s.weight_decay)


def train(model, tokenizer, texts, settings: TrainSettings | None = None, *, objective: str = "auto", teacher=None,
          eval_fn=None, progress: bool = True, checkpoint_dir=None, run_tag: dict | None = None,
          find_unused_parameters: bool = False) -> list[dict]:
    """Fine-tune the trainable parameters (the adapters after apply_plan) on `texts` (strings, or records: dicts
    of planner.train.data.RECORD_SHAPES, trained on their responses) for settings.steps optimizer steps of
    grad_accum micro-batches of batch_size sequences each (per rank; the global batch is
    batch_size × world size × grad_accum). settings: TrainSettings (default: its defaults).

    eval_fn(model) -> float is called before training, every `eval_every` steps and after the last step.
    Returns the history: one dict per logged step {step, loss, tokens_per_s, lr, [eval]}; step 0 holds the
    initial evaluation. A non-finite loss stops the run with a UserError before that step changes anything.
    checkpoint_dir + save_every=N: a checkpoint every N steps and after the last; resume=True continues from
    checkpoint_dir/checkpoint.pt when it exists (settings and `run_tag` must match the run that wrote it).
    Under torchrun the model must already be on this rank's device (setup_distributed() gives it)."""
    s = settings if settings is not None else TrainSettings()
    objective = resolve_objective(model, objective, teacher)
    s.check_checkpoint_folder(checkpoint_dir)
    params = trainable_parameters(model)
    if not params:
        raise UserError("the model has no trainable parameters; apply a plan with adapters (rank > 0) first")
    texts = list(texts)
    check_records_objective(texts, objective == "causal")
    texts = texts if is_records(texts) else [t for t in texts if t and t.strip()]
    if not texts:
        raise UserError("no training text was given; pass a non-empty list of strings")

    device = model_device(model)
    info, runner = join_data_parallel(model, device, find_unused_parameters)
    torch.manual_seed(s.seed + info.rank)  # dropout masks differ across ranks, as they would across samples
    data = Batches(objective, tokenizer, texts, s.batch_size, s.max_len, s.seed, info.rank, info.world, s.pack)
    if teacher is not None:
        teacher.eval()
    names = {id(p): n for n, p in model.named_parameters()}
    adapters = {names[id(p)]: p for p in params}
    identity = {"objective": objective, "world": info.world, "texts": len(texts),
                "adapters": [[n, list(p.shape)] for n, p in adapters.items()], **s.resume_key(), **(run_tag or {})}
    optimizer = make_optimizer(s, params)
    state = TrainState(adapters, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(s)), data, identity)
    ckpt = None if checkpoint_dir is None else Path(checkpoint_dir) / CHECKPOINT
    if s.resume and ckpt is not None:
        resume(state, ckpt, info, device)
    fwd = Forward(runner, objective, teacher, info, device, device.type == "cuda" if s.bf16 == "auto" else s.bf16)

    if s.gradient_checkpointing:
        _checkpointing(model, True)
    if eval_fn is not None and state.step == 0:
        state.history.append({"step": 0, "eval": float(eval_fn(model))})
    bar = None
    if progress and info.main:
        from tqdm.auto import tqdm

        bar = tqdm(total=s.steps, initial=state.step, desc=f"train ({objective})", unit="step", dynamic_ncols=True)
    model.train()
    try:
        for step in range(state.step + 1, s.steps + 1):
            start = time.perf_counter()
            loss, tokens = accumulate(fwd, data, s.grad_accum)
            if not math.isfinite(loss):  # before the optimizer step: no checkpoint or model gets this state
                raise UserError(f"the training loss became non-finite ({loss}) at step {step}; lower --lr (now "
                                f"{s.lr:g}) or add --warmup-steps, and train again")
            if s.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
            optimizer.step()
            state.scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            rate = tokens / max(time.perf_counter() - start, 1e-9)
            record = {"step": step, "loss": loss, "tokens_per_s": rate, "lr": state.scheduler.get_last_lr()[0]}
            if state.resumed_from is not None and step == state.resumed_from + 1:
                record["resumed_from"] = state.resumed_from
            if eval_fn is not None and ((s.eval_every and step % s.eval_every == 0) or step == s.steps):
                record["eval"] = float(eval_fn(model))
                model.train()
            if step % s.log_every == 0 or step == s.steps or "eval" in record or "resumed_from" in record:
                state.history.append(record)
            state.step = step
            if ckpt is not None and s.save_every and (step % s.save_every == 0 or step == s.steps):
                state.save(ckpt, info, device)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rate:.0f}")
    finally:
        if bar is not None:
            bar.close()
        if s.gradient_checkpointing:
            _checkpointing(model, False)
        model.eval()
    return state.history
