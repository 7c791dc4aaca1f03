"""Cost model, the search's throughput objective: a lookup table of per-layer decode costs by kind.

A :class:`CostTable` holds, for one device, model shape, batch (concurrency) and context, the
time of one decode step of the head (embedding, final norm, lm_head, argmax) and of one decoder
layer of each kind (``softmax`` at that context, ``lswa`` per window/sinks/feature dim, ``none``;
MLP and norms included). A plan's step time is the head plus the sum of its layers' costs.
Tables are measured on CUDA (micro-benchmarks with the decode engine, see
:func:`lbsearch.bench.measure_layer_costs`) or, where measuring is too slow (CPU), computed
analytically from bytes and FLOPs against the machine's measured bandwidth and FLOP rate; the
table's ``source`` says which, and ``calibrated`` after a fit to end-to-end measurements.
Memory: KV bytes per sequence by kind give the largest concurrency that fits a budget.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch

from .io import atomic_write_json, cache_dir, stable_hash
from .plan import LayerSpec, Plan

LSWA_STATE_BYTES = 4  # the linear state is float32


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    """What decides a decoder's speed: sizes, and bytes per weight/cache element."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    dtype_bytes: int = 2
    tied: bool = True

    @classmethod
    def from_config(cls, config, dtype_bytes: int = 2) -> "ModelShape":
        return cls(hidden=config.hidden_size, layers=config.num_hidden_layers, heads=config.num_attention_heads,
                   kv_heads=config.num_key_value_heads,
                   head_dim=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
                   intermediate=config.intermediate_size, vocab=config.vocab_size, dtype_bytes=dtype_bytes,
                   tied=bool(getattr(config, "tie_word_embeddings", False)))

    @property
    def attn_params(self) -> int:
        return self.hidden * (self.heads + 2 * self.kv_heads) * self.head_dim + self.heads * self.head_dim * self.hidden

    @property
    def mlp_params(self) -> int:
        return 3 * self.hidden * self.intermediate

    def weight_bytes(self, plan: Plan | None = None) -> int:
        """Weights a decode step reads (a none layer skips its attention weights)."""
        n_attn = self.layers if plan is None else self.layers - plan.count("none")
        params = n_attn * self.attn_params + self.layers * self.mlp_params + self.vocab * self.hidden
        return params * self.dtype_bytes

    def stored_weight_bytes(self) -> int:
        """Weights held in memory (embedding and lm_head once when tied)."""
        head = self.vocab * self.hidden * (1 if self.tied else 2)
        return (self.layers * (self.attn_params + self.mlp_params) + head) * self.dtype_bytes


# -- memory ------------------------------------------------------------------------------------
def _softmax_kv(shape: ModelShape, spec: LayerSpec, context: int) -> int:
    return 2 * shape.kv_heads * context * shape.head_dim * shape.dtype_bytes


def _lswa_kv(shape: ModelShape, spec: LayerSpec, context: int) -> int:
    """Sinks and ring (keys, values, ring features) in the cache dtype, linear state in fp32, pos."""
    d, f = shape.head_dim, spec.feature_dim
    cached = (2 * spec.sinks * d + 2 * spec.window * d + spec.window * f) * shape.dtype_bytes
    return shape.kv_heads * (cached + (f * d + f) * LSWA_STATE_BYTES) + 8


KV_BYTES = {"softmax": _softmax_kv, "lswa": _lswa_kv, "none": lambda shape, spec, context: 0}


def kv_bytes_per_seq(shape: ModelShape, plan: Plan, context: int) -> int:
    """Cache bytes one sequence of ``context`` tokens needs under ``plan``."""
    return sum(KV_BYTES[s.kind](shape, s, context) for s in plan.layers)


def max_concurrency(shape: ModelShape, plan: Plan, context: int, budget_bytes: int, reserve_bytes: int = 0) -> int:
    """Largest number of sequences whose caches fit ``budget`` after the weights and ``reserve``."""
    free = budget_bytes - shape.stored_weight_bytes() - reserve_bytes
    per_seq = kv_bytes_per_seq(shape, plan, context)
    if free <= 0:
        return 0
    return 10**9 if per_seq == 0 else free // per_seq


# -- the table -----------------------------------------------------------------------------------
def spec_key(spec: LayerSpec) -> str:
    """Table key of a layer: the kind, or the compact token for lswa (its cost depends on window)."""
    return spec.token() if spec.kind == "lswa" else spec.kind


@dataclass
class CostTable:
    """Seconds per decode step: ``head`` and ``layer[spec_key]``; plus the machine's rates."""

    device: str
    shape: ModelShape
    batch: int
    context: int
    source: str  # measured | analytic | calibrated
    head: float
    layer: dict[str, float]
    bandwidth: float  # bytes/s (copy)
    flop_rate: float  # FLOP/s (matmul)
    notes: dict = field(default_factory=dict)

    def step_time(self, plan: Plan) -> float:
        missing = {spec_key(s) for s in plan.layers} - set(self.layer)
        if missing:
            raise KeyError(f"cost table lacks {sorted(missing)} (has {sorted(self.layer)})")
        return self.head + sum(self.layer[spec_key(s)] for s in plan.layers)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["shape"] = asdict(self.shape)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "CostTable":
        return cls(**{**data, "shape": ModelShape(**data["shape"])})


@dataclass(frozen=True)
class Machine:
    """Measured copy bandwidth (bytes/s, read + write counted) and matmul FLOP rate."""

    name: str
    bandwidth: float
    flop_rate: float


def _time(fn, repeats: int = 5) -> float:
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
    bandwidth = 2 * src.numel() * 4 / _time(lambda: dst.copy_(src))
    m = 4096 if cuda else 512
    dtype = torch.bfloat16 if cuda else torch.float32
    a = torch.randn(m, m, device=device, dtype=dtype)
    flop_rate = 2 * m**3 / _time(lambda: a @ a)
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    return Machine(name, bandwidth, flop_rate)


def _roofline(machine: Machine, nbytes: float, flops: float) -> float:
    return max(nbytes / machine.bandwidth, flops / machine.flop_rate)


def _analytic_layer(shape: ModelShape, machine: Machine, spec: LayerSpec, batch: int, context: int) -> float:
    db, b = shape.dtype_bytes, batch
    mlp = _roofline(machine, shape.mlp_params * db, 2 * b * shape.mlp_params)
    if spec.kind == "none":
        return mlp
    proj = _roofline(machine, shape.attn_params * db, 2 * b * shape.attn_params)
    span = context if spec.kind == "softmax" else spec.window + spec.sinks
    extra = 0 if spec.kind == "softmax" else 2 * spec.feature_dim  # linear state read and query
    flops = 4 * b * shape.heads * (span + extra) * shape.head_dim
    return mlp + proj + _roofline(machine, b * KV_BYTES[spec.kind](shape, spec, context), flops)


def analytic_table(shape: ModelShape, batch: int, context: int, specs, machine: Machine) -> CostTable:
    """Roofline estimate of each kind's cost (no launch overheads: a lower bound on GPUs)."""
    head_params = shape.vocab * shape.hidden
    head = _roofline(machine, head_params * shape.dtype_bytes, 2 * batch * head_params)
    layer = {spec_key(s): _analytic_layer(shape, machine, s, batch, context) for s in specs}
    return CostTable(machine.name, shape, batch, context, "analytic", head, layer, machine.bandwidth, machine.flop_rate)


def default_specs(plans) -> list[LayerSpec]:
    """softmax, none, and every distinct lswa spec of ``plans``."""
    specs = {"softmax": LayerSpec(kind="softmax"), "none": LayerSpec(kind="none")}
    for plan in plans:
        for s in plan.layers:
            specs.setdefault(spec_key(s), s)
    return list(specs.values())


def table_for(shape: ModelShape, batch: int, context: int, specs, device: str = "cpu",
              measure: bool | None = None, refresh: bool = False) -> CostTable:
    """The table for this device/shape/batch/context, from the disk cache or built now.

    ``measure`` (default: on CUDA) runs the engine micro-benchmarks; otherwise analytic.
    """
    measure = device.startswith("cuda") if measure is None else measure
    machine = measure_machine(device)
    keys = sorted(spec_key(s) for s in specs)
    path = cache_dir("cost") / f"{stable_hash(machine.name, asdict(shape), batch, context, keys, measure)}.json"
    if path.is_file() and not refresh:
        import json

        table = CostTable.from_dict(json.loads(path.read_text()))
        if set(keys) <= set(table.layer):
            return table
    if measure:
        from .bench import measure_layer_costs

        head, layer = measure_layer_costs(shape, batch, context, specs, device)
        table = CostTable(machine.name, shape, batch, context, "measured", head, layer,
                          machine.bandwidth, machine.flop_rate)
    else:
        table = analytic_table(shape, batch, context, specs, machine)
    atomic_write_json(path, table.to_dict())
    return table


# -- predictions -------------------------------------------------------------------------------
def prefill_flops(shape: ModelShape, plan: Plan, batch: int, prompt_len: int) -> float:
    """FLOPs of prefilling ``batch`` prompts (projections, MLP, attention by kind, head once per row)."""
    tokens = batch * prompt_len
    total = 2 * tokens * shape.layers * shape.mlp_params + 2 * batch * shape.vocab * shape.hidden
    for s in plan.layers:
        if s.kind == "none":
            continue
        total += 2 * tokens * shape.attn_params
        span = prompt_len / 2 if s.kind == "softmax" else min(prompt_len, s.window + s.sinks) + 2 * s.feature_dim
        total += 4 * tokens * shape.heads * span * shape.head_dim
    return total


def predict(table: CostTable, plan: Plan, prompt_len: int | None = None) -> dict:
    """Decode tokens/s, prefill seconds and KV bytes per sequence, each also as a ratio to all-softmax."""
    base = Plan.softmax(len(plan))
    step, base_step = table.step_time(plan), table.step_time(base)
    out = {"plan": str(plan), "batch": table.batch, "context": table.context, "source": table.source,
           "decode_tps": table.batch / step, "decode_ratio": base_step / step,
           "kv_bytes_per_seq": kv_bytes_per_seq(table.shape, plan, table.context)}
    base_kv = kv_bytes_per_seq(table.shape, base, table.context)
    out["kv_ratio"] = out["kv_bytes_per_seq"] / base_kv
    if prompt_len:
        eff = table.notes.get("prefill_efficiency", 0.5)  # achieved share of the matmul rate
        flops = prefill_flops(table.shape, plan, table.batch, prompt_len)
        out["prefill_s"] = flops / (table.flop_rate * eff)
        out["prefill_ratio"] = out["prefill_s"] / (prefill_flops(table.shape, base, table.batch, prompt_len)
                                                   / (table.flop_rate * eff))
    return out


def calibrate(table: CostTable, measured: list[tuple[Plan, float]], strength: float = 0.1) -> CostTable:
    """Refit head and layer costs to measured step times (seconds) of whole plans.

    Least squares on relative errors, pulled toward the current table by ``strength`` (so costs
    the measurements do not determine keep their prior values); costs stay positive.
    """
    names = ["head"] + sorted(table.layer)
    prior = np.array([table.head] + [table.layer[n] for n in names[1:]])
    rows, rhs = [], []
    for plan, seconds in measured:
        counts = np.array([1.0] + [sum(spec_key(s) == n for s in plan.layers) for n in names[1:]])
        rows.append(counts * prior / seconds)
        rhs.append(1.0)
    for i in range(len(names)):
        reg = np.zeros(len(names))
        reg[i] = strength
        rows.append(reg)
        rhs.append(strength)
    scale, *_ = np.linalg.lstsq(np.array(rows), np.array(rhs), rcond=None)
    fitted = prior * np.clip(scale, 0.05, None)
    notes = {**table.notes, "calibrated_on": [[str(p), s] for p, s in measured]}
    return replace(table, source="calibrated", head=float(fitted[0]),
                   layer={n: float(v) for n, v in zip(names[1:], fitted[1:])}, notes=notes)


def save_calibrated(table: CostTable) -> str:
    """Write a calibrated table beside the measured ones (loaded by :func:`load_calibrated`)."""
    path = cache_dir("cost") / f"calibrated-{stable_hash(table.device, asdict(table.shape), table.batch, table.context)}.json"
    atomic_write_json(path, table.to_dict())
    return str(path)


def load_calibrated(device: str, shape: ModelShape, batch: int, context: int) -> CostTable | None:
    import json

    path = cache_dir("cost") / f"calibrated-{stable_hash(device, asdict(shape), batch, context)}.json"
    return CostTable.from_dict(json.loads(path.read_text())) if path.is_file() else None


def relative_error(predicted: float, measured: float) -> float:
    return abs(predicted / measured - 1.0) if measured else math.inf
