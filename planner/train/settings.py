"""The settings of one fine-tuning run (TrainSettings), frozen and validated once, where they are made."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import UserError
from ..plan.train_memory import ADAPTER_DTYPES, OPTIMIZERS
from .apply import INITS, METHODS

SCHEDULES = ("constant", "cosine")
# Settings the command line has no flag for are named as keyword arguments in messages, the others as their flag.
LIBRARY_ONLY = frozenset({"weight_decay", "max_grad_norm", "log_every", "bf16"})


def given(name: str, value) -> str:
    """How a message names setting `name` set to `value`: as its `lqplan train` flag (--lr nan), or as the keyword
    argument for library-only settings (weight_decay=nan)."""
    shown = value if isinstance(value, (int, float)) and not isinstance(value, bool) else repr(value)
    return f"{name}={shown}" if name in LIBRARY_ONLY else f"--{name.replace('_', '-')} {shown}"


def _whole(name: str, value, low: int, note: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{given(name, value)} must be a whole number >= {low}{note}")
    if value < low:
        raise UserError(f"{given(name, value)} must be >= {low}{note}")


def _finite(name: str, value, positive: bool, example: str) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or (value <= 0 if positive else value < 0):
        bound = "a finite positive number" if positive else "a finite number >= 0"
        raise UserError(f"{given(name, value)} must be {bound}, e.g. {example}")


def _choice(name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise UserError(f"{given(name, value)} is not supported; use one of {choices}")


@dataclass(frozen=True)
class TrainSettings:
    """What `lqplan train` / finetune() / train() do, as one value: the optimizer steps of grad_accum micro-batches
    of batch_size sequences (per rank) of <= max_len tokens, AdamW (lr, weight_decay) with optional clipping
    (max_grad_norm; None or 0 = off), an LR schedule with linear warm-up, evaluation (eval_every steps, on eval_texts
    held-out paragraphs), checkpoints (save_every steps; resume), the seed, pack (training records joined into
    max_len blocks instead of one padded sequence each; plain texts are always packed), and finetune's model
    set-up (init, method, dropout, save_model). Bad values raise UserError here, so a run fails before any work."""

    steps: int = 100
    batch_size: int = 8
    grad_accum: int = 1
    max_len: int = 128
    lr: float = 2e-4
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    schedule: str = "constant"
    warmup_steps: int = 0
    gradient_checkpointing: bool = False
    bf16: bool | str = "auto"  # "auto": bf16 autocast on CUDA, fp32 on CPU
    dropout: bool = True  # False: the model's dropout probabilities are set to 0 (finetune)
    eval_every: int = 0
    eval_texts: int = 64
    log_every: int = 1
    save_every: int = 0
    resume: bool = False
    seed: int = 0
    init: str = "loftq"
    method: str | None = None  # apply_plan's layer method; None = each plan entry's own
    save_model: bool = True
    adapter_dtype: str = "fp32"  # the adapters' dtype while training (the plan counts them at 16 bits either way)
    optimizer: str = "adamw"  # adamw | adamw8bit | paged_adamw8bit (bitsandbytes) | sgd
    reference: bool = True  # evaluate the full-precision model too (streamed, cached)
    pack: bool = False  # training records: packed into max_len blocks (planner.train.data.sft_examples)

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum", "eval_texts", "log_every"):
            _whole(name, getattr(self, name), 1)
        for name in ("save_every", "eval_every", "warmup_steps"):
            _whole(name, getattr(self, name), 0, " (0 = off)")
        _whole("max_len", self.max_len, 2, ", e.g. 128")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise UserError(f"{given('seed', self.seed)} must be a whole number, e.g. 0")
        _finite("lr", self.lr, True, "2e-4")
        _finite("weight_decay", self.weight_decay, False, "0.01")
        if self.max_grad_norm is not None:
            _finite("max_grad_norm", self.max_grad_norm, False, "1.0 (None = no clipping)")
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("init", self.init, INITS)
        _choice("method", self.method, (None, *METHODS))
        _choice("bf16", self.bf16, ("auto", True, False))
        _choice("pack", self.pack, (True, False))
        _choice("adapter_dtype", self.adapter_dtype, tuple(ADAPTER_DTYPES))
        _choice("optimizer", self.optimizer, OPTIMIZERS)

    def check_checkpoint_folder(self, folder) -> None:
        """save_every / resume write and read checkpoints in `folder`, so they need one."""
        if (self.save_every or self.resume) and folder is None:
            raise UserError("checkpoints (--save-every/--resume) need an output folder; pass out_dir=... (--out)")

    def resume_key(self) -> dict:
        """The settings a resumed run must share with the run that wrote the checkpoint (the optimizer, the data
        order and the LR curve depend on them)."""
        key = {name: getattr(self, name) for name in ("batch_size", "grad_accum", "max_len", "lr", "weight_decay",
                                                      "max_grad_norm", "warmup_steps", "schedule", "seed")}
        if (self.adapter_dtype, self.optimizer) != ("fp32", "adamw"):  # older checkpoints lack them: defaults
            key.update(adapter_dtype=self.adapter_dtype, optimizer=self.optimizer)
        if self.pack:  # the examples themselves differ (older checkpoints lack it: unpacked)
            key["pack"] = True
        if self.schedule == "cosine":
            key["steps"] = self.steps  # the schedule's shape depends on it; a constant-LR run may be extended
        return key
