"""One-layer-at-a-time sensitivity: the quality drop when only layer i becomes lswa or none.

The teacher's hidden states are computed once per batch; each changed forward starts at the
changed layer (layers before it are untouched, so their outputs are the teacher's).
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .evaluate import Quality, TeacherLogits, evaluate, quality_from_sums, quality_sums
from .io import atomic_write_bytes, atomic_write_json, atomic_write_text
from .layers import head, hidden_states, run_layers
from .models import decoder_layers
from .plan import LayerSpec, Plan
from .surgery import apply_plan

METRICS = ("kl", "perplexity", "agreement")


@dataclass
class SensitivityTable:
    """Quality per (kind, layer) with exactly that layer changed; ``base`` is the unchanged model."""

    model: str
    tokens: int
    base: Quality
    specs: dict[str, LayerSpec]
    rows: dict[str, list[Quality]] = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return len(next(iter(self.rows.values())))

    def column(self, kind: str, metric: str = "kl") -> list[float]:
        return [getattr(q, metric) for q in self.rows[kind]]

    def to_dict(self) -> dict:
        return {"model": self.model, "tokens": self.tokens, "base": self.base.to_dict(),
                "specs": {k: s.to_dict() for k, s in self.specs.items()},
                "rows": {k: [q.to_dict() for q in v] for k, v in self.rows.items()}}

    @classmethod
    def from_dict(cls, data: dict) -> "SensitivityTable":
        return cls(model=data["model"], tokens=data["tokens"], base=Quality(**data["base"]),
                   specs={k: LayerSpec(**s) for k, s in data["specs"].items()},
                   rows={k: [Quality(**q) for q in v] for k, v in data["rows"].items()})

    @classmethod
    def load(cls, path: str | Path) -> "SensitivityTable":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_csv(self) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf)
        kinds = list(self.rows)
        writer.writerow(["layer"] + [f"{k}_{m}" for k in kinds for m in METRICS])
        for i in range(self.n_layers):
            writer.writerow([i] + [f"{getattr(self.rows[k][i], m):.6g}" for k in kinds for m in METRICS])
        return buf.getvalue()

    def render(self) -> str:
        kinds = list(self.rows)
        head_row = "layer " + " ".join(f"{k + ' KL':>11} {k + ' ppl':>11}" for k in kinds)
        lines = [f"base: ppl {self.base.perplexity:.3f} on {self.tokens} held-out tokens", head_row]
        for i in range(self.n_layers):
            cells = " ".join(f"{self.rows[k][i].kl:11.4f} {self.rows[k][i].perplexity:11.3f}" for k in kinds)
            lines.append(f"{i:5d} {cells}")
        return "\n".join(lines)

    def heatmap_png(self) -> bytes:
        """KL per (kind, layer) as a heatmap; darker is worse; each cell annotated with its value."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        kinds = list(self.rows)
        kl = torch.tensor([self.column(k) for k in kinds])
        data = kl.clamp_min(1e-6).log10().numpy()
        fig, ax = plt.subplots(figsize=(max(7, self.n_layers * 0.42), 1.6 + 0.7 * len(kinds)))
        im = ax.imshow(data, aspect="auto", cmap="magma_r")
        labels = [f"{k} ({'trained' if 'trained' in k else 'untrained'} {self.specs[k].token()})"
                  if self.specs[k].kind == "lswa" else k for k in kinds]
        ax.set_yticks(range(len(kinds)), labels)
        ax.set_xticks(range(self.n_layers))
        ax.set_xlabel("layer")
        for (row, col), value in zip(((r, c) for r in range(len(kinds)) for c in range(self.n_layers)), kl.flatten()):
            shade = data[row, col] > (data.min() + data.max()) / 2
            ax.text(col, row, f"{value:.2g}", ha="center", va="center", fontsize=6,
                    color="white" if shade else "black")
        ax.set_title(f"{self.model}: KL to the teacher with only that layer changed "
                     f"({self.tokens} held-out tokens; darker = worse)")
        fig.colorbar(im, ax=ax, fraction=0.03, label="log10 KL")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=120)
        plt.close(fig)
        return buf.getvalue()

    def save(self, out_dir: str | Path) -> dict[str, Path]:
        out = Path(out_dir)
        return {
            "json": atomic_write_json(out / "sensitivity.json", self.to_dict()),
            "csv": atomic_write_text(out / "sensitivity.csv", self.to_csv()),
            "png": atomic_write_bytes(out / "sensitivity.png", self.heatmap_png()),
        }


def _single_change(n_layers: int, layer: int, spec: LayerSpec) -> Plan:
    return Plan.softmax(n_layers).with_layer(layer, spec)


@torch.no_grad()
def sensitivity(model, blocks: torch.Tensor, teacher: TeacherLogits, specs: dict[str, LayerSpec],
                batch_size: int = 4, libraries: dict | None = None, progress: bool = True,
                model_name: str = "model") -> SensitivityTable:
    """The table, reusing the teacher's hidden states up to each changed layer.

    ``specs`` names the columns; ``libraries`` maps a column to the block library whose trained
    LSWA blocks it uses (columns without one use untrained blocks).
    """
    libraries = libraries or {}
    n_layers = len(decoder_layers(model))
    device = next(model.parameters()).device
    sums = {k: [torch.zeros(5, dtype=torch.float64) for _ in range(n_layers)] for k in specs}
    base = torch.zeros(5, dtype=torch.float64)
    bar = tqdm(total=len(range(0, len(blocks), batch_size)) * n_layers * len(specs), desc="sensitivity",
               unit="fwd", disable=not progress)
    for start in range(0, len(blocks), batch_size):
        sl = slice(start, start + batch_size)
        ids = blocks[sl].to(device)
        states, pos_inputs = hidden_states(model, ids)
        base += quality_sums(head(model, states[-1]), blocks[sl], teacher.batch(sl))
        for layer in range(n_layers):
            for kind, spec in specs.items():
                with apply_plan(model, _single_change(n_layers, layer, spec), libraries.get(kind)):
                    hidden = run_layers(model, states[layer], layer, *pos_inputs)
                sums[kind][layer] += quality_sums(head(model, hidden), blocks[sl], teacher.batch(sl))
                bar.update()
        del states
    bar.close()
    return SensitivityTable(
        model=model_name, tokens=blocks.numel(), base=quality_from_sums(base),
        specs=dict(specs), rows={k: [quality_from_sums(s) for s in v] for k, v in sums.items()})


@torch.no_grad()
def sensitivity_naive(model, blocks: torch.Tensor, teacher: TeacherLogits, specs: dict[str, LayerSpec],
                      batch_size: int = 4, libraries: dict | None = None, progress: bool = True,
                      model_name: str = "model") -> SensitivityTable:
    """The same table with a full forward per changed layer: the baseline the fast one is checked against."""
    libraries = libraries or {}
    n_layers = len(decoder_layers(model))
    rows = {k: [] for k in specs}
    bar = tqdm(total=n_layers * len(specs), desc="sensitivity (naive)", unit="plan", disable=not progress)
    base = evaluate(model, blocks, teacher, batch_size)
    for layer in range(n_layers):
        for kind, spec in specs.items():
            with apply_plan(model, _single_change(n_layers, layer, spec), libraries.get(kind)):
                rows[kind].append(evaluate(model, blocks, teacher, batch_size))
            bar.update()
    bar.close()
    return SensitivityTable(model=model_name, tokens=blocks.numel(), base=base,
                            specs=dict(specs), rows=rows)


def threshold_plan(table: SensitivityTable, n_none: int, n_lswa: int, lswa: LayerSpec | None = None,
                   pinned: tuple[int, ...] = ()) -> Plan:
    """The paper's heuristic: the ``n_none`` layers least hurt by removal lose attention, then the
    ``n_lswa`` least hurt by linearisation become lswa; the rest (and ``pinned``) stay softmax."""
    lswa = lswa or table.specs["lswa"]
    free = [i for i in range(table.n_layers) if i not in pinned]
    removed = sorted(free, key=lambda i: table.rows["none"][i].kl)[:n_none]
    rest = [i for i in free if i not in removed]
    linear = sorted(rest, key=lambda i: table.rows["lswa"][i].kl)[:n_lswa]
    plan = Plan.softmax(table.n_layers)
    for i in removed:
        plan = plan.with_layer(i, LayerSpec(kind="none"))
    for i in linear:
        plan = plan.with_layer(i, lswa)
    return plan


def remove_only_plan(table: SensitivityTable, n_none: int, pinned: tuple[int, ...] = ()) -> Plan:
    """The threshold plan's removed layers, every other layer softmax (removal alone)."""
    return threshold_plan(table, n_none, 0, pinned=pinned)


def uniform_plan(n_layers: int, spec: LayerSpec, pinned: tuple[int, ...] = ()) -> Plan:
    """Every layer ``spec`` except the pinned ones, which stay softmax."""
    plan = Plan.uniform(n_layers, spec)
    for i in pinned:
        plan = plan.with_layer(i, LayerSpec(kind="softmax"))
    return plan
