"""``lswa``: linear sliding-window attention with attention sinks (definition in lbsearch.kernels.lswa).

Reuses the layer's own q/k/v/o projections and RoPE. New parameters: a Hedgehog-style feature
map per KV head, ``phi(x) = [softmax(xW), softmax(-xW)]``, and a per-query-head gate that weighs
the exact softmax part (window + sinks) against the linear part.
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch import nn

from ..errors import LBSearchError
from ..kernels.lswa import LSWAState, ops
from .base import AttentionKind, SpecField
from .common import (CountingCacheLayer, cache_layer, left_padding, out_projection, pick_cache, project_qkv,
                     qk_norm_params, scale_of)

# sigmoid(4) = 0.982: untrained LSWA is mostly window + sinks softmax (StreamingLLM), with a small
# linear share that the per-layer transfer then learns to use.
GATE_INIT_LOGIT = 4.0


class HedgehogFeatureMap(nn.Module):
    """phi(x) = [softmax(x W_h), softmax(-x W_h)] with one W_h [D, F/2] per KV head (shared by its group)."""

    def __init__(self, kv_heads: int, head_dim: int, feature_dim: int):
        super().__init__()
        half = feature_dim // 2
        weight = torch.zeros(kv_heads, head_dim, half)
        idx = torch.arange(max(head_dim, half))
        weight[:, idx % head_dim, idx % half] = 1.0  # identity-like start: softmax over coordinates of x
        self.weight = nn.Parameter(weight / math.sqrt(math.sqrt(head_dim)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, h, d = x.shape
        kv = self.weight.shape[0]
        dt = torch.promote_types(x.dtype, torch.float32)  # low-precision inputs: features in fp32
        z = torch.einsum("btkgd,kdf->btkgf", x.to(dt).view(b, t, kv, h // kv, d), self.weight.to(dt))
        return torch.cat([z.softmax(-1), (-z).softmax(-1)], -1).view(b, t, h, -1)


def horizon_scale(positions: torch.Tensor, window: int, sinks: int, horizon: int) -> torch.Tensor:
    """Factor on the linear weights of queries at ``positions`` (real-token indices): 1 while a query has
    at most ``horizon`` linear keys (those before its window, sinks excluded), then ``horizon`` over
    their number. Past ``horizon`` the linear part then weighs as much as ``horizon`` average keys,
    however long the context: a bounded normaliser (the plain sum grows with the context). Measured on
    healed students it barely changes their long-context drift (BENCHMARKS.md, recipe study part 3)."""
    n = (positions - window - sinks + 1).clamp(min=1).to(torch.float64)  # exact for float64 checks
    return (horizon / n).clamp(max=1.0)


class LSWACacheLayer(CountingCacheLayer):
    """Constant-size decode state (sinks, ring buffer of the window, linear state) in a transformers Cache."""

    def __init__(self, **kwargs):
        super().__init__()
        self.state = None  # lbsearch.kernels.lswa.LSWAState after prefill

    def reset(self) -> None:
        self.state, self.seen = None, 0

    def _index(self, fn) -> None:
        if self.state is not None:
            for name, value in vars(self.state).items():
                setattr(self.state, name, fn(value))

    def reorder_cache(self, beam_idx) -> None:
        self._index(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices) -> None:
        self._index(lambda t: t[indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._index(lambda t: t.repeat_interleave(repeats, dim=0))

    def nbytes(self) -> int:
        return 0 if self.state is None else self.state.nbytes()


class LSWAttention(nn.Module):
    """Drop-in replacement for a decoder layer's ``self_attn``."""

    kind = "lswa"

    def __init__(self, base: nn.Module, spec):
        super().__init__()
        self.base = base
        self.layer_idx = base.layer_idx
        self.head_dim = base.head_dim
        self.window, self.sinks, self.feature_dim = spec.window, spec.sinks, spec.feature_dim
        n_heads = base.q_proj.out_features // base.head_dim
        kv_heads = base.k_proj.out_features // base.head_dim
        like = dict(device=base.q_proj.weight.device, dtype=base.q_proj.weight.dtype)
        self.feature_map = HedgehogFeatureMap(kv_heads, base.head_dim, spec.feature_dim).to(**like)
        self.gate_logit = nn.Parameter(torch.full((n_heads,), GATE_INIT_LOGIT, **like))
        self.backend: str | None = None  # None: ops' automatic choice (Triton on CUDA)
        # An evaluation option, not part of the plan (:func:`linear_horizon`): bound the linear part's
        # mass at this many keys (:func:`horizon_scale`); the decode engine does not take it.
        self.linear_horizon: int | None = None

    def new_parameters(self) -> dict[str, nn.Parameter]:
        """The parameters LSWA adds to the layer (trained by transfer and healing)."""
        return {"feature_map.weight": self.feature_map.weight, "gate_logit": self.gate_logit}

    def kernel_inputs(self, q, k) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
        """(fq, fk, gate, scale): what the LSWA kernels take besides q, k, v (module and engine share it)."""
        return self.feature_map(q), self.feature_map(k), torch.sigmoid(self.gate_logit), scale_of(self.base)

    def attend(self, q, k, v, cache=None, start: torch.Tensor | None = None) -> torch.Tensor:
        """LSWA over projected q [B,T,H,D], k/v [B,T,Hkv,D]; uses and fills ``cache`` when given.

        ``start`` [B]: left-padding tokens per row (they are neither keys nor sinks; the decode
        state counts real tokens only, so a padded row decodes exactly like the row alone).
        """
        fq, fk, gate, scale = self.kernel_inputs(q, k)
        layer = None if cache is None else cache_layer(cache, self.layer_idx, LSWACacheLayer)
        if self.linear_horizon:
            fq = fq * self._horizon_factor(q, start, layer).to(fq.dtype)
        if torch.is_autocast_enabled(q.device.type):  # like SDPA under autocast: low-precision tensor cores
            dt = torch.get_autocast_dtype(q.device.type)
            q, k, v, fq, fk = (x.to(dt) for x in (q, k, v, fq, fk))
        args = dict(gate=gate, scale=scale, backend=self.backend)
        if layer is None:
            return ops.lswa(q, k, v, fq, fk, window=self.window, sinks=self.sinks, start=start, **args)
        if layer.state is None:
            out, layer.state = ops.lswa(q, k, v, fq, fk, window=self.window, sinks=self.sinks,
                                        return_state=True, start=start, **args)
        else:
            steps = [ops.lswa_decode(q[:, t], k[:, t], v[:, t], fq[:, t], fk[:, t], state=layer.state, **args)
                     for t in range(q.shape[1])]
            out = torch.stack(steps, 1)
        layer.seen += q.shape[1]
        return out

    def _horizon_factor(self, q, start, layer) -> torch.Tensor:
        """[B, T, 1, 1] :func:`horizon_scale` of q's tokens: real-token indices from 0 (left pads below), or
        from the tokens the cache has seen when it decodes."""
        if layer is not None and layer.state is not None:
            first = layer.state.pos
        elif start is not None:
            first = -start.to(q.device)
        else:
            first = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        positions = first.view(-1, 1) + torch.arange(q.shape[1], device=q.device)
        return horizon_scale(positions, self.window, self.sinks, self.linear_horizon)[..., None, None]

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, *args, **kwargs):
        q, k, v = project_qkv(self.base, hidden_states, position_embeddings)
        start = left_padding(kwargs.get("attention_mask"), hidden_states.shape[1])
        out = self.attend(q, k, v, pick_cache(kwargs), start).to(hidden_states.dtype)
        return self.base.o_proj(out.flatten(2)), None


def build(attn: nn.Module, spec) -> nn.Module:
    return LSWAttention(attn, spec)


@contextmanager
def linear_horizon(model: nn.Module, horizon: int | None):
    """Every LSWA layer of ``model`` bounds its linear part at ``horizon`` keys inside the block (None:
    unbounded, as trained); the earlier setting comes back afterwards."""
    if horizon is not None and (isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1):
        raise LBSearchError(f"linear_horizon: {horizon!r}: must be a whole number of keys >= 1, or None")
    layers = [m for m in model.modules() if isinstance(m, LSWAttention)]
    saved = [m.linear_horizon for m in layers]
    for m in layers:
        m.linear_horizon = horizon
    try:
        yield layers
    finally:
        for m, h in zip(layers, saved):
            m.linear_horizon = h


class LSWARunner:
    """Decode engine: constant-size LSWA state; prefill and decode through lbsearch.kernels.lswa."""

    def __init__(self, layer, batch: int, max_len: int, like: torch.Tensor):
        self.mod = layer.self_attn
        if self.mod.linear_horizon:
            raise LBSearchError(f"layer {self.mod.layer_idx}: linear_horizon is an evaluation option of the "
                                "model's forward; the decode engine does not take it")
        base = self.mod.base
        kv_heads = base.k_proj.out_features // base.head_dim
        self.st = LSWAState.empty(batch, kv_heads, base.head_dim, self.mod.feature_dim, self.mod.window,
                                  self.mod.sinks, like.dtype, like.device)
        self.proj = base  # the module holding q/k/v/o_proj (the fused step projects)
        self.heads, self.kv_heads = base.q_proj.out_features // base.head_dim, kv_heads
        self._qk_norm = qk_norm_params(base)
        self._gate = None  # sigmoid(gate_logit), taken when the fused step is built

    def can_fuse(self) -> bool:
        """Whether :meth:`fused_decode` computes this layer; takes the gate as it is now (like the fused
        step's concatenated weights, it is read once: build the engine after training)."""
        self._gate = torch.sigmoid(self.mod.gate_logit.detach()).contiguous()
        return self._qk_norm is not None and type(self.mod.feature_map) is HedgehogFeatureMap

    def fmap_in_decode(self, ops) -> bool:
        """Whether :meth:`fused_decode` with ``ops`` computes the feature map inside the decode kernel."""
        return ops.lswa_decode_fmap is not None

    def fused_decode(self, qkv, step, ops):
        """Attention output [B, H*D] from the fused projection qkv [B, (H + 2 Hkv) D]: RoPE (+ q/k norm) in
        one op, then one LSWA decode kernel that also maps q and k to features (or, with ops that lack
        it, the feature map as one op and then the decode kernel)."""
        qn, kn, eps = self._qk_norm
        q, k, v = ops.rope_qkv(qkv, step.cos, step.sin, step.pos, self.heads, self.kv_heads, qn, kn, eps)
        weight, scale = self.mod.feature_map.weight, scale_of(self.mod.base)
        if self.fmap_in_decode(ops):
            out = ops.lswa_decode_fmap(q, k, v, weight, self._gate, self.st, scale, self.mod.backend)
        else:
            fq, fk = ops.feature_map(q, k, weight)
            out = ops.lswa_decode(q, k, v, fq, fk, self._gate, self.st, scale, self.mod.backend)
        return out.to(qkv.dtype).flatten(1)

    def _inputs(self, x, cos_sin):
        q, k, v = project_qkv(self.mod.base, x, cos_sin)
        return (q, k, v, *self.mod.kernel_inputs(q, k))

    def prefill(self, x, rows, cos_sin, start=None):
        """State rows ``rows`` from x [n, T, C]; ``start`` [n]: left pads per row (neither keys nor
        sinks; the state is each row's alone, in real-token space)."""
        q, k, v, fq, fk, gate, scale = self._inputs(x, cos_sin)
        out, st = ops.lswa(q, k, v, fq, fk, gate, window=self.mod.window, sinks=self.mod.sinks,
                           scale=scale, backend=self.mod.backend, return_state=True, start=start)
        for name, buf in vars(self.st).items():
            buf[rows] = getattr(st, name).to(buf.dtype)
        return self.mod.base.o_proj(out.to(x.dtype).flatten(2))

    def decode(self, x, pos, cos_sin):
        q, k, v, fq, fk, gate, scale = self._inputs(x, cos_sin)
        out = ops.lswa_decode(q[:, 0], k[:, 0], v[:, 0], fq[:, 0], fk[:, 0], gate, self.st, scale,
                              backend=self.mod.backend)
        return self.mod.base.o_proj(out.to(x.dtype).reshape(x.shape[0], 1, -1))

    def state(self) -> list[torch.Tensor]:
        return list(vars(self.st).values())

    def nbytes(self) -> int:
        return self.st.nbytes()


LSWA_STATE_BYTES = 4  # the linear state is float32


def kv_bytes(shape, spec, context: int) -> int:
    """Sinks and ring (keys, values, ring features) in the cache dtype, linear state in fp32, pos."""
    d, f = shape.head_dim, spec.feature_dim
    cached = (2 * spec.sinks * d + 2 * spec.window * d + spec.window * f) * shape.dtype_bytes
    return shape.kv_heads * (cached + (f * d + f) * LSWA_STATE_BYTES) + 8


def decode_traffic(shape, spec, batch: int, context: int) -> tuple[float, float]:
    """The whole state is read; exact scores over window + sinks, plus the linear state read and query."""
    span = spec.window + spec.sinks + 2 * spec.feature_dim
    return batch * kv_bytes(shape, spec, context), 4 * batch * shape.heads * span * shape.head_dim


def reference(module: LSWAttention, hidden: torch.Tensor, cos_sin) -> torch.Tensor:
    """The float64 quadratic reference of lbsearch.kernels.lswa on this module's own inputs."""
    from ..kernels.lswa import lswa_naive

    q, k, v = project_qkv(module.base, hidden, cos_sin)
    fq, fk, gate, scale = module.kernel_inputs(q, k)
    out = lswa_naive(*(x.double() for x in (q, k, v, fq, fk, gate)), module.window, module.sinks, scale)
    return out_projection(module.base.o_proj, out.flatten(2))


KIND = AttentionKind(
    name="lswa", letter="L", build=build, cache_layer=LSWACacheLayer, runner=LSWARunner, trainable=True,
    fields=(SpecField(name="window", prefix=""), SpecField(name="sinks", prefix="s", minimum=0),
            SpecField(name="feature_dim", prefix="f", minimum=2, even=True)),
    kv_bytes=kv_bytes, decode_traffic=decode_traffic,
    prefill_span=lambda spec, prompt_len: min(prompt_len, spec.window + spec.sinks) + 2 * spec.feature_dim,
    reference=reference,
)
