"""The training loop: fine-tune the LoRA adapters of a quantized model on real text.

Objectives:
  causal  — next-token cross-entropy on contiguous blocks of `max_len` tokens (causal LMs).
  distill — for encoders without a head (the embedded all-MiniLM-L6-v2): match the full-precision teacher.
            loss = MSE between student and teacher last hidden states over non-padding tokens
                   + (1 − cosine) between their mean-pooled sentence embeddings.
AdamW over the trainable (adapter) parameters only, gradient accumulation, optional gradient checkpointing,
bf16 autocast on GPU, a tqdm bar with loss and tokens/s, and a periodic evaluation callback.

Crash safety: with `checkpoint_dir` and `save_every`, the adapters, optimizer, LR scheduler, step, data position,
history and RNG states are written atomically (temp + rename) to checkpoint_dir/checkpoint.pt; `resume=True`
continues from it, so the loss trajectory continues exactly (on CPU, bit for bit).

Data parallel: under torchrun (WORLD_SIZE > 1) the model is wrapped in DistributedDataParallel (gloo on CPU,
NCCL on CUDA). Every rank draws the same global micro-batch of batch_size × world sequences and keeps its own
slice; losses are normalised by the global micro-batch, so the gradients (and the loss curve) equal a 1-process
run with batch_size × world. Only rank 0 writes files and shows progress.

The same losses work inside a Hugging Face Trainer: causal LMs need nothing special (labels = input_ids), and
`DistillationTrainer` (a Trainer with compute_loss overridden; created lazily to keep imports light) distills.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path

import torch

from ..devices import resolve_device
from ..dist import RankInfo, all_sum, init, rank_info
from ..errors import UserError
from ..fsio import atomic_path
from .apply import trainable_parameters
from .checkpoint import (
    CHECKPOINT,
    CHECKPOINT_SCHEMA,
    check_resume_settings,
    clean_stale_temps,
    load_checkpoint,
    rng_state,
    set_rng_state,
)
from .data import Batches, detect_objective
from .evaluate import model_device
from .losses import causal_step_loss, distill_step_loss

log = logging.getLogger("lqplan")
OBJECTIVES = ("auto", "causal", "distill")


def setup_distributed(device=None) -> tuple[RankInfo, torch.device]:
    """Under torchrun (WORLD_SIZE > 1) or in an already joined process group: join it through planner.distributed.init
    (NCCL on CUDA, gloo on CPU) and return this rank's place and device (cuda:LOCAL_RANK on GPUs). Otherwise:
    (RankInfo(), the device)."""
    import torch.distributed as dist

    info = rank_info()  # a malformed WORLD_SIZE/LOCAL_RANK is a one-line error
    if not info.active and not (dist.is_available() and dist.is_initialized()):
        return RankInfo(), resolve_device(device)
    if not dist.is_available():
        raise UserError("WORLD_SIZE > 1 but this torch has no torch.distributed; run without torchrun")
    ctx = init("auto" if device is None else str(device), info)
    return ctx.info, torch.device(ctx.device)


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
          log_every: int = 1, seed: int = 0, progress: bool = True, checkpoint_dir=None, save_every: int = 0,
          resume: bool = False, run_tag: dict | None = None, find_unused_parameters: bool = False) -> list[dict]:
    """Fine-tune the trainable parameters (the adapters after apply_plan) for `steps` optimizer steps of
    `grad_accum` micro-batches of `batch_size` sequences each (per rank; the global batch is
    batch_size × world size × grad_accum).

    eval_fn(model) -> float is called before training, every `eval_every` steps and after the last step.
    Returns the history: one dict per logged step {step, loss, tokens_per_s, lr, [eval]}; step 0 holds the
    initial evaluation. bf16="auto": autocast to bf16 on CUDA, fp32 on CPU.
    checkpoint_dir + save_every=N: a checkpoint every N steps and after the last; resume=True continues from
    checkpoint_dir/checkpoint.pt when it exists (settings and `run_tag` must match the run that wrote it).
    Under torchrun the model must already be on this rank's device (setup_distributed() gives it)."""
    if objective not in OBJECTIVES:
        raise UserError(f"objective={objective!r} is not supported; use one of {OBJECTIVES}")
    if objective == "auto":
        objective = detect_objective(model)
    if objective == "distill" and teacher is None:
        raise UserError("objective 'distill' needs the full-precision teacher model; pass teacher=<model>")
    if steps < 1 or batch_size < 1 or grad_accum < 1 or max_len < 2:
        raise UserError("steps, batch_size and grad_accum must be >= 1 and max_len >= 2")
    if save_every < 0 or eval_every < 0:
        raise UserError("save_every and eval_every must be >= 0 (0 = never)")
    if (save_every or resume) and checkpoint_dir is None:
        raise UserError("save_every/resume need a checkpoint folder; pass checkpoint_dir=... (the CLI: --out)")
    if schedule not in ("constant", "cosine"):
        raise UserError(f"schedule={schedule!r} is not supported; use 'constant' or 'cosine'")
    params = trainable_parameters(model)
    if not params:
        raise UserError("the model has no trainable parameters; apply a plan with adapters (rank > 0) first")
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise UserError("no training text was given; pass a non-empty list of strings")

    device = model_device(model)
    dist_info, rank_device = setup_distributed(device)
    if dist_info.active and rank_device != device:
        raise UserError(f"the model is on {device} but this rank's device is {rank_device} (LOCAL_RANK); move it "
                        "there first: dist_info, device = planner.train.setup_distributed(); model.to(device)")
    use_bf16 = (device.type == "cuda") if bf16 == "auto" else bool(bf16)
    torch.manual_seed(seed + dist_info.rank)  # dropout masks differ across ranks, as they would across samples
    data = Batches(objective, tokenizer, texts, batch_size, max_len, seed, dist_info.rank, dist_info.world)
    if teacher is not None:
        teacher.eval()
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

    def factor(step):
        warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
        if schedule == "cosine":
            return warm * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))
        return warm

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    names = {id(p): n for n, p in model.named_parameters()}
    settings = {"objective": objective, "batch_size": batch_size, "world": dist_info.world, "grad_accum": grad_accum,
                "max_len": max_len, "lr": lr, "weight_decay": weight_decay, "max_grad_norm": max_grad_norm,
                "warmup_steps": warmup_steps, "schedule": schedule, "seed": seed, "texts": len(texts),
                "adapters": [[names[id(p)], list(p.shape)] for p in params], **(run_tag or {})}
    if schedule == "cosine":
        settings["steps"] = steps  # the schedule's shape depends on it; a constant-LR run may be extended

    history: list[dict] = []
    start_step = 1
    ckpt_path = None if checkpoint_dir is None else Path(checkpoint_dir) / CHECKPOINT
    if resume and ckpt_path is not None:
        state = load_checkpoint(ckpt_path, device)
        if state is None:
            log.info("no checkpoint at %s: starting from step 1", ckpt_path)
        else:
            check_resume_settings(state["settings"], settings, ckpt_path)
            with torch.no_grad():
                for p in params:
                    p.copy_(state["adapters"][names[id(p)]])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            data.load_state(state["data"])
            set_rng_state(state["rng"][dist_info.rank], device)
            history = list(state["history"])
            start_step = int(state["step"]) + 1
            log.info("resumed from %s at step %d", ckpt_path, start_step - 1)
        if dist_info.main:
            clean_stale_temps(ckpt_path.parent)

    def save_checkpoint(step: int) -> None:
        rng = [rng_state(device)]
        if dist_info.active:
            import torch.distributed as dist

            rng = [None] * dist_info.world
            dist.all_gather_object(rng, rng_state(device))
        if not dist_info.main:
            return

        state = {"schema": CHECKPOINT_SCHEMA, "step": step, "settings": settings,
                 "adapters": {names[id(p)]: p.detach() for p in params}, "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "data": data.state(), "rng": rng, "history": history}
        with atomic_path(ckpt_path) as tmp:
            try:
                torch.save(state, tmp)
            except RuntimeError as e:  # torch reports a full disk as a RuntimeError from its zip writer
                raise OSError(f"writing checkpoint {ckpt_path} failed: {e}") from None

    runner = model
    if dist_info.active:
        import inspect

        from torch.nn.parallel import DistributedDataParallel

        # No buffer sync on every forward: the frozen packed codes are identical on every rank and never change
        # (torch >= 2.13 spells the option forward_sync_buffers, older versions broadcast_buffers).
        new_name = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
        runner = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                         find_unused_parameters=find_unused_parameters,
                                         **{"forward_sync_buffers" if new_name else "broadcast_buffers": False})
    if gradient_checkpointing:
        _checkpointing(model, True)

    if eval_fn is not None and start_step == 1:
        history.append({"step": 0, "eval": float(eval_fn(model))})
    bar = None
    if progress and dist_info.main:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=start_step - 1, desc=f"train ({objective})", unit="step",
                   dynamic_ncols=True)
    model.train()
    try:
        for step in range(start_step, steps + 1):
            start = time.perf_counter()
            total_loss, tokens = 0.0, 0
            for micro in range(grad_accum):
                batch, global_tokens, global_rows = data.next(device)
                tokens += int(batch["attention_mask"].sum())
                # no_sync: gradients are all-reduced once per optimizer step, on the last micro-batch.
                sync = (runner.no_sync() if dist_info.active and micro < grad_accum - 1 else contextlib.nullcontext())
                with sync, torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                    if objective == "causal":
                        loss = causal_step_loss(runner, batch)
                    else:
                        norm = dist_info.world
                        loss = distill_step_loss(runner, teacher, batch, global_tokens / norm, global_rows / norm)
                    (loss / grad_accum).backward()
                total_loss += float(loss.detach()) / grad_accum
            if max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if dist_info.active:
                total_loss, tokens = all_sum([total_loss, tokens], device)
                total_loss, tokens = total_loss / dist_info.world, int(tokens)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            rate = tokens / max(time.perf_counter() - start, 1e-9)
            record = {"step": step, "loss": total_loss, "tokens_per_s": rate, "lr": scheduler.get_last_lr()[0]}
            if step == start_step > 1:
                record["resumed_from"] = start_step - 1
            if eval_fn is not None and ((eval_every and step % eval_every == 0) or step == steps):
                record["eval"] = float(eval_fn(model))
                model.train()
            if step % log_every == 0 or step == steps or "eval" in record or "resumed_from" in record:
                history.append(record)
            if ckpt_path is not None and save_every and (step % save_every == 0 or step == steps):
                save_checkpoint(step)
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
