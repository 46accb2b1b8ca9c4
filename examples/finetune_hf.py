"""Fine-tune a model quantized by an lqplan plan with transformers' Trainer, LoRA adapters through PEFT.

    python examples/finetune_hf.py --model path/to/hf-folder --plan lqplan-out/plan.json --data chat.jsonl

--data: a .jsonl / .json file of records ({"messages": [...]}, {"prompt", "completion"}, {"instruction", "output"}
or {"text"}) or a .txt file; the loss is on the assistant responses only (planner.hf.data). Prints the peak GPU
memory (from process start) and the host's peak RSS, and saves the adapter to --out/adapter.
"""

import argparse
import resource
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

from planner.hf import LqplanConfig
from planner.hf.data import collator, sft_dataset
from planner.hf.peft import get_lqplan_peft_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="the Hugging Face folder the plan was made for")
    p.add_argument("--plan", required=True, help="plan.json written by `lqplan plan`")
    p.add_argument("--data", required=True, help="training records: .jsonl / .json / .txt")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    p.add_argument("--out", default="lqplan-hf-out")
    args = p.parse_args()
    cuda = torch.cuda.is_available()

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    # Each planned linear is quantized as it loads (the fp matrix never stays), keeping its LoftQ factors.
    model = AutoModelForCausalLM.from_pretrained(args.model, quantization_config=LqplanConfig(plan=args.plan),
                                                 dtype=torch.bfloat16 if cuda else torch.float32)
    model = get_lqplan_peft_model(model)  # LoRA adapters that start from those factors
    model.print_trainable_parameters()

    train_data = sft_dataset(tokenizer, args.data, args.max_len)
    training = TrainingArguments(output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                                 learning_rate=args.lr, lr_scheduler_type="constant", logging_steps=10,
                                 save_strategy="no", report_to="none", bf16=cuda, use_cpu=not cuda,
                                 gradient_checkpointing=args.gradient_checkpointing,
                                 gradient_checkpointing_kwargs={"use_reentrant": False})
    trainer = Trainer(model=model, args=training, train_dataset=train_data, data_collator=collator(tokenizer))
    result = trainer.train()
    model.save_pretrained(Path(args.out) / "adapter")  # the adapter only; the base is the plan applied again

    mib = 2**20
    print(f"trained {result.global_step} steps, mean loss {result.training_loss:.4f}; adapter: {args.out}/adapter")
    if cuda:  # peaks from process start: never reset, so loading and quantizing count too
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / mib:.0f} MiB allocated, "
              f"{torch.cuda.max_memory_reserved() / mib:.0f} MiB reserved")
    print(f"peak host memory (max RSS): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
