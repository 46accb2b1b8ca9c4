"""TRL's SFTTrainer over lqplan's HF integration, on CPU, both ways a user passes the model: the lqplan-quantized
model (from_pretrained with LqplanConfig) with peft_config=lqplan_lora_config(model, plan), and a model already
wrapped by get_lqplan_peft_model. On prompt/completion records TRL's own dataset preparation labels the
completions only; at step 0 the trainer's model is the planned model (outputs and loss equal apply_plan's); two
steps move only the adapters, leave every packed base buffer bit-identical, and the adapter TRL saves reloads over
the saved base. Skipped when TRL is not installed (it is optional: pip install trl)."""

from __future__ import annotations

import math

import pytest

trl = pytest.importorskip("trl")  # first: without TRL the module is skipped before anything heavy is imported
datasets = pytest.importorskip("datasets")

import torch  # noqa: E402
from test_hf_data import tiny_llama, word_tokenizer  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from planner.hf import LqplanConfig  # noqa: E402
from planner.hf.data import IGNORE_INDEX  # noqa: E402
from planner.hf.peft import get_lqplan_peft_model, load_lqplan_adapter, lqplan_lora_config  # noqa: E402
from planner.profile.grid import GridPoint  # noqa: E402
from planner.train.apply import apply_plan, explicit_plan, quant_layers  # noqa: E402
from quant import QuantConfig  # noqa: E402
from quant.layers import BUFFER_PREFIX  # noqa: E402

POINTS = [GridPoint(QuantConfig(bits=4, blocksize=64), 8), GridPoint(QuantConfig(bits=3, blocksize=32), 4),
          GridPoint(QuantConfig(bits=2, blocksize=16), 4)]
RECORDS = [{"prompt": "what is two plus two", "completion": " sure thing"},
           {"prompt": "tell me a joke", "completion": " no"},
           {"prompt": "hi there", "completion": " hello friend"},
           {"prompt": "is the sky blue", "completion": " sure"}] * 2
BY_FIRST_WORD = {r["prompt"].split()[0]: r for r in RECORDS}  # each prompt starts with its own word


class RecordingSFTTrainer(trl.SFTTrainer):
    """SFTTrainer keeping each training batch and the loss TRL computed on it (its fused LM head's)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self.seen = getattr(self, "seen", []) + [({k: inputs[k].clone() for k in ("input_ids", "attention_mask",
                                                                                 "labels")}, loss.item())]
        return loss


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny Llama folder with the word tokenizer, a mixed 4/3/2-bit plan of every projection (LoftQ T=1) and
    apply_plan's model of it, the step-0 reference."""
    tok = word_tokenizer()
    folder = tmp_path_factory.mktemp("llama")
    tiny_llama(tok).save_pretrained(folder)
    tok.save_pretrained(folder)
    plan = explicit_plan(tiny_llama(tok), lambda i, n, s: POINTS[i % 3], model_path=folder, iters=1)
    ref = apply_plan(AutoModelForCausalLM.from_pretrained(folder), plan, device="cpu", progress=False).eval()
    ids = torch.randint(4, len(tok), (2, 12), generator=torch.Generator().manual_seed(1))
    return tok, folder, plan, ref, ids


def packed_buffers(model) -> dict[str, torch.Tensor]:
    """Module name + field -> a copy of every packed base buffer (PEFT's .base_layer left out of the names)."""
    return {f"{n}.{f}".replace(".base_layer", "").removeprefix("base_model.model."): t.clone()
            for n, layer in quant_layers(model).items() for f, t in layer.named_buffers()
            if f.startswith(BUFFER_PREFIX)}


@pytest.mark.parametrize("way", ["peft_config", "peft_model"])
def test_sft_trainer_trains_the_adapters_over_the_packed_base(setup, way, tmp_path):
    tok, folder, plan, ref, ids = setup
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=LqplanConfig(plan=plan), device_map="cpu")
    model.save_pretrained(tmp_path / "base")  # the packed base, before PEFT wraps its layers in place
    packed = packed_buffers(model)
    assert len(packed) >= 2 * len(plan.matrices)
    args = trl.SFTConfig(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=4,
                         learning_rate=1e-2, max_length=32, logging_steps=1, save_strategy="no", report_to=[],
                         use_cpu=True, disable_tqdm=True, seed=0,
                         bf16=False)  # fp32 for exact comparisons; gradient checkpointing on (SFTConfig default)
    if way == "peft_config":
        trainer = RecordingSFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(RECORDS),
                                      processing_class=tok, peft_config=lqplan_lora_config(model, plan))
    else:
        trainer = RecordingSFTTrainer(model=get_lqplan_peft_model(model, plan), args=args,
                                      train_dataset=datasets.Dataset.from_list(RECORDS), processing_class=tok)
    peft_model = trainer.model
    assert all(getattr(m, "lqplan_init", None) is None for m in peft_model.modules())  # the LoftQ factors are in the adapters

    # TRL's own formatting: every prompt token is -100, the completion and the EOS TRL appends are labelled
    assert len(trainer.train_dataset) == len(RECORDS)
    for example in trainer.train_dataset:
        record = BY_FIRST_WORD[example["prompt"].split()[0]]
        words = tok.convert_ids_to_tokens(example["input_ids"])
        labelled = [w for w, lab in zip(words, example["labels"]) if lab != IGNORE_INDEX]
        assert words == record["prompt"].split() + labelled
        assert labelled == record["completion"].split() + ["</s>"]
        assert all(lab in (i, IGNORE_INDEX) for i, lab in zip(example["input_ids"], example["labels"]))

    # step 0: the trainer's model is apply_plan's model (LoftQ-initialised adapters over the packed base)
    with torch.no_grad():
        want = ref(input_ids=ids).logits
        torch.testing.assert_close(peft_model.eval()(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)

    before = {k: v.clone() for k, v in peft_model.state_dict().items()}
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    lora = {k for k in before if ".lora_A." in k or ".lora_B." in k}
    assert len(lora) == 2 * len(plan.matrices) and trainable == lora

    result = trainer.train()
    assert result.global_step == 2 and len(trainer.seen) == 2

    # the first loss TRL computed (fused LM head, checkpointed, train mode) is the planned model's on that batch
    batch, loss = trainer.seen[0]
    with torch.no_grad():
        assert loss == pytest.approx(ref(**batch).loss.item(), rel=1e-5)
        every_token = ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)).loss
    assert not math.isclose(loss, every_token.item(), rel_tol=1e-3)  # the prompts did not count
    for row, labels in zip(batch["input_ids"], batch["labels"]):
        record = BY_FIRST_WORD[tok.convert_ids_to_tokens(row[:1])[0]]
        labelled = [w for w, lab in zip(tok.convert_ids_to_tokens(row), labels) if lab != IGNORE_INDEX]
        assert labelled == record["completion"].split() + ["</s>"]
    assert all(math.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)

    after = peft_model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == lora
    now = packed_buffers(peft_model)
    assert now.keys() == packed.keys() and all(torch.equal(now[k], packed[k]) for k in packed)

    # the adapter TRL saves is a standard PEFT adapter: over the saved packed base it gives the trained outputs
    trainer.save_model(str(tmp_path / "adapter"))
    peft_model.eval()
    with torch.no_grad():
        trained = peft_model(input_ids=ids).logits
    assert not torch.allclose(trained, want)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", device_map="cpu")
    reloaded = load_lqplan_adapter(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, trained)


def test_a_packed_output_head_fails_loudly_and_trains_kept_dense(setup, tmp_path):
    """TRL computes the loss from lm_head.weight itself (its fused LM head), not by calling the head. A packed
    head has no dense weight to give: the step fails (it used to train on a loss of 0, reading an empty weight).
    Kept in full precision with modules_to_not_convert, the same plan trains, the head frozen."""
    tok, folder, _, _, _ = setup
    names = [n for n, m in tiny_llama(tok).named_modules() if isinstance(m, torch.nn.Linear)]
    plan = explicit_plan(tiny_llama(tok), lambda i, n, s: GridPoint(QuantConfig(bits=4, blocksize=32),
                                                                    0 if n == "lm_head" else 4),
                         model_path=folder, names=names, iters=1)
    assert "lm_head" in {e.name for e in plan.matrices}
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                         max_length=32, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, bf16=False)
    for kept in ([], ["lm_head"]):
        model = AutoModelForCausalLM.from_pretrained(
            folder, quantization_config=LqplanConfig(plan=plan, modules_to_not_convert=kept), device_map="cpu")
        assert tuple(model.lm_head.weight.shape) == ((len(tok), 0) if not kept else (len(tok), 64))
        head = model.lm_head.weight.clone()
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(RECORDS),
                                 processing_class=tok, peft_config=lqplan_lora_config(model, plan))
        if not kept:
            with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
                trainer.train()
            continue
        result = trainer.train()
        assert result.global_step == 2 and math.isfinite(result.training_loss) and result.training_loss > 1
        assert torch.equal(model.lm_head.weight, head)
