"""Serving benchmark: decode throughput of a model under plans against its base, at several concurrencies.

For every concurrency (batch of sequences decoded together) and plan, the decode engine
(:mod:`lbsearch.engine`) prefills random prompts and greedily decodes ``output_len`` tokens; we
report decode tokens/s, time per output token, prefill latency and peak memory (warm-up first,
CUDA events, medians of repeats), beside the cost model's prediction and memory-bound
concurrency. Also here: HF ``generate()`` timing, the analytic bandwidth floor, and the engine
micro-benchmarks that measure cost tables.
"""
from __future__ import annotations

import csv
import io
import statistics
import time
from pathlib import Path

import torch

from .cost import ModelShape, kv_bytes_per_seq, max_concurrency
from .engine import DecodeEngine
from .io import atomic_write_bytes, atomic_write_json, atomic_write_text
from .plan import Plan
from .surgery import apply_plan

# Built-in model shapes for --shape (random weights: shapes decide speed).
SHAPES: dict[str, dict] = {
    "llama-3.2-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                         head_dim=64, intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True,
                         rope_theta=500000.0, max_position_embeddings=131072,
                         rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "smollm2-135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         head_dim=64, intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True,
                         rope_theta=100000.0, max_position_embeddings=8192),
}


def random_model(config, dtype=torch.bfloat16, device: str = "cpu"):
    """A causal LM with random weights built directly on ``device``; ``config`` is a config or a SHAPES name."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if isinstance(config, str):
        config = AutoConfig.for_model("llama", attn_implementation="sdpa", **SHAPES[config])
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval().requires_grad_(False)


def shape_config(shape: ModelShape, layers: int | None = None):
    """A Llama config of ``shape`` (optionally with fewer layers), for micro-benchmarks."""
    from transformers import AutoConfig

    return AutoConfig.for_model(
        "llama", hidden_size=shape.hidden, num_hidden_layers=layers or shape.layers, num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim, intermediate_size=shape.intermediate,
        vocab_size=shape.vocab, tie_word_embeddings=shape.tied, attn_implementation="sdpa")


# -- timing ------------------------------------------------------------------------------------
class Timer:
    """Seconds of a region: CUDA events on GPU, perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.end.record()
            self.end.synchronize()
            self.seconds = self.start.elapsed_time(self.end) / 1000
        else:
            self.seconds = time.perf_counter() - self.t0


def fake_fill(engine: DecodeEngine, context: int) -> None:
    """Pretend ``context`` tokens are cached (speed depends on lengths, not on cache values)."""
    engine.pos.fill_(context)
    engine.prompt_len = context
    for runner in engine.runners:
        if hasattr(runner, "st"):
            runner.st.pos.fill_(context)


def step_seconds(model, plan: Plan, batch: int, context: int, steps: int = 16, repeats: int = 3) -> float:
    """Median seconds of one decode step of ``model`` under ``plan`` at ``context`` cached tokens."""
    with apply_plan(model, plan):
        engine = DecodeEngine(model, batch, context + steps + 1)
        times = []
        for _ in range(repeats):
            fake_fill(engine, context)
            with Timer(engine.device) as t:
                engine.decode(steps)
            times.append(t.seconds / steps)
    del engine
    return statistics.median(times)


def measure_layer_costs(shape: ModelShape, batch: int, context: int, specs, device: str, layers: int = 8):
    """(head seconds, {spec_key: seconds}) from uniform plans on random models of ``shape``.

    An n-layer model under a uniform plan of kind X takes ``head + n * c_X`` per step; all-none
    at n and n/2 layers separates ``head`` from ``c_none``.
    """
    from .cost import spec_key

    n = min(layers, shape.layers)
    dtype = torch.bfloat16 if shape.dtype_bytes == 2 else torch.float32
    model = random_model(shape_config(shape, n), dtype, device)
    totals = {spec_key(s): step_seconds(model, Plan.uniform(n, s), batch, context) for s in specs}
    half = random_model(shape_config(shape, n // 2), dtype, device)
    from .plan import LayerSpec

    t_half = step_seconds(half, Plan.uniform(n // 2, LayerSpec(kind="none")), batch, context)
    c_none = (totals["none"] - t_half) / (n - n // 2)
    head = max(totals["none"] - n * c_none, 0.0)
    del model, half
    return head, {k: (t - head) / n for k, t in totals.items()}


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


def bandwidth_floor(shape: ModelShape, batch: int, prompt_len: int, output_len: int, bandwidth: float) -> dict:
    """Base model's decode tokens/s if a step only read weights and all KV caches at copy bandwidth."""
    base = Plan.softmax(shape.layers)
    nbytes = shape.weight_bytes(base) + batch * kv_bytes_per_seq(shape, base, prompt_len + output_len // 2)
    return {"plan": "floor(base)", "batch": batch, "decode_tps": batch * bandwidth / nbytes,
            "tpot_ms": 1000 * nbytes / bandwidth, "step_bytes_gb": nbytes / 2**30, "bandwidth_tbs": bandwidth / 1e12}


def add_memory_fit(row: dict, shape: ModelShape, plan: Plan, budget_bytes: int) -> dict:
    context = row["prompt_len"] + row["output_len"]
    row["kv_mb_per_seq"] = kv_bytes_per_seq(shape, plan, context) / 2**20
    row["max_concurrency"] = max_concurrency(shape, plan, context, budget_bytes)
    return row


# -- output ------------------------------------------------------------------------------------
COLUMNS = ["plan", "batch", "decode_tps", "speedup", "tpot_ms", "prefill_s", "peak_mem_gb", "kv_mb_per_seq",
           "max_concurrency", "pred_ratio", "ratio_err"]


def add_speedups(rows: list[dict]) -> list[dict]:
    """speedup = decode tokens/s over the all-softmax engine row of the same batch."""
    base = {r["batch"]: r["decode_tps"] for r in rows if r.get("is_base")}
    for r in rows:
        if r["batch"] in base:
            r["speedup"] = r["decode_tps"] / base[r["batch"]]
    return rows


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return "" if value is None else str(value)


def render(rows: list[dict], columns=COLUMNS, width: int = 34) -> str:
    cols = [c for c in columns if any(c in r for r in rows)]
    lines = [" ".join(f"{c:>{width if c == 'plan' else 14}}" for c in cols)]
    for r in rows:
        cells = []
        for c in cols:
            text = _cell(r.get(c))
            text = text if c != "plan" or len(text) <= width else text[: width - 3] + "..."
            cells.append(f"{text:>{width if c == 'plan' else 14}}")
        lines.append(" ".join(cells))
    return "\n".join(lines)


def to_csv(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r if not isinstance(r[k], (list, dict))))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def plot_png(rows: list[dict], title: str) -> bytes:
    """Decode tokens/s against concurrency, one line per plan."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for plan in dict.fromkeys(r["plan"] for r in rows if "prompt_len" in r or r["plan"].startswith("floor")):
        pts = sorted((r["batch"], r["decode_tps"]) for r in rows if r["plan"] == plan)
        label = plan if len(plan) <= 40 else plan[:37] + "..."
        ax.plot(*zip(*pts), marker="o", linestyle="--" if plan.startswith(("floor", "hf-")) else "-", label=label)
    ax.set(xlabel="concurrent sequences", ylabel="decode tokens/s", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def write_results(out: Path, name: str, rows: list[dict], meta: dict) -> dict[str, Path]:
    out = Path(out)
    return {"json": atomic_write_json(out / f"{name}.json", {"meta": meta, "rows": rows}),
            "csv": atomic_write_text(out / f"{name}.csv", to_csv(rows)),
            "png": atomic_write_bytes(out / f"{name}.png", plot_png(rows, meta.get("title", name)))}


# -- the sweep ---------------------------------------------------------------------------------
def model_shape(model) -> ModelShape:
    return ModelShape.from_config(model.config, model.lm_head.weight.element_size())


def sweep(model, plans: list[Plan], concurrency, prompt_len: int, output_len: int, *, repeats: int = 3,
          budget_bytes: int | None = None, measure_costs: bool | None = None, log=print):
    """Engine rows for the base and every plan at every concurrency, with cost-model predictions.

    Returns (rows, tables): ``tables[batch]`` is the cost table used at that concurrency (context:
    the mean over decoding, prompt + output/2).
    """
    from .cost import default_specs, predict, relative_error, table_for

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
        tables[batch] = table_for(shape, batch, prompt_len + output_len // 2, default_specs(plans), str(device),
                                  measure=measure_costs)
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


def calibrate_from_rows(tables: dict, rows: list[dict]) -> dict:
    """Refit every concurrency's cost table to the measured step times of its rows; saved for reuse."""
    from .cost import calibrate, save_calibrated

    fitted = {}
    for batch, table in tables.items():
        measured = [(Plan.parse(r["plan"]), batch / r["decode_tps"]) for r in rows
                    if r["batch"] == batch and "is_base" in r]
        fitted[batch] = calibrate(table, measured)
        fitted[batch].notes["path"] = save_calibrated(fitted[batch])
    return fitted
