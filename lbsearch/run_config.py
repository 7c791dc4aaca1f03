"""What one ``lbsearch run`` is told: flags, or a YAML file (``--config``) with the same names.

Validated like the search space: every bad value is one line naming the file (or flag), the key
and what is allowed. Flags override the file. ``space_as_run`` gives the search space as the run
uses it: the ``cpu:`` section merged in without a GPU, then the run's budgets and search settings.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveFloat, PositiveInt, ValidationError

from .errors import LBSearchError
from .io import load_yaml
from .space import Budgets, SearchSpace, _message, _one_line, _shown, load_space, parse_space

SEARCH_KEYS = ("trials", "time_budget", "sampler", "seed", "finalists")  # -> the space's search: section


class RunConfig(BaseModel):
    """Everything ``lbsearch run`` takes; None means "the space's value" or "the default"."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    space: str | None = None  # search-space YAML; None: the packaged default
    model: str | None = None  # overrides the space's model
    out: str | None = None  # run folder; default runs/<model>
    device: str | None = None  # cpu | cuda[:N]; default: cuda when there is one
    trials: PositiveInt | None = None
    time_budget: PositiveFloat | None = None  # seconds of search
    sampler: Literal["tpe", "nsga2", "gp", "random"] | None = None
    seed: int | None = None
    prior: bool = True  # False: no threshold plans, no prior draws
    finalists: NonNegativeInt | None = None  # front plans re-scored (healed) at the end
    workers: PositiveInt = 1  # more than 1 (or a ray_address): Ray actors
    cpus_per_worker: PositiveInt = 1
    ray_address: str | None = None
    storage: str | None = None  # Optuna RDB URL; default sqlite in the run folder
    study: str | None = None
    mlflow_uri: str | None = None  # default: sqlite in the run folder
    experiment: str = Field("lbsearch", min_length=1)
    resume: bool = False  # continue the run folder's run with its saved settings
    budgets: dict[str, PositiveInt] = Field(default_factory=dict)  # keys of the space's budgets:

    @property
    def uses_ray(self) -> bool:
        return self.workers > 1 or bool(self.ray_address)

    def run_dir(self, space: SearchSpace) -> Path:
        ref = Path(self.model or space.model)
        return Path(self.out) if self.out else Path("runs") / (ref.stem if ref.suffix == ".gguf" else ref.name)

    def load_space(self) -> SearchSpace:
        space = load_space(self.space)
        return space.model_copy(update={"model": self.model}) if self.model else space

    def space_as_run(self, space: SearchSpace, device) -> SearchSpace:
        """``space`` on ``device`` with this run's budgets and search settings (checked: one line)."""
        data = space.on(device).model_dump(mode="json", exclude={"cpu"})
        data["budgets"].update(self.budgets)
        settings = {"trials": self.trials, "time_budget": self.time_budget, "sampler": self.sampler,
                    "seed": self.seed, "rescore_top": self.finalists}
        data["search"].update({k: v for k, v in settings.items() if v is not None})
        if self.time_budget is not None and self.trials is None:
            data["search"]["trials"] = None  # a time budget alone: no trial cap
        return parse_space(data, "run settings")


def parse_run_config(data: dict, source: str) -> RunConfig:
    if not isinstance(data, dict):
        raise LBSearchError(f"{source}: expected a mapping of run settings at the top level")
    unknown = sorted(set(data.get("budgets") or {}) - set(Budgets.model_fields))
    if unknown:
        raise LBSearchError(f"{source}: budgets.{unknown[0]}: unknown budget; allowed: "
                            f"{', '.join(Budgets.model_fields)}")
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        if error["type"] == "extra_forbidden":
            raise LBSearchError(f"{source}: {'.'.join(map(str, error['loc']))}: unknown setting; allowed: "
                                f"{', '.join(RunConfig.model_fields)}") from None
        if source == "flags":
            loc = [str(part) for part in error["loc"]]
            name = loc[-1] if loc[0] == "budgets" else loc[0]
            raise LBSearchError(f"--{name.replace('_', '-')}: {_message(error)} (got {_shown(error.get('input'))})") \
                from None
        raise LBSearchError(_one_line(error, source)) from None


def load_run_config(path: str | Path | None, flags: dict) -> RunConfig:
    """The YAML file at ``path`` (if any) with ``flags`` (non-None values) over it."""
    data = (load_yaml(path, "run config") if path else None) or {}
    if not isinstance(data, dict):
        raise LBSearchError(f"{path}: expected a mapping of run settings at the top level")
    budgets = {**(data.get("budgets") or {}), **flags.pop("budgets", {})}
    data.update({k: v for k, v in flags.items() if v is not None})
    if budgets:
        data["budgets"] = budgets
    return parse_run_config(data, str(path) if path else "flags")
