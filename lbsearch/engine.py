"""Static-cache decode engine: a model with a plan applied, served with our own attention and caches.

The engine runs the model's own weights (embedding, q/k/v/o projections, norms, MLP, lm_head)
and the LSWA feature map and gate of the ``LSWAttention`` modules :func:`lbsearch.apply_plan`
installs (so trained parameters are honoured). Caches are preallocated per layer kind:

* softmax: full keys/values ``[B, Hkv, max_len, D]``, read by the split-KV decode-attention kernel;
* lswa: one :class:`~lbsearch.kernels.lswa.LSWAState` (sinks, ring buffer, linear state);
* none: nothing; the layer skips its input layernorm and attention.

Prefill is batched (in micro-batches of rows to bound activation memory); decoding is greedy.
On CUDA one decode step is captured as a CUDA graph and replayed; on CPU it is a plain loop.
Sequences of one batch share the prompt length (no padding), which is what a benchmark needs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention.common import project_qkv
from .kernels.decode_attention import decode_attention
from .kernels.lswa import LSWAState, ops as lswa_ops
from .models import decoder_layers


def layer_kind(layer) -> str:
    """softmax / lswa / none from the module apply_plan installed (original modules: softmax)."""
    return getattr(layer.self_attn, "kind", "softmax")


def _scale(attn) -> float:
    return getattr(attn, "scaling", attn.head_dim ** -0.5)


class SoftmaxRunner:
    """Full KV cache; prefill with causal SDPA, decode with the split-KV kernel."""

    attends = True

    def __init__(self, layer, batch: int, max_len: int, like: torch.Tensor):
        self.attn = layer.self_attn
        kv_heads = self.attn.k_proj.out_features // self.attn.head_dim
        shape = (batch, kv_heads, max_len, self.attn.head_dim)
        self.k = torch.zeros(shape, dtype=like.dtype, device=like.device)
        self.v = torch.zeros_like(self.k)

    def prefill(self, x, rows: slice, cos_sin):
        q, k, v = project_qkv(self.attn, x, cos_sin)
        t = x.shape[1]
        k, v = k.transpose(1, 2), v.transpose(1, 2)
        self.k[rows, :, :t] = k
        self.v[rows, :, :t] = v
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, is_causal=True,
                                             scale=_scale(self.attn), enable_gqa=True)
        return self.attn.o_proj(out.transpose(1, 2).flatten(2))

    def decode(self, x, pos, cos_sin):
        q, k, v = project_qkv(self.attn, x, cos_sin)
        rows = torch.arange(x.shape[0], device=x.device)
        self.k[rows, :, pos] = k[:, 0]
        self.v[rows, :, pos] = v[:, 0]
        out = decode_attention(q[:, 0], self.k, self.v, pos + 1, _scale(self.attn))
        return self.attn.o_proj(out.reshape(x.shape[0], 1, -1))

    def state(self) -> list[torch.Tensor]:
        return []  # rows past the prompt are rewritten by every decode, rows before by nobody

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


class LSWARunner:
    """Constant-size LSWA state; prefill and decode through lbsearch.kernels.lswa."""

    attends = True

    def __init__(self, layer, batch: int, max_len: int, like: torch.Tensor):
        self.mod = layer.self_attn
        base = self.mod.base
        kv_heads = base.k_proj.out_features // base.head_dim
        self.st = LSWAState.empty(batch, kv_heads, base.head_dim, self.mod.feature_dim, self.mod.window,
                                  self.mod.sinks, like.dtype, like.device)

    def _features(self, x, cos_sin):
        q, k, v = project_qkv(self.mod.base, x, cos_sin)
        fm = self.mod.feature_map
        return q, k, v, fm(q), fm(k), torch.sigmoid(self.mod.gate_logit), _scale(self.mod.base)

    def prefill(self, x, rows: slice, cos_sin):
        q, k, v, fq, fk, gate, scale = self._features(x, cos_sin)
        out, st = lswa_ops.lswa(q, k, v, fq, fk, gate, window=self.mod.window, sinks=self.mod.sinks,
                                scale=scale, backend=self.mod.backend, return_state=True)
        for name, buf in vars(self.st).items():
            buf[rows].copy_(getattr(st, name))
        return self.mod.base.o_proj(out.to(x.dtype).flatten(2))

    def decode(self, x, pos, cos_sin):
        q, k, v, fq, fk, gate, scale = self._features(x, cos_sin)
        out = lswa_ops.lswa_decode(q[:, 0], k[:, 0], v[:, 0], fq[:, 0], fk[:, 0], gate, self.st, scale,
                                   backend=self.mod.backend)
        return self.mod.base.o_proj(out.to(x.dtype).reshape(x.shape[0], 1, -1))

    def state(self) -> list[torch.Tensor]:
        return list(vars(self.st).values())

    def nbytes(self) -> int:
        return self.st.nbytes()


class NoneRunner:
    """No attention, no cache."""

    attends = False

    def __init__(self, layer, batch: int, max_len: int, like: torch.Tensor):
        pass

    def state(self) -> list[torch.Tensor]:
        return []

    def nbytes(self) -> int:
        return 0


RUNNERS = {"softmax": SoftmaxRunner, "lswa": LSWARunner, "none": NoneRunner}


def _block(layer, runner, hidden, mode: str, *args):
    """One decoder layer: [input norm + attention] (skipped for none) + post norm + MLP."""
    if runner.attends:
        hidden = hidden + getattr(runner, mode)(layer.input_layernorm(hidden), *args)
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


class DecodeEngine:
    """Greedy batched generation with static caches; see the module docstring.

    ``max_len`` bounds prompt + generated tokens. ``prefill_rows`` sequences are prefilled at a time.
    ``graph``: capture the decode step as a CUDA graph (default: on CUDA).
    """

    def __init__(self, model, batch: int, max_len: int, *, prefill_rows: int = 32, graph: bool | None = None):
        self.model = model
        self.layers = decoder_layers(model)
        self.kinds = [layer_kind(layer) for layer in self.layers]
        like = model.lm_head.weight
        self.device, self.batch, self.max_len = like.device, batch, max_len
        self.prefill_rows = prefill_rows
        self.runners = [RUNNERS[kind](layer, batch, max_len, like) for kind, layer in zip(self.kinds, self.layers)]
        positions = torch.arange(max_len, device=self.device)[None]
        cos, sin = model.model.rotary_emb(like.new_empty(1, max_len, 1), positions)
        self.cos, self.sin = cos[0], sin[0]  # [max_len, D], the model's own RoPE (scaling included)
        self.tokens = torch.zeros(batch, dtype=torch.long, device=self.device)  # token to feed next
        self.pos = torch.zeros(batch, dtype=torch.long, device=self.device)  # its position
        self.seq = torch.zeros(batch, max_len + 1, dtype=torch.long, device=self.device)
        self.prompt_len = 0
        self.graph = None
        if graph if graph is not None else self.device.type == "cuda":
            self._capture()

    # -- the step --------------------------------------------------------------------------
    def _head(self, hidden) -> torch.Tensor:
        return self.model.lm_head(self.model.model.norm(hidden)).argmax(-1)

    @torch.no_grad()
    def _step(self) -> None:
        hidden = self.model.model.embed_tokens(self.tokens[:, None])
        cos_sin = (self.cos[self.pos][:, None], self.sin[self.pos][:, None])
        for layer, runner in zip(self.layers, self.runners):
            hidden = _block(layer, runner, hidden, "decode", self.pos, cos_sin)
        nxt = self._head(hidden[:, -1])
        self.seq.scatter_(1, (self.pos + 1)[:, None], nxt[:, None])
        self.tokens.copy_(nxt)
        self.pos.add_(1)

    def _capture(self, warmup: int = 2) -> None:
        """Warm up (compiles kernels) on a side stream, then capture one step. Buffers are reset by prefill."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                self._step()
        torch.cuda.current_stream().wait_stream(stream)
        self.pos.zero_()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._step()
        self.pos.zero_()

    # -- public ----------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor) -> None:
        """Fill every cache from prompts [batch, T] and pick the first generated token."""
        b, t = input_ids.shape
        if b != self.batch or t >= self.max_len:
            raise ValueError(f"prompts {tuple(input_ids.shape)} do not fit batch {self.batch}, max_len {self.max_len}")
        input_ids = input_ids.to(self.device)
        cos_sin = (self.cos[None, :t], self.sin[None, :t])
        for r0 in range(0, b, self.prefill_rows):
            rows = slice(r0, min(b, r0 + self.prefill_rows))
            hidden = self.model.model.embed_tokens(input_ids[rows])
            for layer, runner in zip(self.layers, self.runners):
                hidden = _block(layer, runner, hidden, "prefill", rows, cos_sin)
            self.tokens[rows] = self._head(hidden[:, -1])
        self.seq[:, :t] = input_ids
        self.seq[:, t] = self.tokens
        self.pos.fill_(t)
        self.prompt_len = t

    @torch.no_grad()
    def decode(self, steps: int) -> None:
        """``steps`` greedy steps (each consumes one token and produces the next)."""
        if self.prompt_len + steps >= self.max_len + 1:
            raise ValueError(f"{steps} steps after {self.prompt_len} tokens exceed max_len {self.max_len}")
        for _ in range(steps):
            self.graph.replay() if self.graph is not None else self._step()

    def generate(self, input_ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
        """Prompts followed by ``new_tokens`` greedy tokens, [batch, T + new_tokens]."""
        self.prefill(input_ids)
        self.decode(new_tokens - 1)
        return self.seq[:, : input_ids.shape[1] + new_tokens].clone()

    def snapshot(self) -> list[torch.Tensor]:
        """Copies of everything decoding changes besides rewritten KV rows (to repeat a decode)."""
        tensors = [self.tokens, self.pos] + [t for r in self.runners for t in r.state()]
        return [t.clone() for t in tensors]

    def restore(self, snap: list[torch.Tensor]) -> None:
        tensors = [self.tokens, self.pos] + [t for r in self.runners for t in r.state()]
        for dst, src in zip(tensors, snap):
            dst.copy_(src)

    def cache_bytes(self) -> dict[str, int]:
        """Allocated cache bytes by kind (all sequences)."""
        out = {kind: 0 for kind in RUNNERS}
        for kind, runner in zip(self.kinds, self.runners):
            out[kind] += runner.nbytes()
        return out
