"""Serving benchmark: decode throughput of a model under plans against its base, at several concurrencies.

Two modes. ``static``: for every concurrency (batch of sequences decoded together) and plan, the
decode engine (:mod:`lbsearch.engine`) prefills random prompts and greedily decodes ``output_len``
tokens; we report decode tokens/s, time per output token, prefill latency and peak memory
(warm-up first, CUDA events, medians of repeats), beside the cost model's prediction and
memory-bound concurrency. ``requests``: a closed loop of that many slots, each refilled with a
new request of drawn lengths when its sequence ends (:mod:`lbsearch.serving`); we report
generated tokens/s and time to first token / per output token, p50 and p99. Also here: HF
``generate()`` timing and the bandwidth floor (the upper bound on throughput if a step only moved
bytes). Timers and micro-benchmarks are in :mod:`lbsearch.profile`.
"""
from __future__ import annotations

import csv
import io
import statistics
from pathlib import Path

import torch

from .cost import ModelShape, kv_bytes_per_seq, max_concurrency
from .engine import DecodeEngine
from .io import atomic_write_bytes, atomic_write_json, atomic_write_text
from .plan import Plan
from .profile import Timer
from .serving import Request, draw_requests, engine_length, run_requests, summarize
from .surgery import apply_plan

def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0


def bench_plan(model, plan: Plan, batch: int, prompt_len: int, output_len: int, repeats: int = 3,
               prefill_rows: int = 32, seed: int = 0) -> dict:
    """Measured prefill and decode of ``batch`` random prompts under ``plan`` with the engine."""
    device = model.lm_head.weight.device
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt_len),
                        generator=torch.Generator().manual_seed(seed))
    _peak_reset(device)
    with apply_plan(model, plan):
        engine = DecodeEngine(model, batch, prompt_len + output_len, prefill_rows=prefill_rows)
        prefill = []
        for _ in range(max(2, repeats - 1)):  # the first also warms up prefill kernels
            with Timer(device) as t:
                engine.prefill(ids)
            prefill.append(t.seconds)
        snap = engine.snapshot()
        steps = output_len - 1
        decode = []
        for _ in range(repeats):
            engine.restore(snap)
            with Timer(device) as t:
                engine.decode(steps)
            decode.append(t.seconds)
        cache = sum(engine.cache_bytes().values())
    del engine
    t_dec = statistics.median(decode)
    return {"plan": str(plan), "batch": batch, "prompt_len": prompt_len, "output_len": output_len,
            "decode_tps": batch * steps / t_dec, "tpot_ms": 1000 * t_dec / steps,
            "prefill_s": statistics.median(prefill[1:]), "peak_mem_gb": _peak(device) / 2**30,
            "cache_gb": cache / 2**30, "decode_s_all": decode}


def bench_requests(model, plan: Plan, slots: int, requests, prefill_rows: int = 32) -> dict:
    """The closed-loop request benchmark of ``requests`` (:class:`lbsearch.serving.Request`) on
    ``slots`` engine rows under ``plan``, after a warm-up of every slot's prefill and one refill."""
    device = model.lm_head.weight.device
    _peak_reset(device)
    with apply_plan(model, plan):
        engine = DecodeEngine(model, slots, engine_length(requests), prefill_rows=prefill_rows)
        run_requests(engine, [Request(r.prompt, 2) for r in requests[: slots + 1]])  # compiles kernels
        records, wall = run_requests(engine, requests)
    del engine
    return {"plan": str(plan), "mode": "requests", "batch": slots, **summarize(records, wall),
            "peak_mem_gb": _peak(device) / 2**30}


def bench_hf_generate(model, batch: int, prompt_len: int, output_len: int, cache: str = "static") -> dict:
    """HF generate() (greedy, ``cache`` implementation): decode tokens/s from runs of 1 and N new tokens."""
    device = model.lm_head.weight.device
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt_len),
                        generator=torch.Generator().manual_seed(0)).to(device)
    model.generation_config.eos_token_id = None
    times = {}
    for new in (1, output_len):
        runs = []
        for _ in range(2):
            with Timer(device) as t:
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                               do_sample=False, pad_token_id=0, cache_implementation=cache)
            runs.append(t.seconds)
        times[new] = min(runs)
    dec = times[output_len] - times[1]
    return {"plan": f"hf-generate-{cache}", "batch": batch, "prompt_len": prompt_len, "output_len": output_len,
            "decode_tps": batch * (output_len - 1) / dec, "tpot_ms": 1000 * dec / (output_len - 1),
            "prefill_s": times[1]}


UPPER_BOUND = "bound(base)"  # the row of bandwidth_floor: no engine can decode the base faster


def bandwidth_floor(shape: ModelShape, batch: int, prompt_len: int, output_len: int, bandwidth: float) -> dict:
    """Upper bound on the base model's decode tokens/s: a step that only reads weights and all KV
    caches at copy bandwidth (its time is the floor)."""
    base = Plan.softmax(shape.layers)
    nbytes = shape.weight_bytes(base) + batch * kv_bytes_per_seq(shape, base, prompt_len + output_len // 2)
    return {"plan": UPPER_BOUND, "batch": batch, "decode_tps": batch * bandwidth / nbytes,
            "tpot_ms": 1000 * nbytes / bandwidth, "step_bytes_gb": nbytes / 2**30, "bandwidth_tbs": bandwidth / 1e12}


def add_memory_fit(row: dict, shape: ModelShape, plan: Plan, budget_bytes: int) -> dict:
    context = row["prompt_len"] + row["output_len"]
    row["kv_mb_per_seq"] = kv_bytes_per_seq(shape, plan, context) / 2**20
    row["max_concurrency"] = max_concurrency(shape, plan, context, budget_bytes)
    return row


# -- output ------------------------------------------------------------------------------------
COLUMNS = {"plan": "plan", "batch": "batch", "decode_tps": "tok/s", "speedup": "speedup", "tpot_ms": "TPOT ms",
           "prefill_s": "prefill s", "peak_mem_gb": "peak GB", "kv_mb_per_seq": "KV MB/seq",
           "max_concurrency": "max conc", "pred_ratio": "predicted", "ratio_err": "pred err"}


REQUEST_COLUMNS = {"plan": "plan", "batch": "slots", "requests": "requests", "throughput_tps": "tok/s",
                   "speedup": "speedup", "ttft_p50_ms": "TTFT p50 ms", "ttft_p99_ms": "TTFT p99 ms",
                   "tpot_p50_ms": "TPOT p50 ms", "tpot_p99_ms": "TPOT p99 ms", "req_per_s": "req/s",
                   "peak_mem_gb": "peak GB"}


def add_speedups(rows: list[dict], metric: str = "decode_tps") -> list[dict]:
    """speedup = ``metric`` (tokens/s) over the all-softmax engine row of the same batch."""
    base = {r["batch"]: r[metric] for r in rows if r.get("is_base")}
    for r in rows:
        if r["batch"] in base and metric in r:
            r["speedup"] = r[metric] / base[r["batch"]]
    return rows


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return "" if value is None else str(value)


def render(rows: list[dict], columns: dict[str, str] = COLUMNS, plan_width: int = 28) -> str:
    """A plain-text table; each column as wide as its widest cell, long plans shortened."""
    cols = [c for c in columns if any(c in r for r in rows)]

    def text(r, c):
        t = _cell(r.get(c))
        return t if c != "plan" or len(t) <= plan_width else t[: plan_width - 3] + "..."

    widths = {c: max(len(columns[c]), *(len(text(r, c)) for r in rows)) for c in cols}
    fmt = [(f"{{:<{widths[c]}}}" if c == "plan" else f"{{:>{widths[c]}}}") for c in cols]
    lines = ["  ".join(f.format(columns[c]) for f, c in zip(fmt, cols))]
    lines += ["  ".join(f.format(text(r, c)) for f, c in zip(fmt, cols)) for r in rows]
    return "\n".join(lines)


def to_csv(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r if not isinstance(r[k], (list, dict))))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def plot_png(rows: list[dict], title: str, metric: str = "decode_tps", label: str = "decode tokens/s") -> bytes:
    """``metric`` (tokens/s) against concurrency, one line per plan."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for plan in dict.fromkeys(r["plan"] for r in rows if "prompt_len" in r or r["plan"] == UPPER_BOUND):
        pts = sorted((r["batch"], r[metric]) for r in rows if r["plan"] == plan and metric in r)
        label = plan if len(plan) <= 40 else plan[:37] + "..."
        ax.plot(*zip(*pts), marker="o", linestyle="--" if plan == UPPER_BOUND or plan.startswith("hf-") else "-", label=label)
    ax.set(xlabel="concurrent sequences", ylabel=label, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def write_results(out: Path, name: str, rows: list[dict], meta: dict, metric: str = "decode_tps",
                  label: str = "decode tokens/s") -> dict[str, Path]:
    out = Path(out)
    return {"json": atomic_write_json(out / f"{name}.json", {"meta": meta, "rows": rows}),
            "csv": atomic_write_text(out / f"{name}.csv", to_csv(rows)),
            "png": atomic_write_bytes(out / f"{name}.png", plot_png(rows, meta.get("title", name), metric, label))}


# -- the sweep ---------------------------------------------------------------------------------
def model_shape(model) -> ModelShape:
    return ModelShape.from_config(model.config, model.lm_head.weight.element_size())


def sweep(model, plans: list[Plan], concurrency, prompt_len: int, output_len: int, *, repeats: int = 3,
          budget_bytes: int | None = None, measure_costs: bool | None = None, cost_plans=(), log=print):
    """Engine rows for the base and every plan at every concurrency, with cost-model predictions.

    Returns (rows, tables): ``tables[batch]`` is the cost table used at that concurrency (context:
    the mean over decoding, prompt + output/2), covering the specs of ``plans`` and ``cost_plans``.
    """
    from .cost import default_specs, predict, relative_error
    from .profile import table_for

    shape = model_shape(model)
    device = model.lm_head.weight.device
    base = Plan.softmax(shape.layers)
    plans = [base] + [p for p in plans if p != base]
    for p in plans:
        p.check(shape.layers)
    if budget_bytes is None:
        budget_bytes = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 16 * 2**30
    rows, tables = [], {}
    for batch in concurrency:
        tables[batch] = table_for(shape, batch, prompt_len + output_len // 2, default_specs(plans + list(cost_plans)),
                                  str(device), measure=measure_costs)
        for plan in plans:
            row = bench_plan(model, plan, batch, prompt_len, output_len, repeats)
            row["is_base"] = plan == base
            add_memory_fit(row, shape, plan, budget_bytes)
            row["pred_ratio"] = predict(tables[batch], plan)["decode_ratio"]
            rows.append(row)
            log(f"  batch {batch:4d}  {row['decode_tps']:12,.0f} tok/s  prefill {row['prefill_s']:.3f} s  {plan}")
    add_speedups(rows)
    for r in rows:
        r["ratio_err"] = relative_error(r["pred_ratio"], r["speedup"])
    return rows, tables


def sweep_requests(model, plans: list[Plan], concurrency, prompt_len: int, output_len: int, *,
                   requests: int | None = None, distribution: str = "uniform", spread: float = 0.5, seed: int = 0,
                   log=print) -> list[dict]:
    """Request-mode rows for the base and every plan at every concurrency (slots). Each concurrency
    serves ``requests`` requests (default 4 per slot), the same ones for every plan."""
    shape = model_shape(model)
    base = Plan.softmax(shape.layers)
    plans = [base] + [p for p in plans if p != base]
    for p in plans:
        p.check(shape.layers)
    rows = []
    for slots in concurrency:
        reqs = draw_requests(requests or 4 * slots, prompt_len, output_len, model.config.vocab_size,
                             distribution, spread, seed)
        for plan in plans:
            row = {**bench_requests(model, plan, slots, reqs), "prompt_len": prompt_len, "output_len": output_len,
                   "distribution": distribution, "spread": spread, "is_base": plan == base}
            rows.append(row)
            log(f"  slots {slots:4d}  {row['throughput_tps']:12,.0f} tok/s  TTFT p50 {row['ttft_p50_ms']:.1f} ms  "
                f"TPOT p50 {row['tpot_p50_ms']:.2f} ms  {plan}")
    return add_speedups(rows, "throughput_tps")


def calibrate_from_rows(tables: dict, rows: list[dict], notes: dict | None = None, out=None) -> dict:
    """Refit every concurrency's cost table to the measured step times of its rows.

    Saved in the cache (the search uses them for this device) and, with ``out``, as
    ``out/cost_tables/*.json``; ``notes`` (command, date, code version) go into each table.
    """
    from .cost import calibrate, save_calibrated

    fitted = {}
    for batch, table in tables.items():
        measured = [(Plan.parse(r["plan"]), batch / r["decode_tps"]) for r in rows
                    if r["batch"] == batch and "is_base" in r]
        fitted[batch] = calibrate(table, measured)
        fitted[batch].notes.update(notes or {})
        if out is not None:
            save_calibrated(fitted[batch], Path(out) / "cost_tables")
        fitted[batch].notes["path"] = str(save_calibrated(fitted[batch]))
    return fitted
