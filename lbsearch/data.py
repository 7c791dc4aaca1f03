"""Corpora through ``datasets``: teacher-generated text (default, data-free), local files or hub
names; deterministic train / calibration / held-out splits; token blocks of fixed length."""
from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from typing import TYPE_CHECKING

from .errors import LBSearchError
from .io import cache_dir, stable_hash

if TYPE_CHECKING:  # pydantic is not needed where only blocks are made (e.g. the GPU image)
    from .space import DataConfig

SPLITS = ("train", "calibration", "heldout")

# Fixed seed prompts for data-free distillation: varied tasks so the teacher shows its range.
SEED_PROMPTS = (
    "Explain how a hash table works and when it is a poor choice.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "What are the main causes of inflation? Give examples.",
    "Describe the water cycle to a ten-year-old.",
    "Write a Python function that checks whether a string is a palindrome, and explain it.",
    "Summarise the plot of a heist film you invent, in one paragraph.",
    "Give me five tips for staying focused while studying.",
    "How does photosynthesis turn light into chemical energy?",
    "Compare renting and buying a home: list pros and cons.",
    "Write an email asking a colleague to review a report by Friday.",
    "What is the difference between weather and climate?",
    "Explain recursion with an example in JavaScript.",
    "Describe a typical day of a medieval blacksmith.",
    "How do vaccines train the immune system?",
    "Write a haiku sequence about the four seasons.",
    "What should I pack for a three-day hiking trip?",
    "Explain the rules of chess for a complete beginner.",
    "Why is the sky blue? Give the physics.",
    "Write a product description for a solar-powered backpack.",
    "List the planets of the solar system with one fact about each.",
    "How does a bill become law in a parliamentary democracy?",
    "Explain what a neural network is without using jargon.",
    "Write a recipe for a vegetarian lasagna.",
    "What are good habits for writing maintainable code?",
    "Describe the causes and effects of the French Revolution.",
    "Explain compound interest with a numeric example.",
    "Write a dialogue between a cat and a dog about sharing a sofa.",
    "How do airplanes stay in the air?",
    "Give advice to someone starting their first job.",
    "Explain SQL joins with small example tables.",
    "Describe how the internet routes a message from one computer to another.",
    "What is the theory of evolution by natural selection?",
)


SAMPLING = {"temperature": 0.8, "top_p": 0.95}


def _save_dataset_atomic(ds, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    ds.save_to_disk(str(tmp))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


@torch.no_grad()
def sample_teacher_texts(model, tokenizer, n_tokens: int, seed: int = 0, max_new_tokens: int = 256,
                         batch_size: int = 16, progress: bool = True) -> tuple[list[str], list[int]]:
    """The teacher's answers to the seed prompts (asked through its chat template), about
    ``n_tokens`` of answer text, and the index of the prompt each answers.

    Only the answer is kept: the chat boilerplate and the prompt would repeat across documents
    (and across splits); the prompt index lets splits keep all answers to one prompt together.
    When every layer has its original attention (the teacher), the decode engine samples them
    (prompts of different lengths in one batch, ``SAMPLING``, each answer ending at its EOS), in
    :func:`generation_dtype` (a float32 teacher on CUDA: from a bfloat16 copy, made for this call
    and freed after; the teacher itself is not touched); otherwise HF ``generate()`` does, with the
    same settings, on the model as it is.
    """
    texts, groups, total, step = [], [], 0, 0
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = model.generation_config.eos_token_id
    eos = ([eos] if isinstance(eos, int) else list(eos)) if eos is not None else [tokenizer.eos_token_id]
    chats = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in SEED_PROMPTS]
    prompts = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in chats]
    if _is_teacher(model):
        sample = _engine_sampler(model, batch_size, max(map(len, prompts)) + max_new_tokens, max_new_tokens, pad, eos,
                                 dtype=generation_dtype(model))
    else:
        sample = _hf_sampler(model, max_new_tokens, pad, eos)
    bar = tqdm(total=n_tokens, desc="teacher corpus", unit="tok", disable=not progress)
    while total < n_tokens:
        index = [(step * batch_size + i) % len(SEED_PROMPTS) for i in range(batch_size)]
        for new, prompt in zip(sample([prompts[i] for i in index], seed * 100003 + step), index):
            text = tokenizer.decode(new, skip_special_tokens=True).strip()
            if text:
                texts.append(text)
                groups.append(prompt)
                total += len(new)
        bar.update(min(total, n_tokens) - bar.n)
        step += 1
    bar.close()
    del sample  # the engine, its caches and graphs (and a bf16 copy of the teacher) go now
    return texts, groups


def _is_teacher(model) -> bool:
    from .attention import ORIGINAL, kind_of_module
    from .models import decoder_layers

    return all(kind_of_module(layer.self_attn).name == ORIGINAL for layer in decoder_layers(model))


def generation_dtype(model) -> torch.dtype:
    """The dtype the decode engine samples the teacher corpus in: bfloat16 for a float32 model on CUDA
    (the float32 step spends most of its time in float32 GEMMs and attention), else the model's own."""
    weight = next(model.parameters())
    return torch.bfloat16 if weight.is_cuda and weight.dtype == torch.float32 else weight.dtype


def _cast_copy(model, dtype: torch.dtype):
    """A copy of ``model`` with its floating-point parameters in ``dtype`` (tied ones stay tied) and its
    buffers as they are (RoPE's inverse frequencies stay float32, as when a model is loaded in ``dtype``).
    ``model`` is not touched: only the copy's parameters are new tensors."""
    import copy

    memo = {id(p): torch.nn.Parameter(p.detach().to(dtype), requires_grad=False)
            for p in model.parameters() if p.is_floating_point()}
    return copy.deepcopy(model, memo)


def _engine_sampler(model, batch_size: int, max_len: int, max_new_tokens: int, pad: int, eos: list[int],
                    dtype: torch.dtype | None = None):
    """(prompts, seed) -> answers (token lists ending at EOS), sampled by the decode engine; with a ``dtype``
    other than the model's, from a copy of the model in that dtype (kept as long as the sampler is)."""
    from .engine import DecodeEngine  # the engine builds on kinds and models only: no import cycle

    if dtype is not None and dtype != next(model.parameters()).dtype:
        model = _cast_copy(model, dtype)
    engine = DecodeEngine(model, batch_size, max_len)
    return lambda prompts, seed: engine.generate(prompts, max_new_tokens, seed=seed, eos_token_id=eos,
                                                 pad_token_id=pad, **SAMPLING)


def _hf_sampler(model, max_new_tokens: int, pad: int, eos: list[int]):
    """(prompts, seed) -> answers (token lists ending at EOS), sampled by HF generate() on a left-padded batch."""
    device = next(model.parameters()).device

    def sample(prompts, seed):
        width = max(map(len, prompts))
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in prompts], device=device)
        torch.manual_seed(seed)
        out = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=True, max_new_tokens=max_new_tokens,
                             pad_token_id=pad, **SAMPLING)
        return [row[: _until_eos(row, eos)] for row in out[:, width:].tolist()]

    return sample


def teacher_corpus(model, tokenizer, n_tokens: int, seed: int = 0, max_new_tokens: int = 256,
                   batch_size: int = 16, model_key: str = "model"):
    """:func:`sample_teacher_texts` as a ``datasets`` Dataset (columns ``text``, ``group``), cached.

    Keyed by everything that shapes the samples (``model_key``, seed, size, length, batch size,
    prompts, sampling settings, the sampler: engine or HF, and the dtype it computes in), so any
    change regenerates it; a damaged entry is regenerated.
    """
    from datasets import Dataset, load_from_disk

    batch_size = min(batch_size, max(16, n_tokens // (max_new_tokens // 2)))  # no batch far larger than needed
    teacher = _is_teacher(model)
    sampler = "engine-v2" if teacher else "hf-generate"  # the same settings draw other samples (v2: top-p ties)
    dtype = generation_dtype(model) if teacher else next(model.parameters()).dtype
    key = stable_hash("answers-v2", sampler, model_key, seed, n_tokens, max_new_tokens, batch_size, SEED_PROMPTS,
                      SAMPLING, str(dtype).removeprefix("torch."))
    path = cache_dir("corpora") / f"teacher-{key}"
    if (path / "dataset_info.json").is_file():
        try:
            return load_from_disk(str(path))
        except Exception:  # noqa: BLE001 - any damage means: sample again
            print(f"lbsearch: {path}: damaged corpus cache, sampling it again", file=sys.stderr)
    print(f"lbsearch: sampling {n_tokens:,} tokens of the teacher's answers to {len(SEED_PROMPTS)} prompts "
          "(data-free distillation: the teacher writes the text the students are compared on); "
          f"this runs once, then {path} is reused", file=sys.stderr, flush=True)
    texts, groups = sample_teacher_texts(model, tokenizer, n_tokens, seed, max_new_tokens, batch_size)
    ds = Dataset.from_dict({"text": texts, "group": groups})
    _save_dataset_atomic(ds, path)
    return ds


def _until_eos(tokens: list[int], eos: list[int]) -> int:
    """Length of ``tokens`` up to and including the first of the ``eos`` ids."""
    return next((i + 1 for i, t in enumerate(tokens) if t in eos), len(tokens))


_LOCAL_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def file_corpus(source: str, text_field: str = "text"):
    """A local file or folder (.txt, .json, .jsonl, .parquet), or a hub dataset name."""
    from datasets import load_dataset

    path = Path(source)
    if path.exists():
        files = sorted(p for p in (path.rglob("*") if path.is_dir() else [path]) if p.suffix in _LOCAL_BUILDERS)
        if not files:
            raise LBSearchError(f"{source}: no .txt, .json, .jsonl or .parquet files")
        builders = {_LOCAL_BUILDERS[p.suffix] for p in files}
        if len(builders) > 1:
            raise LBSearchError(f"{source}: mixes file types {sorted(builders)}; use one type")
        builder = builders.pop()
        extra = {"sample_by": "paragraph"} if builder == "text" else {}
        ds = load_dataset(builder, data_files=[str(p) for p in files], split="train", **extra)
    else:
        try:
            ds = load_dataset(source, split="train")
        except Exception as exc:  # offline or unknown name: one line, not a traceback
            raise LBSearchError(f"data.source {source!r}: not a local path and not loadable from the hub "
                                f"({type(exc).__name__})") from None
    if text_field not in ds.column_names:
        raise LBSearchError(f"{source}: no column {text_field!r} (columns: {', '.join(ds.column_names)}); "
                            "set data.text_field")
    if text_field != "text":
        ds = ds.rename_column(text_field, "text")
    return ds.select_columns(["text"]).filter(lambda r: bool(r["text"] and r["text"].strip()))


def load_corpus(cfg: DataConfig, model=None, tokenizer=None, model_key: str = "model", batch_size: int = 16):
    check_training_source(cfg.source)
    if cfg.source == "teacher":
        if model is None or tokenizer is None:
            raise LBSearchError("data.source 'teacher' needs the teacher model and tokenizer")
        return teacher_corpus(model, tokenizer, cfg.corpus_tokens, cfg.seed, batch_size=batch_size,
                              model_key=model_key)
    return file_corpus(cfg.source, cfg.text_field)


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
    return list(file_corpus(source, text_field)["text"])


def check_training_source(source: str) -> None:
    """Refuse training text taken from the Python standard library: evaluation sets are drawn there."""
    path = Path(source)
    if path.exists() and (path.resolve() == stdlib_dir() or stdlib_dir() in path.resolve().parents):
        raise LBSearchError(f"data.source {source!r}: the Python standard library is evaluation text "
                            "(python-docs) and may not be trained on")


def _bucket(index: int, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_corpus(ds, cfg: DataConfig) -> dict:
    """Deterministic split of whole documents by a hash of (seed, group): same corpus and seed, same
    split. The group is the document's ``group`` column when there is one (the prompt a teacher
    answer answers, so no prompt is in two splits), else its index."""
    groups = ds["group"] if "group" in ds.column_names else range(len(ds))
    u = [_bucket(g, cfg.seed) for g in groups]
    held, cal = cfg.heldout_fraction, cfg.heldout_fraction + cfg.calibration_fraction
    names = ["heldout" if x < held else "calibration" if x < cal else "train" for x in u]
    splits = {s: ds.select([i for i, n in enumerate(names) if n == s]) for s in SPLITS}
    for name, part in splits.items():
        if len(part) == 0:
            raise LBSearchError(f"corpus too small: split {name!r} is empty ({len(ds)} documents); "
                                "give more data (data.corpus_tokens)")
    return splits


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


def blocks_hash(blocks: torch.Tensor) -> str:
    return hashlib.sha256(blocks.cpu().numpy().tobytes()).hexdigest()[:12]
