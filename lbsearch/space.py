"""Search spaces from YAML, validated: what each layer may become, constraints, objectives, budgets.

Every bad input is one :class:`LBSearchError` line naming the file, the key path and what is allowed.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveFloat, PositiveInt, ValidationError, field_validator

from .errors import LBSearchError
from .plan import KIND_LETTERS, LayerSpec, LSWADefaults, Plan

Kind = Literal["softmax", "lswa", "none"]
Objective = Literal["kl", "perplexity", "agreement", "throughput", "memory"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class KindChoices(_Strict):
    default: list[Kind] = Field(default_factory=lambda: ["softmax", "lswa", "none"], min_length=1)
    layers: dict[int, list[Kind]] = Field(default_factory=dict)  # per-layer overrides, e.g. {0: [softmax]}


class LSWAChoices(_Strict):
    windows: list[PositiveInt] = Field(default_factory=lambda: [64], min_length=1)
    sinks: list[NonNegativeInt] = Field(default_factory=lambda: [4], min_length=1)
    feature_dims: list[PositiveInt] = Field(default_factory=lambda: [64], min_length=1)

    @field_validator("feature_dims")
    @classmethod
    def _even(cls, dims):
        for d in dims:
            if d % 2:
                raise ValueError(f"feature dims must be even (two halves of the feature map), got {d}")
        return dims


class Constraints(_Strict):
    min_softmax_layers: NonNegativeInt = 0
    max_removed_layers: NonNegativeInt | None = None
    kv_memory_budget_mb: PositiveFloat | None = None  # per sequence, at `context` tokens
    context: PositiveInt = 4096


class Budgets(_Strict):
    calibration_tokens: PositiveInt = 16384
    healing_tokens: PositiveInt = 10_000_000
    healing_tokens_cpu: PositiveInt = 16384
    eval_tokens: PositiveInt = 4096
    sensitivity_tokens: PositiveInt = 2048


class DataConfig(_Strict):
    source: str = "teacher"  # "teacher" (generated), a local .txt/.json/.jsonl/.parquet file or dir, or a hub name
    text_field: str = "text"
    seq_len: PositiveInt = 512
    corpus_tokens: PositiveInt = 24576  # size of the teacher-generated corpus
    # GPU healing (source "teacher") trains on a separate teacher corpus of this size, so a 10M-token
    # budget repeats each block a few times instead of hundreds; 0, or on CPU: the train split
    healing_corpus_tokens: NonNegativeInt = 2_500_000
    heldout_fraction: float = Field(0.25, gt=0, lt=1)
    calibration_fraction: float = Field(0.25, gt=0, lt=1)
    seed: int = 0


class SearchSpace(_Strict):
    model: str = "smollm2-135m"
    kinds: KindChoices = Field(default_factory=KindChoices)
    lswa: LSWAChoices = Field(default_factory=LSWAChoices)
    constraints: Constraints = Field(default_factory=Constraints)
    objectives: list[Objective] = Field(default_factory=lambda: ["kl", "throughput"], min_length=1)
    budgets: Budgets = Field(default_factory=Budgets)
    data: DataConfig = Field(default_factory=DataConfig)

    @property
    def lswa_defaults(self) -> LSWADefaults:
        return LSWADefaults(window=self.lswa.windows[0], sinks=self.lswa.sinks[0],
                            feature_dim=self.lswa.feature_dims[0])

    def default_lswa(self) -> LayerSpec:
        return LayerSpec.lswa(defaults=self.lswa_defaults)

    def allowed_kinds(self, layer: int) -> list[str]:
        return list(self.kinds.layers.get(layer, self.kinds.default))

    def check_layers(self, n_layers: int, source: str = "space") -> "SearchSpace":
        for idx in self.kinds.layers:
            if not 0 <= idx < n_layers:
                raise LBSearchError(f"{source}: kinds.layers.{idx}: layer index out of range; "
                                    f"the model has {n_layers} layers (0..{n_layers - 1})")
        return self

    def violations(self, plan: Plan) -> list[str]:
        """Why ``plan`` is outside this space (empty when it is inside). Memory is checked by the cost model."""
        out = [f"layer {i}: {s.kind} not allowed (allowed: {', '.join(self.allowed_kinds(i))})"
               for i, s in enumerate(plan.layers) if s.kind not in self.allowed_kinds(i)]
        if plan.count("softmax") < self.constraints.min_softmax_layers:
            out.append(f"{plan.count('softmax')} softmax layers < min_softmax_layers {self.constraints.min_softmax_layers}")
        cap = self.constraints.max_removed_layers
        if cap is not None and plan.count("none") > cap:
            out.append(f"{plan.count('none')} removed layers > max_removed_layers {cap}")
        return out


def _allowed_keys(loc: tuple) -> list[str]:
    """Field names of the model that holds the key at ``loc`` (for 'unknown key' messages)."""
    model = SearchSpace
    for part in loc[:-1]:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def _one_line(error: dict, source: str) -> str:
    loc = tuple(error["loc"])
    path = ".".join(str(p) for p in loc) or "(top level)"
    if error["type"] == "extra_forbidden":
        allowed = _allowed_keys(loc)
        return f"{source}: {path}: unknown key; allowed: {', '.join(allowed)}"
    if error["type"] == "literal_error" and "kinds" in loc:
        return f"{source}: {path}: unknown kind {error.get('input')!r}; allowed: {', '.join(KIND_LETTERS)}"
    return f"{source}: {path}: {error['msg']} (got {error.get('input')!r})"


def parse_space(data: dict | None, source: str = "space") -> SearchSpace:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise LBSearchError(f"{source}: expected a mapping at the top level")
    try:
        return SearchSpace.model_validate(data)
    except ValidationError as exc:
        raise LBSearchError(_one_line(exc.errors()[0], source)) from None


def load_space(path: str | Path | None = None, n_layers: int | None = None) -> SearchSpace:
    """Read and validate a search-space YAML; ``None`` gives the packaged default space.

    Layer indices are checked against ``n_layers``, or the model's layer count when it can be
    read without loading weights.
    """
    if path is None:
        text, source = resources.files("lbsearch.search_spaces").joinpath("smollm2-135m.yaml").read_text(), "smollm2-135m.yaml"
    else:
        path = Path(path)
        if not path.is_file():
            raise LBSearchError(f"{path}: search space file not found")
        text, source = path.read_text(), str(path)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise LBSearchError(f"{source}: not valid YAML ({str(exc).splitlines()[0]})") from None
    space = parse_space(data, source)
    if n_layers is None:
        from .models import model_num_layers

        n_layers = model_num_layers(space.model)
    if n_layers is not None:
        space.check_layers(n_layers, source)
    return space
