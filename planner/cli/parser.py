"""The argument parser of every verb, with the house error format (one line, exit 2)."""

from __future__ import annotations

import argparse

from ..plan.train_memory import ADAPTER_DTYPES, OPTIMIZERS

EXAMPLES = """examples:
  plan --budget 2.75bits --model llama2-13b
  lqplan plan --budget 2.75bits                      # the embedded default model (all-MiniLM-L6-v2, 384 wide)
  lqplan plan --budget 3bits --ranks 8,16,32 --calib pydoc   # Fisher-weighted (LQ-LoRA data-aware)
  lqplan plan --budget 3bits --calib pydoc --objective output  # output-aware (input covariance, CLoQ adapters)
  lqplan plan --budget 6GB --model /path/to/hf-folder --bits 2,3,4 --ranks 64
  lqplan plan --budget 3bits --model smollm2-135m --tie qkv,gate_up   # one config per fused q/k/v and gate/up
  lqplan memory --model /path/to/folder-with-config.json
  lqplan report --plan lqplan-out/plan.json
"""

RANKS_HELP = ("LoRA ranks (0 = no adapter). Default: from the model's planned matrices, r,2r,4r with r the largest "
              "power of two <= w/48 within 4..16, w the median of their smaller sides (a rank-r adapter on a w x w "
              "matrix costs 32r/w bits/weight): the 384-wide MiniLM gets 8,16,32, 640-wide Gemma 3 270M 8,16,32, "
              "4096+ wide models 16,32,64; `grid` uses --shape's smaller side, or 16,32,64 without one")
EVAL_TEXT_HELP = ("UTF-8 evaluation text, paragraphs split on blank lines, all of them scored (default: the first "
                  "--eval-texts paragraphs of the built-in held-out pydoc prose)")


class _Parser(argparse.ArgumentParser):
    """argparse with the house error format: one line on stderr naming the problem and the fix, exit code 2."""

    def error(self, message: str):
        hint = f"see `{self.prog} --help`"
        if "expected one argument" in message:
            hint = "a value starting with '-' must be attached with '=', e.g. --budget=VALUE; " + hint
        self.exit(2, f"lqplan: error: {message}; {hint}\n")


def _grid_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("grid and decomposition")
    g.add_argument("--bits", default="2,3,4,8", help="NF code widths to consider (default: 2,3,4,8)")
    g.add_argument("--blocks", default="16,32,64,128", help="first-level block sizes (default: 16,32,64,128)")
    g.add_argument("--ranks", default=None, help=RANKS_HELP)
    g.add_argument("--no-double-quant", action="store_true", help="store fp32 block scales instead of 8-bit ones")
    g.add_argument("--method", choices=("lora", "qalora", "both"), default="lora",
                   help="lora: NF configs with LoRA adapters (default); qalora: QA-LoRA points (asymmetric INT --bits "
                        "in groups of --groups input columns, fp16 scale+zero, group-pooled adapters); both: the union")
    g.add_argument("--groups", default="32,64,128", help="QA-LoRA group sizes g (default: 32,64,128)")
    g.add_argument("--iters", type=int, default=5, help="LoftQ alternating iterations T (default 5; 0 = QLoRA)")
    g.add_argument("--svd", choices=("randomized", "exact"), default="randomized",
                   help="rank-r step: warm-started randomized subspace iteration (default) or exact SVD")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=_path, default=None,
                   help="local Hugging Face folder, alias (see `lqplan aliases`) or hub id found in the local HF "
                        "cache; default: the embedded all-MiniLM-L6-v2")
    p.add_argument("--include-head", action="store_true", help="also plan the output head (lm_head)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N")
    p.add_argument("--cache", type=_path, default=".lqplan-cache", help="profile cache folder (default .lqplan-cache)")
    p.add_argument("--out", type=_path, default="lqplan-out", help="output folder (default lqplan-out)")
    p.add_argument("--calib", type=_path, default=None,
                   help="calibration text for the fisher and output objectives: a UTF-8 text file, or 'pydoc' "
                        "(Python's reference prose, built in)")
    p.add_argument("--calib-tokens", type=int, default=16384, help="calibration tokens (default 16384)")
    p.add_argument("--objective", choices=("data-free", "fisher", "output"), default=None,
                   help="the error each matrix's configurations are ranked by (docs/objectives.md): data-free "
                        "||W-Q-AB'||^2; fisher: LQ-LoRA's diagonal Fisher weighting; output: the layer's output error "
                        "over the calibration inputs, weighted by the output gradients (needs --calib). Default: "
                        "fisher with --calib, data-free without")
    p.add_argument("--rounding", choices=("nearest", "gptq"), default="nearest",
                   help="the output objective's quantizer step: nearest code per weight (default), or gptq: codes "
                        "chosen column by column compensating the rounding error under the layer's input statistics "
                        "(GPTQ's update; same storage, decomposed one point at a time, slower)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--distributed", type=int, default=None, metavar="N",
                   help="profile with N processes on this host (one per GPU) via torchrun; under torchrun itself "
                        "the job's ranks are used (see docs/distributed.md)")


def _train_shape_args(p: argparse.ArgumentParser, title: str) -> None:
    g = p.add_argument_group("training memory", title)
    g.add_argument("--train-batch", type=int, default=None, metavar="N", help="sequences per micro-batch")
    g.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (default 512)")
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw", help="adapter optimizer (default adamw)")
    g.add_argument("--adapter-dtype", choices=tuple(ADAPTER_DTYPES), default="fp32",
                   help="the adapters' dtype while training (default fp32)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lqplan", description="Memory-budget planner for quantized LoRA "
                                     "fine-tuning (QLoRA / LoftQ / LQ-LoRA).", epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("plan", help="profile, solve the ILP and write plan.json + reports",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", required=True, help="bits per planned parameter ('2.75bits') or model bytes "
                   "('6GB', '6GiB', '500MB'; a lower-case final b, as in '6Gb', is refused: bits or bytes?)")
    p.add_argument("--ilp-solver", choices=("highs", "cbc"), default="highs",
                   help="MIP solver through PuLP, for instances too large for the exact DP: HiGHS (default) or "
                   "PuLP's bundled CBC")
    p.add_argument("--time-limit", type=_seconds, default=60.0, metavar="SECONDS",
                   help="seconds the ILP may branch to prove optimality; then the best plan found is kept, marked "
                   "'feasible' with its gap (default 60; 0 = no limit)")
    p.add_argument("--no-report", action="store_true", help="write plan.json only")
    p.add_argument("--force", action="store_true",
                   help="replace a plan.json in --out made for another budget, model, grid or objective (without "
                   "it such a plan is kept and the run refused; rerunning the same request always replaces it)")
    p.add_argument("--tie", default=None, metavar="GROUPS",
                   help="fused groups whose members get one configuration, for serving engines that fuse them "
                   "(vLLM): qkv (q/k/v projections of a layer), gate_up (gate/up projections), or qkv,gate_up; "
                   "the report shows what the tie costs against the untied plan (docs/tie.md)")
    _model_args(p)
    _grid_args(p)
    _train_shape_args(p, "with --train-batch the budget (in bytes) is the fine-tune's peak GPU memory")

    p = sub.add_parser("profile", help="profile only: decomposition error and cost for every matrix x config")
    _model_args(p)
    _grid_args(p)

    p = sub.add_parser("report", help="(re)write reports from an existing plan and profile table")
    p.add_argument("--plan", type=_path, required=True, help="plan.json written by `lqplan plan`")
    p.add_argument("--profile", type=_path, default=None, help="profile.csv (default: beside the plan)")
    p.add_argument("--out", type=_path, default=None, help="output folder (default: the plan's folder)")

    p = sub.add_parser("grid", help="list the configuration grid with bits per weight")
    _grid_args(p)
    p.add_argument("--shape", default=None, help="show exact storage for an MxN matrix, e.g. 5120x13824")

    p = sub.add_parser("memory", help="dry run: memory of a model at uniform configs, from config.json alone; "
                       "with --plan, the fine-tune's predicted peak GPU memory term by term")
    p.add_argument("--model", type=_path, default=None,
                   help="folder with config.json (weights not needed), alias or default")
    p.add_argument("--plan", type=_path, default=None, help="plan.json: predict its fine-tune's peak GPU memory")
    _train_shape_args(p, "the fine-tune that --plan's prediction is for")

    sub.add_parser("aliases", help="list model aliases and their hub ids")
    _train_parsers(sub)
    return parser


def _train_parsers(sub) -> None:
    p = sub.add_parser("train", help="apply a plan, fine-tune the adapters on real text, evaluate, save",
                       description="Apply PLAN to its model, fine-tune the LoRA adapters (causal LMs: next-token "
                       "loss; encoders: distillation of the full-precision model), evaluate before/after and the "
                       "full-precision model, write train_report.md/.json and the quantized model to --out. "
                       "Under torchrun (several processes) it trains data-parallel (DDP).")
    p.add_argument("--plan", type=_path, required=True, help="plan.json written by `lqplan plan`")
    p.add_argument("--model", type=_path, default=None, help="the model folder (default: the plan's model.source)")
    p.add_argument("--init", choices=("loftq", "qlora"), default="loftq",
                   help="adapters from the LoftQ/LQ-LoRA decomposition (default) or QLoRA's zero-product init")
    p.add_argument("--method", choices=("lora", "qalora"), default=None,
                   help="layer kind for every matrix (default: each plan entry's own; qalora = QA-LoRA)")
    p.add_argument("--text", type=_path, default=None, help="UTF-8 training text file (default: built-in pydoc prose)")
    p.add_argument("--data", type=_path, default=None, metavar="FILE",
                   help="training records instead of --text (causal LMs; read with datasets, pip install -e '.[hf]'): "
                        "a .json/.jsonl file of chat 'messages', 'prompt'+'completion', 'instruction'+'output' or "
                        "'text' records, trained on the responses only (chat template), or a .txt file (paragraphs)")
    p.add_argument("--pack", action="store_true",
                   help="with --data: join the records into --max-len blocks instead of one padded sequence each")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps (default 100)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per micro-batch per process (default 8)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate (default 2e-4)")
    p.add_argument("--schedule", choices=("constant", "cosine"), default="constant")
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--max-len", type=int, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    p.add_argument("--no-dropout", action="store_true", help="set the model's dropout probabilities to 0")
    p.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (default: before/after only)")
    p.add_argument("--eval-texts", type=int, default=64, help="held-out paragraphs to evaluate on (default 64)")
    p.add_argument("--eval-text", type=_path, default=None, metavar="FILE", help=EVAL_TEXT_HELP)
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps into --out (0: never)")
    p.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt when it exists")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N")
    p.add_argument("--out", type=_path, default="lqplan-train", help="output folder (default lqplan-train)")
    p.add_argument("--no-save", action="store_true", help="do not write the quantized model")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw",
                   help="adamw (default), sgd, or bitsandbytes' adamw8bit / paged_adamw8bit (pip install -e '.[bnb]')")
    p.add_argument("--adapter-dtype", choices=tuple(ADAPTER_DTYPES), default="fp32",
                   help="the adapters' dtype while training (default fp32; bf16 halves their memory)")
    p.add_argument("--no-reference", action="store_true",
                   help="skip the full-precision model's metric (otherwise streamed layer by layer and cached)")
    p.add_argument("--cache", type=_path, default=".lqplan-cache",
                   help="cache folder for the reference metric and --data")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser("evaluate", help="score a plan's quantized model against the full-precision model (KL, "
                       "perplexity), or a saved quantized model",
                       description="--plan: build the plan's quantized model with its initial LoftQ/LQ-LoRA adapters "
                       "and score it against the full-precision model on held-out text: KL(fp || quantized) per "
                       "token, perplexity of both, top-1 agreement, on the same BOS-first windows; writes "
                       "evaluate.json (docs/evaluate.md). --quantized: perplexity (causal LMs) or embedding cosine "
                       "(encoders) of a folder written by `lqplan train`, and of its full-precision model.")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--plan", type=_path, default=None, help="plan.json written by `lqplan plan`")
    which.add_argument("--quantized", type=_path, default=None, help="folder written by `lqplan train` (OUT/quantized)")
    p.add_argument("--model", type=_path, default=None, help="full-precision model folder (default: the plan's model.source)")
    p.add_argument("--eval-text", type=_path, default=None, metavar="FILE", help="UTF-8 evaluation text, paragraphs split on "
                   "blank lines (default: the built-in held-out pydoc prose); with --plan its first --eval-tokens "
                   "tokens are scored, with --quantized all of it")
    p.add_argument("--eval-tokens", type=int, default=None, metavar="N",
                   help="--plan: score the first N tokens of the text (default 4096)")
    p.add_argument("--eval-texts", type=int, default=None, metavar="N",
                   help="--quantized: the first N built-in held-out paragraphs (default 64)")
    p.add_argument("--max-len", type=int, default=None,
                   help="tokens per window, BOS included (default 512 with --plan, fewer where the model has fewer "
                   "positions; 128 with --quantized)")
    p.add_argument("--stride", type=int, default=None, help="--plan: tokens between window starts; each window "
                   "scores the tokens after the previous one's (default max-len // 2)")
    p.add_argument("--batch-size", type=int, default=None, metavar="N",
                   help="--plan: windows per forward (default: as many as keep a batch's logits near 256 MiB)")
    p.add_argument("--stream", action="store_true", help="--plan: run the full-precision model one layer block at "
                   "a time (default: when its fp32 weights exceed 4 GiB)")
    p.add_argument("--out", type=_path, default=None, help="--plan: folder for evaluate.json (default: the plan's folder)")
    p.add_argument("--cache", type=_path, default=".lqplan-cache",
                   help="--plan: where a Fisher plan's Fisher weights are read or computed (default .lqplan-cache)")
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser("export", help="write a saved quantized model as a GPTQ-layout, merged or PEFT folder",
                       description="Read a folder written by `lqplan train` (OUT/quantized) and export it. gptq: "
                       "QA-LoRA layers with their adapters merged into GPTQ's integer layout (docs/gptq-layout.md); "
                       "merged: plain weights for AutoModel; peft: dequantized base + PEFT LoRA adapter.")
    p.add_argument("--quantized", type=_path, required=True, help="folder written by `lqplan train` (OUT/quantized)")
    p.add_argument("--format", choices=("gptq", "merged", "peft"), required=True)
    p.add_argument("--checkpoint-format", choices=("lqplan_offsets", "gptq", "gptq_v2"), default=None,
                   help="--format gptq only: lqplan_offsets (default) keeps QA-LoRA's merged zero-points exact as "
                        "float offsets (read by planner.hf.gptq.load_gptq); gptq (v1) / gptq_v2 round them to GPTQ's "
                        "integer qzeros for transformers' GPTQ path and gptqmodel, which loses up to half a "
                        "quantization step per group")
    p.add_argument("--out", type=_path, required=True, help="output folder")


def _path(text: str) -> str:
    """argparse type of every path option: checked (planner.fsio.user_path: ~user, over-long names) and passed on
    as given."""
    from ..errors import UserError
    from ..fsio import user_path

    try:
        user_path(text, "path")
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("path ")) from None
    return text


def _seconds(text: str) -> float:
    """argparse type for --time-limit: a number of seconds >= 0 (argparse turns the ValueError into a usage error)."""
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise ValueError(text)
    return value


_seconds.__name__ = "seconds (a number >= 0)"  # argparse words its error with the type's name
