"""Corpora as token blocks. What a corpus is made of (sources with weights: teacher answers to a broad
prompt set, unconditional teacher samples, local files, hub datasets; held-out real text; per-group
splits) lives in :mod:`lbsearch.corpus`; this module keeps the names the rest of the package uses and
packs documents into fixed-length token blocks."""
from __future__ import annotations

import hashlib
from types import SimpleNamespace
from typing import TYPE_CHECKING

import torch

from .corpus.files import file_corpus
from .corpus.mixture import Corpus, build_corpus, check_sources, corpus_key
from .corpus.prompts import SEED_PROMPTS, broad_prompts
from .corpus.realtext import EVAL_SOURCES, check_training_source, eval_texts, python_docs, stdlib_dir
from .corpus.sources import SOURCE_KINDS, DrawContext, answers_request, resolve
from .corpus.splits import SPLITS, split_corpus
from .corpus.teacher import SAMPLING, UNCONDITIONAL, _cast_copy, _engine_sampler, _hf_sampler, cached_samples, \
    generation_dtype
from .errors import LBSearchError

if TYPE_CHECKING:  # pydantic is not needed where only blocks are made (e.g. the GPU image)
    from .space import DataConfig

__all__ = ["Corpus", "EVAL_SOURCES", "SAMPLING", "SEED_PROMPTS", "SOURCE_KINDS", "SPLITS", "UNCONDITIONAL",
           "blocks_hash", "broad_prompts", "build_corpus", "check_sources", "check_training_source", "corpus_key",
           "eval_texts", "file_corpus", "generation_dtype", "load_corpus", "pack_blocks", "python_docs",
           "split_corpus", "stdlib_dir", "teacher_corpus", "_cast_copy", "_engine_sampler", "_hf_sampler"]


def teacher_corpus(model, tokenizer, n_tokens: int, seed: int = 0, max_new_tokens: int = 256,
                   batch_size: int = 16, model_key: str = "model", prompts: str = "broad", progress: bool = True):
    """The teacher's answers to a prompt set (columns ``text``, ``group``, ``tokens``), cached: the
    ``teacher-prompts`` source alone, with its default sampling settings."""
    config = SimpleNamespace(source="teacher-prompts", weight=1.0, prompts=prompts, max_new_tokens=max_new_tokens)
    src = resolve(config, "data")
    ctx = DrawContext(model, tokenizer, model_key, batch_size, seed, progress=progress)
    return cached_samples(model, tokenizer, answers_request(src, ctx), n_tokens, seed, batch_size, model_key, progress)


def load_corpus(cfg: DataConfig, model=None, tokenizer=None, model_key: str = "model", batch_size: int = 16):
    """The corpus of ``cfg`` (its sources mixed by weight, ``corpus_tokens`` in all) as a Dataset."""
    return build_corpus(cfg, model, tokenizer, model_key=model_key, batch_size=batch_size).dataset


def pack_blocks(ds, tokenizer, seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """Tokenise, join documents with EOS and cut into [N, seq_len] blocks (the remainder is dropped).

    ``ds`` is a Dataset with a ``text`` column or a list of strings.
    """
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    limit = None if max_tokens is None else max(max_tokens, seq_len)
    for text in (ds if isinstance(ds, list) else ds["text"]):
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        stream.append(eos)
        if limit is not None and len(stream) >= limit:
            break
    n = len(stream) // seq_len
    if limit is not None:
        n = min(n, limit // seq_len)
    if n == 0:
        raise LBSearchError(f"not enough text for one block of {seq_len} tokens ({len(stream)} tokens)")
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


def reblock(blocks: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Packed ``blocks`` cut again at ``seq_len`` (packing is one stream cut into blocks, so this
    equals packing the same text at ``seq_len``, less the remainder)."""
    if seq_len == blocks.shape[1]:
        return blocks
    n = blocks.numel() // seq_len
    if n == 0:
        raise LBSearchError(f"not enough text for one block of {seq_len} tokens ({blocks.numel()} tokens)")
    return blocks.flatten()[: n * seq_len].view(n, seq_len)


def blocks_hash(blocks: torch.Tensor) -> str:
    return hashlib.sha256(blocks.cpu().numpy().tobytes()).hexdigest()[:12]
