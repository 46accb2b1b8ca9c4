"""Fine-tune the LoRA adapters of a quantized model on real text.

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
import functools
import logging
import math
import random
import resource
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .apply import trainable_parameters
from .devices import resolve_device
from .distributed import RankInfo, all_sum, init, rank_info
from .errors import UserError
from .evaluate import mean_pool, model_device
from .fsio import read_paragraphs

log = logging.getLogger("lqplan")

OBJECTIVES = ("auto", "causal", "distill")
CHECKPOINT = "checkpoint.pt"
CHECKPOINT_SCHEMA = "lqplan.train-checkpoint/1"


# ---- losses ---------------------------------------------------------------------------------------------------
def distill_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, attention_mask: torch.Tensor,
                 tokens: float | None = None, rows: float | None = None) -> torch.Tensor:
    """MSE of token states over non-padding tokens + (1 − cos) of mean-pooled embeddings, averaged over the batch.

    `tokens` / `rows` are the normalisers (default: this batch's non-padding tokens and rows). A data-parallel
    rank holding a slice of a larger batch passes that batch's counts divided by the world size, so that DDP's
    average of the ranks' gradients equals the gradient of the whole batch's loss."""
    s, t = student_hidden.float(), teacher_hidden.float()
    mask = attention_mask.unsqueeze(-1).to(s.dtype)
    tokens = mask.sum() if tokens is None else torch.as_tensor(tokens, dtype=s.dtype, device=s.device)
    rows = s.shape[0] if rows is None else rows
    mse = ((s - t) ** 2 * mask).sum() / (tokens * s.shape[-1]).clamp_min(1)
    cos = F.cosine_similarity(mean_pool(s, attention_mask), mean_pool(t, attention_mask), dim=-1)
    return mse + (1 - cos).sum() / rows


def distill_step_loss(student, teacher, batch: dict, tokens: float | None = None,
                      rows: float | None = None) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.no_grad():
        target = teacher(**inputs).last_hidden_state
    return distill_loss(student(**inputs).last_hidden_state, target, inputs["attention_mask"], tokens, rows)


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


def read_text_file(path) -> list[str]:
    """Paragraphs (split on blank lines) of a UTF-8 plain-text training file."""
    return read_paragraphs(Path(path), "training text file", "pass a UTF-8 text file or leave --text out (built-in "
                           "pydoc text)")


class _Batches:
    """Endless, seeded stream of global micro-batches (a reshuffle after each pass over the data); rank r of a
    world of w keeps rows [r·batch_size, (r+1)·batch_size) of each. Its position is part of a checkpoint."""

    def __init__(self, objective, tokenizer, texts, batch_size, max_len, seed, rank=0, world=1):
        self.objective, self.tokenizer, self.batch_size, self.max_len = objective, tokenizer, batch_size, max_len
        self.rank, self.world = rank, world
        self.rng = random.Random(seed)
        self.items = causal_blocks(tokenizer, texts, max_len) if objective == "causal" else list(texts)
        self.order, self.pos = [], 0

    def _indices(self, count):
        out = []
        while len(out) < count:
            if self.pos >= len(self.order):
                self.order = list(range(len(self.items)))
                self.rng.shuffle(self.order)
                self.pos = 0
            out.append(self.order[self.pos])
            self.pos += 1
        return out

    def next(self, device) -> tuple[dict, int, int]:
        """(this rank's batch, non-padding tokens of the global micro-batch, its rows)."""
        idx = self._indices(self.batch_size * self.world)
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        if self.objective == "causal":
            ids = self.items[idx[mine]]
            return ({"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)},
                    len(idx) * self.max_len, len(idx))
        # Every rank tokenizes the whole global micro-batch: the same padding as a 1-process run, and its counts.
        enc = self.tokenizer([self.items[i] for i in idx], padding=True, truncation=True, max_length=self.max_len,
                             return_tensors="pt")
        tokens = int(enc["attention_mask"].sum())
        return {k: v[mine].to(device) for k, v in enc.items()}, tokens, len(idx)

    def state(self) -> dict:
        version, internal, gauss = self.rng.getstate()
        return {"rng": [version, list(internal), gauss], "order": list(self.order), "pos": self.pos}

    def load_state(self, state: dict) -> None:
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.order, self.pos = list(state["order"]), int(state["pos"])


# ---- distributed ----------------------------------------------------------------------------------------------
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


# ---- checkpoints ----------------------------------------------------------------------------------------------
def _rng_state(device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device) -> None:
    torch.set_rng_state(state["cpu"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def load_checkpoint(path, device="cpu") -> dict | None:
    """The checkpoint at `path` (a dict), or None when there is none."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same answer
        raise UserError(f"checkpoint {path} cannot be read ({type(e).__name__}); delete it to start over") from None
    if not isinstance(state, dict) or state.get("schema") != CHECKPOINT_SCHEMA:
        raise UserError(f"{path} is not an lqplan training checkpoint ({CHECKPOINT_SCHEMA}); delete it or use "
                        "another output folder")
    return state


def _check_settings(saved: dict, now: dict, path) -> None:
    diff = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    if diff:
        k = diff[0]
        raise UserError(f"checkpoint {path} was written with {k}={saved.get(k)!r}, this run has {k}={now.get(k)!r}; "
                        "resume with the same settings, or drop --resume / use another output folder")


def _clean_stale_temps(folder: Path) -> None:
    """Temp files of checkpoint writes killed before their rename (never a complete checkpoint) are removed."""
    for tmp in folder.glob(f".{CHECKPOINT}.*.tmp"):
        tmp.unlink(missing_ok=True)


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
    data = _Batches(objective, tokenizer, texts, batch_size, max_len, seed, dist_info.rank, dist_info.world)
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
            _check_settings(state["settings"], settings, ckpt_path)
            with torch.no_grad():
                for p in params:
                    p.copy_(state["adapters"][names[id(p)]])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            data.load_state(state["data"])
            _set_rng_state(state["rng"][dist_info.rank], device)
            history = list(state["history"])
            start_step = int(state["step"]) + 1
            log.info("resumed from %s at step %d", ckpt_path, start_step - 1)
        if dist_info.main:
            _clean_stale_temps(ckpt_path.parent)

    def save_checkpoint(step: int) -> None:
        rng = [_rng_state(device)]
        if dist_info.active:
            import torch.distributed as dist

            rng = [None] * dist_info.world
            dist.all_gather_object(rng, _rng_state(device))
        if not dist_info.main:
            return
        from .fsio import atomic_path

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


# ---- command helper -------------------------------------------------------------------------------------------
def _no_dropout_config(config):
    """The model's config with every dropout probability set to 0 (deterministic training, e.g. for comparing
    loss curves across runs or process counts)."""
    for key, value in config.to_dict().items():
        if "dropout" in key and isinstance(value, float):
            setattr(config, key, 0.0)
    return config


def peak_memory(device) -> dict:
    """Peak memory so far: the CUDA allocator's peak on GPU, else the process's peak resident set size."""
    if device.type == "cuda":
        return {"peak_memory_bytes": int(torch.cuda.max_memory_allocated(device)), "peak_memory_kind": "cuda_allocated"}
    return {"peak_memory_bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024,
            "peak_memory_kind": "process_rss"}


def finetune(plan, model=None, out_dir=None, *, init: str = "loftq", steps: int = 100, batch_size: int = 8,
             max_len: int = 128, lr: float = 2e-4, grad_accum: int = 1, gradient_checkpointing: bool = False,
             device=None, eval_every: int = 0, eval_texts: int = 64, texts=None, tokenizer=None,
             progress: bool = True, save_every: int = 0, resume: bool = False, seed: int = 0,
             schedule: str = "constant", warmup_steps: int = 0, dropout: bool = True, save_model: bool = True,
             method: str | None = None) -> dict:
    """What `lqplan train` does: load the model folder (default: the plan's model.source), apply the plan,
    fine-tune the adapters on the real-text train split (or `texts`), evaluate on held-out text before and after
    and the full-precision model (perplexity for causal LMs, embedding cosine to the full-precision model for
    encoders), and, with `out_dir`, write train_report.json + train_report.md and save the quantized model
    (save_quantized) to out_dir/quantized. save_every / resume: checkpoints in out_dir (see train()).
    dropout=False zeroes the model's dropout probabilities. method: apply_plan's layer method ("lora" |
    "qalora"; None = each plan entry's own). Under torchrun it trains data-parallel and only
    rank 0 writes. `tokenizer`: default, the folder's own. Returns the report (a dict, with the history)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    from .apply import INITS, apply_plan, quantized_bytes
    from .evaluate import embedding_cosine, perplexity, real_text_splits
    from .plan import Plan

    if init not in INITS:
        raise UserError(f"init={init!r} is not supported; use one of {INITS}")
    if eval_texts < 1:
        raise UserError(f"eval_texts={eval_texts} must be >= 1")
    if (save_every or resume) and out_dir is None:
        raise UserError("checkpoints (save_every/resume) need an output folder; pass out_dir=... (--out)")
    plan = plan if isinstance(plan, Plan) else Plan.load(plan)
    folder = model or plan.model.get("source")
    if not folder or not (Path(folder) / "config.json").is_file():
        raise UserError(f"model folder {folder!r} not found; pass model=<the Hugging Face folder the plan was "
                        "made for> (--model)")
    from .models import fingerprint

    plan.check_model(fingerprint(folder))  # before anything is loaded or written
    import torch.distributed as dist

    joined_here = dist.is_available() and not dist.is_initialized()
    dist_info, dev = setup_distributed(device)
    config = AutoConfig.from_pretrained(folder)
    if not dropout:
        config = _no_dropout_config(config)
    causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in (config.architectures or []))
    loader = AutoModelForCausalLM if causal else AutoModel
    if tokenizer is None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot load a tokenizer from {folder} ({type(e).__name__}); pass tokenizer=...") from None
    splits = real_text_splits()
    held = splits["heldout"][:eval_texts]
    train_texts = texts if texts is not None else splits["train"]
    teacher = None
    if causal:
        metric = "perplexity"
        evaluate = lambda m: perplexity(m, tokenizer, held, max_len=max_len, stride=max(1, max_len // 2),  # noqa: E731
                                        shard=True)
        fp_model = loader.from_pretrained(folder, dtype=torch.float32).to(dev)
        fp_metric = evaluate(fp_model)
        del fp_model
    else:
        metric = "embedding_cosine"
        teacher = AutoModel.from_pretrained(folder, dtype=torch.float32).to(dev).eval()
        evaluate = lambda m: embedding_cosine(m, teacher, tokenizer, held, max_len=max_len, shard=True)  # noqa: E731
        fp_metric = 1.0  # the full-precision model is the reference itself
    student = loader.from_pretrained(folder, config=config, dtype=torch.float32)
    torch.manual_seed(seed)  # zero-init (QLoRA) adapters draw lora_A at random: the same on every rank and rerun
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t = time.perf_counter()
    extra = {} if method is None else {"method": method}  # None: apply_plan follows each plan entry's method
    apply_plan(student, plan, model_path=folder, device=dev, init=init, progress=progress and dist_info.main, **extra)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    quantize_seconds = time.perf_counter() - t
    out = None if out_dir is None else Path(out_dir)
    t = time.perf_counter()
    history = train(student, tokenizer, train_texts, objective="causal" if causal else "distill", teacher=teacher,
                    steps=steps, batch_size=batch_size, max_len=max_len, lr=lr, grad_accum=grad_accum,
                    gradient_checkpointing=gradient_checkpointing, eval_fn=evaluate, eval_every=eval_every,
                    progress=progress, seed=seed, schedule=schedule, warmup_steps=warmup_steps,
                    checkpoint_dir=out, save_every=save_every, resume=resume,
                    run_tag={"plan_fingerprint": plan.fingerprint, "plan_bytes": plan.totals.get("bytes"),
                             "init": init, "method": method, "dropout": dropout})
    train_seconds = time.perf_counter() - t
    evals = [h["eval"] for h in history if "eval" in h]
    rates = [h["tokens_per_s"] for h in history if "tokens_per_s" in h]
    steady = rates[min(3, len(rates) - 1):] if rates else []  # the first steps include warm-up
    held_bytes = quantized_bytes(student)
    result = {"schema": "lqplan.train-report/1", "model": str(folder), "architecture": type(student).__name__,
              "device": str(dev), "world_size": dist_info.world, "init": init, "method": method, "metric": metric,
              "full_precision": fp_metric, "before": evals[0], "after": evals[-1], "steps": steps,
              "batch_size": batch_size, "grad_accum": grad_accum,
              "global_batch": batch_size * dist_info.world * grad_accum, "max_len": max_len, "lr": lr,
              "resumed_from": next((h["resumed_from"] for h in history if "resumed_from" in h), None),
              "quantize_seconds": round(quantize_seconds, 3), "train_seconds": round(train_seconds, 3),
              "tokens_per_s": statistics.median(steady) if steady else None, **peak_memory(dev),
              "quantized_bytes": held_bytes, "plan_bytes": plan.totals.get("bytes"),
              "bytes_match_plan": held_bytes == plan.totals.get("bytes"), "history": history}
    if out is not None and dist_info.main:
        if save_model:
            from .export import save_quantized

            try:
                result["saved"] = str(save_quantized(student, plan, out / "quantized"))
            except UserError as e:  # e.g. a model without a Hugging Face config: report it, keep the results
                result["saved"] = None
                result["not_saved"] = str(e)
        write_report(result, out)
    if dist_info.active and joined_here:
        dist.barrier()  # every rank leaves after rank 0 has written
        dist.destroy_process_group()
    return result


def _fmt_bytes(n) -> str:
    return "-" if n is None else f"{n / 2**20:.1f} MiB"


def write_report(result: dict, out_dir) -> dict:
    """train_report.json (everything, history included) and train_report.md (the summary table) in `out_dir`."""
    from .fsio import write_json, write_text

    out = Path(out_dir)
    r = result
    fmt = (lambda v: "-" if v is None else f"{v:.4f}")  # noqa: E731
    losses = [h["loss"] for h in r["history"] if "loss" in h]
    rate = "-" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:.0f}"
    lines = [
        f"# Fine-tuning report ({r['init']}, {r['architecture']})", "",
        f"Model `{r['model']}` on {r['device']} x {r['world_size']} process(es); {r['steps']} steps, global batch "
        f"{r['global_batch']} sequences of <= {r['max_len']} tokens (batch {r['batch_size']} x "
        f"{r['world_size']} ranks x {r['grad_accum']} accumulation), lr {r['lr']:g}.",
        "", f"| metric ({r['metric']}) | value |", "|---|---|",
        f"| full-precision model | {fmt(r['full_precision'])} |",
        f"| quantized, before fine-tuning | {fmt(r['before'])} |",
        f"| quantized, after fine-tuning | {fmt(r['after'])} |",
        "", "| figure | value |", "|---|---|",
        f"| training loss first -> last step | {fmt(losses[0] if losses else None)} -> "
        f"{fmt(losses[-1] if losses else None)} |",
        f"| quantization time | {r['quantize_seconds']:.2f} s |",
        f"| training time (this process) | {r['train_seconds']:.2f} s |",
        f"| tokens/s (median after warm-up) | {rate} |",
        f"| peak memory ({r['peak_memory_kind']}) | {_fmt_bytes(r['peak_memory_bytes'])} |",
        f"| quantized bytes held / plan | {r['quantized_bytes']:,} / {r['plan_bytes']:,} "
        f"({'equal' if r['bytes_match_plan'] else 'DIFFERENT'}) |",
    ]
    if r.get("resumed_from") is not None:
        lines.append(f"| resumed from checkpoint at step | {r['resumed_from']} |")
    if r.get("saved"):
        lines += ["", f"Quantized model saved to `{r['saved']}` (reload: planner.export.load_quantized)."]
    elif r.get("not_saved"):
        lines += ["", f"Quantized model not saved: {r['not_saved']}"]
    write_json(out / "train_report.json", r)
    write_text(out / "train_report.md", "\n".join(lines) + "\n")
    return {"json": str(out / "train_report.json"), "md": str(out / "train_report.md")}


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
