"""Cost model, the search's throughput objective: a lookup table of per-layer decode costs by kind.

A :class:`CostTable` holds, for one device, model shape, batch (concurrency) and context, the
time of one decode step of the head (embedding, final norm, lm_head, argmax) and of one decoder
layer of each kind (MLP and norms included). A plan's step time is the head plus the sum of its
layers' costs, as hardware-aware NAS does with measured lookup tables.

Tables come from measurements (``lbsearch bench --calibrate`` on the device; the package ships
those measured on an H200, see ``lbsearch/cost_tables/``) or, where none matches, from an
analytic roofline over the bytes and FLOPs each kind reports (:mod:`lbsearch.attention`) against
a device's copy bandwidth and matmul rate. Every table says which (``source``). This module is
arithmetic only: the measurements live in :mod:`lbsearch.profile`.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path

import numpy as np

from .attention import KINDS
from .io import atomic_write_json, cache_dir, stable_hash
from .plan import LayerSpec, Plan


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
        """Weights a decode step reads (a layer whose kind does not attend skips its attention weights)."""
        n_attn = self.layers if plan is None else sum(KINDS[s.kind].attends for s in plan.layers)
        params = n_attn * self.attn_params + self.layers * self.mlp_params + self.vocab * self.hidden
        return params * self.dtype_bytes

    def stored_weight_bytes(self) -> int:
        """Weights held in memory (embedding and lm_head once when tied)."""
        head = self.vocab * self.hidden * (1 if self.tied else 2)
        return (self.layers * (self.attn_params + self.mlp_params) + head) * self.dtype_bytes


# -- memory ------------------------------------------------------------------------------------
def kv_bytes_per_seq(shape: ModelShape, plan: Plan, context: int) -> int:
    """Cache bytes one sequence of ``context`` tokens needs under ``plan``."""
    return sum(KINDS[s.kind].kv_bytes(shape, s, context) for s in plan.layers)


def max_concurrency(shape: ModelShape, plan: Plan, context: int, budget_bytes: int, reserve_bytes: int = 0) -> int:
    """Largest number of sequences whose caches fit ``budget`` after the weights and ``reserve``."""
    free = budget_bytes - shape.stored_weight_bytes() - reserve_bytes
    per_seq = kv_bytes_per_seq(shape, plan, context)
    if free <= 0:
        return 0
    return 10**9 if per_seq == 0 else free // per_seq


# -- the table -----------------------------------------------------------------------------------
def spec_key(spec: LayerSpec) -> str:
    """Table key of a layer: the kind, or its compact token when its cost depends on its numbers."""
    return KINDS[spec.kind].cost_key(spec)


@dataclass
class CostTable:
    """Seconds per decode step: ``head`` and ``layer[spec_key]``; plus the machine's rates.

    ``notes`` says how the table was made (command, date, code version, calibration plans).
    """

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

    def covers(self, specs) -> bool:
        return {spec_key(s) for s in specs} <= set(self.layer)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["shape"] = asdict(self.shape)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "CostTable":
        return cls(**{**data, "shape": ModelShape(**data["shape"])})


@dataclass(frozen=True)
class Machine:
    """Copy bandwidth (bytes/s, read + write counted), matmul FLOP rate and memory of a device."""

    name: str
    bandwidth: float
    flop_rate: float
    memory: int = 0  # bytes (0: unknown)


# Devices a search may target without being on them (rates measured on this project's lent H200:
# device-to-device copy 4.3 TB/s, bf16 8192^3 matmul 788 TFLOP/s on random data; 143,771 MiB).
DEVICES: dict[str, Machine] = {"h200": Machine("NVIDIA H200", 4.3e12, 7.88e14, 143771 * 2**20)}


def roofline(machine: Machine, nbytes: float, flops: float) -> float:
    return max(nbytes / machine.bandwidth, flops / machine.flop_rate)


def analytic_layer(shape: ModelShape, machine: Machine, spec: LayerSpec, batch: int, context: int) -> float:
    """MLP, plus the attention projections and core of kinds that attend, each at its roofline."""
    db, b, kind = shape.dtype_bytes, batch, KINDS[spec.kind]
    seconds = roofline(machine, shape.mlp_params * db, 2 * b * shape.mlp_params)
    if kind.attends:
        seconds += roofline(machine, shape.attn_params * db, 2 * b * shape.attn_params)
        seconds += roofline(machine, *kind.decode_traffic(shape, spec, batch, context))
    return seconds


def analytic_table(shape: ModelShape, batch: int, context: int, specs, machine: Machine) -> CostTable:
    """Roofline estimate of each kind's cost (no launch overheads: a lower bound on GPUs)."""
    head_params = shape.vocab * shape.hidden
    head = roofline(machine, head_params * shape.dtype_bytes, 2 * batch * head_params)
    layer = {spec_key(s): analytic_layer(shape, machine, s, batch, context) for s in specs}
    return CostTable(machine.name, shape, batch, context, "analytic", head, layer, machine.bandwidth, machine.flop_rate)


def default_specs(plans) -> list[LayerSpec]:
    """One spec of every kind without numbers, and every distinct spec with numbers in ``plans``."""
    specs = {k.name: LayerSpec(kind=k.name) for k in KINDS.values() if not k.fields}
    for plan in plans:
        for s in plan.layers:
            specs.setdefault(spec_key(s), s)
    return list(specs.values())


# -- stored tables -------------------------------------------------------------------------------
def _table_name(table: CostTable) -> str:
    device = "".join(c if c.isalnum() else "-" for c in table.device.lower()).strip("-")
    return f"{device}-{stable_hash(asdict(table.shape))}-b{table.batch}-c{table.context}.json"


def save_calibrated(table: CostTable, folder: str | Path | None = None) -> Path:
    """Write a calibrated table to ``folder`` (default: the cache, where :func:`find_table` looks)."""
    folder = Path(folder) if folder else cache_dir("cost", "calibrated")
    return atomic_write_json(folder / _table_name(table), table.to_dict())


def _tables_in(folder) -> list[CostTable]:
    out = []
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        if path.name.endswith(".json"):
            try:
                out.append(CostTable.from_dict(json.loads(path.read_text())))
            except (ValueError, TypeError, KeyError):
                continue  # a damaged user file is skipped, never fatal: the shipped tables remain
    return out


def shipped_tables() -> list[CostTable]:
    """Tables measured on real devices and shipped with lbsearch (``lbsearch/cost_tables``)."""
    folder = resources.files("lbsearch").joinpath("cost_tables")
    return _tables_in(Path(str(folder)))


def find_table(device_name: str, shape: ModelShape, batch: int, context: int, specs) -> CostTable | None:
    """A calibrated (cache) or shipped table for exactly this device, shape, batch and context that
    covers ``specs``; the user's own calibration wins over the shipped one."""
    for table in _tables_in(cache_dir("cost", "calibrated")) + shipped_tables():
        if (table.device == device_name and table.shape == shape and table.batch == batch
                and table.context == context and table.covers(specs)):
            return table
    return None


def target_table(device: str, shape: ModelShape, batch: int, context: int, specs,
                 local: Machine | None = None) -> CostTable:
    """The table a search predicts throughput with: measured when one matches, else analytic.

    ``device`` names a known device (``DEVICES``) or is "local" (``local``, the measured machine
    this process runs on). An analytic fallback says so in ``notes["fallback"]``.
    """
    machine = local if device == "local" else DEVICES.get(device)
    if machine is None:
        raise ValueError(f"unknown target device {device!r}; known: local, {', '.join(DEVICES)}")
    table = find_table(machine.name, shape, batch, context, specs)
    if table is not None:
        return table
    table = analytic_table(shape, batch, context, specs, machine)
    table.notes["fallback"] = (f"no measured cost table for {machine.name}, batch {batch}, context {context} "
                               "and this model shape: analytic roofline (an upper bound on speed)")
    return table


# -- predictions -------------------------------------------------------------------------------
def prefill_flops(shape: ModelShape, plan: Plan, batch: int, prompt_len: int) -> float:
    """FLOPs of prefilling ``batch`` prompts (projections, MLP, attention by kind, head once per row)."""
    tokens = batch * prompt_len
    total = 2 * tokens * shape.layers * shape.mlp_params + 2 * batch * shape.vocab * shape.hidden
    for s in plan.layers:
        kind = KINDS[s.kind]
        if kind.attends:
            total += 2 * tokens * shape.attn_params
            total += 4 * tokens * shape.heads * kind.prefill_span(s, prompt_len) * shape.head_dim
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


def relative_error(predicted: float, measured: float) -> float:
    return abs(predicted / measured - 1.0) if measured else math.inf
