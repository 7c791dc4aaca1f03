"""Heal one plan end to end: transfer missing blocks, assemble, measure, distil, measure, save."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from ..evaluate import TeacherLogits, evaluate
from ..plan import Plan
from ..surgery import apply_plan
from .healing import HealConfig, add_lora, heal
from .healed import save_healed
from .library import BlockLibrary, lswa_pairs


def heal_plan(model, plan: Plan, library: BlockLibrary, calibration, train, heldout, teacher: TeacherLogits,
              cfg: HealConfig, out_dir: str | Path, resume: bool = True, progress: bool = True,
              extra_heldout: dict[str, tuple[torch.Tensor, TeacherLogits]] | None = None) -> dict:
    """Returns a report with transfer errors, quality before/after healing and timing.

    ``extra_heldout``: more named held-out sets (blocks, teacher logits), measured before and after
    too; the main ``heldout`` set is also measured every ``cfg.eval_tokens`` during healing.
    """
    sets = {"heldout": (heldout, teacher), **(extra_heldout or {})}

    def quality() -> dict:
        return {name: evaluate(model, b, t).to_dict() for name, (b, t) in sets.items()}

    start = time.perf_counter()
    transfers = library.ensure(model, lswa_pairs(plan), calibration, progress=progress)
    transfer_s = time.perf_counter() - start
    teacher_q = quality()
    handle = apply_plan(model, plan, library)
    before = quality()
    add_lora(model, cfg)
    state = heal(model, handle, train, cfg, out_dir, resume=resume, progress=progress,
                 evaluator=lambda: evaluate(model, heldout, teacher).to_dict())
    after = quality()
    errors = [library.metrics(i, s)["rel_error_after"] for i, s in lswa_pairs(plan)]
    report = {"plan": str(plan), "teacher": teacher_q["heldout"], "before": before["heldout"],
              "after": after["heldout"], "tokens": state.tokens, "seconds": state.seconds,
              "tokens_per_s": state.tokens / max(state.seconds, 1e-9), "transfer_seconds": transfer_s,
              "transfers": transfers,
              "transfer_rel_error": {"mean": sum(errors) / len(errors), "max": max(errors)} if errors else None,
              "final_loss": state.losses[-1] if state.losses else None, "curve": state.evals,
              "extra": {name: {"teacher": teacher_q[name], "before": before[name], "after": after[name]}
                        for name in sets if name != "heldout"}}
    save_healed(model, plan, cfg, Path(out_dir) / "healed", report)
    return report
