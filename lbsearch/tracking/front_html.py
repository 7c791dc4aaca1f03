"""The Pareto front as one self-contained HTML page: an SVG scatter (KL against predicted
throughput) with hover tooltips, and a table of the front's plans. No network at view time.

Input: a :class:`lbsearch.search.pareto.Front`, or the front's rows: dicts with ``trial_number``,
``plan``, ``result`` (a TrialResult dict) and optionally ``rescored`` ({fidelity: TrialResult dict});
``others`` (dominated trials, same rows) are drawn grey.
"""
from __future__ import annotations

import math
from html import escape

W, H, LEFT, RIGHT, TOP, BOTTOM = 760, 440, 70, 20, 30, 50


def _ticks(low: float, high: float, n: int = 5) -> list[float]:
    if high <= low:
        high = low + 1.0
    raw = (high - low) / n
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 5, 10) if m * step >= raw)
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def _tooltip(row: dict) -> str:
    r = row["result"]
    lines = [f"trial {row.get('trial_number', '?')}: {row['plan']}",
             f"{r['fidelity']}: KL {r['kl']:.4g}, ppl {r['perplexity']:.4g}, agreement {r['agreement']:.3f}",
             f"throughput x{r['throughput_ratio']:.3f}, KV {r['kv_bytes_per_seq'] / 2**20:.2f} MB/seq"]
    for fidelity, res in (row.get("rescored") or {}).items():
        lines.append(f"{fidelity}: KL {res['kl']:.4g}, ppl {res['perplexity']:.4g}")
    return "\n".join(lines)


def _points(rows, sx, sy, cls: str) -> list[str]:
    out = []
    for row in rows:
        r = row["result"]
        tip = escape(_tooltip(row))
        out.append(f'<circle class="{cls}" cx="{sx(r["throughput_ratio"]):.1f}" cy="{sy(r["kl"]):.1f}" r="5" '
                   f'data-tip="{tip}" data-trial="{escape(str(row.get("trial_number", "")))}">'
                   f'<title>{tip}</title></circle>')
    return out


def rows_of(points, study: str = "") -> list[dict]:
    """Rows (see the module docstring) of a front's points (:class:`lbsearch.search.pareto.Scored`)."""
    return [{"trial_number": p.trial, "plan": p.plan, "result": p.result.to_dict(), "study": study,
             "rescored": {f: r.to_dict() for f, r in p.rescored.items() if hasattr(r, "to_dict")}}
            for p in points]


def _finite(row: dict) -> bool:
    r = row["result"]
    return all(isinstance(r.get(k), (int, float)) and math.isfinite(r[k]) for k in ("kl", "throughput_ratio"))


def front_html(front, others=(), title: str = "Pareto front") -> str:
    if hasattr(front, "points"):  # a Front: its dominated plans are the others
        on = {p.trial for p in front.points}
        front, others = rows_of(front.points), rows_of([p for p in front.scored if p.trial not in on])
    front, others = [r for r in front if _finite(r)], [r for r in others if _finite(r)]
    rows = front + others
    if not rows:
        return f"<!doctype html><meta charset=utf-8><title>{escape(title)}</title><p>No feasible trials yet.</p>"
    xs = [r["result"]["throughput_ratio"] for r in rows]
    ys = [r["result"]["kl"] for r in rows]
    pad_x, pad_y = (max(xs) - min(xs)) * 0.05 or 0.05, (max(ys) - min(ys)) * 0.05 or 0.05
    x0, x1, y0, y1 = min(xs) - pad_x, max(xs) + pad_x, max(0.0, min(ys) - pad_y), max(ys) + pad_y

    def sx(v):
        return LEFT + (v - x0) / (x1 - x0) * (W - LEFT - RIGHT)

    def sy(v):
        return H - BOTTOM - (v - y0) / (y1 - y0) * (H - TOP - BOTTOM)

    svg = [f'<svg viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img">']
    for t in _ticks(x0, x1):
        svg.append(f'<line class="grid" x1="{sx(t):.1f}" x2="{sx(t):.1f}" y1="{TOP}" y2="{H - BOTTOM}"/>'
                   f'<text x="{sx(t):.1f}" y="{H - BOTTOM + 16}" text-anchor="middle">{t:g}</text>')
    for t in _ticks(y0, y1):
        svg.append(f'<line class="grid" x1="{LEFT}" x2="{W - RIGHT}" y1="{sy(t):.1f}" y2="{sy(t):.1f}"/>'
                   f'<text x="{LEFT - 6}" y="{sy(t) + 4:.1f}" text-anchor="end">{t:g}</text>')
    svg.append(f'<text x="{(LEFT + W - RIGHT) / 2}" y="{H - 10}" text-anchor="middle">predicted decode '
               'throughput / all-softmax (higher is better)</text>'
               f'<text transform="translate(16 {(TOP + H - BOTTOM) / 2}) rotate(-90)" text-anchor="middle">'
               'KL to the teacher (lower is better)</text>')
    line = sorted((r["result"]["throughput_ratio"], r["result"]["kl"]) for r in front)
    if len(line) > 1:
        svg.append('<polyline class="front" points="' + " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in line) + '"/>')
    svg += _points(others, sx, sy, "other") + _points(front, sx, sy, "pareto") + ["</svg>"]
    table = ["<table><tr><th>trial</th><th>plan</th><th>fidelity</th><th>KL</th><th>perplexity</th>"
             "<th>agreement</th><th>throughput</th><th>KV MB/seq</th><th>re-scored</th></tr>"]
    for row in sorted(front, key=lambda r: -r["result"]["throughput_ratio"]):
        r = row["result"]
        rescored = "; ".join(f"{f}: KL {v['kl']:.4g}" for f, v in (row.get("rescored") or {}).items())
        table.append(f'<tr data-trial="{escape(str(row.get("trial_number", "")))}"><td>{row.get("trial_number", "")}'
                     f'</td><td><code>{escape(row["plan"])}</code></td><td>{escape(r["fidelity"])}</td>'
                     f'<td>{r["kl"]:.4g}</td><td>{r["perplexity"]:.4g}</td><td>{r["agreement"]:.3f}</td>'
                     f'<td>{r["throughput_ratio"]:.3f}</td><td>{r["kv_bytes_per_seq"] / 2**20:.2f}</td>'
                     f'<td>{escape(rescored)}</td></tr>')
    table.append("</table>")
    return PAGE.format(title=escape(title), n_front=len(front), n_all=len(rows), svg="\n".join(svg),
                       table="\n".join(table))


PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font: 14px system-ui, sans-serif; margin: 24px; color: #222; }}
svg text {{ font-size: 12px; fill: #444; }}
.grid {{ stroke: #e4e4e4; }}
.front {{ fill: none; stroke: #c0392b; stroke-width: 1.5; stroke-dasharray: 4 3; }}
circle.pareto {{ fill: #c0392b; cursor: pointer; }}
circle.other {{ fill: #bbb; cursor: pointer; }}
circle:hover, circle.hi {{ r: 8; stroke: #000; }}
#tip {{ position: fixed; display: none; white-space: pre; background: #fff; border: 1px solid #888;
        padding: 6px 8px; font: 12px monospace; pointer-events: none; box-shadow: 2px 2px 6px #0003; }}
table {{ border-collapse: collapse; margin-top: 16px; }}
td, th {{ border-bottom: 1px solid #ddd; padding: 3px 8px; text-align: right; }}
td:nth-child(2) {{ text-align: left; }}
tr.hi {{ background: #fdecea; }}
</style></head><body>
<h2>{title}</h2>
<p>{n_front} plans on the front (red) of {n_all} feasible trials; hover a point for its plan and metrics.</p>
{svg}
{table}
<div id="tip"></div>
<script>
const tip = document.getElementById("tip");
function mark(trial, on) {{
  document.querySelectorAll('[data-trial="' + trial + '"]').forEach(e => e.classList.toggle("hi", on));
}}
document.querySelectorAll("circle, tr[data-trial]").forEach(el => {{
  el.addEventListener("mouseenter", () => {{
    mark(el.dataset.trial, true);
    if (el.dataset.tip) {{ tip.textContent = el.dataset.tip; tip.style.display = "block"; }}
  }});
  el.addEventListener("mousemove", ev => {{ tip.style.left = (ev.clientX + 14) + "px"; tip.style.top = (ev.clientY + 14) + "px"; }});
  el.addEventListener("mouseleave", () => {{ mark(el.dataset.trial, false); tip.style.display = "none"; }});
  const title = el.querySelector("title"); if (title) title.remove();
}});
</script>
</body></html>
"""
