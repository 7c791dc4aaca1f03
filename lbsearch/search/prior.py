"""The sensitivity prior: the paper's threshold plans, and per-layer choice probabilities.

Probabilities (softer than thresholds): for layer i and a choice c of kind k,

    w(c) = exp(-KL[k][i] / T) * gain(c) ** beta / n(k, i)
    p(c) = (1 - floor) * w(c) / sum(w) + floor / n(i)

KL[k][i] is the sensitivity table's KL with only layer i changed to kind k (0 for softmax; the
``lswa_trained`` column when the table has one, else ``lswa``); T is ``prior_temperature`` times
the median KL of the table's changed kinds over the searchable layers; gain(c) is the layer's
decode-step cost as softmax over its cost as c in the target's cost table (>1: the choice buys
speed; 1 for a "local" target, whose costs are only known on the workers); n(k, i) is the
number of choices of kind k at the layer (the table has one column per kind, so a kind's mass is
shared by its windows); the floor keeps every choice possible. Layers cheap to change change
more often, weighed against the speed each choice buys.
"""
from __future__ import annotations

import math
import statistics

from ..attention import ORIGINAL
from ..cost import ModelShape, spec_key, target_table
from ..errors import LBSearchError
from ..sensitivity import SensitivityTable, threshold_plan
from .params import choices, constraint_values, feasible, param_name, params_of


def check_table(table: SensitivityTable, n_layers: int, source: str = "sensitivity table") -> SensitivityTable:
    if table.n_layers != n_layers:
        raise LBSearchError(f"{source}: {table.n_layers} layers, the model has {n_layers}")
    return table


def kind_kl(table: SensitivityTable, kind: str) -> list[float] | None:
    """KL per layer with only that layer changed to ``kind`` (None when the table lacks the kind)."""
    if kind == ORIGINAL:
        return [0.0] * table.n_layers
    for column in (f"{kind}_trained", kind):
        if column in table.rows:
            return table.column(column)
    return None


def gains(space, shape: ModelShape, n_layers: int) -> dict[str, float]:
    """Per spec key: a softmax layer's decode cost over this spec's, at the space's target."""
    specs = space.all_specs(n_layers)
    t = space.target
    if t.device == "local":
        return {spec_key(s): 1.0 for s in specs}
    table = target_table(t.device, shape, t.batch, t.context, specs)
    softmax = table.layer[spec_key(space.kind_specs(ORIGINAL)[0])]
    return {spec_key(s): softmax / table.layer[spec_key(s)] for s in specs}


def prior_probabilities(table: SensitivityTable, space, shape: ModelShape) -> dict[str, dict[str, float]]:
    """Parameter name -> {choice token: probability} for every searchable layer (see the module doc)."""
    n = check_table(table, shape.layers).n_layers
    s = space.search
    layer_choices = {i: c for i, c in choices(space, n).items() if len(c) > 1}
    kinds = {spec.kind for c in layer_choices.values() for spec in c.values()}
    kl = {k: kind_kl(table, k) for k in kinds}
    known = [kl[k][i] for i in layer_choices for k in kinds if k != ORIGINAL and kl[k] is not None]
    scale = s.prior_temperature * max(statistics.median(known) if known else 1.0, 1e-9)
    gain = gains(space, shape, n)
    out = {}
    for i, by_token in layer_choices.items():
        per_kind = {k: sum(spec.kind == k for spec in by_token.values()) for k in kinds}
        weights = {}
        for token, spec in by_token.items():
            change = kl[spec.kind][i] if kl[spec.kind] is not None else scale  # unknown kind: neutral
            weights[token] = (math.exp(-change / scale) * gain[spec_key(spec)] ** s.prior_gain_power
                              / per_kind[spec.kind])
        total = sum(weights.values())
        out[param_name(i, n)] = {t: (1 - s.prior_floor) * w / total + s.prior_floor / len(by_token)
                                 for t, w in weights.items()}
    return out


def threshold_plans(table: SensitivityTable, space, shape: ModelShape) -> list[tuple[tuple[int, int], dict]]:
    """The paper's plans for ``search.threshold_budgets`` (fractions of the searchable layers), clipped
    to the constraints: ``[((n_none, n_lswa), params), ...]`` without repeats or infeasible plans."""
    n = check_table(table, shape.layers).n_layers
    by_layer = choices(space, n)
    pinned = tuple(i for i, c in by_layer.items() if len(c) == 1)
    free, c = n - len(pinned), space.constraints
    out, seen = [], set()
    for f_none, f_lswa in space.search.threshold_budgets:
        n_none = round(f_none * free)
        if c.max_removed_layers is not None:
            n_none = min(n_none, c.max_removed_layers)
        n_lswa = max(0, min(round(f_lswa * free), free - n_none, n - n_none - c.min_softmax_layers))
        plan = threshold_plan(table, n_none, n_lswa, space.default_lswa(), pinned=pinned)
        for i in pinned:
            plan = plan.with_layer(i, next(iter(by_layer[i].values())))
        try:
            params = params_of(plan, space)
        except ValueError:
            continue  # a layer got a kind it may not take
        if plan.key in seen or not feasible(constraint_values(plan, space, shape)) or space.violations(plan):
            continue
        seen.add(plan.key)
        out.append(((n_none, n_lswa), params))
    return out
