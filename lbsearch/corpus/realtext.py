"""Held-out real text (``data.eval_sources``), the rules that keep it out of training corpora, and
real training text available offline on any machine (:func:`package_docs`)."""
from __future__ import annotations

import functools
import hashlib
import re
from pathlib import Path

from ..errors import LBSearchError
from .files import file_corpus


def python_docs(max_chars: int = 4_000_000) -> list[str]:
    """Docstrings over 200 characters of this Python's public standard-library modules (parsed with
    ``ast``, never imported), in a fixed pseudo-random order (by content hash) so any prefix samples
    the whole library: real technical English on every machine with Python, offline.

    Evaluation text only: it must never enter a training corpus (see :func:`check_training_source`).
    """
    import ast

    docs = []
    for path in sorted(stdlib_dir().glob("*.py")):
        if path.name.startswith("_"):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 200:
                    docs.append(doc)
    docs.sort(key=lambda d: hashlib.sha256(d.encode()).digest())
    out, total = [], 0
    for doc in docs:
        if total >= max_chars:
            break
        out.append(doc)
        total += len(doc)
    return out


def stdlib_dir() -> Path:
    import sysconfig

    return Path(sysconfig.get_paths()["stdlib"]).resolve()


# Named held-out real-text sources (data.eval_sources); anything else is a local file or folder.
EVAL_SOURCES = {"python-docs": python_docs}


def eval_texts(source: str, text_field: str = "text", max_chars: int = 4_000_000) -> list[str]:
    """Documents of a held-out evaluation source: a name in EVAL_SOURCES, or a local file/folder."""
    if source in EVAL_SOURCES:
        return EVAL_SOURCES[source](max_chars)
    if not Path(source).exists():
        raise LBSearchError(f"data.eval_sources: {source!r} is neither a local file/folder nor one of "
                            f"{', '.join(EVAL_SOURCES)}")
    return list(file_corpus(source, text_field, key="data.eval_sources")["text"])


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def check_training_source(source: str, key: str = "data.source", eval_sources: tuple[str, ...] = ()) -> None:
    """Refuse training text taken from the Python standard library (evaluation sets are drawn there)
    or from a local evaluation source: evaluation text never feeds training."""
    path = Path(source).expanduser()
    if not path.exists():
        return
    here = path.resolve()
    if _overlaps(here, stdlib_dir()):
        raise LBSearchError(f"{key}: {source!r}: the Python standard library is evaluation text "
                            "(python-docs) and may not be trained on")
    for other in eval_sources:
        if other not in EVAL_SOURCES and Path(other).expanduser().exists() \
                and _overlaps(here, Path(other).expanduser().resolve()):
            raise LBSearchError(f"{key}: {source!r}: overlaps the evaluation source {other!r} "
                                "(data.eval_sources); evaluation text may not be trained on")


# -- evaluation text never feeds training ---------------------------------------------------------
NGRAM = 12  # words: a run of 12 words shared with evaluation text is copied text, not common phrasing
_PARAGRAPH = re.compile(r"\n\s*\n")


def _word_ngrams(text: str, n: int = NGRAM) -> set[int]:
    words = text.lower().split()
    return {hash(" ".join(words[i:i + n])) for i in range(len(words) - n + 1)}


@functools.lru_cache(maxsize=4)
def eval_ngrams(eval_sources: tuple[str, ...], text_field: str = "text") -> frozenset[int]:
    """Every 12-word run of the evaluation sources' text (for :func:`without_eval_text`)."""
    grams: set[int] = set()
    for source in eval_sources:
        for doc in eval_texts(source, text_field):
            grams |= _word_ngrams(doc)
    return frozenset(grams)


def without_eval_text(text: str, grams: frozenset[int]) -> str:
    """``text`` less every paragraph that shares a 12-word run with evaluation text: a training
    document may quote an evaluation document (a backport's README quoting the standard library's
    docs, say), and that paragraph would be trained on what is then scored."""
    if not grams or _word_ngrams(text).isdisjoint(grams):
        return text
    return "\n\n".join(p for p in _PARAGRAPH.split(text) if _word_ngrams(p).isdisjoint(grams)).strip()


# -- real training text on every machine ----------------------------------------------------------
@functools.lru_cache(maxsize=1)
def installed_distributions() -> tuple:
    """Installed distributions with a long description (>= 500 characters), one per name, by name
    (read once per process: a source's check, identity and draw all ask)."""
    import importlib.metadata as md

    seen, out = set(), []
    for dist in sorted(md.distributions(), key=lambda d: (d.metadata["Name"] or "").lower()):
        name = (dist.metadata["Name"] or "").lower()
        if name and name not in seen and len(_description(dist)) >= 500:
            seen.add(name)
            out.append(dist)
    return tuple(out)


def _description(dist) -> str:
    meta = dist.metadata
    return ((meta.get_payload() if hasattr(meta, "get_payload") else "") or meta.get("Description") or "").strip()


def package_docs() -> list[str]:
    """The long descriptions (READMEs: English technical prose, markdown or reStructuredText, code) of the
    Python distributions installed here, deduplicated: real text, offline, never the standard library's
    (distributions are installed packages). Training text; the corpus still drops any paragraph that
    quotes an evaluation source."""
    docs, seen = [], set()
    for dist in installed_distributions():
        text = _description(dist)
        digest = hashlib.sha256(text.encode()).digest()
        if digest not in seen:
            seen.add(digest)
            docs.append(text)
    return docs
