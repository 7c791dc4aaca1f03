"""The decode engine's fused step: the model body from tokens to logits in few kernels per layer.

Built once per engine from the model as the plan left it (its trained parameters included):

* **One GEMM for q/k/v and one for gate/up.** The layer's weights (and biases) are concatenated at
  build, when every projection is a plain ``nn.Linear``; otherwise (a LoRA wrapper, say) each
  module is called and the outputs concatenated, so the fused step never computes something else.
  The copies are taken once: build the engine after the weights are final.
* **Glue ops** (:mod:`lbsearch.kernels.fused_decode`): residual add + RMSNorm as one op, RoPE (+ the
  per-head q/k norm, + the KV-cache write for softmax layers) as one op, silu(gate) * up as one op.
  A norm or activation the ops do not compute exactly is called as the model's own module.
* **LSWA**: RoPE, the Hedgehog feature map of q and k as one kernel, then the LSWA decode kernel.
  ``LBSEARCH_FUSED_LSWA_FMAP=1`` (or ``eager_ops(fmap_in_decode=True)``) maps the features inside
  the decode kernel instead (``lswa_decode_fmap``: one kernel fewer per layer, but measured ~4%
  slower per step on the H200, since one program per (sequence, kv head) then also does the mapping;
  BENCHMARKS.md), kept to measure against.
* **Attention cores** come from each kind's runner (``fused_decode``); a kind without one runs its
  eager ``decode`` on the normed hidden state.

``Ops`` names the op set: :func:`eager_ops` calls the kernels' dispatchers (Triton on CUDA, the
PyTorch references on CPU); :func:`compile_ops` (``lbsearch.fused_ops``) routes the Triton kernels
through ``torch.library`` custom ops and leaves the elementwise glue to inductor, for
``torch.compile`` of :meth:`FusedDecoder.__call__`.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .attention.common import rms_norm_params


class Step(NamedTuple):
    """What every layer of one decode step shares: positions [B], filled lengths (pos + 1), RoPE tables [L, D]."""

    pos: torch.Tensor
    lens: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor


@dataclass(frozen=True)
class Ops:
    """The fused step's ops (see the module docstring); signatures as in lbsearch.kernels."""

    rmsnorm: Callable
    add_rmsnorm: Callable
    silu_mul: Callable
    rope_qkv: Callable
    rope_qkv_cache: Callable
    feature_map: Callable
    decode_attention: Callable
    lswa_decode: Callable
    lswa_decode_fmap: Callable | None = None  # None: feature_map, then lswa_decode


FMAP_ENV_VAR = "LBSEARCH_FUSED_LSWA_FMAP"


def use_fmap_kernel(choice: bool | None = None) -> bool:
    """Whether LSWA layers map features inside the decode kernel: ``choice``, else the environment
    variable ``LBSEARCH_FUSED_LSWA_FMAP`` ("1" / "true": yes), else no (the faster path, measured)."""
    if choice is not None:
        return choice
    return os.environ.get(FMAP_ENV_VAR, "0").strip().lower() in ("1", "true", "yes", "on")


def eager_ops(fmap_in_decode: bool | None = None) -> Ops:
    from .kernels import fused_decode as fd
    from .kernels.decode_attention import decode_attention
    from .kernels.lswa import lswa_decode, lswa_decode_fmap

    return Ops(fd.rmsnorm, fd.add_rmsnorm, fd.silu_mul, fd.rope_qkv, fd.rope_qkv_cache, fd.feature_map,
               decode_attention, lambda q, k, v, fq, fk, gate, st, scale, backend=None:
               lswa_decode(q, k, v, fq, fk, gate, st, scale, backend=backend),
               lswa_decode_fmap if use_fmap_kernel(fmap_in_decode) else None)


def _plain(*mods) -> bool:
    return all(type(m) is nn.Linear for m in mods)


class Projection:
    """Several projections of one input as one GEMM (weights concatenated once) when all are plain
    ``nn.Linear``; else each module called and the outputs concatenated."""

    def __init__(self, *mods: nn.Module):
        self.mods = mods
        self.fused = _plain(*mods)
        if self.fused:
            self.weight = torch.cat([m.weight.detach() for m in mods]).contiguous()
            biases = [m.bias for m in mods]
            self.bias = None if all(b is None for b in biases) else torch.cat(
                [b.detach() if b is not None else m.weight.new_zeros(m.out_features) for b, m in zip(biases, mods)])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return F.linear(x, self.weight, self.bias)
        return torch.cat([m(x) for m in self.mods], -1)


class Norm:
    """An RMSNorm the ops compute (with the pending residual add folded in), or the model's own module."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.params = rms_norm_params(module)

    def __call__(self, ops: Ops, hidden, delta):
        """(hidden + delta, its norm); ``delta`` None: nothing to add."""
        if self.params is not None:
            if delta is None:
                return hidden, ops.rmsnorm(hidden, *self.params)
            return ops.add_rmsnorm(hidden, delta, *self.params)
        hidden = hidden if delta is None else hidden + delta
        return hidden, self.module(hidden)


class Mlp:
    """down(act(gate(x)) * up(x)) with gate/up as one projection; another MLP module is called as it is."""

    def __init__(self, mlp: nn.Module):
        self.module = mlp
        parts = [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")]
        self.split = all(p is not None for p in parts) and type(mlp).__name__.endswith("MLP")
        if self.split:
            self.gate_up, self.down, self.act = Projection(parts[0], parts[1]), parts[2], parts[3]
            self.silu = type(self.act).__name__ in ("SiLUActivation", "SiLU")

    def __call__(self, ops: Ops, x):
        if not self.split:
            return self.module(x)
        gu = self.gate_up(x)
        if self.silu:
            return self.down(ops.silu_mul(gu))
        gate, up = gu.chunk(2, -1)
        return self.down(self.act(gate) * up)


class Layer:
    """One decoder layer of the fused step; ``runner`` None: a kind that does not attend."""

    def __init__(self, layer: nn.Module, runner):
        self.runner = runner
        self.post_norm, self.mlp = Norm(layer.post_attention_layernorm), Mlp(layer.mlp)
        if runner is not None:
            self.in_norm = Norm(layer.input_layernorm)
            self.fused_attn = hasattr(runner, "fused_decode") and runner.can_fuse()
            if self.fused_attn:
                p = runner.proj
                self.qkv, self.o_proj = Projection(p.q_proj, p.k_proj, p.v_proj), p.o_proj

    def __call__(self, ops: Ops, step: Step, hidden, delta):
        """(hidden, the pending residual delta) after this layer: the MLP's output is added by the next norm."""
        if self.runner is not None:
            hidden, x = self.in_norm(ops, hidden, delta)
            if self.fused_attn:
                delta = self.o_proj(self.runner.fused_decode(self.qkv(x), step, ops))
            else:
                cos_sin = (step.cos[step.pos][:, None], step.sin[step.pos][:, None])
                delta = self.runner.decode(x[:, None], step.pos, cos_sin)[:, 0]
        hidden, x = self.post_norm(ops, hidden, delta)
        return hidden, self.mlp(ops, x)


class FusedDecoder:
    """tokens [B], positions [B] -> logits [B, V] of one decode step (caches and states updated)."""

    def __init__(self, model, layers, runners, cos: torch.Tensor, sin: torch.Tensor, ops: Ops):
        self.embed, self.head = model.model.embed_tokens, model.lm_head
        self.final_norm = Norm(model.model.norm)
        self.layers = [Layer(layer, runner) for layer, runner in zip(layers, runners)]
        self.cos, self.sin = cos.contiguous(), sin.contiguous()
        self.ops = ops

    def fused_counts(self) -> dict[str, int]:
        """How many layers take each fused path (for reports: a fallback costs kernels)."""
        att = [lay for lay in self.layers if lay.runner is not None]
        return {"layers": len(self.layers), "attention_fused": sum(lay.fused_attn for lay in att),
                "attention_layers": len(att), "qkv_one_gemm": sum(lay.fused_attn and lay.qkv.fused for lay in att),
                "gate_up_one_gemm": sum(lay.mlp.split and lay.mlp.gate_up.fused for lay in self.layers),
                "lswa_fmap_in_decode": sum(bool(lay.fused_attn and hasattr(lay.runner, "fmap_in_decode")
                                                and lay.runner.fmap_in_decode(self.ops)) for lay in att)}

    def __call__(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        step = Step(pos, pos + 1, self.cos, self.sin)
        hidden, delta = self.embed(tokens), None
        for layer in self.layers:
            hidden, delta = layer(self.ops, step, hidden, delta)
        return self.head(self.final_norm(self.ops, hidden, delta)[1])
