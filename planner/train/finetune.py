"""What `lqplan train` does: build the quantized student from the shards, fine-tune, evaluate against the streamed
full-precision reference, report memory peaks beside the memory model's prediction, save."""

from __future__ import annotations

import math
import resource
import statistics
import time
from pathlib import Path

import torch

from ..corpus import real_text_splits
from ..profile.cache import DEFAULT_CACHE
from ..devices import dequant_backend_from_env, resolve_device
from ..errors import UserError
from ..fsio import user_path, write_json, write_text
from ..outputs import output_folder
from ..model.discover import discover_matrices, is_causal_lm
from ..model.hfload import auto_config, check_tokenizer_fits, check_window, pretrained
from ..model.resolve import resolve_model
from ..model.tokenizer import load_tokenizer, tokenizer_digest
from ..model.weights import FLOAT_CODES
from ..plan.document import Plan
from ..profile.objective import plan_weights
from ..plan.train_memory import ReferenceWeights, TrainShape, predict
from .apply import LayerRecipe, quantized_bytes
from .build import build_student
from .data import check_records_objective
from .evaluate import embedding_cosine, perplexity
from .export import save_quantized
from .loop import train
from .parallel import setup_distributed
from .reference import cached_reference_perplexity, reference_perplexity
from .settings import TrainSettings

ADAPTER_TORCH = {"fp32": torch.float32, "bf16": torch.bfloat16}
TRAIN_OUTPUTS = ("train_report.json", "train_report.md", "quantized")


def _no_dropout_config(config):
    """The model's config with every dropout probability set to 0 (deterministic training, e.g. for comparing
    loss curves across runs or process counts)."""
    for key, value in config.to_dict().items():
        if "dropout" in key and isinstance(value, float):
            setattr(config, key, 0.0)
    return config


def peak_memory(device) -> dict:
    """Peaks from process start (never reset, so no spike is hidden): the CUDA allocator's allocated and reserved
    bytes on a GPU, and the host's max resident set size. peak_memory_bytes is the GPU's allocated peak on a GPU,
    else the host RSS peak."""
    rss = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    if device.type == "cuda":
        return {"peak_memory_bytes": int(torch.cuda.max_memory_allocated(device)), "peak_memory_kind": "cuda_allocated",
                "peak_reserved_bytes": int(torch.cuda.max_memory_reserved(device)), "host_max_rss_bytes": rss}
    return {"peak_memory_bytes": rss, "peak_memory_kind": "process_rss", "host_max_rss_bytes": rss}


def training_dtype(device, s: TrainSettings) -> torch.dtype:
    """What the unplanned tensors (embeddings, norms, head) are held in: bf16 under bf16 autocast, else fp32."""
    bf16 = device.type == "cuda" if s.bf16 == "auto" else bool(s.bf16)
    return torch.bfloat16 if bf16 else torch.float32


def predicted_memory(source, plan: Plan, s: TrainSettings, dtype: torch.dtype, reference: bool) -> dict | None:
    """The training-memory model's prediction for this run, every phase it runs included (`reference`: the
    full-precision reference pass runs); decoders only, None where the model has no decoder sizes."""
    planned = {e.name for e in plan.matrices}
    infos = {m.tensor_key for m in discover_matrices(source, include_head=True) if m.name in planned}
    unplanned = sum(math.prod(e.shape) * dtype.itemsize if e.dtype in FLOAT_CODES else e.nbytes
                    for k, e in source.tensors.items() if k not in infos)
    shape = TrainShape(s.batch_size, s.max_len, s.gradient_checkpointing, s.optimizer, s.adapter_dtype)
    try:
        return predict(source.config, plan.matrices, unplanned, shape,
                       zero_init=s.init == "qlora" or not plan.method.get("iters", 5),
                       reference=ReferenceWeights.of(source.tensors) if reference else None)
    except UserError:
        return None


def finetune(plan, settings: TrainSettings | None = None, *, model=None, out_dir=None, texts=None, tokenizer=None,
             device=None, progress: bool = True, cache_dir=None, heldout=None) -> dict:
    """What `lqplan train` does: build the quantized student straight from the model folder's shards (default folder:
    the plan's model.source; planner.train.build: never the full-precision model in memory), fine-tune the adapters
    on the real-text train split (or `texts`: strings, or records trained on their responses), evaluate on
    settings.eval_texts held-out paragraphs before and after and the full-precision model (perplexity for causal
    LMs, streamed layer by layer and cached in `cache_dir`; embedding cosine to the full-precision teacher for
    encoders), and, with `out_dir`, write train_report.json + train_report.md and, with settings.save_model, the
    quantized model (save_quantized) to out_dir/quantized. Memory peaks are from process start: after building the
    student and at the end, next to the training-memory model's prediction. Under torchrun it trains data-parallel
    and only rank 0 writes. `tokenizer`: default, the folder's own. `heldout` (--eval-text): evaluation paragraphs
    instead of the built-in held-out ones (all of them; settings.eval_texts caps the built-in ones only). Returns
    the report (a dict, with the history)."""
    from transformers import AutoModel

    s = settings if settings is not None else TrainSettings()
    s.check_checkpoint_folder(out_dir)  # before anything is loaded
    plan = plan if isinstance(plan, Plan) else Plan.load(plan)
    folder = model or plan.model.get("source")
    if not folder or not (user_path(folder, "--model") / "config.json").is_file():
        raise UserError(f"model folder {folder!r} not found; pass model=<the Hugging Face folder the plan was "
                        "made for> (--model)")
    source = resolve_model(folder)
    plan.check_model(source.fingerprint)  # before anything is loaded or written
    weights = None
    if s.init == "loftq":  # a Fisher or output-aware plan's adapters start at its weighted decomposition
        weights = plan_weights(plan, source, Path(cache_dir or DEFAULT_CACHE), resolve_device(device), progress)
    recipe = LayerRecipe.of(plan, s.init, s.method, fisher=weights)
    import torch.distributed as dist

    joined_here = dist.is_available() and not dist.is_initialized()
    dist_info, dev = setup_distributed(device)
    config = auto_config(folder)
    check_window(s.max_len, config)
    if not s.dropout:
        config = _no_dropout_config(config)
    causal = is_causal_lm(config)
    check_records_objective(texts or [], causal)  # before the student is built
    if tokenizer is None:
        tokenizer = load_tokenizer(folder)
    check_tokenizer_fits(tokenizer, config, folder)
    digest = tokenizer_digest(tokenizer)  # before any call leaves its padding settings on the tokenizer
    splits = real_text_splits()
    held = list(heldout) if heldout is not None else splits["heldout"][:s.eval_texts]
    train_texts = texts if texts is not None else splits["train"]
    teacher, fp_metric, window = None, None, dict(max_len=s.max_len, stride=max(1, s.max_len // 2))
    reference_ran = False  # the streamed full-precision pass ran in this process (not read from the cache)
    if causal:
        metric = "perplexity"
        evaluate = lambda m: perplexity(m, tokenizer, held, shard=True, **window)  # noqa: E731
        if s.reference:
            fp_metric = cached_reference_perplexity(source, tokenizer, held, cache_dir=cache_dir, **window)
            reference_ran = fp_metric is None
            if reference_ran:
                fp_metric = reference_perplexity(source, config, tokenizer, held, device=dev, cache_dir=cache_dir,
                                                 **window)
    else:
        metric = "embedding_cosine"
        teacher = pretrained(AutoModel, folder, dtype=torch.float32).to(dev).eval()
        evaluate = lambda m: embedding_cosine(m, teacher, tokenizer, held, max_len=s.max_len, shard=True)  # noqa: E731
        fp_metric = 1.0  # the full-precision model is the reference itself
    torch.manual_seed(s.seed)  # zero-init (QLoRA) adapters draw lora_A at random: the same on every rank and rerun
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t = time.perf_counter()
    dtype = training_dtype(dev, s)
    student = build_student(source, plan, config, recipe, causal=causal, device=dev, dtype=dtype,
                            adapter_dtype=ADAPTER_TORCH[s.adapter_dtype], backend=dequant_backend_from_env(),
                            progress=progress and dist_info.main)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    quantize_seconds = time.perf_counter() - t
    apply_peaks = peak_memory(dev)
    out = None if out_dir is None else Path(out_dir)
    t = time.perf_counter()
    history = train(student, tokenizer, train_texts, s, objective="causal" if causal else "distill", teacher=teacher,
                    eval_fn=evaluate, progress=progress, checkpoint_dir=out,
                    run_tag={"plan_fingerprint": plan.fingerprint, "plan_bytes": plan.totals.get("bytes"),
                             "init": s.init, "method": s.method, "dropout": s.dropout})
    train_seconds = time.perf_counter() - t
    evals = [h["eval"] for h in history if "eval" in h]
    rates = [h["tokens_per_s"] for h in history if "tokens_per_s" in h]
    steady = rates[min(3, len(rates) - 1):] if rates else []  # the first steps include warm-up
    held_bytes = quantized_bytes(student)
    result = {"schema": "lqplan.train-report/1", "model": str(folder), "weights": source.note,
              "architecture": type(student).__name__, "tokenizer": digest,
              "device": str(dev), "world_size": dist_info.world, "init": s.init, "method": s.method,
              "metric": metric, "full_precision": fp_metric, "before": evals[0], "after": evals[-1], "steps": s.steps,
              "batch_size": s.batch_size, "grad_accum": s.grad_accum,
              "global_batch": s.batch_size * dist_info.world * s.grad_accum, "max_len": s.max_len, "lr": s.lr,
              "gradient_checkpointing": s.gradient_checkpointing, "optimizer": s.optimizer,
              "adapter_dtype": s.adapter_dtype,
              "resumed_from": next((h["resumed_from"] for h in history if "resumed_from" in h), None),
              "quantize_seconds": round(quantize_seconds, 3), "train_seconds": round(train_seconds, 3),
              "tokens_per_s": statistics.median(steady) if steady else None, **peak_memory(dev),
              "apply_peaks": apply_peaks, "predicted_memory": predicted_memory(source, plan, s, dtype, reference_ran),
              "quantized_bytes": held_bytes, "plan_bytes": plan.totals.get("bytes"),
              "bytes_match_plan": held_bytes == plan.totals.get("bytes"), "history": history}
    if out is not None and dist_info.main:
        # the saved model and its report are written as a unit (checkpoints in the folder are kept)
        with output_folder(out, TRAIN_OUTPUTS) as stage:
            if s.save_model:
                try:
                    save_quantized(student, plan, stage / "quantized")
                    result["saved"] = str(out / "quantized")
                except UserError as e:  # e.g. a model without a Hugging Face config: report it, keep the results
                    result["saved"] = None
                    result["not_saved"] = str(e)
            write_report(result, stage)
    if dist_info.active and joined_here:
        dist.barrier()  # every rank leaves after rank 0 has written
        dist.destroy_process_group()
    return result


def _fmt_bytes(n) -> str:
    return "-" if n is None else f"{n / 2**20:.1f} MiB"


def write_report(result: dict, out_dir) -> dict:
    """train_report.json (everything, history included) and train_report.md (the summary table) in `out_dir`."""

    out = Path(out_dir)
    r = result
    fmt = (lambda v: "-" if v is None else f"{v:.4f}")  # noqa: E731  (None: the reference was skipped)
    losses = [h["loss"] for h in r["history"] if "loss" in h]
    rate = "-" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:.0f}"
    lines = [
        f"# Fine-tuning report ({r['init']}, {r['architecture']})", "",
        f"Model `{r['model']}` on {r['device']} x {r['world_size']} process(es); {r['steps']} steps, global batch "
        f"{r['global_batch']} sequences of <= {r['max_len']} tokens (batch {r['batch_size']} x "
        f"{r['world_size']} ranks x {r['grad_accum']} accumulation), lr {r['lr']:g}.",
        *([f"Weights: {r['weights']}."] if r.get("weights") else []),
        *([f"Tokenizer: `{r['tokenizer']}`."] if r.get("tokenizer") else []),
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
        f"| peak memory from process start ({r['peak_memory_kind']}) | {_fmt_bytes(r['peak_memory_bytes'])} |",
        f"| peak memory after building the student | {_fmt_bytes(r['apply_peaks']['peak_memory_bytes'])} |",
        f"| GPU reserved peak / host max RSS | {_fmt_bytes(r.get('peak_reserved_bytes'))} / "
        f"{_fmt_bytes(r['host_max_rss_bytes'])} |",
        f"| predicted peak (memory model; its largest phase) | "
        f"{_fmt_bytes((r.get('predicted_memory') or {}).get('peak_bytes'))} "
        f"({(r.get('predicted_memory') or {}).get('peak_phase', '-')}) |",
        f"| quantized bytes held / plan | {r['quantized_bytes']:,} / {r['plan_bytes']:,} "
        f"({'equal' if r['bytes_match_plan'] else 'DIFFERENT'}) |",
    ]
    if r.get("resumed_from") is not None:
        lines.append(f"| resumed from checkpoint at step | {r['resumed_from']} |")
    if r.get("saved"):
        lines += ["", f"Quantized model saved to `{r['saved']}` (reload: planner.train.load_quantized)."]
    elif r.get("not_saved"):
        lines += ["", f"Quantized model not saved: {r['not_saved']}"]
    write_json(out / "train_report.json", r)
    write_text(out / "train_report.md", "\n".join(lines) + "\n")
    return {"json": str(out / "train_report.json"), "md": str(out / "train_report.md")}
