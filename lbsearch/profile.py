"""Timers and micro-benchmarks: what :mod:`lbsearch.cost` tables are measured with.

``measure_machine`` gives a device's copy bandwidth and matmul rate (the analytic roofline's
inputs); ``measure_layer_costs`` times uniform plans on random models of a shape with the decode
engine (the measured tables); ``table_for`` builds and caches a table for the device it runs on.
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict

import torch

from .attention import KINDS
from .cost import CostTable, Machine, ModelShape, analytic_table, spec_key
from .engine import DecodeEngine
from .io import atomic_write_json, cache_dir, stable_hash
from .plan import LayerSpec, Plan
from .surgery import apply_plan

COST_MODEL_VERSION = 2  # part of every cached table's key: bump when the engine or the measurement changes

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


def median_seconds(fn, repeats: int = 5) -> float:
    """Median seconds of ``fn`` after one warm-up (synchronising on CUDA)."""
    fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def measure_machine(device: str = "cpu") -> Machine:
    """Copy bandwidth and matmul FLOP rate of ``device`` (about a second on CPU)."""
    cuda = device.startswith("cuda")
    n = (512 if cuda else 32) * 2**20 // 4
    src = torch.empty(n, device=device).uniform_()
    dst = torch.empty_like(src)
    bandwidth = 2 * src.numel() * 4 / median_seconds(lambda: dst.copy_(src))
    m = 4096 if cuda else 512
    dtype = torch.bfloat16 if cuda else torch.float32
    a = torch.randn(m, m, device=device, dtype=dtype)
    flop_rate = 2 * m**3 / median_seconds(lambda: a @ a)
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    return Machine(name, bandwidth, flop_rate)


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

    An n-layer model under a uniform plan of kind X takes ``head + n * c_X`` per step; a model
    of layers that do not attend, at n and n/2 layers, separates ``head`` from their cost.
    """
    n = min(layers, shape.layers)
    dtype = torch.bfloat16 if shape.dtype_bytes == 2 else torch.float32
    model = random_model(shape_config(shape, n), dtype, device)
    totals = {spec_key(s): step_seconds(model, Plan.uniform(n, s), batch, context) for s in specs}
    bare = next(LayerSpec(kind=k.name) for k in KINDS.values() if not k.attends and not k.fields)
    if spec_key(bare) not in totals:
        totals[spec_key(bare)] = step_seconds(model, Plan.uniform(n, bare), batch, context)
    half = random_model(shape_config(shape, n // 2), dtype, device)
    t_half = step_seconds(half, Plan.uniform(n // 2, bare), batch, context)
    c_bare = (totals[spec_key(bare)] - t_half) / (n - n // 2)
    head = max(totals[spec_key(bare)] - n * c_bare, 0.0)
    del model, half
    return head, {k: (t - head) / n for k, t in totals.items()}


def table_for(shape: ModelShape, batch: int, context: int, specs, device: str = "cpu",
              measure: bool | None = None, refresh: bool = False) -> CostTable:
    """The table for the device this runs on, from the disk cache or built now.

    ``measure`` (default: on CUDA) runs the engine micro-benchmarks; otherwise analytic.
    """
    measure = device.startswith("cuda") if measure is None else measure
    machine = measure_machine(device)
    keys = sorted(spec_key(s) for s in specs)
    key = stable_hash(machine.name, asdict(shape), batch, context, keys, measure, COST_MODEL_VERSION)
    path = cache_dir("cost") / f"{key}.json"
    if path.is_file() and not refresh:
        try:
            table = CostTable.from_dict(json.loads(path.read_text()))
            if set(keys) <= set(table.layer):
                return table
        except (ValueError, TypeError, KeyError):
            pass  # a damaged cache entry is rebuilt
    if measure:
        head, layer = measure_layer_costs(shape, batch, context, specs, device)
        table = CostTable(machine.name, shape, batch, context, "measured", head, layer,
                          machine.bandwidth, machine.flop_rate)
    else:
        table = analytic_table(shape, batch, context, specs, machine)
    atomic_write_json(path, table.to_dict())
    return table
