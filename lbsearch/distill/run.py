"""Heal one plan end to end: transfer missing blocks, assemble, measure, distil, measure, save."""
from __future__ import annotations

from pathlib import Path

from ..evaluate import TeacherLogits, evaluate
from ..plan import Plan
from ..surgery import apply_plan
from .healing import HealConfig, add_lora, heal
from .healed import save_healed
from .library import BlockLibrary, lswa_pairs


def heal_plan(model, plan: Plan, library: BlockLibrary, calibration, train, heldout, teacher: TeacherLogits,
              cfg: HealConfig, out_dir: str | Path, resume: bool = True, progress: bool = True) -> dict:
    """Returns a report with transfer errors, quality before/after healing and timing."""
    transfers = library.ensure(model, lswa_pairs(plan), calibration, progress=progress)
    teacher_q = evaluate(model, heldout, teacher)
    handle = apply_plan(model, plan, library)
    before = evaluate(model, heldout, teacher)
    add_lora(model, cfg)
    state = heal(model, handle, train, cfg, out_dir, resume=resume, progress=progress)
    after = evaluate(model, heldout, teacher)
    errors = [library.metrics(i, s)["rel_error_after"] for i, s in lswa_pairs(plan)]
    report = {"plan": str(plan), "teacher": teacher_q.to_dict(), "before": before.to_dict(),
              "after": after.to_dict(), "tokens": state.tokens, "seconds": state.seconds,
              "tokens_per_s": state.tokens / max(state.seconds, 1e-9), "transfers": transfers,
              "transfer_rel_error": {"mean": sum(errors) / len(errors), "max": max(errors)} if errors else None,
              "final_loss": state.losses[-1] if state.losses else None}
    save_healed(model, plan, cfg, Path(out_dir) / "healed", report)
    return report
