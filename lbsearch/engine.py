"""Static-cache decode engine: a model with a plan applied, served with our own attention and caches.

The engine runs the model's own weights (embedding, q/k/v/o projections, norms, MLP, lm_head)
and the modules :func:`lbsearch.apply_plan` installs (so trained parameters are honoured). Each
layer's kind supplies its runner (:mod:`lbsearch.attention`), which preallocates its cache:
softmax a full KV cache read by the split-KV decode-attention kernel, lswa its constant-size
state (sinks, ring buffer, linear state), none nothing (the layer skips its norm and attention).

Prompts may differ in length. Prefill runs in micro-batches of rows, each left-padded to its
longest prompt, and every row lives in its own real-token space: its first real token is
position 0 (as ``generate()`` numbers positions under left padding), the softmax runner masks
the pads and caches only real keys, the LSWA kernels skip them (no pad is a sink or enters the
state). So a row decodes exactly as it would alone, and any rows of a running batch can be
prefilled anew while the others keep their caches (slot refill in the request benchmark).

Next tokens are greedy or sampled (:mod:`lbsearch.sampling`, seeded generator on the engine's
device), with a per-row stop at EOS: a finished row emits the pad token from then on. On CUDA
one decode step, sampling and EOS bookkeeping included, is captured as a CUDA graph per decoding
setting and replayed; on CPU it is a plain loop.

The decode step is fused by default (:mod:`lbsearch.fused`: q/k/v and gate/up as one GEMM each,
residual add + RMSNorm, RoPE + cache write and the LSWA feature map as one kernel each);
``fused=False`` is the eager step (the model's modules and each runner's ``decode``), kept to
measure against. ``compile=True`` also runs the fused step through ``torch.compile`` (the Triton
kernels as custom ops, :mod:`lbsearch.fused_ops`), compiled once when the engine is built (tens of
seconds; off by default, since corpus generation builds an engine per call) and falling back to
the uncompiled fused step, with a warning, where compiling fails.
"""
from __future__ import annotations

import warnings

import torch

from .attention import KINDS, kind_of_module
from .models import decoder_layers
from .sampling import GREEDY, Sampling, pick

MAX_EOS = 8  # EOS ids a decoding setting may stop at
CHECK_EVERY = 16  # generate(): steps between looks at whether every row has stopped (a host sync)


def _block(layer, runner, hidden, mode: str, *args):
    """One decoder layer: [input norm + attention] (skipped by kinds that do not attend) + post norm + MLP."""
    if runner is not None:
        hidden = hidden + getattr(runner, mode)(layer.input_layernorm(hidden), *args)
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


def _left_pad(prompts: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token lists as one left-padded [n, T] tensor and the pads per row (None when none are needed)."""
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], dtype=torch.long, device=device)
    if all(len(p) == width for p in prompts):
        return ids, None
    return ids, torch.tensor([width - len(p) for p in prompts], dtype=torch.long, device=device)


def _eos_list(eos_token_id) -> list[int]:
    ids = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if len(ids) > MAX_EOS:
        raise ValueError(f"at most {MAX_EOS} EOS ids, got {len(ids)}")
    return [int(i) for i in ids]


def _until(tokens: list[int], stops: set[int]) -> list[int]:
    """``tokens`` up to and including the first stop token."""
    for i, t in enumerate(tokens):
        if t in stops:
            return tokens[: i + 1]
    return tokens


class DecodeEngine:
    """Batched generation with static caches; see the module docstring.

    ``max_len`` bounds every row's prompt + generated tokens. ``prefill_rows`` rows are
    prefilled at a time. ``graph``: capture the decode step as a CUDA graph (default: on CUDA).
    ``fused``: the fused decode step (default) or the eager one; ``compile``: compile the fused step.
    ``fmap_in_decode``: the LSWA feature map inside the decode kernel, or as its own op before it
    (default: its own op unless ``LBSEARCH_FUSED_LSWA_FMAP=1``).
    """

    def __init__(self, model, batch: int, max_len: int, *, prefill_rows: int = 32, graph: bool | None = None,
                 fused: bool = True, compile: bool = False, fmap_in_decode: bool | None = None):
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
        dev = dict(dtype=torch.long, device=self.device)
        self.tokens = torch.zeros(batch, **dev)  # token to feed next
        self.pos = torch.zeros(batch, **dev)  # its position (real tokens before it)
        self.seq = torch.zeros(batch, max_len + 1, **dev)  # each row's real tokens, prompt then output
        self.done = torch.zeros(batch, dtype=torch.bool, device=self.device)  # row stopped at EOS
        self.eos = torch.full((MAX_EOS,), -1, **dev)
        self.pad = torch.zeros((), **dev)
        self.generator = torch.Generator(device=self.device)
        self.host_pos = torch.zeros(batch, dtype=torch.long)  # host copy of pos (bounds checks, no sync)
        self.lengths = torch.zeros(batch, dtype=torch.long)  # prompt tokens of each row: its output starts there
        self.sampling, self.stop = GREEDY, False
        self.use_graph = graph if graph is not None else self.device.type == "cuda"
        self._graphs: dict[tuple[Sampling, bool], torch.cuda.CUDAGraph] = {}
        self.fused, self.compiled = fused or compile, False
        self._body = self._build_body(compile, fmap_in_decode) if self.fused else None
        if self.use_graph:
            self._capture()
        elif compile:
            self._warm_up()

    @property
    def prompt_len(self) -> int:
        """The longest row so far (prefilled + decoded tokens); setting it sets every row's host position."""
        return int(self.host_pos.max())

    @prompt_len.setter
    def prompt_len(self, value: int) -> None:
        self.host_pos.fill_(value)

    # -- the step --------------------------------------------------------------------------
    def _build_body(self, compile: bool, fmap_in_decode: bool | None):
        """The fused step's body (tokens, pos) -> logits, compiled when asked and possible."""
        from .fused import FusedDecoder, eager_ops

        self.decoder = FusedDecoder(self.model, self.layers, self._attending, self.cos, self.sin,
                                    eager_ops(fmap_in_decode))
        if not compile:
            return self.decoder
        try:
            from .fused_ops import compile_ops

            compiled = FusedDecoder(self.model, self.layers, self._attending, self.cos, self.sin,
                                    compile_ops(fmap_in_decode))
            return _Compiled(compiled, self.decoder, self)
        except Exception as exc:  # noqa: BLE001 - no compiler / custom ops here: the fused step as it is
            warnings.warn(f"lbsearch: compiling the decode step is unavailable ({exc!r}); running it uncompiled")
            return self.decoder

    def _warm_up(self) -> None:
        """One step to compile (CPU, no graph); prefill resets what it fills, as after a capture."""
        self._step()
        self.pos.zero_()
        self.done.zero_()

    def _pick(self, hidden) -> torch.Tensor:
        return pick(self.model.lm_head(self.model.model.norm(hidden)), self.sampling, self.generator)

    def _logits(self) -> torch.Tensor:
        """Logits [B, V] of the step's tokens (caches and states updated)."""
        if self._body is not None:
            return self._body(self.tokens, self.pos)
        hidden = self.model.model.embed_tokens(self.tokens[:, None])
        cos_sin = (self.cos[self.pos][:, None], self.sin[self.pos][:, None])
        for layer, runner in zip(self.layers, self._attending):
            hidden = _block(layer, runner, hidden, "decode", self.pos, cos_sin)
        return self.model.lm_head(self.model.model.norm(hidden[:, -1]))

    @torch.no_grad()
    def _step(self) -> None:
        nxt = pick(self._logits(), self.sampling, self.generator)
        if self.stop:  # HF's rule: a row that stopped before this token emits pad
            nxt = torch.where(self.done, self.pad, nxt)
            self.done |= (nxt[:, None] == self.eos).any(-1)
        self.seq.scatter_(1, (self.pos + 1)[:, None], nxt[:, None])
        self.tokens.copy_(nxt)
        self.pos.add_(1)

    def _capture(self, warmup: int = 2) -> None:
        """Warm up (compiles kernels) on a side stream, then capture one step for the current setting.
        The warm-up steps write caches and states: prefill resets what it fills."""
        graph = torch.cuda.CUDAGraph()
        if not self.sampling.greedy:
            graph.register_generator_state(self.generator)  # replays draw from (and advance) it
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                self._step()
        torch.cuda.current_stream().wait_stream(stream)
        self.pos.zero_()
        with torch.cuda.graph(graph):
            self._step()
        self.pos.zero_()
        self.done.zero_()
        self._graphs[(self.sampling, self.stop)] = graph

    # -- public ----------------------------------------------------------------------------
    def configure(self, sampling: Sampling = GREEDY, eos_token_id=None, pad_token_id: int = 0,
                  seed: int = 0) -> None:
        """Decoding setting of the next prefill and decode steps: ``sampling``, the EOS ids a row
        stops at (int, list or None), the token a stopped row emits, the generator's seed.

        Call it before prefill: on CUDA a new setting first captures its step, whose warm-up
        steps overwrite caches and states.
        """
        eos = _eos_list(eos_token_id)
        self.eos.fill_(-1)
        if eos:
            self.eos[: len(eos)] = torch.tensor(eos, device=self.device)
        self.pad.fill_(pad_token_id)
        self.sampling, self.stop = sampling, bool(eos)
        if self.use_graph and (sampling, self.stop) not in self._graphs:
            self._capture()
        self.generator.manual_seed(seed)

    @torch.no_grad()
    def prefill(self, prompts, rows=None) -> None:
        """Fill the caches of ``rows`` (default: every row) from ``prompts`` and pick each row's first
        new token; other rows keep theirs. ``prompts``: a [n, T] tensor or n token lists of any lengths."""
        lengths = [prompts.shape[1]] * len(prompts) if torch.is_tensor(prompts) else [len(p) for p in prompts]
        rows = list(range(self.batch)) if rows is None else [int(r) for r in rows]
        if len(rows) != len(lengths) or len(set(rows)) != len(rows) or not all(0 <= r < self.batch for r in rows):
            raise ValueError(f"{len(lengths)} prompts for rows {rows} of a batch of {self.batch}")
        if not lengths or min(lengths) < 1 or max(lengths) >= self.max_len:
            raise ValueError(f"prompt lengths {min(lengths, default=0)}..{max(lengths, default=0)} "
                             f"do not fit max_len {self.max_len}")
        for r0 in range(0, len(rows), self.prefill_rows):
            part = slice(r0, r0 + self.prefill_rows)
            if torch.is_tensor(prompts):
                ids, start = prompts[part].to(self.device), None
            else:
                ids, start = _left_pad([list(map(int, p)) for p in prompts[part]], self.device)
            self._prefill(ids, start, torch.tensor(rows[part], device=self.device))
        self.lengths[rows] = torch.tensor(lengths)
        self.host_pos[rows] = torch.tensor(lengths)

    def _prefill(self, ids: torch.Tensor, start: torch.Tensor | None, rows: torch.Tensor) -> None:
        """Prefill of one micro-batch: left-padded ids [n, T], pads per row ``start``, engine ``rows``."""
        n, t = ids.shape
        span = torch.arange(t, device=self.device)
        if start is None:
            cos_sin = (self.cos[None, :t], self.sin[None, :t])
            real, lengths = ids, torch.full((n,), t, device=self.device)
        else:
            positions = (span[None] - start[:, None]).clamp_min(0)  # each row counts from its first real token
            cos_sin = (self.cos[positions], self.sin[positions])
            real = ids.gather(1, (span[None] + start[:, None]).clamp_max(t - 1))  # shifted to real-token space
            lengths = t - start
        hidden = self.model.model.embed_tokens(ids)
        for layer, runner in zip(self.layers, self._attending):
            hidden = _block(layer, runner, hidden, "prefill", rows, cos_sin, start)
        first = self._pick(hidden[:, -1])
        self.done[rows] = (first[:, None] == self.eos).any(-1) if self.stop else False
        self.tokens[rows] = first
        self.pos[rows] = lengths
        self.seq[rows, :t] = real
        self.seq[rows, lengths] = first

    def park(self, rows) -> None:
        """Rows without a sequence: they still run in every step (the batch is static), at position 0."""
        rows = list(rows)
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        self.pos[index] = 0
        self.tokens[index] = 0
        self.done[index] = True
        self.host_pos[rows] = 0
        self.lengths[rows] = 0

    @torch.no_grad()
    def decode(self, steps: int) -> None:
        """``steps`` steps (each consumes one token per row and produces the next)."""
        if self.prompt_len + steps > self.max_len:
            raise ValueError(f"{steps} steps after {self.prompt_len} tokens exceed max_len {self.max_len}")
        graph = self._graphs.get((self.sampling, self.stop)) if self.use_graph else None
        if self.use_graph and graph is None:
            raise RuntimeError("decoding setting changed without configure()")
        for _ in range(steps):
            graph.replay() if graph is not None else self._step()
        self.host_pos += steps

    def new_tokens(self, row: int, count: int) -> list[int]:
        """The first ``count`` tokens row ``row`` generated after its prompt."""
        start = int(self.lengths[row])
        return self.seq[row, start: start + count].tolist()

    def generate(self, prompts, max_new_tokens: int, *, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, seed: int = 0, eos_token_id=None, pad_token_id: int = 0):
        """Up to ``max_new_tokens`` new tokens for each prompt (at most ``batch`` prompts).

        ``prompts``: token lists of any lengths -> the new tokens of each, ending at its first EOS;
        or a [n, T] tensor -> [n, T + max_new_tokens] on the engine's device, prompts followed by
        their new tokens and pad after EOS (HF ``generate()``'s layout). ``temperature`` 0 is
        greedy; the sampling is deterministic for a ``seed``.
        """
        n = len(prompts)
        if not 1 <= n <= self.batch or max_new_tokens < 1:
            raise ValueError(f"{n} prompts for a batch of {self.batch}, max_new_tokens {max_new_tokens}")
        self.configure(Sampling(temperature, top_k, top_p), eos_token_id, pad_token_id, seed)
        self.prefill(prompts, range(n))
        self.park(range(n, self.batch))
        steps, done = max_new_tokens - 1, 0
        while done < steps and not (self.stop and bool(self.done[:n].all())):
            chunk = min(CHECK_EVERY, steps - done)
            self.decode(chunk)
            done += chunk
        stops = set(_eos_list(eos_token_id))
        rows = self.seq[:n].tolist()
        new = [_until(rows[b][int(self.lengths[b]):][: done + 1], stops) for b in range(n)]
        if not torch.is_tensor(prompts):
            return new
        padded = [r + [pad_token_id] * (max_new_tokens - len(r)) for r in new]
        return torch.cat([prompts.to(self.device), torch.tensor(padded, device=self.device)], 1)

    def snapshot(self) -> list[torch.Tensor]:
        """Copies of everything decoding changes besides rewritten KV rows (to repeat a decode)."""
        return [t.clone() for t in self._mutable()]

    def restore(self, snap: list[torch.Tensor]) -> None:
        for dst, src in zip(self._mutable(), snap):
            dst.copy_(src)

    def _mutable(self) -> list[torch.Tensor]:
        return [self.tokens, self.pos, self.done, self.host_pos, self.lengths] + [t for r in self.runners
                                                                                   for t in r.state()]

    def cache_bytes(self) -> dict[str, int]:
        """Allocated cache bytes by kind (all sequences)."""
        out = {kind: 0 for kind in KINDS}
        for kind, runner in zip(self.kinds, self.runners):
            out[kind.name] += runner.nbytes()
        return out


class _Compiled:
    """``torch.compile`` of a fused decoder; the first call compiles (engine build), and a failure there
    falls back to the uncompiled decoder for good, with a warning."""

    def __init__(self, decoder, fallback, engine):
        import torch._dynamo

        cfg = torch._dynamo.config
        for name in ("recompile_limit", "cache_size_limit"):  # one cache entry per engine built in a process
            if hasattr(cfg, name):
                setattr(cfg, name, max(getattr(cfg, name), 256))
        if hasattr(cfg, "accumulated_recompile_limit"):
            cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 4096)
        self.decoder, self.fallback, self.engine = decoder, fallback, engine
        self.fn = torch.compile(decoder.__call__, dynamic=False)

    def __call__(self, tokens, pos):
        if self.fn is self.fallback:
            return self.fallback(tokens, pos)
        try:
            out = self.fn(tokens, pos)
        except Exception as exc:
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise
            warnings.warn(f"lbsearch: compiling the decode step failed ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}); running it uncompiled")
            self.fn = self.fallback
            return self.fallback(tokens, pos)
        self.engine.compiled = True
        return out
