"""Real training text never carries evaluation text: paragraphs quoting an evaluation source are dropped
from every drawn document; package-docs (installed distributions' READMEs) is real text on any machine."""
import json
from pathlib import Path

import pytest

from lbsearch import LBSearchError
from lbsearch.corpus.mixture import build_corpus, corpus_key
from lbsearch.corpus.realtext import NGRAM, package_docs, python_docs, without_eval_text, eval_ngrams
from lbsearch.corpus.sources import allowed_sources, resolve
from lbsearch.space import DataConfig, parse_space

OWN = ("Our trainer reads blocks of tokens from a packed stream and writes checkpoints as it goes, "
       "so that an interrupted run picks up where it stopped without losing any work at all.")


def quoted_paragraph() -> str:
    """A paragraph of a python-docs document long enough to be a quote (>= 2 x NGRAM words)."""
    for doc in python_docs():
        for para in doc.split("\n\n"):
            if len(para.split()) >= 2 * NGRAM:
                return para
    raise AssertionError("no long paragraph in python-docs")


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("\n".join(json.dumps({"text": t}) for t in texts))
    return path


def drawn(cfg: DataConfig, tokenizer) -> list[str]:
    return list(build_corpus(cfg, tokenizer=tokenizer).dataset["text"])


def test_paragraphs_quoting_evaluation_text_are_dropped_from_training_files(tokenizer, tmp_path):
    quote = quoted_paragraph()
    mixed = f"{OWN}\n\n{quote}\n\nA closing remark of our own, nothing quoted here at all."
    train = write_jsonl(tmp_path / "train.jsonl", [mixed, OWN + " Second document.", quote])
    guarded = drawn(DataConfig(source=str(train), eval_sources=["python-docs"], corpus_tokens=10**6), tokenizer)
    assert len(guarded) == 2 and not any(quote in t for t in guarded)  # the pure quote is gone entirely
    assert f"{OWN}\n\nA closing remark of our own, nothing quoted here at all." in guarded
    # without evaluation sources nothing is dropped: the guard is what removed the quote
    open_ = drawn(DataConfig(source=str(train), eval_sources=[], corpus_tokens=10**6), tokenizer)
    assert sum(quote in t for t in open_) == 2
    # a reworded sentence shares no 12-word run: kept
    words = quote.split()
    assert without_eval_text(" ".join(words[: NGRAM - 1]), eval_ngrams(("python-docs",))) != ""


def test_a_local_evaluation_file_guards_training_text_too(tokenizer, tmp_path):
    secret = ("The held-out report states that the eleventh quarter closed with revenue above every forecast "
              "the committee had published in the spring.")
    evals = write_jsonl(tmp_path / "eval.jsonl", [secret])
    train = write_jsonl(tmp_path / "train.jsonl", [f"{OWN}\n\n{secret}", OWN])
    texts = drawn(DataConfig(source=str(train), eval_sources=[str(evals)], corpus_tokens=10**6), tokenizer)
    assert texts and not any(secret in t for t in texts)
    keys = {corpus_key(DataConfig(source=str(train), eval_sources=e), None, "m", 16) for e in ([], [str(evals)])}
    assert len(keys) == 2  # what the guard drops depends on the evaluation sources: another corpus


def test_package_docs_is_real_text_of_the_installed_distributions(tokenizer):
    docs = package_docs()
    assert len(docs) >= 5 and all(len(d) >= 500 for d in docs) and len(set(docs)) == len(docs)
    cfg = DataConfig(source="package-docs", eval_sources=["python-docs"], corpus_tokens=3000)
    corpus = build_corpus(cfg, tokenizer=tokenizer)
    assert corpus.tokens >= 3000 and corpus.sources[0].kind == "package-docs"
    grams = eval_ngrams(("python-docs",))
    assert all(without_eval_text(t, grams) == t for t in corpus.dataset["text"])
    names = dict(resolve(cfg.mixture[0], "data").identity()[1])
    assert "torch" in names  # the identity names each distribution and its version: an upgrade draws again


def test_package_docs_takes_no_options_and_is_listed_among_the_named_sources():
    assert "package-docs" in allowed_sources()
    with pytest.raises(LBSearchError, match="'text_field' does not apply to a package-docs source"):
        parse_space({"data": {"sources": [{"source": "package-docs", "text_field": "body"}]}}, "s.yaml")
