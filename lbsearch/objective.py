"""The trial objective: score one plan at one fidelity -> :class:`TrialResult`.

Fidelities, cheapest first: ``assembled`` (blocks from the library, no healing; evaluated from
the teacher's hidden states at the first changed layer), ``brief`` (healed with
``budgets.trial_healing_tokens``), ``full`` (healed with ``budgets.healing_tokens``). Quality is
measured against the teacher on held-out teacher text and on every held-out real-text set;
throughput and memory are predicted for the space's serving target by the cost model.

No optuna, ray or mlflow here: the search, the executors and tracking build on this.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .attention import KINDS
from .cost import DEVICES, kv_bytes_per_seq, max_concurrency, predict
from .errors import LBSearchError
from .plan import Plan

FIDELITIES = ("assembled", "brief", "full")


@dataclass(frozen=True, kw_only=True)
class TrialResult:
    """What one scored plan is worth; flat numbers, JSON round trip."""

    plan: str  # Plan.parse(plan) gives the plan back
    key: str
    fidelity: str
    kl: float  # held-out teacher text, against the teacher
    perplexity: float
    agreement: float
    eval_tokens: int
    real_text: dict[str, dict[str, float]] = field(default_factory=dict)  # set name -> kl, perplexity, agreement
    throughput_ratio: float  # predicted decode tokens/s over the all-softmax model's, at the target
    tokens_per_s: float  # predicted decode tokens/s at the target
    kv_bytes_per_seq: int  # at the target's prompt + output tokens
    max_concurrency: int  # sequences whose caches fit the target's memory
    cost_source: str  # measured | calibrated | analytic
    cost_note: str = ""  # why the cost model fell back to analytic, when it did
    target: str = ""
    healing_tokens: int = 0
    seconds: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)  # layers per kind

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrialResult":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "TrialResult":
        return cls.from_dict(json.loads(text))

    @property
    def kv_mb_per_seq(self) -> float:
        return self.kv_bytes_per_seq / 2**20


def serving(workspace, plan: Plan) -> dict:
    """Predicted decode throughput and memory of ``plan`` at the space's target."""
    target, table, shape = workspace.space.target, workspace.cost_table(plan), workspace.target_shape
    pred = predict(table, plan)
    length = target.prompt + target.output
    memory = DEVICES[target.device].memory if target.device in DEVICES else _local_memory(workspace.device)
    return {"throughput_ratio": pred["decode_ratio"], "tokens_per_s": pred["decode_tps"],
            "kv_bytes_per_seq": kv_bytes_per_seq(shape, plan, length),
            "max_concurrency": int(max_concurrency(shape, plan, length, memory)),
            "cost_source": table.source, "cost_note": table.notes.get("fallback", ""),
            "target": f"{target.device} batch {target.batch} prompt {target.prompt} output {target.output}"}


def _local_memory(device) -> int:
    import os

    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def score(workspace, plan: Plan, fidelity: str = "assembled", tokens: int | None = None,
          keep: str | Path | None = None) -> TrialResult:
    """Quality (against the teacher) and predicted serving cost of ``plan`` at ``fidelity``;
    ``tokens`` overrides the fidelity's healing budget (fidelity studies). With ``keep`` a healed
    plan checkpoints to ``keep/checkpoints`` (a re-run resumes there) and is saved to
    ``keep/healed`` (:func:`lbsearch.export.save_healed`), so it can be exported later."""
    if fidelity not in FIDELITIES:
        raise LBSearchError(f"fidelity {fidelity!r}; allowed: {', '.join(FIDELITIES)}")
    start = time.perf_counter()
    heal = None
    if fidelity != "assembled":
        d = workspace.defaults
        heal = workspace.heal_config(tokens or (d.trial_healing_tokens if fidelity == "brief" else d.healing_tokens))
    keep = Path(keep) if keep is not None and heal is not None else None
    session = workspace.student(plan, heal, checkpoints=keep)
    with session as model:
        quality = workspace.evaluate() if heal else workspace.evaluate_assembled(plan)
        tokens = session.heal_state.tokens if session.heal_state is not None else 0
        if keep:
            from .distill.healed import save_healed

            save_healed(model, plan, heal, keep / "healed", {"tokens": tokens, "fidelity": fidelity,
                                                              "quality": {k: q.to_dict() for k, q in quality.items()}})
    main = quality.pop("heldout")
    return TrialResult(
        plan=str(plan), key=plan.key, fidelity=fidelity, kl=main.kl, perplexity=main.perplexity,
        agreement=main.agreement, eval_tokens=main.tokens,
        real_text={name: {"kl": q.kl, "perplexity": q.perplexity, "agreement": q.agreement}
                   for name, q in quality.items()},
        healing_tokens=tokens, seconds=time.perf_counter() - start,
        counts={k: plan.count(k) for k in KINDS}, **serving(workspace, plan))
