"""The kinds of training-text source (``data.sources``), one record each in :data:`SOURCE_KINDS`.

A source string names its kind: a registered name (``teacher-prompts``, ``teacher-unconditional``,
``package-docs``), a local file or folder, else a hub dataset. Each kind says which options it takes
(and their defaults), checks a source cheaply before anything heavy, names what shapes its documents (cache and corpus
keys) and draws about ``n`` tokens of documents, each with the group the split keeps together.
Nothing else branches on a kind's name.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import LBSearchError
from .files import LOCAL_BUILDERS, check_hub, check_local, file_corpus, hub_corpus, local_files, looks_local
from .prompts import PROMPT_SETS, prompt_set, prompt_set_key
from .realtext import check_training_source, eval_ngrams, installed_distributions, package_docs, without_eval_text
from .splits import bucket
from .teacher import SAMPLING, UNCONDITIONAL, Documents, Request, cached_samples, chat_prompts, start_token

@dataclass(frozen=True)
class Source:
    """One resolved source of a mixture: its string, kind, weight, options (defaults filled in) and the
    key its errors name (``data.sources[2]``)."""

    source: str
    kind: "SourceKind"
    weight: float
    options: dict = field(default_factory=dict)
    key: str = "data"  # what errors name: data (data.source, data.text_field) or data.sources[i]

    def identity(self) -> tuple:
        """Everything of this source that shapes its documents (for cache and corpus keys)."""
        return (self.kind.name, self.kind.identity(self), sorted(self.options.items()))


@dataclass(frozen=True)
class DrawContext:
    """What drawing needs besides the source: the teacher, its tokenizer, the seed, and which groups may
    be drawn (``keep``; the healing corpus keeps the train split's groups only)."""

    model: Any
    tokenizer: Any
    model_key: str = "model"
    batch_size: int = 16
    seed: int = 0
    keep: Callable[[str], bool] | None = None
    progress: bool = True
    eval_sources: tuple[str, ...] = ()  # real text drawn for training drops paragraphs quoting these
    text_field: str = "text"  # of local evaluation files


@dataclass(frozen=True)
class SourceKind:
    name: str
    summary: str  # what it is, for "allowed" messages
    defaults: dict  # the options it takes, with their defaults (None: required or taken from data.text_field)
    matches: Callable[[str], bool]
    check: Callable[[Source, tuple], None]  # cheap checks before heavy work: (source, eval_sources)
    identity: Callable[[Source], tuple]  # what of the source itself shapes its documents
    draw: Callable[[Source, DrawContext, int], Documents]
    generated: bool = False  # sampled from the teacher (needs it loaded)
    aliases: tuple[str, ...] = ()
    named: bool = False  # the source string is the kind's name (else a path or a hub id)


# -- teacher samples -----------------------------------------------------------------------------------
def _check_prompts(src: Source, eval_sources: tuple) -> None:
    if src.options["prompts"] not in PROMPT_SETS:
        raise LBSearchError(f"{src.key}.prompts: {src.options['prompts']!r}: unknown prompt set; "
                            f"allowed: {', '.join(PROMPT_SETS)}")


def answers_request(src: Source, ctx: DrawContext) -> Request:
    """The teacher's answers to a prompt set, its prompts in a seeded order (any prefix spreads over
    topics, tasks and lengths), each prompt its own group; only the groups ``ctx`` keeps."""
    name, o = src.options["prompts"], src.options
    groups = [f"prompt:{name}:{i}" for i in range(len(prompt_set(name)))]
    chosen = [i for i, g in enumerate(groups) if ctx.keep is None or ctx.keep(g)]
    # an order hash of its own: sorting by the split's hash would put the first prompts all in held-out
    chosen.sort(key=lambda i: bucket(f"order:{groups[i]}", ctx.seed))
    if not chosen:
        raise LBSearchError(f"{src.key}: no prompt of set {name!r} falls in the train split")
    texts = [prompt_set(name)[i].text for i in chosen]
    return Request(f"teacher answers to {len(chosen):,} prompts ({name})", tuple(chat_prompts(ctx.tokenizer, texts)),
                   tuple(groups[i] for i in chosen), o["temperature"], o["top_p"], o["max_new_tokens"],
                   extra_key=(prompt_set_key(name),))


def _draw_answers(src: Source, ctx: DrawContext, n_tokens: int) -> Documents:
    return _as_documents(cached_samples(ctx.model, ctx.tokenizer, answers_request(src, ctx), n_tokens, ctx.seed,
                                        ctx.batch_size, ctx.model_key, ctx.progress))


def _draw_unconditional(src: Source, ctx: DrawContext, n_tokens: int) -> Documents:
    """Samples from the start token alone (no chat template): the teacher's own text distribution.
    Every sample is its own group (no prompt is shared, so no filter applies)."""
    o = src.options
    try:
        token = start_token(ctx.model, ctx.tokenizer, o["start"])
    except LBSearchError as exc:
        raise LBSearchError(f"{src.key}.{exc}") from None
    request = Request(f"unconditional teacher samples from token {token}", ((token,),), ("unconditional",),
                      o["temperature"], o["top_p"], o["max_new_tokens"], fresh_groups=True)
    return _as_documents(cached_samples(ctx.model, ctx.tokenizer, request, n_tokens, ctx.seed, ctx.batch_size,
                                        ctx.model_key, ctx.progress))


def _as_documents(ds) -> Documents:
    return Documents(list(ds["text"]), list(ds["group"]), list(ds["tokens"]))


def _no_check(src: Source, eval_sources: tuple) -> None:
    return None


# -- existing text -----------------------------------------------------------------------------------------
def _check_files(src: Source, eval_sources: tuple) -> None:
    if not Path(src.source).expanduser().exists():
        raise LBSearchError(f"{src.key}.source: {src.source!r}: no such file or folder; allowed: {allowed_sources()}")
    check_training_source(src.source, f"{src.key}.source", eval_sources)
    check_local(src.source, src.options["text_field"], f"{src.key}.source")


def _files_identity(src: Source) -> tuple:
    """The files themselves: path, size and modification time of each (an edited file is drawn again)."""
    files = local_files(src.source, f"{src.key}.source")
    return tuple((str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files)


def _draw_files(src: Source, ctx: DrawContext, n_tokens: int) -> Documents:
    ds = file_corpus(src.source, src.options["text_field"], key=f"{src.key}.source")
    return draw_texts(ds, f"file:{Path(src.source).expanduser().resolve()}", n_tokens, ctx)


def _check_package_docs(src: Source, eval_sources: tuple) -> None:
    if not installed_distributions():
        raise LBSearchError(f"{src.key}.source: package-docs: no installed Python distribution has a long "
                            f"description here; allowed: {allowed_sources()}")


def _package_docs_identity(src: Source) -> tuple:
    """Which distributions, at which versions (an upgrade draws again)."""
    return tuple((d.metadata["Name"].lower(), d.version) for d in installed_distributions())


def _draw_package_docs(src: Source, ctx: DrawContext, n_tokens: int) -> Documents:
    from datasets import Dataset

    return draw_texts(Dataset.from_dict({"text": package_docs()}), "package-docs", n_tokens, ctx)


def _check_hub(src: Source, eval_sources: tuple) -> None:
    check_hub(src.source, src.options["subset"], src.options["text_field"], f"{src.key}.source")


def _draw_hub(src: Source, ctx: DrawContext, n_tokens: int) -> Documents:
    o = src.options
    ds = hub_corpus(src.source, o["subset"], o["split"], o["text_field"], key=f"{src.key}.source")
    return draw_texts(ds, f"hub:{src.source}/{o['subset']}/{o['split']}", n_tokens, ctx)


def draw_texts(ds, prefix: str, n_tokens: int, ctx: DrawContext, chunk: int = 256) -> Documents:
    """About ``n_tokens`` of a text Dataset's documents in a seeded order (a prefix samples the whole
    source), each document its own group ``<prefix>:<index>``; tokens counted with the EOS that joins them.
    Paragraphs that quote the evaluation sources (``ctx.eval_sources``) are dropped first."""
    import numpy as np

    grams = eval_ngrams(tuple(ctx.eval_sources), ctx.text_field) if ctx.eval_sources else frozenset()
    groups = [f"{prefix}:{i}" for i in range(len(ds))]
    allowed = np.array([i for i, g in enumerate(groups) if ctx.keep is None or ctx.keep(g)], dtype=np.int64)
    order = allowed[np.random.default_rng(ctx.seed).permutation(len(allowed))]
    texts, chosen, counts, total = [], [], [], 0
    for start in range(0, len(order), chunk):
        if total >= n_tokens:
            break
        idx = order[start: start + chunk].tolist()
        kept = [(i, t) for i, t in zip(idx, (without_eval_text(t, grams) for t in ds.select(idx)["text"])) if t]
        if not kept:
            continue
        idx, batch = (list(x) for x in zip(*kept))
        for i, text, ids in zip(idx, batch, ctx.tokenizer(batch, add_special_tokens=False)["input_ids"]):
            if total >= n_tokens:
                break
            texts.append(text)
            chosen.append(groups[i])
            counts.append(len(ids) + 1)
            total += len(ids) + 1
    return Documents(texts, chosen, counts)


SOURCE_KINDS: dict[str, SourceKind] = {k.name: k for k in (
    SourceKind("teacher-prompts", "the teacher's answers to a prompt set",
               {"prompts": "broad", **SAMPLING, "max_new_tokens": 256},
               lambda s: s in ("teacher-prompts", "teacher"), _check_prompts, lambda s: (),
               _draw_answers, generated=True, aliases=("teacher",), named=True),
    SourceKind("teacher-unconditional", "the teacher's samples from its start token",
               {"start": "bos", **UNCONDITIONAL, "max_new_tokens": 256},
               lambda s: s == "teacher-unconditional", _no_check, lambda s: (),
               _draw_unconditional, generated=True, named=True),
    SourceKind("package-docs", "the long descriptions (READMEs) of the Python distributions installed here",
               {}, lambda s: s == "package-docs", _check_package_docs, _package_docs_identity,
               _draw_package_docs, named=True),
    SourceKind("file", f"a local file or folder ({', '.join(LOCAL_BUILDERS)})", {"text_field": None},
               looks_local, _check_files, _files_identity, _draw_files),
    SourceKind("hub", "a hub dataset name (through datasets)", {"text_field": None, "subset": None, "split": "train"},
               lambda s: True, _check_hub, lambda s: (), _draw_hub),
)}


def source_kind(source: str) -> SourceKind:
    """The kind a source string names: the first kind in :data:`SOURCE_KINDS` that matches it."""
    return next(k for k in SOURCE_KINDS.values() if k.matches(source))


def allowed_sources() -> str:
    named = [n for k in SOURCE_KINDS.values() if k.named for n in (k.name, *k.aliases)]
    rest = [k.summary for k in SOURCE_KINDS.values() if not k.named]
    return ", ".join(named + rest)


def option_error(source: str, given: dict) -> str | None:
    """Why ``given`` options (those set, not None) do not fit the kind ``source`` names; None when they do."""
    kind = source_kind(source)
    extra = [k for k, v in given.items() if v is not None and k not in kind.defaults]
    if extra:
        takes = ", ".join(("weight", *kind.defaults))
        return f"{extra[0]!r} does not apply to a {kind.name} source ({kind.summary}); it takes: {takes}"
    if given.get("prompts") is not None and given["prompts"] not in PROMPT_SETS:
        return f"prompts: {given['prompts']!r}: unknown prompt set; allowed: {', '.join(PROMPT_SETS)}"
    return None


def resolve(config, key: str, text_field: str = "text") -> Source:
    """A SourceConfig (or anything with its attributes) as a :class:`Source`: kind found, defaults filled."""
    kind = source_kind(config.source)
    options = {}
    for name, default in kind.defaults.items():
        value = getattr(config, name, None)
        options[name] = value if value is not None else (text_field if name == "text_field" else default)
    return Source(config.source, kind, float(config.weight), options, key)
