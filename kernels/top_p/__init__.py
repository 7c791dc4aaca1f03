"""Top-p sampling for rows whose nucleus is wider than the sampler's top-k candidates.

Given probabilities [N, V], the log-uniforms ``log U`` [N, V] of the race ``argmax(log U / p)`` and
``fits`` [N] (the row's nucleus lies in its candidates; those rows are done elsewhere), write into
``tokens`` [N] the race winner among each other row's nucleus: the most likely tokens until the
integer mass (``int(p * MASS_SCALE)``, summed exactly) ranked above the next reaches ``bound``,
plus every token exactly as likely as the last kept one.

Implementations: ``naive`` (PyTorch, full sort; the reference) and ``wide_rows`` (Triton: one
program per row, rows that fit return at once; the nucleus's last probability by bisection over
the float bits, then the race over the whole vocabulary; no host synchronisation, so it runs
inside a CUDA graph). ``top_p_wide_rows`` dispatches (Triton on CUDA when it imports).
"""
from .naive import KEY_FLOOR, MASS_SCALE, top_p_wide_rows_naive
from .ops import resolve_backend, top_p_wide_rows

__all__ = ["KEY_FLOOR", "MASS_SCALE", "resolve_backend", "top_p_wide_rows", "top_p_wide_rows_naive"]
