"""The front as a report: a text table, pareto.json / pareto.csv, pareto.png and hypervolume.png.

Quality numbers come from the highest fidelity a plan was scored at (re-scored front plans: the
re-score fidelity; the rest: the search's) and every row says which; throughput and memory come
from the cost model, whose source (measured / calibrated / analytic) each row names.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

from ..attention import KINDS
from ..io import atomic_write_bytes, atomic_write_json, atomic_write_text
from ..objective import FIDELITIES
from .objectives import OBJECTIVES
from .pareto import Front, Scored

QUALITY = ("kl", "perplexity", "agreement")


def best_result(point: Scored, search_fidelity: str):
    """(fidelity, TrialResult) of the highest fidelity that scored ``point``."""
    done = [(f, r) for f, r in point.rescored.items() if not isinstance(r, dict)]
    return max([(search_fidelity, point.result)] + done, key=lambda fr: FIDELITIES.index(fr[0]))


def rows(front: Front) -> list[dict]:
    out = []
    for p in front.points:
        fidelity, best = best_result(p, front.fidelity)
        r = p.result
        out.append({"trial": p.trial, "plan": p.plan, "key": p.key, "origin": p.origin,
                    **{f"n_{k}": r.counts.get(k, 0) for k in KINDS},
                    **{m: getattr(best, m) for m in QUALITY}, "quality_fidelity": fidelity,
                    **{f"search_{m}": getattr(r, m) for m in QUALITY}, "search_fidelity": front.fidelity,
                    "throughput_ratio": r.throughput_ratio, "kv_mb_per_seq": r.kv_mb_per_seq,
                    "cost_source": r.cost_source, "target": r.target,
                    "rescored": {f: (v if isinstance(v, dict) else v.to_dict()) for f, v in p.rescored.items()}})
    return out


def render(front: Front) -> str:
    letters = "/".join(k.letter for k in KINDS.values())
    ref = ", ".join(f"{n} {v:.4g}" for n, v in zip(front.objectives, front.reference))
    lines = [f"Pareto front of {front.study}: {len(front.points)} plans of {len(front.scored)} scored; "
             f"hypervolume {front.hypervolume:.5g} (reference {ref})",
             f"{'trial':>5} {letters:>8} {'KL':>8} {'ppl':>8} {'quality at':>10} {'speed x':>7} {'KV MB':>7}  plan"]
    for row in rows(front):
        counts = "/".join(str(row[f"n_{k}"]) for k in KINDS)
        mark = " (threshold)" if row["origin"] == "threshold" else ""
        lines.append(f"{row['trial']:>5} {counts:>8} {row['kl']:8.4f} {row['perplexity']:8.3f} "
                     f"{row['quality_fidelity']:>10} {row['throughput_ratio']:7.3f} {row['kv_mb_per_seq']:7.2f}  "
                     f"{row['plan']}{mark}")
    sources = sorted({p.result.cost_source for p in front.points})
    if sources:
        lines.append(f"speed and KV memory: predicted by the cost model ({', '.join(sources)} costs) for "
                     f"{front.points[0].result.target}")
    return "\n".join(lines)


def to_csv(front: Front) -> str:
    table = rows(front)
    buf = io.StringIO()
    if table:
        names = [k for k in table[0] if k != "rescored"]
        writer = csv.DictWriter(buf, fieldnames=names, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(table)
    return buf.getvalue()


def to_json(front: Front, storage: str = "") -> dict:
    return {"study": front.study, "storage": storage, "objectives": front.objectives, "directions": front.directions,
            "reference_point": front.reference, "hypervolume": front.hypervolume, "search_fidelity": front.fidelity,
            "scored_plans": len(front.scored), "front": rows(front), "hypervolume_history": front.history}


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig, plt) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def pareto_png(front: Front) -> bytes:
    """The front over the first two objectives (every scored plan in grey, threshold plans marked,
    re-scored quality as hollow markers)."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(7, 4.8))
    names = front.objectives[:2]

    def xy(points, get=lambda p, i: p.values[i]):
        if len(names) == 1:
            return [p.trial for p in points], [get(p, 0) for p in points]
        return [get(p, 0) for p in points], [get(p, 1) for p in points]

    ax.scatter(*xy(front.scored), s=12, c="0.7", label="scored plans")
    ax.plot(*xy(front.points), "o-", c="tab:blue", ms=5, label=f"front ({front.fidelity})", drawstyle="default")
    if front.thresholds:
        ax.scatter(*xy(front.thresholds), marker="x", s=60, c="tab:red", label="threshold plans (paper)")
    again = [p for p in front.points if any(not isinstance(r, dict) for r in p.rescored.values())]
    if again:
        def rescored_value(p, i):
            fidelity, best = best_result(p, front.fidelity)
            return OBJECTIVES[front.objectives[i]].get(best)
        ax.scatter(*xy(again, rescored_value), facecolors="none", edgecolors="tab:orange", s=60,
                   label="front plans re-scored")
    xs = [p.values[0] for p in front.scored]
    if len(names) > 1 and xs and min(xs) > 0 and max(xs) > 100 * min(xs):
        ax.set_xscale("log")  # KL spans decades: a removed early layer costs 100x a linearised late one
    ax.set_xlabel("trial" if len(names) == 1 else OBJECTIVES[names[0]].label)
    ax.set_ylabel(OBJECTIVES[names[-1]].label)
    ax.set_title(f"{front.study}: {len(front.points)} Pareto plans, hypervolume {front.hypervolume:.4g}")
    ax.legend(fontsize=8)
    return _png(fig, plt)


def hypervolume_png(front: Front) -> bytes:
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    if front.history:
        trials, hv = zip(*front.history)
        ax.step(trials, hv, where="post")
    ax.set_xlabel("trial")
    ax.set_ylabel("hypervolume")
    ax.set_title(f"{front.study}: hypervolume after each trial")
    return _png(fig, plt)


def write_report(front: Front, out_dir: str | Path, storage: str = "") -> dict[str, Path]:
    out = Path(out_dir)
    return {"json": atomic_write_json(out / "pareto.json", to_json(front, storage)),
            "csv": atomic_write_text(out / "pareto.csv", to_csv(front)),
            "png": atomic_write_bytes(out / "pareto.png", pareto_png(front)),
            "hypervolume": atomic_write_bytes(out / "hypervolume.png", hypervolume_png(front))}
