"""Per-layer attention plans: frozen specs, the compact string codec, a stable key, JSON/YAML.

A plan string has one token per layer: the kind's letter (``S`` softmax, ``N`` none, ``L`` lswa;
see :mod:`lbsearch.attention`) followed by the numbers the kind takes, e.g. lswa's window
(``L128``), sink count (``s4``) and feature dim (``f64``): ``"SSL128N"``. Missing numbers come
from the defaults (normally the search space's).
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import yaml

from .attention import BY_LETTER, KINDS
from .errors import LBSearchError

_TOKEN = re.compile(r"([A-Z])(\d*)((?:[a-z]\d+)*)")
_NUMBER = re.compile(r"([a-z])(\d+)")


@dataclass(frozen=True, kw_only=True)
class LSWADefaults:
    """Values a token gets for the numbers it leaves out (the fields of every kind that takes them)."""

    window: int = 64
    sinks: int = 4
    feature_dim: int = 64


DEFAULTS = LSWADefaults()
SPEC_FIELDS = ("window", "sinks", "feature_dim")  # every number a kind may take (LayerSpec attributes)


@dataclass(frozen=True, kw_only=True)
class LayerSpec:
    """What one layer's attention becomes. LSWA fields are ``None`` for the other kinds."""

    kind: str
    window: int | None = None
    sinks: int | None = None
    feature_dim: int | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise LBSearchError(f"unknown attention kind {self.kind!r}; allowed: {', '.join(KINDS)}")
        taken = {f.name for f in KINDS[self.kind].fields}
        for field in KINDS[self.kind].fields:
            problem = field.problem(getattr(self, field.name))
            if problem:
                raise LBSearchError(f"{self.kind} {problem}")
        extra = [n for n in SPEC_FIELDS if n not in taken and getattr(self, n) is not None]
        if extra:
            raise LBSearchError(f"{self.kind} layers take no {', '.join(extra)}")

    @classmethod
    def lswa(cls, window: int | None = None, sinks: int | None = None, feature_dim: int | None = None,
             defaults: LSWADefaults = DEFAULTS) -> "LayerSpec":
        return cls(kind="lswa", window=defaults.window if window is None else window,
                   sinks=defaults.sinks if sinks is None else sinks,
                   feature_dim=defaults.feature_dim if feature_dim is None else feature_dim)

    def token(self) -> str:
        """Compact token: the letter, the first number, then prefixed numbers that differ from DEFAULTS."""
        kind = KINDS[self.kind]
        text = kind.letter
        for i, field in enumerate(kind.fields):
            value = getattr(self, field.name)
            if i == 0 or value != getattr(DEFAULTS, field.name):
                text += f"{field.prefix}{value}"
        return text

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class Plan:
    """The attention kind of every layer, in order."""

    layers: tuple[LayerSpec, ...]

    @classmethod
    def parse(cls, text: str, defaults: LSWADefaults = DEFAULTS) -> "Plan":
        compact = re.sub(r"[\s,_-]", "", text)
        specs, pos = [], 0
        while pos < len(compact):
            match = _TOKEN.match(compact, pos)
            if not match or match.group(1) not in BY_LETTER:
                raise LBSearchError(f"plan {_short(text)}: cannot read {_short(compact[pos:], 12)} at layer {len(specs)}; "
                                    f"use per layer {_grammar()}")
            specs.append(_spec_from_token(match, defaults, text, len(specs)))
            pos = match.end()
        if not specs:
            raise LBSearchError(f"plan {text!r} is empty")
        return cls(tuple(specs))

    @classmethod
    def uniform(cls, n_layers: int, spec: LayerSpec) -> "Plan":
        return cls((spec,) * n_layers)

    @classmethod
    def softmax(cls, n_layers: int) -> "Plan":
        return cls.uniform(n_layers, LayerSpec(kind="softmax"))

    def __str__(self) -> str:
        return "".join(s.token() for s in self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i: int) -> LayerSpec:
        return self.layers[i]

    def with_layer(self, i: int, spec: LayerSpec) -> "Plan":
        layers = list(self.layers)
        layers[i] = spec
        return replace(self, layers=tuple(layers))

    def count(self, kind: str) -> int:
        return sum(s.kind == kind for s in self.layers)

    def to_dict(self) -> dict:
        return {"plan": str(self), "layers": [s.to_dict() for s in self.layers]}

    @property
    def key(self) -> str:
        """Stable 12-hex-digit hash of the full specs (not of the string, whose defaults may vary)."""
        canon = json.dumps([s.to_dict() for s in self.layers], sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canon.encode()).hexdigest()[:12]

    @classmethod
    def from_dict(cls, data: dict, defaults: LSWADefaults = DEFAULTS, source: str = "plan") -> "Plan":
        if "layers" in data:
            try:
                return cls(tuple(LayerSpec(**layer) for layer in data["layers"]))
            except TypeError as exc:
                raise LBSearchError(f"{source}: layers: {exc}") from None
        if "plan" in data:
            return cls.parse(str(data["plan"]), defaults)
        raise LBSearchError(f"{source}: needs a 'plan' string or a 'layers' list")

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def load(cls, path: str | Path, defaults: LSWADefaults = DEFAULTS) -> "Plan":
        """Read a plan file (.json or .yaml/.yml)."""
        from .io import load_yaml

        path = Path(path)
        data = load_yaml(path, "plan")  # JSON is YAML
        if not isinstance(data, dict):
            raise LBSearchError(f"{path}: expected a mapping with 'plan' or 'layers'")
        return cls.from_dict(data, defaults, source=str(path))

    def save(self, path: str | Path) -> Path:
        from .io import atomic_write_text

        path = Path(path)
        text = self.to_yaml() if path.suffix in (".yaml", ".yml") else self.to_json()
        return atomic_write_text(path, text)

    def check(self, n_layers: int, source: str = "plan") -> "Plan":
        if len(self) != n_layers:
            raise LBSearchError(f"{_short(source, 40)[1:-1]}: {len(self)} layers in plan {_short(str(self))}, "
                                f"the model has {n_layers}")
        return self


def _short(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _grammar() -> str:
    parts = []
    for kind in KINDS.values():
        numbers = "".join(f"[{f.prefix}<{f.name}>]" for f in kind.fields)
        parts.append(kind.letter + numbers)
    return " or ".join(parts)


def _spec_from_token(match: re.Match, defaults: LSWADefaults, text: str, layer: int) -> LayerSpec:
    kind = BY_LETTER[match.group(1)]
    numbers = {"": match.group(2)} if match.group(2) else {}
    numbers.update(_NUMBER.findall(match.group(3)))
    by_prefix = {f.prefix: f for f in kind.fields}
    unknown = [p or "(number)" for p in numbers if p not in by_prefix]
    if unknown:
        raise LBSearchError(f"plan {_short(text)}: layer {layer}: {kind.letter} takes no {', '.join(unknown)}; "
                            f"use {_grammar()}")
    values = {f.name: int(numbers[f.prefix]) if f.prefix in numbers else getattr(defaults, f.name)
              for f in kind.fields}
    return LayerSpec(kind=kind.name, **values)


def resolve_plan(text_or_path: str, defaults: LSWADefaults = DEFAULTS) -> Plan:
    """A plan from a string, or from a file when the argument names one."""
    path = Path(text_or_path)
    if path.suffix in (".json", ".yaml", ".yml") or (len(text_or_path) < 1024 and _is_file(path)):
        return Plan.load(text_or_path, defaults)
    return Plan.parse(text_or_path, defaults)


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # e.g. a name too long for the file system: not a file
        return False
