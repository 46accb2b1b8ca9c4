"""The output-aware objective's calibration statistics (docs/objectives.md): for every planned matrix, the second
moment of its inputs R = E[x·xᵀ] and row weights d_i = E[(∂ℓ/∂y_i)²] (its squared output gradients, mean over
tokens), from one forward and one backward pass over the calibration text.

The pass: the model in eval mode (no dropout: R is what the layers see when the model runs), the calibration text
tokenized as for the Fisher weights (planner.profile.fisher.calib_batches). Causal LMs: one example at a time, the
summed next-token loss of the example, so each token's output gradient is that of its own loss terms. Encoders
without a language-model head: the SimCSE loss (planner.profile.fisher) with one view (dropout off, so a second view
would be identical), summed over the batch's sentences; padding positions are left out of both statistics.

Matrices that read the same input tensor share one R (q/k/v; gate/up): the group is found from the identity of the
input tensor in the forward pass, so no per-architecture table is needed; each matrix keeps its own row weights.

Cache: <cache>/<fingerprint>/output-stats/<key>/, one safetensors file per group (R in fp32 and each member's row
weights) and index.json (groups, members, layers, tokens) written last: a folder without it is incomplete and the
pass runs again. The profile reads them through OutputStats one group at a time, keeping only the groups of the
decoder layer it is on.

Memory: the pass itself holds every group's R at once, Σ n² fp32 over the groups: 1.3 MB a layer for MiniLM, ~25 MB
for Gemma 3 270M (18 layers: ~0.44 GB), but ~1.1 GB a layer for a 13B Llama (3 x 5120² + 13824²; down_proj's R alone
is 13,824² floats = 764 MB), 43 GB over its 40 layers: beyond small models the pass would have to run layer by layer.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from quant.weighting import Weighting, damped_cholesky

from ..corpus import CalibText, load_calib
from ..errors import UserError
from ..fsio import read_json, write_bytes, write_json
from ..model.weights import read_header_table
from ..schema import INT, STR, list_of, map_of, optional, problem
from ..model.tokenizer import load_tokenizer, short_digest, tokenizer_digest
from .cache import safe_name
from .fisher import calib_batches, example_pieces, find_modules, load_calib_model

log = logging.getLogger("lqplan")
SCHEMA = "lqplan.output-stats/1"
INDEX = "index.json"
SIMCSE_TEMPERATURE = 0.05  # as planner.profile.fisher's SimCSE loss


@dataclass
class GroupStats:
    """One input group: its members (module paths) in model order, the input second moment (n, n) and each member's
    row weights (m,), both fp32 on the CPU, and the tokens they are means over."""
    members: list[str]
    second_moment: torch.Tensor
    rows: dict[str, torch.Tensor]
    tokens: int
    layer: int | None = None


def _one_view_simcse(model, batch) -> torch.Tensor:
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp_min(1), dim=-1)
    logits = emb @ emb.T / SIMCSE_TEMPERATURE
    return torch.nn.functional.cross_entropy(logits, torch.arange(len(emb), device=logits.device), reduction="sum")


class _Recorder:
    """Forward hooks on the planned modules: group each by the input tensor it reads, add xᵀx of the group's inputs
    (real tokens only) to the group's sum, and, when gradients flow, the squared output gradients to each member's
    row sums."""

    def __init__(self, modules: dict[str, torch.nn.Module], rows: bool):
        self.modules, self.rows = modules, rows
        self.leader: dict[str, str] = {}  # member -> the first module (in call order) that read its input
        self.sums: dict[str, torch.Tensor] = {}
        self.row_sums: dict[str, torch.Tensor] = {}
        self.tokens = 0
        self.mask: torch.Tensor | None = None  # (batch, seq) bool of the current forward, None: every position
        self._inputs: dict[int, tuple[torch.Tensor, str]] = {}
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in modules.items()]

    def start(self, mask: torch.Tensor | None) -> None:
        self.mask = None if mask is None else mask.bool().reshape(-1)
        self._inputs = {}

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._inputs = {}

    def _select(self, t: torch.Tensor) -> torch.Tensor:
        flat = t.reshape(-1, t.shape[-1])
        return flat if self.mask is None else flat[self.mask]

    def _hook(self, name: str):
        def hook(module, inputs, output):
            x = inputs[0]
            seen = self._inputs.get(id(x))
            leader = seen[1] if seen is not None and seen[0] is x else name
            if leader == name:
                self._inputs[id(x)] = (x, name)  # held until the pass ends, so the id cannot be reused meanwhile
            if self.leader.setdefault(name, leader) != leader:
                raise UserError(f"{name} read the input of {leader} in one calibration batch but not in another; "
                                "this model's layers cannot share input statistics, use --objective fisher")
            if leader == name:
                flat = self._select(x.detach()).float()
                s = self.sums.get(name)
                self.sums[name] = flat.T @ flat if s is None else s.addmm_(flat.T, flat)
            if self.rows and output.requires_grad:
                output.register_hook(self._grad_hook(name))
        return hook

    def _grad_hook(self, name: str):
        mask = self.mask

        def hook(grad):
            flat = grad.detach().reshape(-1, grad.shape[-1])
            flat = (flat if mask is None else flat[mask]).float()
            s = flat.pow(2).sum(0)
            self.row_sums[name] = s if name not in self.row_sums else self.row_sums[name] + s
        return hook


def compute_output_stats(folder: Path, matrices, calib: CalibText, max_tokens: int = 16384, seq_len: int = 128,
                         batch_size: int = 16, device: str = "cpu", rows: bool = True,
                         progress=None, tokenizer=None) -> dict[str, GroupStats]:
    """Input groups (keyed by their first member) of the planned `matrices` (MatrixInfo) of the model in `folder`
    (`tokenizer`: default, the folder's own). rows=False skips the backward pass: every member's row weights are
    then ones (R alone)."""
    names = [m.name for m in matrices]
    layer_of = {m.name: m.layer for m in matrices}
    batches = calib_batches(folder, calib, max_tokens, seq_len, batch_size, needs="The output-aware objective",
                            tokenizer=tokenizer)
    model, causal = load_calib_model(folder, device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    modules = find_modules(model, names)
    recorder = _Recorder(modules, rows)
    # The embeddings' output is made a leaf that needs a gradient, so that every planned module's output has one
    # without computing any parameter's gradient.
    embed = model.get_input_embeddings()
    leaf = embed.register_forward_hook(lambda m, i, o: o.requires_grad_(True)) if rows else None
    try:
        for enc in (progress(batches) if progress else batches):
            enc = {k: v.to(device) for k, v in enc.items()}
            for piece in example_pieces(enc, causal):
                length = piece["input_ids"].shape[1]
                if causal and length < 2:
                    continue  # nothing to predict, no loss to weigh the rows by
                recorder.start(None if causal else piece["attention_mask"])
                with torch.set_grad_enabled(rows):
                    if causal:
                        out = model(**piece, labels=piece["input_ids"] if rows else None)
                        loss = out.loss * (length - 1) if rows else None  # the example's summed token losses
                    else:
                        loss = _one_view_simcse(model, piece) if rows else model(**piece)
                if rows:
                    if not math.isfinite(float(loss.detach())):
                        raise UserError("the calibration loss is not finite; check the model weights and the "
                                        "calibration text")
                    loss.backward()
                recorder.tokens += length if causal else int(piece["attention_mask"].sum())
    finally:
        recorder.close()
        if leaf is not None:
            leaf.remove()

    missed = [n for n in names if n not in recorder.leader]
    if missed:
        raise UserError(f"planned matrix {missed[0]} was never called in the calibration pass ({len(missed)} such); "
                        "use --objective fisher for this model")
    groups: dict[str, GroupStats] = {}
    count = recorder.tokens
    for name in names:
        leader = recorder.leader[name]
        if leader not in groups:
            groups[leader] = GroupStats([], (recorder.sums[leader] / count).cpu(), {}, count, layer_of.get(leader))
        g = groups[leader]
        g.members.append(name)
        m = int(modules[name].weight.shape[0 if not _is_conv1d(modules[name]) else 1])
        g.rows[name] = ((recorder.row_sums[name] / count).cpu() if name in recorder.row_sums
                        else torch.ones(m))
    return groups


def _is_conv1d(module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


# ---- cache -----------------------------------------------------------------------------------------------------
def stats_key(text: CalibText, tokens: int) -> str:
    """The cache key of one calibration source and size (the Fisher weights' key has the same form)."""
    return f"{text.name.replace('/', '_')[-40:]}-{text.digest}-{tokens}"


def stats_folder(cache_dir: Path, fingerprint: str, key: str) -> Path:
    return Path(cache_dir) / fingerprint.split(":")[-1][:24] / "output-stats" / key


def save_output_stats(folder: Path, groups: dict[str, GroupStats], meta: dict) -> None:
    """One safetensors file per group, then the index (atomic writes; the index last marks the folder complete)."""
    from safetensors.torch import save

    index = {"schema": SCHEMA, **meta, "groups": {}}
    for leader, g in groups.items():
        file = f"{safe_name(leader)}.safetensors"
        tensors = {"second_moment": g.second_moment.float().contiguous(),
                   **{f"rows.{n}": r.float().contiguous() for n, r in g.rows.items()}}
        write_bytes(folder / file, save(tensors, metadata={"tokens": str(g.tokens)}))
        index["groups"][leader] = {"file": file, "members": g.members, "layer": g.layer, "tokens": g.tokens,
                                   "inputs": int(g.second_moment.shape[0])}
    write_json(folder / INDEX, index)


_INDEX_SPEC = {"schema": STR, "groups": map_of({"file": STR, "members": list_of(STR), "layer?": optional(INT),
                                                "tokens?": INT, "inputs": INT})}


def _read_index(folder: Path) -> dict | None:
    """The cache's index, or None (recomputed) where it is missing, unreadable, malformed, or names a file that is
    not a plain .safetensors name inside the folder."""
    if not (folder / INDEX).exists():
        return None
    try:
        index = read_json(folder / INDEX, "it is recomputed")
        found = problem(index, _INDEX_SPEC, INDEX) or (None if index["schema"] == SCHEMA else "another schema")
        bad = [] if found else [g["file"] for g in index["groups"].values()
                                if Path(g["file"]).name != g["file"] or not g["file"].endswith(".safetensors")]
        if not found and not bad:
            return index
        log.warning("ignoring the output statistics in %s (%s; they will be recomputed)", folder,
                    found or f"the file name {bad[0][:60]!r} is not inside the folder")
    except UserError as e:
        log.warning("ignoring the output statistics: %s (they will be recomputed)", e)
    return None


class OutputStats:
    """The cached statistics of one model and calibration source, read one group at a time: get(name) is the
    Weighting of one matrix (the damped Cholesky factor of its group's R and its row weights). Only the groups of the
    decoder layer last asked for are kept (plus whatever a caller still holds); safe to call from several threads."""

    objective = "output"

    def __init__(self, folder: Path, index: dict, damping: float):
        self.folder, self.index, self.damping = Path(folder), index, float(damping)
        self.group_of = {n: leader for leader, g in index["groups"].items() for n in g["members"]}
        self._held: dict[str, tuple[torch.Tensor, dict]] = {}
        self._lock = threading.Lock()

    def __contains__(self, name: str) -> bool:
        return name in self.group_of

    def _load(self, leader: str):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        info = self.index["groups"][leader]
        damaged = "delete that folder and run again to recompute them"
        try:
            read_header_table(self.folder / info["file"], damaged)  # checked before safetensors reads it
            t = load_file(str(self.folder / info["file"]))
            if tuple(t["second_moment"].shape) != (info["inputs"],) * 2:
                raise KeyError("second_moment")
            chol = damped_cholesky(t["second_moment"], self.damping)
            rows = {n: t[f"rows.{n}"] for n in info["members"]}
        except (SafetensorError, OSError, KeyError, UserError):
            raise UserError(f"the output statistics in {self.folder} are damaged; delete that folder and run again "
                            "to recompute them") from None
        except ValueError as e:
            raise UserError(f"the input statistics of {leader} cannot be used ({e}); raise --calib-tokens") from None
        return chol, rows

    def get(self, name: str, default=None):
        leader = self.group_of.get(name)
        if leader is None:
            return default
        with self._lock:
            if leader not in self._held:
                layer = self.index["groups"][leader].get("layer")
                self._held = {k: v for k, v in self._held.items()
                              if self.index["groups"][k].get("layer") == layer}
                self._held[leader] = self._load(leader)
            chol, rows = self._held[leader]
        return Weighting.output(chol, rows[name])


def get_output_stats(source, matrices, calib: str, cache_dir: Path, tokens: int, device, progress: bool,
                     damping: float) -> tuple[OutputStats, str, str]:
    """The output statistics of `source` on the calibration source `calib`, computed once and read from the cache
    afterwards; returns them with their key and the tokenizer's digest (part of the key)."""
    text = load_calib(calib)
    tokenizer = load_tokenizer(source.folder)
    digest = tokenizer_digest(tokenizer)
    key = f"{stats_key(text, tokens)}-tok{short_digest(digest)}"
    folder = stats_folder(cache_dir, source.fingerprint, key)
    names = [m.name for m in matrices]
    index = _read_index(folder)
    if index is not None and all(n in {m for g in index["groups"].values() for m in g["members"]} for n in names):
        log.info("output statistics: reusing %s", folder)
        return OutputStats(folder, index, damping), key, digest
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = lambda it: tqdm(it, desc="calibration", unit="batch", dynamic_ncols=True)  # noqa: E731
    groups = compute_output_stats(source.folder, matrices, text, max_tokens=tokens, device=str(device), progress=bar,
                                  tokenizer=tokenizer)
    save_output_stats(folder, groups, {"calib": text.name, "digest": text.digest, "tokens": tokens,
                                       "row_weights": True, "tokenizer": digest})
    return OutputStats(folder, _read_index(folder), damping), key, digest
