"""LqplanHfQuantizer: transformers' from_pretrained quantizes a model with an lqplan plan while it loads.

Before any weight is read, each planned linear becomes a rank-0 QuantLoRALinear (QALoRALinear for QA-LoRA entries)
whose packed uint8 buffers are empty (meta). Quantizing from a full-precision checkpoint, it also keeps the
linear's meta `weight`, so the checkpoint tensor of that name is routed to it: transformers streams the checkpoint
one tensor at a time onto its device, and each planned weight goes through LqplanQuantize (the quantizer's
get_quantize_ops hook), which quantizes it there exactly as apply_plan does (planner.train.apply's LayerRecipe and
build_layer) and returns the packed buffers in its place; the fp matrix is gone before the next one is read.
transformers maps every shard for the whole load, so every page it reads would stay in the process's resident
memory (26 GB of host RSS for a 13B model); after each planned weight the pages read so far are dropped from the
process (planner.model.pages), and host memory stays near one shard's worth.
With init="loftq" the LoftQ factors stay on the module as `lqplan_init` for PEFT adapters to start from.
A model saved with save_pretrained holds the packed buffers and a config.json with the plan; loading that folder
builds the same modules and reads the buffers as they are (no quantization). register() (run on import) makes
transformers know quant_method "lqplan"."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers.core_model_loading import ConversionOps
from transformers.pytorch_utils import Conv1D
from transformers.quantizers import (
    HfQuantizer,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers import auto as hf_auto

from quant.blockwise import QuantizedTensor
from quant.config import SCALE_DTYPE_BYTES, QuantConfig, packed_nbytes
from quant.layers import BUFFER_PREFIX, QuantLoRALinear, packed_layers, set_backend
from quant.methods import get_method
from quant.qalora import QALoRALinear

from ..devices import dequant_backend_from_env, resolve_device
from ..errors import UserError
from ..model.pages import release_mapped_pages
from ..plan.document import PlanEntry
from ..profile.grid import GridPoint
from ..train.apply import (
    LayerRecipe,
    check_fingerprint,
    resolve_names,
    set_module,
)
from ..train.build import checkpoint_key
from .config import QUANT_METHOD, LqplanConfig, matches


def buffer_nbytes(config: QuantConfig, numel: int) -> dict[str, int]:
    """Bytes of each packed field a layer of `config` holds for `numel` weights: the lengths of its uint8 buffers
    (QuantizedTensor's fields as raw bytes), so an empty layer has the shapes the quantized one will have."""
    nblocks = config.num_blocks(numel)
    out = {"codes": packed_nbytes(nblocks * config.blocksize, config.bits)}
    if config.double_quant:
        nblocks2 = math.ceil(nblocks / config.dq_blocksize)
        out.update(scale_codes=packed_nbytes(nblocks2 * config.dq_blocksize, config.dq_bits),
                   scale_scales=nblocks2 * SCALE_DTYPE_BYTES[config.dq_dtype], scale_offset=4)
    else:
        out["scales"] = nblocks * SCALE_DTYPE_BYTES[config.scale_dtype]
        if config.asymmetric:
            out["zeros"] = nblocks * SCALE_DTYPE_BYTES[config.scale_dtype]
    return out


def empty_layer(entry: PlanEntry, linear: nn.Module, routes_weight: bool) -> QuantLoRALinear:
    """The rank-0 layer of `entry` for `linear`, with meta buffers (no memory) and the linear's (meta) bias.
    routes_weight: keep the linear's meta `weight` as a parameter, so the checkpoint's fp tensor of that name is
    loaded into it (and quantized); otherwise `weight` is already the stand-in stand_in_weight() gives."""
    config, (m, n) = entry.point.config, entry.shape
    sizes = buffer_nbytes(config, m * n)
    fields = {f: torch.empty(size, dtype=torch.uint8, device="meta") for f, size in sizes.items()}
    layer = get_method(entry.point.method).layer(QuantizedTensor(config, (m, n), **fields), linear.bias, rank=0)
    if routes_weight:
        layer.register_parameter("weight", linear.weight)
    else:
        stand_in_weight(layer, linear.weight.dtype, torch.device("meta"))
    layer.lqplan_init = None
    return layer


def stand_in_weight(layer: QuantLoRALinear, dtype: torch.dtype, device: torch.device) -> None:
    """An empty `weight` (non-persistent: never saved): many models' _init_weights and forward code reach into a
    linear's `.weight` (GPT-2, T5, CLIP init it; others read its dtype or device), which the packed layer has not.
    Zero elements, so initialising it does nothing; a buffer, so it follows the model's .to(device / dtype).
    Shaped (out_features, 0), not (0,): code that multiplies by `.weight` itself instead of calling the layer
    (TRL's SFTTrainer does, for the output head) fails on the shapes; a (0,) weight, read as 0 rows, gave TRL a
    0-token vocabulary and a loss of 0, with no error."""
    layer._parameters.pop("weight", None)
    layer.register_buffer("weight", torch.empty(layer.out_features, 0, dtype=dtype, device=device), persistent=False)


def init_factors(layer: QuantLoRALinear) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(lora_A (r, in), lora_B (out, r), scaling) of a decomposed layer, as a standard LoRA adapter holds them.
    QA-LoRA's lora_A reads the input averaged over groups of g: the same map is its columns repeated g times over
    g (exact: g is a power of two), the only form a PEFT LoRA adapter can take."""
    a, b = layer.lora_A.detach(), layer.lora_B.detach()
    if isinstance(layer, QALoRALinear):
        a = a.repeat_interleave(layer.group_size, dim=1) / layer.group_size
    return a, b, layer.scaling


def checkpoint_folder(model: nn.Module, checkpoint_files) -> Path:
    """The folder from_pretrained reads the weights from (the one the plan's fingerprint must match)."""
    if checkpoint_files:
        return Path(checkpoint_files[0]).parent
    guess = getattr(model.config, "_name_or_path", "") or ""
    if guess and (Path(guess) / "config.json").is_file():
        return Path(guess)
    raise UserError("from_pretrained named no model folder to check the plan's fingerprint against; load the model "
                    "from the folder (or hub id) the plan was made for")


def check_saved(checkpoint_files, layers: dict[str, QuantLoRALinear]) -> None:
    """A saved quantized folder must hold every packed buffer: one it lacks would be left uninitialised memory
    (transformers fills missing tensors with empty ones and only warns)."""
    keys = set()
    for file in checkpoint_files or []:
        if str(file).endswith(".safetensors"):
            with safe_open(str(file), framework="pt") as f:  # the header only: no tensor is read
                keys.update(f.keys())
    for name, layer in layers.items():
        for field, t in layer.named_buffers():
            if keys and field.startswith(BUFFER_PREFIX) and checkpoint_key(f"{name}.{field}", keys) is None:
                raise UserError(f"the quantized model folder lacks {name}.{field}; it is incomplete: re-save the "
                                "quantized model with save_pretrained")


class LqplanQuantize(ConversionOps):
    """transformers' on-load quantization step: {weight name: fp tensor} -> {that module's packed buffers}."""

    def __init__(self, hf_quantizer: LqplanHfQuantizer):
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict, source_patterns=None, target_patterns=None, model=None, missing_keys=None,
                **kwargs):
        out = {}
        for key, value in input_dict.items():
            value = value[0] if isinstance(value, list) else value
            out.update(self.hf_quantizer.quantize_weight(model, key, value))
            if missing_keys is not None:
                missing_keys.discard(key)  # the weight is now the packed buffers, which are set in its place
        release_mapped_pages(self.hf_quantizer.shard_files)
        return out


class LqplanHfQuantizer(HfQuantizer):
    """from_pretrained with an LqplanConfig (see the module docstring). Quantization runs on each weight's device
    (device_map; None means apply_plan's default: $LQPLAN_DEVICE, else CUDA when there is one, else CPU)."""

    requires_calibration = False

    def __init__(self, quantization_config, **kwargs):
        if not isinstance(quantization_config, LqplanConfig):
            raise UserError(f"quant_method {QUANT_METHOD!r} needs a planner.hf.LqplanConfig, got "
                            f"{type(quantization_config).__name__}")
        super().__init__(quantization_config, **kwargs)
        self.modules: dict[str, PlanEntry] = {}  # module name -> its plan entry
        self.targets: dict[str, tuple[str, PlanEntry, bool]] = {}  # weight name -> (module, entry, Conv1D?)
        self.recipe: LayerRecipe | None = None
        self.failure: Exception | None = None
        self.shard_files: list[str] = []  # the safetensors files being read (their mapped pages are released)

    # ---- before loading ----------------------------------------------------------------------------------
    def validate_environment(self, *args, **kwargs):
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise UserError("device_map puts modules on 'disk'; lqplan models load onto a GPU or the CPU: pass "
                            "device_map='cuda', 'cpu' or a map without 'disk'")

    def update_device_map(self, device_map):
        if device_map is None:
            dev = resolve_device(None)
            if dev.type == "cuda" and dev.index is None:
                dev = torch.device("cuda", torch.cuda.current_device())
            device_map = {"": str(dev)}
        return device_map

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        config = self.quantization_config
        plan = config.plan
        self.recipe = LayerRecipe.of(plan, config.init, iters=config.iters)
        self.shard_files = [str(f) for f in checkpoint_files or [] if str(f).endswith(".safetensors")]
        if not self.pre_quantized:
            # a saved quantized folder has other bytes than the model the plan was made for: nothing to compare
            check_fingerprint(model, plan, checkpoint_folder(model, checkpoint_files))
        mapping = resolve_names(model, plan)
        unmatched = [m for m in config.modules_to_not_convert if not any(matches(m, n) for n in mapping.values())]
        if unmatched:
            raise UserError(f"modules_to_not_convert entry {unmatched[0]!r} matches no planned module; pass names "
                            f"of planned modules (e.g. {next(iter(mapping.values()))})")
        tied = getattr(model, "all_tied_weights_keys", None) or {}
        tied = set(tied) | set(tied.values())
        for entry in plan.matrices:
            name = mapping[entry.name]
            if config.skips(name):
                continue
            if f"{name}.weight" in tied:
                raise UserError(f"planned matrix {name} shares its weight with another module (tied weights); "
                                f"re-plan without it or pass modules_to_not_convert=[{name!r}]")
            linear = model.get_submodule(name)
            layer = empty_layer(entry, linear, routes_weight=not self.pre_quantized)
            if not self.pre_quantized:
                self.targets[f"{name}.weight"] = (name, entry, isinstance(linear, Conv1D))
            set_module(model, name, layer)
            self.modules[name] = entry
        if self.pre_quantized:
            check_saved(checkpoint_files, {n: model.get_submodule(n) for n in self.modules})
        return model

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        return param_name in self.targets

    def param_element_size(self, model, param_name: str, param: torch.Tensor) -> float:
        # A planned weight arrives in fp but is held as the packed buffers, which are counted on their own.
        return 0 if param_name in self.targets else param.element_size()

    def get_quantize_ops(self):
        return LqplanQuantize(self)

    # ---- while loading -----------------------------------------------------------------------------------
    def decomposes(self, entry: PlanEntry) -> bool:
        """Whether the entry's layer is a LoftQ decomposition (else plain quantization, as build_layer decides)."""
        return self.recipe.init == "loftq" and entry.point.rank > 0 and self.recipe.iters > 0

    def quantize_weight(self, model, key: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
        """The packed buffers of planned weight `key` (loaded as `value`, on its device), keyed by state name."""
        name, entry, transposed = self.targets[key]
        module = model.get_submodule(name)
        if not self.decomposes(entry):  # rank 0: no adapter factors to make (nor random ones to draw)
            entry = dataclasses.replace(entry, point=GridPoint(entry.point.config, 0, entry.point.method))
        built = None
        if self.failure is None:
            try:
                with torch.no_grad():
                    w = (value.t() if transposed else value).to(torch.float32)
                    built = self.recipe.layer(entry, w, None, None, 0.0, torch.float32)
                    del w
            except Exception as e:  # noqa: BLE001 - re-raised after loading, see below
                self.failure = e
        stand_in_weight(module, value.dtype, value.device)
        if built is None:
            # transformers would log an op's exception in its load report and raise a generic error of its own:
            # the load goes on with zero buffers (no work for the matrices after the failure) and
            # _process_model_after_weight_loading raises the error itself
            return {f"{name}.{f}": torch.zeros_like(t, device=value.device) for f, t in module.named_buffers()
                    if f.startswith(BUFFER_PREFIX)}
        module.lqplan_init = init_factors(built) if built.rank else None
        buffers = ((f, getattr(built, BUFFER_PREFIX + f)) for f in QuantizedTensor.TENSOR_FIELDS)
        return {f"{name}.{BUFFER_PREFIX}{f}": t for f, t in buffers if t is not None}

    # ---- after loading -----------------------------------------------------------------------------------
    def _process_model_after_weight_loading(self, model, **kwargs):
        release_mapped_pages(self.shard_files)  # what was read after the last planned weight
        if self.failure is not None:
            raise self.failure  # a UserError from build_layer (e.g. non-finite weights), or out of memory
        for name in self.modules:
            if "weight" in model.get_submodule(name)._parameters:  # its fp weight never came
                raise UserError(f"the checkpoint has no weight for planned module {name}; load the folder the "
                                "plan was made for")
        set_backend(model, dequant_backend_from_env())
        return model

    def _dequantize(self, model, dtype=None):
        """model.dequantize(): every quantized layer back to an nn.Linear holding dequant(Q) in `dtype`."""
        if isinstance(dtype, str):  # config.dtype may be stored by name
            dtype = getattr(torch, dtype)
        for name, layer in packed_layers(model).items():
            weight = layer.dequantize(dtype or torch.float32)
            linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                               device=weight.device, dtype=weight.dtype)
            with torch.no_grad():
                linear.weight.copy_(weight)
                if layer.bias is not None:
                    linear.bias.copy_(layer.bias)
            set_module(model, name, linear)
        return model

    def is_serializable(self, *args, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True  # through adapters (PEFT); the packed base stays frozen

    @property
    def is_qat_trainable(self) -> bool:
        return False


def register() -> None:
    """Make transformers map quant_method "lqplan" to LqplanConfig and LqplanHfQuantizer; safe to call again
    (transformers' register_* refuse a second registration)."""
    for mapping, registrar, cls in ((hf_auto.AUTO_QUANTIZATION_CONFIG_MAPPING, register_quantization_config,
                                     LqplanConfig),
                                    (hf_auto.AUTO_QUANTIZER_MAPPING, register_quantizer, LqplanHfQuantizer)):
        if mapping.get(QUANT_METHOD) is not cls:
            mapping.pop(QUANT_METHOD, None)  # a stale class from a reloaded module
            registrar(QUANT_METHOD)(cls)


register()
