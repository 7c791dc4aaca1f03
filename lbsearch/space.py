"""Search spaces from YAML, validated: what each layer may become, constraints, objectives, budgets.

Every bad input is one :class:`LBSearchError` line naming the file, the key path and what is allowed.
"""
from __future__ import annotations

from dataclasses import fields
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, NonNegativeInt, PositiveFloat, PositiveInt,
                      TypeAdapter, ValidationError, field_validator, model_validator)

from .attention import KINDS
from .errors import LBSearchError
from .io import load_yaml
from .plan import LayerSpec, LSWADefaults, Plan
from .recipe import HealConfig, TransferConfig


def _known_kind(name: str) -> str:
    if name not in KINDS:
        raise ValueError(f"unknown kind {name!r}; allowed: {', '.join(KINDS)}")
    return name


Kind = Annotated[str, AfterValidator(_known_kind)]
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


MAX_TOKENS = 10**11  # larger budgets are typos, not plans


class Budgets(_Strict):
    """Token budgets (the space's ``cpu:`` section gives CPU-sized ones)."""

    calibration_tokens: PositiveInt = Field(16384, le=MAX_TOKENS)
    healing_tokens: PositiveInt = Field(10_000_000, le=MAX_TOKENS)  # fidelity "full"
    trial_healing_tokens: PositiveInt = Field(250_000, le=MAX_TOKENS)  # fidelity "brief"
    eval_tokens: PositiveInt = Field(4096, le=MAX_TOKENS)
    sensitivity_tokens: PositiveInt = Field(2048, le=MAX_TOKENS)


class Target(_Strict):
    """Where the healed model will be served: the throughput objective is predicted for this."""

    device: str = "h200"  # a known device (lbsearch.cost.DEVICES) or "local"
    batch: PositiveInt = Field(200, le=1_000_000)
    prompt: PositiveInt = Field(1024, le=10_000_000)
    output: PositiveInt = Field(256, le=10_000_000)

    @property
    def context(self) -> int:
        """Mean cached tokens over the decode (what the cost tables are measured at)."""
        return self.prompt + self.output // 2

    @field_validator("device")
    @classmethod
    def _known_device(cls, name):
        from .cost import DEVICES

        if name != "local" and name not in DEVICES:
            raise ValueError(f"unknown device {name!r}; allowed: local, {', '.join(DEVICES)}")
        return name


def _overrides_of(config_cls, exclude: tuple[str, ...] = ()):
    """A validator for a dict of overrides of a frozen config dataclass (keys, types, its own checks)."""
    allowed = [f.name for f in fields(config_cls) if f.name not in exclude]

    def check(values: dict[str, Any]) -> dict[str, Any]:
        unknown = [k for k in values if k not in allowed]
        if unknown:
            raise ValueError(f"unknown key {unknown[0]!r}; allowed: {', '.join(allowed)}")
        try:
            TypeAdapter(config_cls).validate_python(values, strict=False)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            raise ValueError(f"{where + ': ' if where else ''}{_message(err)}") from None
        except LBSearchError as exc:
            raise ValueError(str(exc)) from None
        return dict(values)

    return AfterValidator(check)


class SourceConfig(_Strict):
    """One source of the training corpus. ``source`` names its kind (lbsearch.corpus.sources.SOURCE_KINDS:
    teacher-prompts, teacher-unconditional, a local file or folder, a hub dataset); the options that kind
    takes may be set, the others not (None: the kind's default)."""

    source: str = Field(min_length=1)
    weight: float = Field(1.0, gt=0, le=1e6)  # share of the corpus's tokens, relative to the other sources
    text_field: str | None = None  # files, hub: the column with the text (default: data.text_field)
    subset: str | None = None  # hub: the dataset's configuration
    split: str | None = None  # hub: its split (default train)
    prompts: str | None = None  # teacher-prompts: the prompt set, broad (default) or seed (the first 32)
    temperature: float | None = Field(None, gt=0, le=10)  # teacher samples (defaults: answers 0.8, unconditional 1)
    top_p: float | None = Field(None, gt=0, le=1)  # teacher samples (defaults: answers 0.95, unconditional 1)
    max_new_tokens: int | None = Field(None, ge=1, le=100_000)  # teacher samples (default 256)
    start: str | None = None  # teacher-unconditional: bos (default), eos or a token's text

    @model_validator(mode="after")
    def _fits_its_kind(self):
        from .corpus.sources import option_error

        error = option_error(self.source, self.model_dump(exclude={"source", "weight"}))
        if error:
            raise ValueError(error)
        return self


class DataConfig(_Strict):
    # the training corpus: one source (shorthand) or a weighted mixture; neither: teacher-prompts
    source: str | None = None  # teacher (= teacher-prompts), teacher-unconditional, a local file/dir, a hub name
    sources: list[SourceConfig] = Field(default_factory=list)
    # held-out real text measured beside the held-out split (never trained on); see lbsearch.corpus.EVAL_SOURCES
    eval_sources: list[str] = Field(default_factory=list)
    text_field: str = "text"  # files and hub datasets: the column with the text, unless a source sets its own
    seq_len: PositiveInt = Field(512, le=1_000_000)
    corpus_tokens: PositiveInt = Field(24576, le=MAX_TOKENS)  # size of the corpus split into train/calibration/held-out
    # GPU healing trains on its own corpus of this size, drawn from the same sources (other seed, train-split
    # prompts and documents only), so a 10M-token budget repeats each block a few times instead of hundreds;
    # 0, or on CPU: the train split
    healing_corpus_tokens: NonNegativeInt = Field(2_500_000, le=MAX_TOKENS)
    heldout_fraction: float = Field(0.25, gt=0, lt=1)
    calibration_fraction: float = Field(0.25, gt=0, lt=1)
    seed: int = 0

    @model_validator(mode="after")
    def _one_way_to_name_sources(self):
        if self.source is not None and self.sources:
            raise ValueError("give data.source (one source) or data.sources (a mixture), not both")
        return self

    @property
    def mixture(self) -> tuple[SourceConfig, ...]:
        """The corpus's sources: ``source`` alone, else ``sources``, else teacher-prompts."""
        if self.source is not None:
            return (SourceConfig(source=self.source),)
        return tuple(self.sources) or (SourceConfig(source="teacher-prompts"),)

    def source_keys(self) -> list[str]:
        """The key each source of :attr:`mixture` is named by in messages (``data`` for the shorthand:
        ``data.source``, ``data.text_field``)."""
        if self.source is not None or not self.sources:
            return ["data"]
        return [f"data.sources[{i}]" for i in range(len(self.sources))]


Fraction = Annotated[float, Field(ge=0, le=1)]
FidelityName = Literal["assembled", "brief", "full"]  # lbsearch.objective.FIDELITIES


class SearchSettings(_Strict):
    """How ``lbsearch search`` runs (flags override): sampler, budget, fidelities and the sensitivity prior."""

    sampler: Literal["tpe", "nsga2", "gp", "random"] = "tpe"  # lbsearch.search.sampler.SAMPLERS
    seed: int = 0
    trials: PositiveInt | None = 100  # stop when the study holds this many complete trials
    time_budget: PositiveFloat | None = None  # seconds of search (in-flight trials finish)
    fidelity: FidelityName = "assembled"  # what the search ranks plans at
    rescore_fidelity: FidelityName | None = "brief"  # the front's best plans are re-scored at this
    rescore_top: NonNegativeInt = 5
    n_startup_trials: PositiveInt = 16  # prior draws (and the base sampler's startup), threshold plans included
    # the paper's threshold plans, enqueued first: (removed, lswa) as fractions of the searchable layers
    threshold_budgets: list[tuple[Fraction, Fraction]] = Field(default_factory=lambda: [
        (0.0, 0.5), (0.0, 1.0), (0.1, 0.2), (0.2, 0.3), (0.3, 0.3), (0.4, 0.4), (0.5, 0.5)])
    prior_temperature: PositiveFloat = 1.0  # KL scale of the prior, times the table's median KL
    prior_gain_power: float = Field(1.0, ge=0)  # weight of each choice's per-layer speed-up
    prior_floor: float = Field(0.1, ge=0, lt=1)  # share of every layer's mass spread evenly over its choices
    reference: dict[Objective, float] = Field(default_factory=dict)  # hypervolume reference overrides

    @field_validator("threshold_budgets")
    @classmethod
    def _at_most_all_layers(cls, budgets):
        for n_none, n_lswa in budgets:
            if n_none + n_lswa > 1:
                raise ValueError(f"({n_none}, {n_lswa}): the two fractions add up to more than 1")
        return budgets


class SearchSpace(_Strict):
    model: str = "smollm2-135m"
    kinds: KindChoices = Field(default_factory=KindChoices)
    lswa: LSWAChoices = Field(default_factory=LSWAChoices)
    constraints: Constraints = Field(default_factory=Constraints)
    objectives: list[Objective] = Field(default_factory=lambda: ["kl", "throughput"], min_length=1)
    target: Target = Field(default_factory=Target)
    budgets: Budgets = Field(default_factory=Budgets)
    data: DataConfig = Field(default_factory=DataConfig)
    search: SearchSettings = Field(default_factory=SearchSettings)
    # overrides of lbsearch.distill.HealConfig / TransferConfig (their defaults live there)
    heal: Annotated[dict[str, Any], _overrides_of(HealConfig, exclude=("tokens",))] = Field(default_factory=dict)
    transfer: Annotated[dict[str, Any], _overrides_of(TransferConfig)] = Field(default_factory=dict)
    # what changes without a GPU: any part of this space, merged over it (CPU-sized budgets)
    cpu: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _cpu_section_is_valid(self):
        if self.cpu:
            self.on_cpu()
        return self

    def on_cpu(self) -> "SearchSpace":
        """This space as it runs without a GPU: the ``cpu:`` section merged over the rest."""
        if not self.cpu:
            return self
        if "cpu" in self.cpu:
            raise ValueError("cpu: cannot hold another cpu section")
        merged = _merge(self.model_dump(exclude={"cpu"}), self.cpu)
        try:
            return SearchSpace.model_validate(merged)
        except ValidationError as exc:
            raise ValueError(_one_line(exc.errors()[0], "cpu")) from None

    def on(self, device) -> "SearchSpace":
        """The space as it runs on ``device`` (a torch device or its type name)."""
        return self if getattr(device, "type", device) == "cuda" else self.on_cpu()

    @property
    def lswa_defaults(self) -> LSWADefaults:
        return LSWADefaults(window=self.lswa.windows[0], sinks=self.lswa.sinks[0],
                            feature_dim=self.lswa.feature_dims[0])

    def default_lswa(self) -> LayerSpec:
        return LayerSpec.lswa(defaults=self.lswa_defaults)

    def allowed_kinds(self, layer: int) -> list[str]:
        return list(self.kinds.layers.get(layer, self.kinds.default))

    def kind_specs(self, kind: str) -> list[LayerSpec]:
        """Every spec of ``kind`` the space allows: the product of the space's values of its numbers."""
        values = {"window": self.lswa.windows, "sinks": self.lswa.sinks, "feature_dim": self.lswa.feature_dims}
        combos = [{}]
        for f in KINDS[kind].fields:
            combos = [{**c, f.name: v} for c in combos for v in values[f.name]]
        return [LayerSpec(kind=kind, **c) for c in combos]

    def layer_specs(self, layer: int) -> list[LayerSpec]:
        """The choices of one layer (a search parameter when there is more than one)."""
        return [spec for kind in self.allowed_kinds(layer) for spec in self.kind_specs(kind)]

    def all_specs(self, n_layers: int) -> list[LayerSpec]:
        """Every distinct spec any layer may take, softmax first (what cost tables must cover)."""
        specs = {s: None for s in self.kind_specs("softmax")}
        for i in range(n_layers):
            specs.update({s: None for s in self.layer_specs(i)})
        return list(specs)

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


def _merge(base: dict, over: dict) -> dict:
    """``over`` merged into ``base``: nested mappings merge, anything else replaces."""
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _sub_model(model, name) -> tuple[type[BaseModel] | None, bool]:
    """The model a field of ``model`` holds, and whether it holds a list of them."""
    field = model.model_fields.get(name) if model is not None and isinstance(name, str) else None
    ann = getattr(field, "annotation", None)
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann, False
    args = getattr(ann, "__args__", ())
    if getattr(ann, "__origin__", None) is list and args and isinstance(args[0], type) \
            and issubclass(args[0], BaseModel):
        return args[0], True
    return None, False


def _walk(loc: tuple) -> tuple[str, type[BaseModel] | None]:
    """The key path as written (``data.sources[2].weight``: list items of models indexed) and the model
    that holds its last key (None when that is not a model)."""
    model, listed, path, holder = SearchSpace, False, "", None
    for part in loc:
        if listed and isinstance(part, int):
            path, listed = f"{path}[{part}]", False
            continue
        path += ("." if path else "") + str(part)
        holder = model
        model, listed = _sub_model(model, part)
    return path, holder


def _allowed_keys(loc: tuple) -> list[str]:
    """Field names of the model that holds the key at ``loc`` (for 'unknown key' messages)."""
    holder = _walk(loc)[1]
    return list(holder.model_fields) if holder is not None else []


def _message(error: dict) -> str:
    msg = error["msg"]
    return msg[len("Value error, "):] if msg.startswith("Value error, ") else msg


def _shown(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _one_line(error: dict, source: str) -> str:
    loc = tuple(error["loc"])
    path = _walk(loc)[0] or "(top level)"
    if error["type"] == "extra_forbidden":
        allowed = _allowed_keys(loc)
        return f"{source}: {path}: unknown key; allowed: {', '.join(allowed)}"
    if error["type"] == "value_error":
        return f"{source}: {path}: {_message(error)}"
    return f"{source}: {path}: {_message(error)} (got {_shown(error.get('input'))})"


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
        text = resources.files("lbsearch.search_spaces").joinpath("smollm2-135m.yaml").read_text()
        data, source = yaml.safe_load(text), "smollm2-135m.yaml"
    else:
        data, source = load_yaml(path, "search space"), str(path)
    space = parse_space(data, source)
    if n_layers is None:
        from .models import model_num_layers

        n_layers = model_num_layers(space.model)
    if n_layers is not None:
        space.check_layers(n_layers, source)
    return space
