"""Apply a plan to a model in place, and undo it.

Each decoder layer's ``self_attn`` is swapped for the module its kind builds (see
:mod:`lbsearch.attention`); the returned handle puts the originals back. The model's
``generate()`` keeps working: lswa and none layers install their own constant-size cache
entries in whatever ``Cache`` generate() creates (or use :func:`plan_cache`).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

from torch import nn
from transformers.cache_utils import Cache, DynamicLayer

from .attention import build_attention
from .attention.lswa import LSWACacheLayer, LSWAttention
from .attention.none import PassThroughCacheLayer
from .models import decoder_layers
from .plan import Plan

CACHE_LAYERS = {"softmax": DynamicLayer, "lswa": LSWACacheLayer, "none": PassThroughCacheLayer}


@dataclass
class SurgeryHandle:
    """Restores the original attention modules of a model changed by :func:`apply_plan`."""

    model: nn.Module
    plan: Plan
    originals: dict[int, nn.Module] = field(default_factory=dict)

    def restore(self) -> None:
        layers = decoder_layers(self.model)
        for idx, attn in self.originals.items():
            layers[idx].self_attn = attn
        self.originals.clear()
        self.model.lbsearch_plan = None

    @contextmanager
    def suspended(self):
        """Original attention in every changed layer for the duration (a teacher forward on the same weights)."""
        layers = decoder_layers(self.model)
        current = {i: layers[i].self_attn for i in self.originals}
        for i, attn in self.originals.items():
            layers[i].self_attn = attn
        try:
            yield self.model
        finally:
            for i, attn in current.items():
                layers[i].self_attn = attn

    def __enter__(self) -> "SurgeryHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def apply_plan(model: nn.Module, plan: Plan, library=None) -> SurgeryHandle:
    """Change every layer to its kind in ``plan`` (in place). Use the handle to restore.

    ``library`` (a block library, see :mod:`lbsearch.distill`) supplies trained LSWA parameters.
    A model already changed is first restored, so plans do not stack.
    """
    layers = decoder_layers(model)
    plan.check(len(layers))
    previous = getattr(model, "lbsearch_handle", None)
    if previous is not None and previous.originals:
        previous.restore()
    handle = SurgeryHandle(model, plan)
    try:
        for idx, (layer, spec) in enumerate(zip(layers, plan.layers)):
            if spec.kind == "softmax":
                continue
            handle.originals[idx] = layer.self_attn
            layer.self_attn = build_attention(layer.self_attn, spec)
            if library is not None and spec.kind == "lswa":
                library.load_into(layer.self_attn, idx, spec)
    except BaseException:
        handle.restore()  # all or nothing
        raise
    model.lbsearch_handle = handle
    model.lbsearch_plan = plan
    return handle


def plan_cache(plan: Plan) -> Cache:
    """A transformers Cache with one entry per layer of the plan's kind."""
    return Cache(layers=[CACHE_LAYERS[spec.kind]() for spec in plan.layers])


def lswa_modules(model: nn.Module) -> dict[int, LSWAttention]:
    return {i: layer.self_attn for i, layer in enumerate(decoder_layers(model))
            if isinstance(layer.self_attn, LSWAttention)}
