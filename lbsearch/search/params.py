"""Space -> trial: one categorical parameter per searchable layer, constraints as Optuna constraints.

:func:`plan_from_trial` is the only code that asks an Optuna trial for parameters. A layer with a
single allowed spec is a pin, not a parameter. Choices are spec tokens (``S``, ``N``, ``L64``,
...), so a trial's parameters read like the plan.
"""
from __future__ import annotations

from ..cost import ModelShape, kv_bytes_per_seq
from ..plan import LayerSpec, Plan


def param_name(layer: int, n_layers: int) -> str:
    """``layer_07`` (zero-padded so names sort by layer)."""
    return f"layer_{layer:0{len(str(n_layers - 1))}d}"


def choices(space, n_layers: int) -> dict[int, dict[str, LayerSpec]]:
    """Every layer's choices by token, pins included (one choice)."""
    return {i: {s.token(): s for s in space.layer_specs(i)} for i in range(n_layers)}


def searchable(space, n_layers: int) -> dict[str, dict[str, LayerSpec]]:
    """The parameters: name -> {token: spec} for layers with more than one choice."""
    return {param_name(i, n_layers): c for i, c in choices(space, n_layers).items() if len(c) > 1}


def plan_from_trial(trial, space, n_layers: int) -> Plan:
    """The plan an Optuna trial proposes (suggests one categorical per searchable layer)."""
    layers = []
    for i, by_token in choices(space, n_layers).items():
        if len(by_token) == 1:
            layers.append(next(iter(by_token.values())))
        else:
            layers.append(by_token[trial.suggest_categorical(param_name(i, n_layers), list(by_token))])
    return Plan(tuple(layers))


def params_of(plan: Plan, space) -> dict[str, str]:
    """The trial parameters that give ``plan`` (for enqueueing); a layer outside its choices raises."""
    n = len(plan)
    out = {}
    for i, by_token in choices(space, n).items():
        token = plan.layers[i].token()
        if token not in by_token:
            raise ValueError(f"layer {i}: {token} is not one of {list(by_token)}")
        if len(by_token) > 1:
            out[param_name(i, n)] = token
    return out


def model_shape(space) -> ModelShape:
    """The model's shape as served (bf16), read from its config: no weights are loaded."""
    from ..models import load_config

    return ModelShape.from_config(load_config(space.model), dtype_bytes=2)


def constraint_values(plan: Plan, space, shape: ModelShape) -> dict[str, float]:
    """Optuna constraints of ``plan`` (feasible iff every value <= 0); the same keys for every plan."""
    c = space.constraints
    out = {"min_softmax_layers": float(c.min_softmax_layers - plan.count("softmax"))}
    if c.max_removed_layers is not None:
        out["max_removed_layers"] = float(plan.count("none") - c.max_removed_layers)
    if c.kv_memory_budget_mb is not None:
        out["kv_memory_budget_mb"] = kv_bytes_per_seq(shape, plan, c.context) / 2**20 - c.kv_memory_budget_mb
    return out


def feasible(constraints: dict[str, float]) -> bool:
    return all(v <= 0 for v in constraints.values())
