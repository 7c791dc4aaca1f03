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
from transformers.cache_utils import Cache

from .attention import KINDS, ORIGINAL, build_attention, kind_of_module
from .models import decoder_layers
from .plan import Plan


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

    ``library`` (a block library, see :mod:`lbsearch.distill`) supplies the trained parameters of
    kinds that have them. The model must be unchanged (all layers original): plans do not stack.
    """
    layers = decoder_layers(model)
    plan.check(len(layers))
    changed = [i for i, layer in enumerate(layers) if kind_of_module(layer.self_attn).name != ORIGINAL]
    if changed:
        raise RuntimeError(f"layers {changed} are already changed by another plan; restore its handle first")
    handle = SurgeryHandle(model, plan)
    try:
        for idx, (layer, spec) in enumerate(zip(layers, plan.layers)):
            new = build_attention(layer.self_attn, spec)
            if new is layer.self_attn:
                continue
            handle.originals[idx] = layer.self_attn
            layer.self_attn = new
            if library is not None and KINDS[spec.kind].trainable:
                library.load_into(new, idx, spec)
    except BaseException:
        handle.restore()  # all or nothing
        raise
    return handle


def plan_cache(plan: Plan) -> Cache:
    """A transformers Cache with one entry per layer of the plan's kind."""
    return Cache(layers=[KINDS[spec.kind].cache_layer() for spec in plan.layers])


def trainable_modules(model: nn.Module) -> dict[int, nn.Module]:
    """Installed attention modules whose kind has new parameters (``new_parameters()``), by layer."""
    return {i: layer.self_attn for i, layer in enumerate(decoder_layers(model))
            if kind_of_module(layer.self_attn).trainable}
