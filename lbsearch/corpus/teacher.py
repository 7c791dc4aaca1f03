"""Text sampled from the teacher: answers to prompts (through its chat template) and unconditional
samples from its start token, cached by everything that shapes them.

When every layer has its original attention (the teacher), the decode engine samples (prompts of
different lengths in one batch, each answer ending at its EOS), in :func:`generation_dtype`;
otherwise HF ``generate()`` does, with the same settings, on the model as it is.
"""
from __future__ import annotations

import hashlib
import math
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..io import cache_dir, stable_hash

SAMPLING = {"temperature": 0.8, "top_p": 0.95}  # answers to prompts
UNCONDITIONAL = {"temperature": 1.0, "top_p": 1.0}  # the teacher's own distribution, untruncated
SAMPLE_VERSION = "samples-v3"  # v3: one sampler for prompts and start tokens; groups are strings


@dataclass(frozen=True)
class Request:
    """What to sample: token prompts (one per group, in the order they are used, cycled), the
    sampling settings and the answer length; ``label`` names it in messages."""

    label: str
    prompts: tuple[tuple[int, ...], ...]
    groups: tuple[str, ...]
    temperature: float
    top_p: float
    max_new_tokens: int
    fresh_groups: bool = False  # every sample its own group (unconditional: there is no prompt to share)
    extra_key: tuple = field(default=())

    def key_parts(self) -> tuple:
        digest = hashlib.sha256(repr((self.prompts, self.groups)).encode()).hexdigest()[:16]
        return (digest, len(self.prompts), self.temperature, self.top_p, self.max_new_tokens, self.fresh_groups,
                self.extra_key)


@dataclass(frozen=True)
class Documents:
    """Texts with the group each belongs to (the split keeps a group together) and its token count."""

    texts: list[str]
    groups: list[str]
    tokens: list[int]


def chat_prompts(tokenizer, texts) -> list[tuple[int, ...]]:
    """Each text asked as the user through the tokenizer's chat template, ready for the answer."""
    chats = [tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                           add_generation_prompt=True) for t in texts]
    return [tuple(ids) for ids in tokenizer(chats, add_special_tokens=False)["input_ids"]]


def start_token(model, tokenizer, start: str) -> int:
    """The token unconditional samples start from: ``bos`` (the model's, else the tokenizer's, else its
    EOS), ``eos``, or a token of the vocabulary by its text."""
    from ..errors import LBSearchError

    if start == "bos":
        bos = getattr(model.generation_config, "bos_token_id", None)
        bos = bos[0] if isinstance(bos, (list, tuple)) and bos else bos
        for candidate in (bos, tokenizer.bos_token_id, tokenizer.eos_token_id):
            if candidate is not None:
                return int(candidate)
    if start == "eos" and tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    token = tokenizer.convert_tokens_to_ids(start)
    if token is None or (token == tokenizer.unk_token_id and start != tokenizer.unk_token):
        raise LBSearchError(f"start: {start!r}: not a token of the tokenizer; allowed: bos, eos or a token's text")
    return int(token)


@torch.no_grad()
def sample_documents(model, tokenizer, request: Request, n_tokens: int, seed: int, batch_size: int,
                     progress: bool = True) -> Documents:
    """About ``n_tokens`` of sampled text (answers only: the prompt and chat boilerplate are dropped)."""
    texts, groups, counts, total, step, used = [], [], [], 0, 0, 0
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = model.generation_config.eos_token_id
    eos = ([eos] if isinstance(eos, int) else list(eos)) if eos is not None else [tokenizer.eos_token_id]
    longest = max(map(len, request.prompts)) + request.max_new_tokens
    sampling = {"temperature": request.temperature, "top_p": request.top_p}
    if is_teacher(model):
        sample = _engine_sampler(model, batch_size, longest, request.max_new_tokens, pad, eos,
                                 dtype=generation_dtype(model), sampling=sampling)
    else:
        sample = _hf_sampler(model, request.max_new_tokens, pad, eos, sampling=sampling)
    bar = tqdm(total=n_tokens, desc=request.label, unit="tok", disable=not progress)
    while total < n_tokens:
        guess = request.max_new_tokens if request.fresh_groups else request.max_new_tokens / 2
        rows = _rows(batch_size, n_tokens - total, total / used if used else guess)
        index = [(used + i) % len(request.prompts) for i in range(rows)]
        for i, (new, prompt) in enumerate(zip(sample([list(request.prompts[j]) for j in index],
                                                     seed * 100003 + step), index)):
            text = tokenizer.decode(new, skip_special_tokens=True).strip()
            if text:
                texts.append(text)
                groups.append(f"{request.groups[prompt]}:{seed}:{used + i}" if request.fresh_groups
                              else request.groups[prompt])
                counts.append(len(new))
                total += len(new)
        used += rows
        bar.update(min(total, n_tokens) - bar.n)
        step += 1
    bar.close()
    del sample  # the engine, its caches and graphs (and a bf16 copy of the teacher) go now
    return Documents(texts, groups, counts)


def _rows(batch_size: int, remaining: int, per_row: float) -> int:
    """Rows of the next batch: the full batch, fewer when the remaining tokens need fewer (a small
    share must not sample a whole batch of long rows), judged by the tokens per row so far (first:
    the length limit for unconditional samples, which seldom stop early; half of it for answers)."""
    return max(1, min(batch_size, math.ceil(1.1 * remaining / max(per_row, 1.0))))


def is_teacher(model) -> bool:
    from ..attention import ORIGINAL, kind_of_module
    from ..models import decoder_layers

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
                    dtype: torch.dtype | None = None, sampling: dict | None = None):
    """(prompts, seed) -> answers (token lists ending at EOS), sampled by the decode engine; with a ``dtype``
    other than the model's, from a copy of the model in that dtype (kept as long as the sampler is)."""
    from ..engine import DecodeEngine  # the engine builds on kinds and models only: no import cycle

    if dtype is not None and dtype != next(model.parameters()).dtype:
        model = _cast_copy(model, dtype)
    engine = DecodeEngine(model, batch_size, max_len)
    settings = sampling or SAMPLING
    return lambda prompts, seed: engine.generate(prompts, max_new_tokens, seed=seed, eos_token_id=eos,
                                                 pad_token_id=pad, **settings)


def _hf_sampler(model, max_new_tokens: int, pad: int, eos: list[int], sampling: dict | None = None):
    """(prompts, seed) -> answers (token lists ending at EOS), sampled by HF generate() on a left-padded batch."""
    device = next(model.parameters()).device
    settings = sampling or SAMPLING

    def sample(prompts, seed):
        width = max(map(len, prompts))
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in prompts], device=device)
        torch.manual_seed(seed)
        out = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=True, max_new_tokens=max_new_tokens,
                             pad_token_id=pad, **settings)
        return [row[: _until_eos(row, eos)] for row in out[:, width:].tolist()]

    return sample


def _until_eos(tokens: list[int], eos: list[int]) -> int:
    """Length of ``tokens`` up to and including the first of the ``eos`` ids."""
    return next((i + 1 for i, t in enumerate(tokens) if t in eos), len(tokens))


def sampler_key(model) -> tuple[str, str]:
    """Which sampler draws for ``model`` and in which dtype: the same settings draw other samples
    through another (v2: top-p ties; v3: the fused decode step, whose bf16 GEMMs round differently)."""
    teacher = is_teacher(model)
    dtype = generation_dtype(model) if teacher else next(model.parameters()).dtype
    return ("engine-v3" if teacher else "hf-generate"), str(dtype).removeprefix("torch.")


def batch_rows(batch_size: int, n_tokens: int, max_new_tokens: int) -> int:
    """The sampler's batch: ``batch_size``, or less when ``n_tokens`` needs far fewer rows."""
    return min(batch_size, max(16, n_tokens // max(1, max_new_tokens // 2)))


def sample_key(request: Request, model, n_tokens: int, seed: int, batch_size: int, model_key: str) -> str:
    """The cache key of a sample: everything that shapes it."""
    return stable_hash(SAMPLE_VERSION, *sampler_key(model), model_key, seed, n_tokens,
                       batch_rows(batch_size, n_tokens, request.max_new_tokens), request.key_parts())


def cached_samples(model, tokenizer, request: Request, n_tokens: int, seed: int = 0, batch_size: int = 16,
                   model_key: str = "model", progress: bool = True):
    """:func:`sample_documents` as a ``datasets`` Dataset (columns ``text``, ``group``, ``tokens``),
    cached under :func:`sample_key`; a damaged entry is sampled again."""
    from datasets import Dataset, load_from_disk

    path = cache_dir("corpora") / f"teacher-{sample_key(request, model, n_tokens, seed, batch_size, model_key)}"
    if (path / "dataset_info.json").is_file():
        try:
            return load_from_disk(str(path))
        except Exception:  # noqa: BLE001 - any damage means: sample again
            print(f"lbsearch: {path}: damaged corpus cache, sampling it again", file=sys.stderr)
    print(f"lbsearch: sampling {n_tokens:,} tokens: {request.label} (data-free distillation: the teacher writes "
          f"the text the students are compared on); this runs once, then {path} is reused",
          file=sys.stderr, flush=True)
    docs = sample_documents(model, tokenizer, request, n_tokens, seed,
                            batch_rows(batch_size, n_tokens, request.max_new_tokens), progress)
    ds = Dataset.from_dict({"text": docs.texts, "group": docs.groups, "tokens": docs.tokens})
    save_dataset_atomic(ds, path)
    return ds


def save_dataset_atomic(ds, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    ds.save_to_disk(str(tmp))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
