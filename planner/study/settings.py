"""What one study run is: the models, budgets, objectives, grid, fine-tune and how the GPU is shared, validated once."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..errors import UserError

OBJECTIVES = ("data-free", "fisher", "output")


@dataclass(frozen=True)
class StudySettings:
    models: tuple[tuple[str, str], ...] = ()  # (name, alias or folder), in the order they get the GPU
    budgets: tuple[float, ...] = (2.5, 2.75, 3.0, 3.5, 4.127)  # QLoRA's own bits are added per model
    objectives: tuple[str, ...] = OBJECTIVES
    headline: str = "output"  # the objective claims (a)-(c) and (e) are judged on; the others are reported beside
    near_budget: float = 2.75  # claim (c): this plan against QLoRA NF4 at QLoRA's own bits
    near_ratio: float = 1.05
    spearman_goal: float = 0.9  # claim (e); EXL3's noise-model ranking reaches 0.84 against swap tests
    bits: str = "2,3,4"
    blocks: str = "16,32,64,128"
    ranks: str = "8,16,32"
    qlora_rank: int = 16
    iters: int = 5
    calib: str = "pydoc"
    calib_tokens: int = 16384
    steps: int = 100
    batch_size: int = 8
    max_len: int = 256
    lr: float = 2e-4
    eval_texts: int = 64
    kl_tokens: int | None = None  # held-out tokens evaluate --plan scores (None: its default, 4096)
    seeds: int = 1
    key_seeds: int = 2  # QLoRA and every objective's plan at QLoRA's bits and at near_budget
    slots: int = 12  # processes at a time on the one GPU
    gpu_fraction: float = 0.85  # of the card's memory the running processes' estimates may fill
    deadline_s: float = 540.0  # from the start: no task starts that would end later; what runs then is stopped
    device: str = "auto"
    tiny: bool = False
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if not self.models:
            raise UserError("no model given; pass --model NAME[=FOLDER] (e.g. --model smollm2-135m)")
        bad = [o for o in self.objectives if o not in OBJECTIVES]
        if bad or not self.objectives:
            raise UserError(f"--objectives {','.join(self.objectives)}: use some of {','.join(OBJECTIVES)}")
        if self.headline not in self.objectives:
            raise UserError(f"--headline {self.headline} is not among --objectives {','.join(self.objectives)}")
        for name, value in (("--steps", self.steps), ("--batch-size", self.batch_size), ("--max-len", self.max_len),
                            ("--eval-texts", self.eval_texts), ("--seeds", self.seeds), ("--slots", self.slots)):
            if value < 1:
                raise UserError(f"{name} {value} must be >= 1")
        if self.key_seeds < self.seeds:
            object.__setattr__(self, "key_seeds", self.seeds)
        if not self.budgets or min(self.budgets) <= 0:
            raise UserError(f"--budgets {self.budgets}: give positive bits per parameter, e.g. 2.5,2.75,3")
        grid = (self.bits.split(","), self.blocks.split(","), self.ranks.split(","))
        if "4" not in grid[0] or "64" not in grid[1] or str(self.qlora_rank) not in grid[2]:
            raise UserError(f"the grid (--bits {self.bits} --blocks {self.blocks} --ranks {self.ranks}) must hold "
                            f"QLoRA's NF4, blocks of 64, rank {self.qlora_rank}: its arm is read from the profile")
        if not 0 < self.gpu_fraction <= 1:
            raise UserError(f"--gpu-fraction {self.gpu_fraction} must be in (0, 1]")
        if self.deadline_s < 60:
            raise UserError(f"--deadline {self.deadline_s:g} s leaves no time for a fine-tune; give at least 60")


def tiny_settings(models: tuple[tuple[str, str], ...], **overrides) -> StudySettings:
    """The CPU smoke run on a tiny random decoder (64 wide: a rank-4 adapter costs 2 bits/param there, so the
    budgets sit above 4): every stage, every output; its numbers mean nothing."""
    base = StudySettings(models=models, budgets=(4.5, 5.0), near_budget=5.0, bits="2,4", blocks="64", ranks="4",
                         qlora_rank=4, iters=1, calib_tokens=256, steps=2, batch_size=2, max_len=32, eval_texts=2,
                         kl_tokens=256, seeds=1, key_seeds=2, slots=2, deadline_s=3600.0, device="cpu", tiny=True)
    return replace(base, **overrides)
