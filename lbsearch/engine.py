"""Static-cache decode engine: a model with a plan applied, served with our own attention and caches.

The engine runs the model's own weights (embedding, q/k/v/o projections, norms, MLP, lm_head)
and the modules :func:`lbsearch.apply_plan` installs (so trained parameters are honoured). Each
layer's kind supplies its runner (:mod:`lbsearch.attention`), which preallocates its cache:
softmax a full KV cache read by the split-KV decode-attention kernel, lswa its constant-size
state (sinks, ring buffer, linear state), none nothing (the layer skips its norm and attention).

Prefill is batched (in micro-batches of rows to bound activation memory); decoding is greedy.
On CUDA one decode step is captured as a CUDA graph and replayed; on CPU it is a plain loop.
Sequences of one batch share the prompt length (no padding), which is what a benchmark needs.
"""
from __future__ import annotations

import torch

from .attention import KINDS, kind_of_module
from .models import decoder_layers


def _block(layer, runner, hidden, mode: str, *args):
    """One decoder layer: [input norm + attention] (skipped by kinds that do not attend) + post norm + MLP."""
    if runner is not None:
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
        self.kinds = [kind_of_module(layer.self_attn) for layer in self.layers]
        like = model.lm_head.weight
        self.device, self.batch, self.max_len = like.device, batch, max_len
        self.prefill_rows = prefill_rows
        self.runners = [kind.runner(layer, batch, max_len, like) for kind, layer in zip(self.kinds, self.layers)]
        self._attending = [r if k.attends else None for k, r in zip(self.kinds, self.runners)]
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
        for layer, runner in zip(self.layers, self._attending):
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
            for layer, runner in zip(self.layers, self._attending):
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
        out = {kind: 0 for kind in KINDS}
        for kind, runner in zip(self.kinds, self.runners):
            out[kind.name] += runner.nbytes()
        return out
