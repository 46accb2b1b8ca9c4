"""The default LoRA ranks for a model: a fact of its matrix widths, shared by the profile grid and `lqplan memory`."""

from __future__ import annotations

DEFAULT_RANKS = (16, 32, 64)  # `lqplan grid` without a model or --shape, and make_grid()'s default
# Default ranks for a model (default_ranks): r, 2r, 4r with r the largest power of two <= w / RANK_WIDTH_RATIO, w the
# median of the planned matrices' smaller sides, r within RANK_BASE_RANGE. A rank-r adapter on a w x w matrix
# costs 16·r·2w / w² = 32r/w bits per weight, so the smallest default rank costs at most 2/3 bit per weight and the
# cheapest plan fits 2.75 bits: MiniLM (w 384) -> 8,16,32; Gemma 3 270M (w 640) -> 8,16,32; 4096+ -> 16,32,64.
RANK_WIDTH_RATIO = 48
RANK_BASE_RANGE = (4, 16)


def default_ranks(widths) -> str:
    """The default --ranks for matrices whose smaller sides are `widths` (see RANK_WIDTH_RATIO), e.g. "8,16,32"."""
    widths = sorted(int(w) for w in widths)
    if not widths:
        return ",".join(map(str, DEFAULT_RANKS))
    median = widths[len(widths) // 2]
    lo, hi = RANK_BASE_RANGE
    base = lo
    while base * 2 <= min(hi, median / RANK_WIDTH_RATIO):
        base *= 2
    return ",".join(str(base * k) for k in (1, 2, 4))
