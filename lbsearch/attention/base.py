"""The record every attention kind exports, so the rest of lbsearch looks kinds up instead of
branching on their names.

A kind module (``softmax.py``, ``lswa.py``, ``none.py``) defines its modules, cache layer and
engine runner and exports one :class:`AttentionKind`; ``lbsearch.attention.KINDS`` collects them.
Adding a fourth kind is one new file plus one line in that registry.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True, kw_only=True)
class SpecField:
    """A number a kind takes in a plan token: ``L128s4f64`` is window 128, sinks 4, feature dim 64."""

    name: str  # the LayerSpec attribute
    prefix: str  # "" for the first number after the letter, else a lower-case letter
    minimum: int = 1
    even: bool = False

    def problem(self, value) -> str | None:
        if not isinstance(value, int) or isinstance(value, bool) or value < self.minimum:
            return f"{self.name} must be an integer >= {self.minimum}, got {value!r}"
        if self.even and value % 2:
            return f"{self.name} must be even, got {value}"
        return None


@dataclass(frozen=True, kw_only=True)
class AttentionKind:
    """Everything lbsearch needs to know about one attention kind.

    Shapes passed to the cost functions are :class:`lbsearch.cost.ModelShape` (sizes and bytes
    per element); specs are :class:`lbsearch.plan.LayerSpec`.
    """

    name: str  # "softmax", "lswa", "none"
    letter: str  # plan-string letter
    fields: tuple[SpecField, ...] = ()  # numbers the kind takes (its LayerSpec fields)
    build: Callable  # (original attention module, spec) -> module installed in the layer
    cache_layer: type  # transformers cache layer that generate() uses for this kind
    runner: type  # decode-engine runner: (layer, batch, max_len, like) with prefill/decode/state/nbytes
    attends: bool = True  # False: the layer skips its input norm and attention weights entirely
    trainable: bool = False  # has new parameters trained by per-layer transfer (block library)
    kv_bytes: Callable  # (shape, spec, context) -> cache bytes of one sequence
    decode_traffic: Callable  # (shape, spec, batch, context) -> (bytes, flops) of the attention core per step
    prefill_span: Callable  # (spec, prompt_len) -> keys each query attends to on average in prefill
    reference: Callable  # (installed module, hidden [B,T,C], (cos, sin)) -> output: slow, obvious, float64

    def cost_key(self, spec) -> str:
        """Cost-table key of a layer: the kind's name, or its token when its cost depends on fields."""
        return spec.token() if self.fields else self.name


def no_traffic(shape, spec, batch: int, context: int) -> tuple[float, float]:
    return 0.0, 0.0
