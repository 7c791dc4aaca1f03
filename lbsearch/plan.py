"""Per-layer attention plans: frozen specs, the compact string codec, a stable key, JSON/YAML.

A plan string has one token per layer: ``S`` (softmax), ``N`` (none) or ``L`` (lswa) with an
optional window (``L128``), sink count (``s4``) and feature dim (``f64``): ``"SSL128N"``.
Missing LSWA fields come from the defaults (normally the search space's).
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import yaml

from .errors import LBSearchError

KIND_LETTERS = {"softmax": "S", "lswa": "L", "none": "N"}
LETTER_KINDS = {v: k for k, v in KIND_LETTERS.items()}
_TOKEN = re.compile(r"([SLN])(\d+)?(?:s(\d+))?(?:f(\d+))?")


@dataclass(frozen=True, kw_only=True)
class LSWADefaults:
    """Values an ``L`` token without numbers gets."""

    window: int = 64
    sinks: int = 4
    feature_dim: int = 64


DEFAULTS = LSWADefaults()


@dataclass(frozen=True, kw_only=True)
class LayerSpec:
    """What one layer's attention becomes. LSWA fields are ``None`` for the other kinds."""

    kind: str
    window: int | None = None
    sinks: int | None = None
    feature_dim: int | None = None

    def __post_init__(self):
        if self.kind not in KIND_LETTERS:
            raise LBSearchError(f"unknown attention kind {self.kind!r}; allowed: {', '.join(KIND_LETTERS)}")
        if self.kind == "lswa":
            for name in ("window", "sinks", "feature_dim"):
                value = getattr(self, name)
                if value is None or value < (0 if name == "sinks" else 1):
                    raise LBSearchError(f"lswa {name} must be a {'non-negative' if name == 'sinks' else 'positive'} integer, got {value!r}")
            if self.feature_dim % 2:
                raise LBSearchError(f"lswa feature_dim must be even (two halves), got {self.feature_dim}")
        elif (self.window, self.sinks, self.feature_dim) != (None, None, None):
            raise LBSearchError(f"{self.kind} layers take no window, sinks or feature_dim")

    @classmethod
    def lswa(cls, window: int | None = None, sinks: int | None = None, feature_dim: int | None = None,
             defaults: LSWADefaults = DEFAULTS) -> "LayerSpec":
        return cls(kind="lswa", window=defaults.window if window is None else window,
                   sinks=defaults.sinks if sinks is None else sinks,
                   feature_dim=defaults.feature_dim if feature_dim is None else feature_dim)

    def token(self) -> str:
        """Compact token; sinks and feature dim are written only when they differ from DEFAULTS."""
        if self.kind != "lswa":
            return KIND_LETTERS[self.kind]
        text = f"L{self.window}"
        if self.sinks != DEFAULTS.sinks:
            text += f"s{self.sinks}"
        if self.feature_dim != DEFAULTS.feature_dim:
            text += f"f{self.feature_dim}"
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
            if not match:
                raise LBSearchError(f"plan {text!r}: cannot read {compact[pos:]!r} at layer {len(specs)}; "
                                    "use S, N or L[window][s<sinks>][f<feature_dim>] per layer")
            letter, window, sinks, feat = match.groups()
            if letter != "L" and (window or sinks or feat):
                raise LBSearchError(f"plan {text!r}: only L takes numbers (layer {len(specs)})")
            if letter == "L":
                specs.append(LayerSpec.lswa(*(None if x is None else int(x) for x in (window, sinks, feat)),
                                            defaults=defaults))
            else:
                specs.append(LayerSpec(kind=LETTER_KINDS[letter]))
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
        path = Path(path)
        if not path.is_file():
            raise LBSearchError(f"{path}: plan file not found")
        try:
            data = yaml.safe_load(path.read_text())  # JSON is YAML
        except yaml.YAMLError as exc:
            raise LBSearchError(f"{path}: not valid YAML/JSON ({str(exc).splitlines()[0]})") from None
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
            raise LBSearchError(f"{source}: {len(self)} layers in plan {str(self)!r}, the model has {n_layers}")
        return self


def resolve_plan(text_or_path: str, defaults: LSWADefaults = DEFAULTS) -> Plan:
    """A plan from a string, or from a file when the argument names one."""
    if Path(text_or_path).suffix in (".json", ".yaml", ".yml") or Path(text_or_path).is_file():
        return Plan.load(text_or_path, defaults)
    return Plan.parse(text_or_path, defaults)
