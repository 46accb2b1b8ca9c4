"""Hugging Face Trainer support: a Trainer subclass whose loss distills the full-precision teacher."""

from __future__ import annotations

import functools

import torch

from ..errors import UserError
from .losses import distill_loss


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
