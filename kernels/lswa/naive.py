"""Quadratic PyTorch reference for LSWA (see the package docstring for the definition).

Works in any float dtype (use float64 for checks) and on any device. Everything else in
``lbsearch.kernels.lswa`` is tested against these functions.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def _expand_kv(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[B, T, Hkv, X] -> [B, T, H, X], query head h reading kv head h // group."""
    group = n_heads // x.shape[2]
    return x.repeat_interleave(group, dim=2) if group > 1 else x


def lswa_masks(t_q: int, t_k: int, window: int, sinks: int, offset: int = 0, device=None,
               start: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean (softmax, linear) masks [t_q, t_k] for queries at positions offset + arange(t_q).

    With ``start`` [B] (left padding per row: keys j < start do not exist and the sinks are the
    first real tokens) they are [B, 1, t_q, t_k].
    """
    i = torch.arange(t_q, device=device)[:, None] + offset
    j = torch.arange(t_k, device=device)[None, :]
    s0 = 0 if start is None else start.to(device).view(-1, 1, 1, 1)
    causal = (j <= i) & (j >= s0)
    in_window = (j > i - window) & causal
    soft = in_window | ((j < s0 + sinks) & causal)
    lin = causal & ~soft
    return soft, lin


def lswa_naive(q, k, v, fq, fk, gate, window: int, sinks: int, scale: float | None = None,
               start: torch.Tensor | None = None):
    """Full-sequence LSWA. q [B,T,H,D], k/v [B,T,Hkv,D], fq [B,T,H,F], fk [B,T,Hkv,F], gate [H].

    ``start`` [B]: left-padding tokens per row (see ``lswa_masks``); pad queries output zeros.
    Masked scores are dropped before the exponent: exp of a large masked score overflows and
    would turn the backward into NaN (0 * inf).
    """
    b, t, h, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    k, v, fk = (_expand_kv(x, h) for x in (k, v, fk))
    soft, lin = lswa_masks(t, t, window, sinks, device=q.device, start=start)
    scores = (torch.einsum("bihd,bjhd->bhij", q, k) * scale).masked_fill(~soft, float("-inf"))
    m = scores.amax(-1, keepdim=True)
    if start is not None:  # pad queries have no keys at all
        m = m.masked_fill(m == float("-inf"), 0.0)
    g = gate.to(q.dtype).view(1, h, 1, 1)
    w_soft = g * torch.exp(scores - m)
    w_lin = (1 - g) * torch.einsum("bihf,bjhf->bhij", fq, fk).masked_fill(~lin, 0.0)
    weights = w_soft + w_lin
    out = torch.einsum("bhij,bjhd->bihd", weights, v)
    den = weights.sum(-1)
    if start is not None:
        den = den.masked_fill(den == 0, 1.0)
    return out / den.transpose(1, 2)[..., None]


@dataclass
class LSWAState:
    """Constant-size decode state of one LSWA layer for a batch.

    sink_k/v [B, Hkv, S, D]; ring_k/v [B, Hkv, W, D] and ring_fk [B, Hkv, W, F] hold token j in
    slot j % W; lin_s [B, Hkv, F, D] and lin_z [B, Hkv, F] (float32) sum fk (x) v over tokens that
    left the window (sinks excluded); pos [B] counts tokens seen. Token indices count real tokens
    only (left padding of a prefill is skipped), so each row's state is that of the row alone.
    """

    sink_k: torch.Tensor
    sink_v: torch.Tensor
    ring_k: torch.Tensor
    ring_v: torch.Tensor
    ring_fk: torch.Tensor
    lin_s: torch.Tensor
    lin_z: torch.Tensor
    pos: torch.Tensor

    @classmethod
    def empty(cls, batch, kv_heads, head_dim, feature_dim, window, sinks, dtype, device):
        def z(*shape, dt=dtype):
            return torch.zeros(*shape, dtype=dt, device=device)

        return cls(
            z(batch, kv_heads, sinks, head_dim), z(batch, kv_heads, sinks, head_dim),
            z(batch, kv_heads, window, head_dim), z(batch, kv_heads, window, head_dim),
            z(batch, kv_heads, window, feature_dim),
            z(batch, kv_heads, feature_dim, head_dim, dt=torch.float32),
            z(batch, kv_heads, feature_dim, dt=torch.float32),
            torch.zeros(batch, dtype=torch.long, device=device),
        )

    @property
    def window(self) -> int:
        return self.ring_k.shape[2]

    @property
    def sinks(self) -> int:
        return self.sink_k.shape[2]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in vars(self).values())


def lswa_decode_naive(q, k, v, fq, fk, gate, state: LSWAState, scale: float | None = None):
    """One decode step: q [B,H,D], k/v [B,Hkv,D], fq [B,H,F], fk [B,Hkv,F]. Updates ``state``."""
    b, h, d = q.shape
    hkv = k.shape[1]
    w, s = state.window, state.sinks
    scale = d ** -0.5 if scale is None else scale
    p = state.pos  # [B]
    bi = torch.arange(b, device=q.device)
    slot = p % w
    # The token leaving the window (j = p - w) is folded into the linear state unless it is a sink.
    leaving = ((p - w) >= s).to(torch.float32).view(b, 1, 1)
    old_fk = state.ring_fk[bi, :, slot].float()  # [B, Hkv, F]
    old_v = state.ring_v[bi, :, slot].float()
    state.lin_s += leaving[..., None] * old_fk[..., :, None] * old_v[..., None, :]
    state.lin_z += leaving * old_fk
    state.ring_k[bi, :, slot] = k.to(state.ring_k.dtype)
    state.ring_v[bi, :, slot] = v.to(state.ring_v.dtype)
    state.ring_fk[bi, :, slot] = fk.to(state.ring_fk.dtype)
    is_sink = p < s
    if bool(is_sink.any()):
        sb = bi[is_sink]
        state.sink_k[sb, :, p[is_sink]] = k[is_sink].to(state.sink_k.dtype)
        state.sink_v[sb, :, p[is_sink]] = v[is_sink].to(state.sink_v.dtype)

    r = torch.arange(w, device=q.device)
    tok = p[:, None] - torch.remainder(p[:, None] - r[None], w)  # [B, W] token held by slot r
    ring_ok = tok >= 0
    t_idx = torch.arange(s, device=q.device)
    sink_ok = t_idx[None] <= (p[:, None] - w)  # sinks outside the window
    keys = torch.cat([state.sink_k, state.ring_k], 2)  # [B, Hkv, S+W, D]
    vals = torch.cat([state.sink_v, state.ring_v], 2)
    ok = torch.cat([sink_ok, ring_ok], 1)[:, None, None, :]  # [B,1,1,S+W]
    group = h // hkv
    qg = q.view(b, hkv, group, d).to(keys.dtype)
    scores = torch.einsum("bhgd,bhnd->bhgn", qg, keys) * scale
    scores = scores.masked_fill(~ok, float("-inf"))
    m = scores.amax(-1, keepdim=True)
    e = torch.exp(scores - m)
    gq = gate.view(1, hkv, group, 1).to(torch.float32)
    num = gq * torch.einsum("bhgn,bhnd->bhgd", e, vals).float()
    den = gq * e.float().sum(-1, keepdim=True)
    fqg = fq.view(b, hkv, group, -1).float()
    num = num + (1 - gq) * torch.einsum("bhgf,bhfd->bhgd", fqg, state.lin_s)
    den = den + (1 - gq) * torch.einsum("bhgf,bhf->bhg", fqg, state.lin_z)[..., None]
    state.pos += 1
    return (num / den).view(b, h, d).to(q.dtype)


def lswa_decode_fmap_naive(q, k, v, weight, gate, state: LSWAState, scale: float | None = None):
    """One decode step from q [B,H,D], k/v [B,Hkv,D] and the Hedgehog feature map's weight [Hkv, D, F/2]:
    fq / fk = [softmax(x W_h), softmax(-x W_h)] in float32 (W_h = weight[h // group]), then
    :func:`lswa_decode_naive`. The reference of the fused kernel that does both in one pass (it is the
    two ops the engine ran before)."""
    from ..fused_decode.naive import feature_map_naive

    fq, fk = feature_map_naive(q, k, weight)
    return lswa_decode_naive(q, k, v, fq, fk, gate, state, scale)


def _gather_tokens(x, idx, ok):
    """x [B, T, Hkv, X] at per-row token indices idx [B, N] -> [B, Hkv, N, X], zero where not ok."""
    rows = torch.arange(x.shape[0], device=x.device)[:, None]
    out = x[rows, idx.clamp(0, max(x.shape[1] - 1, 0))]
    return torch.where(ok[:, :, None, None], out, 0).transpose(1, 2)


def window_state(k, v, fk, window: int, sinks: int, start=None, state_dtype=None) -> LSWAState:
    """Decode state after k/v/fk [B, T, Hkv, *] with its linear part (lin_s / lin_z) left zero.

    Lives in real-token index space: row b's first start[b] tokens are left padding and do not
    exist, so sinks, ring slots and pos are those of the row prefilled alone.
    """
    b, t, hkv, d = k.shape
    st = LSWAState.empty(b, hkv, d, fk.shape[-1], window, sinks, state_dtype or k.dtype, k.device)
    if t == 0:
        return st
    s0 = torch.zeros(b, dtype=torch.long, device=k.device) if start is None else start.to(k.device)
    n = (t - s0)[:, None]  # real tokens per row
    r = torch.arange(window, device=k.device)[None]
    tok = n - 1 - torch.remainder(n - 1 - r, window)  # real token held by ring slot r
    idx, ok = s0[:, None] + tok, tok >= 0
    st.ring_k.copy_(_gather_tokens(k, idx, ok))
    st.ring_v.copy_(_gather_tokens(v, idx, ok))
    st.ring_fk.copy_(_gather_tokens(fk, idx, ok))
    tok = torch.arange(sinks, device=k.device)[None]
    idx, ok = s0[:, None] + tok, tok < n
    st.sink_k.copy_(_gather_tokens(k, idx, ok))
    st.sink_v.copy_(_gather_tokens(v, idx, ok))
    st.pos.copy_(n[:, 0])
    return st


def fold_linear(st: LSWAState, fk, v, lo: int, hi: int, start=None) -> None:
    """Add fk_j (x) v_j over lo <= j < hi (non-sink real tokens only) to st.lin_s / st.lin_z."""
    if hi <= lo:
        return
    fk_old, v_old = fk[:, lo:hi].float(), v[:, lo:hi].float()
    if start is not None:
        j = torch.arange(lo, hi, device=fk.device)
        keep = (j[None] >= start.to(fk.device)[:, None] + st.sinks)[:, :, None, None]
        fk_old, v_old = torch.where(keep, fk_old, 0), torch.where(keep, v_old, 0)
    st.lin_s += torch.einsum("bthf,bthd->bhfd", fk_old, v_old)
    st.lin_z += fk_old.sum(1)


def lswa_state_from_prefill(k, v, fk, window: int, sinks: int, state_dtype=None,
                            start: torch.Tensor | None = None) -> LSWAState:
    """Decode state after consuming k/v/fk [B, T, Hkv, *] from position 0 (row b from start[b])."""
    st = window_state(k, v, fk, window, sinks, start, state_dtype)
    fold_linear(st, fk, v, sinks, k.shape[1] - window, start)
    return st
