"""A corpus as a weighted mixture of sources (``data.sources``): weights are shares of its tokens.

:func:`check_sources` runs every source's cheap checks (before the teacher loads);
:func:`build_corpus` draws each source's share, interleaves the documents in a seeded order (so
every prefix of a split mixes the sources) and says what each source gave (:class:`SourceDraw`,
the run's metadata); :func:`teacher_text` keeps a split's teacher-written documents. Sampled
sources are cached by :mod:`lbsearch.corpus.teacher`; the corpus as a whole is named by
:func:`corpus_key`.
"""
from __future__ import annotations

import sys
from dataclasses import asdict, dataclass

from ..errors import LBSearchError
from ..io import stable_hash
from .sources import SOURCE_KINDS, DrawContext, Source, resolve
from .splits import split_of
from .teacher import batch_rows, sampler_key

CORPUS_VERSION = "mixture-v2"  # v2: real text drops paragraphs that quote the evaluation sources
SHORTFALL = 0.9  # a source that gives less than this share of its tokens is reported


@dataclass(frozen=True)
class SourceDraw:
    """What one source gave a corpus (named in the run's metadata)."""

    index: int
    kind: str
    source: str
    weight: float
    share: float  # weight / sum of weights
    target_tokens: int
    tokens: int  # actually drawn
    documents: int
    options: dict

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Corpus:
    """A drawn corpus: the Dataset (``text``, ``group``, ``source``, ``tokens``), each source's draw, its key."""

    dataset: object
    sources: tuple[SourceDraw, ...]
    key: str
    tokens: int
    train_only: bool = False

    def describe(self) -> dict:
        return {"key": self.key, "tokens": self.tokens, "documents": len(self.dataset),
                "train_groups_only": self.train_only, "sources": [s.to_dict() for s in self.sources]}


def mixture(cfg) -> list[Source]:
    """The sources of a DataConfig, resolved (kind found, defaults filled in), with the keys errors name."""
    return [resolve(s, key, cfg.text_field) for s, key in zip(cfg.mixture, cfg.source_keys())]


def check_sources(cfg) -> list[Source]:
    """Every source's cheap checks (files exist and hold the field, not the standard library, not an
    evaluation source, hub names resolve): one line naming the key, before anything heavy."""
    sources = mixture(cfg)
    for src in sources:
        src.kind.check(src, tuple(cfg.eval_sources))
    return sources


def targets(sources: list[Source], n_tokens: int) -> list[int]:
    """Each source's share of ``n_tokens`` (weights normalised), at least one token each."""
    total = sum(s.weight for s in sources)
    return [max(1, round(n_tokens * s.weight / total)) for s in sources]


def corpus_key(cfg, model, model_key: str, batch_size: int, n_tokens: int | None = None, seed: int | None = None,
               train_only: bool = False, exclude_groups: frozenset = frozenset()) -> str:
    """Everything that shapes the corpus: sources (kind, string, options, file identities), their token
    shares, the sampler and its dtype, the batch rows, the model, the seed and the split filter."""
    sources = mixture(cfg)
    n = n_tokens or cfg.corpus_tokens
    parts = []
    for src, target in zip(sources, targets(sources, n)):
        gen = (sampler_key(model), batch_rows(batch_size, target, src.options["max_new_tokens"])) \
            if src.kind.generated else ()
        parts.append((src.identity(), src.source, target, gen))
    split = (cfg.seed, cfg.heldout_fraction, cfg.calibration_fraction, sorted(map(str, exclude_groups))) \
        if train_only else ()
    return stable_hash(CORPUS_VERSION, model_key, n, cfg.seed if seed is None else seed, split, parts,
                       sorted(cfg.eval_sources))


def build_corpus(cfg, model=None, tokenizer=None, *, model_key: str = "model", batch_size: int = 16,
                 n_tokens: int | None = None, seed: int | None = None, train_only: bool = False,
                 exclude_groups: frozenset = frozenset(), progress: bool = True) -> Corpus:
    """The mixture of ``cfg`` (a DataConfig) at ``n_tokens`` (default ``corpus_tokens``), drawn with
    ``seed`` (default ``cfg.seed``). ``train_only``: only groups that ``cfg``'s split puts in train and
    none of ``exclude_groups`` (the corpus's held-out and calibration groups, as split): the healing
    corpus, so that no held-out or calibration prompt or document feeds healing."""
    from datasets import Dataset

    sources = check_sources(cfg)
    if tokenizer is None or (model is None and any(s.kind.generated for s in sources)):
        names = ", ".join(s.source for s in sources if s.kind.generated) or "the data sources"
        raise LBSearchError(f"{names}: needs the teacher model and tokenizer")
    n = n_tokens or cfg.corpus_tokens
    seed = cfg.seed if seed is None else seed
    keep = (lambda g: g not in exclude_groups
            and split_of(g, cfg.seed, cfg.heldout_fraction, cfg.calibration_fraction) == "train") \
        if train_only else None
    ctx = DrawContext(model, tokenizer, model_key, batch_size, seed, keep, progress,
                      tuple(cfg.eval_sources), cfg.text_field)
    texts, groups, origin, counts, draws = [], [], [], [], []
    for index, (src, target) in enumerate(zip(sources, targets(sources, n))):
        docs = src.kind.draw(src, ctx, target)
        if not docs.texts:
            raise LBSearchError(f"{src.key}.source: {src.source!r}: no documents"
                                + (" in the train split" if train_only else ""))
        drawn = sum(docs.tokens)
        if len(sources) > 1 and drawn < SHORTFALL * target:
            print(f"lbsearch: {src.key}: {src.source} gave {drawn:,} of its {target:,} tokens "
                  f"(all it has{' in the train split' if train_only else ''}): the mixture leans on the others",
                  file=sys.stderr)
        texts += docs.texts
        groups += docs.groups
        counts += docs.tokens
        origin += [index] * len(docs.texts)
        draws.append(SourceDraw(index, src.kind.name, src.source, src.weight,
                                src.weight / sum(s.weight for s in sources), target, drawn, len(docs.texts),
                                dict(src.options)))
    order = _interleave(len(texts), seed)
    ds = Dataset.from_dict({"text": [texts[i] for i in order], "group": [groups[i] for i in order],
                            "source": [origin[i] for i in order], "tokens": [counts[i] for i in order]})
    key = corpus_key(cfg, model, model_key, batch_size, n, seed, train_only, exclude_groups)
    return Corpus(ds, tuple(draws), key, sum(counts), train_only)


def teacher_text(ds, corpus: Corpus):
    """The documents of ``ds`` (a split of ``corpus``) that the teacher wrote, when the mixture also has
    other text: held-out teacher text stays the teacher's whatever real text joins the mixture (real
    text has its own sets, ``data.eval_sources``). Else, or if none is left, all of ``ds``."""
    written = {d.index for d in corpus.sources if SOURCE_KINDS[d.kind].generated}
    if not written or len(written) == len(corpus.sources) or "source" not in ds.column_names:
        return ds
    keep = [i for i, s in enumerate(ds["source"]) if s in written]
    return ds.select(keep) if keep else ds


def _interleave(n: int, seed: int) -> list[int]:
    import numpy as np

    return np.random.default_rng([seed, 1]).permutation(n).tolist()
