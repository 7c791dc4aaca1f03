"""The attention kinds a layer can take, as one registry of :class:`AttentionKind` records."""
from __future__ import annotations

from torch import nn

from . import lswa, none, softmax
from .base import AttentionKind, SpecField

KINDS: dict[str, AttentionKind] = {k.name: k for k in (softmax.KIND, lswa.KIND, none.KIND)}
ORIGINAL = "softmax"  # the kind whose build keeps the layer's own attention
BY_LETTER: dict[str, AttentionKind] = {k.letter: k for k in KINDS.values()}


def kind_of_module(attn: nn.Module) -> AttentionKind:
    """The kind of an installed attention module (modules that are not ours are the original)."""
    return KINDS[getattr(attn, "kind", ORIGINAL)]


def build_attention(attn: nn.Module, spec) -> nn.Module:
    return KINDS[spec.kind].build(attn, spec)


__all__ = ["AttentionKind", "BY_LETTER", "KINDS", "ORIGINAL", "SpecField", "build_attention", "kind_of_module"]
