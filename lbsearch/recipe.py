"""The healing recipe: per-layer transfer and global distillation settings, validated on creation.

Plain frozen dataclasses (no torch), so the search space can validate its ``heal:`` and
``transfer:`` sections against them: defaults live here and only here.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

from .errors import LBSearchError

ATTN_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
TEACHER_SOURCES = ("auto", "cached", "online")
TUNE_KINDS = ("lora", "full")  # what trains beside the new attention parameters; see lbsearch.distill.tuning


def _check_ranges(obj, where: str, ranges: dict[str, tuple[float, float]]) -> None:
    """Every named field is a number within its closed range (bools are not numbers)."""
    for f in fields(obj):
        if f.name not in ranges:
            continue
        value, (low, high) = getattr(obj, f.name), ranges[f.name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise LBSearchError(f"{where}: {f.name} must be a number in [{low:g}, {high:g}], got {value!r}")


@dataclass(frozen=True, kw_only=True)
class TransferConfig:
    """Per-layer transfer: train one layer's new attention parameters to match its softmax output."""

    steps: int = 300
    lr: float = 3e-3
    batch_size: int = 4  # blocks per step
    val_fraction: float = 0.125
    seed: int = 0

    def __post_init__(self):
        _check_ranges(self, "transfer", {"steps": (0, 10**7), "lr": (0, 10), "batch_size": (1, 10**6),
                                         "val_fraction": (0, 0.9)})


@dataclass(frozen=True, kw_only=True)
class HealConfig:
    """Global distillation (see lbsearch.distill.healing): budget, optimisation, LoRA or full
    tuning, teacher targets."""

    tokens: int = 65536
    batch_size: int = 4  # blocks per micro-batch
    grad_accum: int = 1
    seq_len: int = 0  # training block length (0: the data's); long blocks show LSWA states long contexts
    lr: float = 1e-3  # new attention parameters
    lora_lr: float = 2e-4
    warmup_fraction: float = 0.05
    temperature: float = 1.0
    ce_weight: float = 0.0
    attn_mse_weight: float = 0.0
    tune: str = "lora"  # "full": the projections' weights themselves instead of adapters (see TUNE_KINDS)
    full_lr: float = 5e-5  # the fully tuned weights (tune="full")
    lora_rank: int = 16  # 0: no adapters
    lora_alpha: int = 32
    lora_mlp: bool = True  # adapters (or full tuning) on the MLP projections too
    teacher: str = "auto"  # see TEACHER_SOURCES and lbsearch.distill.healing
    top_k: int = 128  # teacher tokens kept per position by the cached teacher
    checkpoint_tokens: int = 1_000_000
    eval_tokens: int = 0  # held-out quality every this many tokens (0: only before and after)
    max_grad_norm: float = 1.0
    divergence_factor: float = 10.0
    seed: int = 0

    def __post_init__(self):
        _check_ranges(self, "healing", {
            "tokens": (1, 10**11), "seq_len": (0, 10**6), "batch_size": (1, 10**6), "grad_accum": (1, 10**6), "lr": (0, 10),
            "lora_lr": (0, 10), "full_lr": (0, 10), "warmup_fraction": (0, 1), "temperature": (1e-3, 1e3), "ce_weight": (0, 1e3),
            "attn_mse_weight": (0, 1e3), "lora_rank": (0, 65536), "lora_alpha": (0, 10**6), "top_k": (1, 10**7),
            "checkpoint_tokens": (1, 10**12), "eval_tokens": (0, 10**12), "max_grad_norm": (1e-9, 1e9),
            "divergence_factor": (1, 1e9)})
        if self.teacher not in TEACHER_SOURCES:
            raise LBSearchError(f"healing: teacher={self.teacher!r}; allowed: {', '.join(TEACHER_SOURCES)}")
        if self.tune not in TUNE_KINDS:
            raise LBSearchError(f"healing: tune={self.tune!r}; allowed: {', '.join(TUNE_KINDS)}")
        if self.teacher == "cached" and self.attn_mse_weight > 0:
            raise LBSearchError("healing: attn_mse_weight needs the teacher's attention outputs; "
                                "use teacher='online' with it")

    def teacher_source(self, train_tokens: int) -> str:
        """"cached" or "online": what ``teacher`` means for a training set of ``train_tokens``."""
        if self.teacher != "auto":
            return self.teacher
        return "cached" if self.tokens > train_tokens and self.attn_mse_weight == 0 else "online"

    def lora_targets(self) -> list[str]:
        return list(ATTN_TARGETS + (MLP_TARGETS if self.lora_mlp else ()))
