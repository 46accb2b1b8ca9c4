"""The fine-tune's peak GPU memory, predicted term by term from the model's config and a plan: packed weights,
unplanned tensors at the training dtype, adapters (parameters, gradients and optimizer states at their dtypes),
activations per layer with and without gradient checkpointing, logits and loss, CUDA workspace.

The activation terms count the tensors autograd saves in lqplan's training step (bf16 autocast, the fused
quantized-LoRA linear, which saves its input and the rank-r product but never the weight; SDPA attention) for a
Llama-family decoder layer, per token: two RMSNorm inputs in fp32 (4h each) and their bf16 outputs (2h each),
q (2h), k and v (2·kv each), the attention output (2h) and its log-sum-exp (4 per head), the MLP's gate, up,
SiLU and product outputs (2i each) and each adapter's rank-r product (2r); fp32 adapters add one bf16 copy of
their factors per layer. tests/test_train_memory.py checks these byte counts exactly against autograd's saved
tensors on the CPU; the GPU's transient terms (loss backward, workspace) are measured (reports/memory.md).

`lqplan train` has phases besides the training steps, and the predicted peak is the largest of them: building the
student, the evaluations of the student (before and after training), and the full-precision reference pass (fp32,
streamed one layer block at a time, before the student is built). The last two score EVAL_WINDOWS windows of
seq_len tokens per forward; tests/test_train_memory.py checks their working sets against the CPU allocator."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..errors import UserError
from ..model.discover import is_causal_lm, unplanned_bytes
from ..model.weights import FLOAT_CODES

OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit", "sgd")
# optimizer state bytes per adapter parameter: AdamW keeps two moments at the parameter's dtype (fp32 here);
# bitsandbytes' 8-bit AdamW keeps two 8-bit moments (its block-wise scales are < 1% more); SGD without momentum none
STATE_BYTES = {"adamw": 8, "adamw8bit": 2, "paged_adamw8bit": 2, "sgd": 0}
ADAPTER_DTYPES = {"fp32": 4, "bf16": 2}
# cuBLAS keeps its workspace between GEMMs; measured on the H200 with torch 2.11 (reports/memory.md)
CUDA_WORKSPACE = 32 * 2**20
EVAL_WINDOWS = 4  # windows per forward of planner.train.evaluate.perplexity (the evaluations and the reference pass)


@dataclass(frozen=True)
class TrainShape:
    """The fine-tune the memory is for: sequences per micro-batch, tokens per sequence, activation checkpointing,
    the optimizer and the adapters' dtype while training."""
    batch: int = 1
    seq_len: int = 512
    gradient_checkpointing: bool = False
    optimizer: str = "adamw"
    adapter_dtype: str = "fp32"

    def __post_init__(self):
        for name in ("batch", "seq_len"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise UserError(f"--{'train-batch' if name == 'batch' else 'seq-len'} {v} must be a whole number "
                                ">= 1, e.g. 4 and 512")
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"--optimizer {self.optimizer} is not supported; use one of {OPTIMIZERS}")
        if self.adapter_dtype not in ADAPTER_DTYPES:
            raise UserError(f"--adapter-dtype {self.adapter_dtype} is not supported; use one of "
                            f"{tuple(ADAPTER_DTYPES)}")

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len

    @property
    def bytes_per_adapter_param(self) -> int:
        """Parameter + gradient at the adapter dtype + optimizer state."""
        return 2 * ADAPTER_DTYPES[self.adapter_dtype] + STATE_BYTES[self.optimizer]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Architecture:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_dim: int
    vocab: int
    causal: bool = True  # False: an encoder, distilled and scored on its hidden states (no logits, no LM head)

    @classmethod
    def from_config(cls, config: dict) -> "Architecture":
        try:
            h, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
            kv_heads = int(config.get("num_key_value_heads") or heads)
            return cls(h, int(config["intermediate_size"]), int(config["num_hidden_layers"]), heads,
                       h // heads * kv_heads, int(config["vocab_size"]), is_causal_lm(config))
        except (KeyError, TypeError, ValueError, ZeroDivisionError):
            raise UserError("config.json lacks a decoder's sizes (hidden_size, intermediate_size, num_hidden_layers, "
                            "num_attention_heads, vocab_size): the training-memory model covers decoder LMs") from None


@dataclass(frozen=True)
class ReferenceWeights:
    """What the streamed full-precision reference (planner.train.reference) holds, in fp32 bytes: every tensor
    outside the numbered layer blocks (`outside`, loaded once), the largest block's tensors (`block`, one block on the
    device at a time), and the values of the largest single tensor (`largest`: read at its stored 16-bit dtype and
    cast on the device, so both copies exist for a moment)."""
    outside: int
    block: int
    largest: int

    @classmethod
    def of(cls, tensors: dict) -> "ReferenceWeights":
        """From a model's safetensors entries (key -> TensorEntry): floating tensors at 4 bytes a value."""
        outside, blocks, largest = 0, {}, 0
        for key, e in tensors.items():
            values = 1
            for d in e.shape:
                values *= d
            size = 4 * values if e.dtype in FLOAT_CODES else e.nbytes
            layer = _layer_of(key)
            if layer < 0:
                outside += size
            else:
                blocks[layer] = blocks.get(layer, 0) + size
            largest = max(largest, values)
        return cls(outside, max(blocks.values(), default=0), largest)


def reference_peak_bytes(arch: "Architecture", weights: ReferenceWeights, seq_len: int) -> int:
    """The reference pass's peak: its resident weights plus the largest of its working sets for EVAL_WINDOWS windows
    of seq_len tokens (n tokens), all fp32: a tensor being loaded (its 16-bit read beside its fp32 copy); a layer's
    forward (the block's input, the residual and the normed input, 3·4h per token, and the MLP's activation, up
    projection and their product, 3·4i); the head (the fp32 logits, 4V per token, beside the final norm's output
    during the projection or one window's log-softmax after it)."""
    n = EVAL_WINDOWS * seq_len
    h, i, v = arch.hidden, arch.intermediate, arch.vocab if arch.causal else 0  # an encoder has no logits
    work = max(2 * weights.largest, 4 * n * (3 * h + 3 * i), 4 * n * v + 4 * max(n * h, seq_len * v))
    return weights.outside + weights.block + work + CUDA_WORKSPACE


def eval_work_bytes(arch: "Architecture", seq_len: int, largest: int) -> int:
    """The working set of one evaluation forward of the student (no autograd, 16-bit activations) over EVAL_WINDOWS
    windows of seq_len tokens (n tokens): a layer's (block input, residual and normed input, 3·2h per token; the MLP's
    activation, up projection and product, 3·2i; the largest matrix dequantized, 2 bytes a value) or the head's (the
    16-bit logits, 2V per token, beside the final norm's output or one window's fp32 copy and log-softmax, 8V)."""
    n = EVAL_WINDOWS * seq_len
    h, i, v = arch.hidden, arch.intermediate, arch.vocab if arch.causal else 0  # an encoder has no logits
    return max(2 * n * (3 * h + 3 * i) + 2 * largest, 2 * n * v + max(2 * n * h, 8 * seq_len * v))


def layer_activation_bytes(arch: Architecture, tokens: int, ranks: list[int]) -> int:
    """Bytes autograd saves for one decoder layer of `tokens` tokens whose adapters have `ranks`."""
    h, i, kv = arch.hidden, arch.intermediate, arch.kv_dim
    per_token = 2 * (4 * h + 4) + 2 * 2 * h + 2 * h + 2 * 2 * kv + 2 * h + 4 * arch.heads + 4 * 2 * i
    return tokens * (per_token + 2 * sum(ranks))


def head_bytes(arch: Architecture, tokens: int) -> int:
    """The final norm's saved fp32 input, the logits (bf16 and the fp32 log-softmax the loss saves), the labels,
    and the loss backward's two fp32 logit-sized gradients, all alive at the start of backward. An encoder has no
    logits: its distillation loss (planner.train.losses.distill_loss) holds the teacher's fp32 hidden states, the
    fp32 difference it saves and that difference's gradient, 3·4h per token."""
    if not arch.causal:
        return tokens * 3 * 4 * arch.hidden
    return tokens * ((4 * arch.hidden + 4) + (2 + 4) * arch.vocab + 8 + 2 * 4 * arch.vocab)


def apply_peak_bytes(packed: int, adapter_bytes: int, unplanned: int, largest: int, zero_init: bool) -> int:
    """The peak while the student is built (planner.train.build): the packed matrices and adapters built so far,
    plus the matrix in flight: its stored bf16 read and fp32 copy (6 bytes per value) and, for a LoftQ start, the
    decomposition's fp32 residual and dequantized iterate (8 more); the quantizer's chunked pass adds ~64 MiB. The
    unplanned tensors are loaded after the last matrix."""
    in_flight = (6 if zero_init else 14) * largest + 64 * 2**20
    return packed + adapter_bytes + max(unplanned, in_flight) + CUDA_WORKSPACE


def predict(config: dict, plan_entries, unplanned_train_bytes: int, shape: TrainShape,
            zero_init: bool = False, reference: ReferenceWeights | None = None) -> dict:
    """The predicted peak and its terms (bytes): the training phase's terms, each phase's peak (`phases`: build,
    evaluate, train, and reference when `reference` is given) and peak_bytes, the largest of them (`peak_phase`).
    `plan_entries`: PlanEntry-like objects (name, shape, point); `unplanned_train_bytes`: every tensor the plan does
    not cover, at its training dtype; `zero_init`: QLoRA's initialisation (no LoftQ decomposition while building);
    `reference`: the streamed full-precision reference pass's weights, when the run includes that pass."""
    arch = Architecture.from_config(config)
    packed = adapter_params = largest = 0
    ranks_by_layer: dict[int, list[int]] = {}
    for e in plan_entries:
        params = e.point.adapter_params(e.shape)
        packed += e.point.bits(e.shape) // 8 - 2 * params
        adapter_params += params
        largest = max(largest, e.shape[0] * e.shape[1])
        ranks_by_layer.setdefault(_layer_of(e.name), []).append(e.point.rank)
    # fp32 adapters are cast to bf16 in every layer's forward and the copies are saved for backward
    copy_bytes = 2 * adapter_params // max(1, arch.layers) if shape.adapter_dtype != "bf16" else 0
    per_layer = [layer_activation_bytes(arch, shape.tokens, ranks_by_layer.get(k, [])) + copy_bytes
                 for k in range(arch.layers)]
    head = head_bytes(arch, shape.tokens)
    activations = _activations(arch, shape, max(per_layer, default=0), sum(per_layer), head, 2 * largest)
    terms = {"packed_weights": packed, "unplanned_tensors": unplanned_train_bytes,
             "adapter_params": adapter_params * ADAPTER_DTYPES[shape.adapter_dtype],
             "adapter_grads": adapter_params * ADAPTER_DTYPES[shape.adapter_dtype],
             "optimizer_states": adapter_params * STATE_BYTES[shape.optimizer],
             "activations": activations, "logits_and_loss": head,
             "cuda_workspace": CUDA_WORKSPACE}
    build = apply_peak_bytes(packed, terms["adapter_params"], unplanned_train_bytes, largest, zero_init)
    # the last evaluation runs after the last step: the optimizer's states exist, the gradients were freed
    evaluate = (packed + unplanned_train_bytes + terms["adapter_params"] + terms["optimizer_states"]
                + eval_work_bytes(arch, shape.seq_len, largest) + CUDA_WORKSPACE)
    phases = {"build": build, "evaluate": evaluate, "train": sum(terms.values())}
    if reference is not None:
        phases["reference"] = reference_peak_bytes(arch, reference, shape.seq_len)
    peak_phase = max(phases, key=phases.get)
    return {"shape": shape.to_dict(), "terms": terms, "train_peak_bytes": phases["train"],
            "apply_peak_bytes": build, "phases": phases, "peak_phase": peak_phase, "peak_bytes": phases[peak_phase],
            "adapter_params": adapter_params}


def unplanned_train_bytes(source, matrices) -> int:
    """Every tensor of `source` outside the planned `matrices` (embeddings, norms, head), at bf16 while training."""
    return unplanned_bytes(source, matrices, float_bytes=2)


def predict_model(source, matrices, plan_entries, shape: TrainShape) -> dict:
    """predict() for a resolved model's plan as `lqplan train` runs it: the planned `matrices` set which tensors are
    unplanned; the full-precision reference pass is included, as train runs it by default."""
    return predict(source.config, plan_entries, unplanned_train_bytes(source, matrices), shape,
                   reference=ReferenceWeights.of(source.tensors))


def train_cost_bits(point, shape, train: TrainShape) -> int:
    """A configuration's cost in a training-memory budget: its packed storage plus its adapter's parameters,
    gradients and optimizer states at their training dtypes (the plan's own accounting counts adapters at 16 bits)."""
    params = point.adapter_params(shape)
    return point.bits(shape) - 16 * params + 8 * params * train.bytes_per_adapter_param


def training_table(table, grid, train: TrainShape):
    """The profile table with storage_bits replaced by each configuration's training cost (train_cost_bits)."""
    points = {p.label: p for p in grid}
    out = table.copy()
    out["storage_bits"] = [train_cost_bits(points[label], (int(m), int(n)), train)
                           for label, m, n in zip(table["label"], table["m"], table["n"])]
    return out


def _activations(arch: Architecture, shape: TrainShape, one_layer: int, all_layers: int, head: int,
                 dequant: int) -> int:
    """Activation bytes at the peak, which falls in one of two phases: the loss's backward (the head's gradients
    alive) or a layer's backward (its weight dequantized to bf16 for the GEMMs, `dequant` bytes for the largest
    matrix, and with checkpointing that layer's rebuilt tensors). Without checkpointing every layer's saved tensors
    are alive in both; with it each layer keeps only its bf16 input. Counted as the layer phase's excess over the
    head term (measured on the H200: reports/memory.md)."""
    if not shape.gradient_checkpointing:
        return all_layers + max(0, dequant - head)
    return arch.layers * 2 * arch.hidden * shape.tokens + max(0, one_layer + dequant - head)


def _layer_of(name: str) -> int:
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    return -1


def fixed_bytes(config: dict, unplanned_train_bytes: int, shape: TrainShape, ranks_hint: int) -> int:
    """What the fine-tune needs besides the planned matrices' packed storage and adapter training state, for a
    budget in GPU bytes: unplanned tensors, activations (with adapters of rank `ranks_hint` for their rank-r
    products), logits and loss, or an evaluation's working set where that is larger, and the workspace."""
    arch = Architecture.from_config(config)
    per_layer = layer_activation_bytes(arch, shape.tokens, [ranks_hint] * 7)
    head = head_bytes(arch, shape.tokens)
    largest = max(arch.intermediate, arch.hidden) * arch.hidden
    activations = _activations(arch, shape, per_layer, arch.layers * per_layer, head, 2 * largest)
    work = max(activations + head, eval_work_bytes(arch, shape.seq_len, largest))
    return unplanned_train_bytes + work + CUDA_WORKSPACE
