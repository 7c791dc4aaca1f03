"""The attention kinds a layer can take, as a registry: kind name -> builder(original_attn, spec)."""
from __future__ import annotations

from typing import Callable

from torch import nn

from ..plan import LayerSpec
from . import lswa, none, softmax

Builder = Callable[[nn.Module, LayerSpec], nn.Module]

ATTENTION_KINDS: dict[str, Builder] = {
    "softmax": softmax.build,
    "lswa": lswa.build,
    "none": none.build,
}


def build_attention(attn: nn.Module, spec: LayerSpec) -> nn.Module:
    return ATTENTION_KINDS[spec.kind](attn, spec)
