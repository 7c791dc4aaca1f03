import json

import pytest
import torch
from conftest import tiny_model

from lbsearch import LBSearchError
from lbsearch.data import file_corpus, load_corpus, pack_blocks, reblock, split_corpus, teacher_corpus
from lbsearch.space import DataConfig


def test_teacher_corpus_is_generated_once_then_cached(tokenizer, cache_home):
    model = tiny_model("llama", vocab=49152)
    ds = teacher_corpus(model, tokenizer, n_tokens=300, seed=1, max_new_tokens=16, batch_size=4)
    assert len(ds) >= 4 and all(isinstance(t, str) and t for t in ds["text"])
    assert not any("<|im_start|>" in t or "user" == t[:4] for t in ds["text"])  # answers only, no chat boilerplate
    assert all(g.startswith("prompt:broad:") for g in ds["group"])
    model.generate = None  # a second call must not generate
    again = teacher_corpus(model, tokenizer, n_tokens=300, seed=1, max_new_tokens=16, batch_size=4)
    assert again["text"] == ds["text"]
    assert len(list(cache_home.glob("corpora/teacher-*"))) == 1


def test_teacher_corpus_depends_on_seed(tokenizer, cache_home):
    model = tiny_model("llama", vocab=49152)
    a = teacher_corpus(model, tokenizer, n_tokens=100, seed=1, max_new_tokens=12, batch_size=2)
    b = teacher_corpus(model, tokenizer, n_tokens=100, seed=2, max_new_tokens=12, batch_size=2)
    assert a["text"] != b["text"]


def test_teacher_corpus_is_keyed_by_its_generation_dtype(tokenizer, cache_home, monkeypatch):
    """A float32 teacher on CUDA samples from a bf16 copy: another corpus, under another key; the teacher stays."""
    from lbsearch import data
    from lbsearch.corpus import teacher

    model = tiny_model("llama", vocab=49152)
    assert data.generation_dtype(model) == torch.float32  # CPU: the model as it is
    before = {k: v.clone() for k, v in model.state_dict().items()}
    a = teacher_corpus(model, tokenizer, n_tokens=100, seed=1, max_new_tokens=12, batch_size=2)
    copies = []
    cast = teacher._cast_copy
    monkeypatch.setattr(teacher, "_cast_copy", lambda m, dtype: copies.append(cast(m, dtype)) or copies[-1])
    monkeypatch.setattr(teacher, "generation_dtype", lambda m: torch.bfloat16)  # as for a float32 teacher on CUDA
    b = teacher_corpus(model, tokenizer, n_tokens=100, seed=1, max_new_tokens=12, batch_size=2)
    assert len(list(cache_home.glob("corpora/teacher-*"))) == 2 and len(a) > 0 and len(b) > 0
    assert len(copies) == 1 and next(copies[0].parameters()).dtype == torch.bfloat16  # sampled from the copy
    assert teacher_corpus(model, tokenizer, n_tokens=100, seed=1, max_new_tokens=12, batch_size=2)["text"] == b["text"]
    assert len(copies) == 1  # cached: no copy, no sampling
    assert all(v.dtype == torch.float32 and torch.equal(v, before[k]) for k, v in model.state_dict().items())
    copy = data._cast_copy(model, torch.bfloat16)
    assert copy.model.embed_tokens.weight.dtype == torch.bfloat16
    assert copy.model.rotary_emb.inv_freq.dtype == torch.float32  # buffers as loaded in bf16


@pytest.fixture()
def corpus_files(tmp_path):
    docs = [f"Document number {i}. " + "Some words follow here. " * (i % 5 + 1) for i in range(40)]
    (tmp_path / "a.txt").write_text("\n\n".join(docs))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"body": d}) for d in docs))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": docs}), tmp_path / "a.parquet")
    return tmp_path, docs


def test_local_files_load_as_text(corpus_files):
    root, docs = corpus_files
    assert file_corpus(str(root / "a.parquet"))["text"] == docs
    assert file_corpus(str(root / "a.jsonl"), text_field="body")["text"] == docs
    assert len(file_corpus(str(root / "a.txt"))) == len(docs)


def test_local_file_errors(corpus_files, tmp_path):
    root, _ = corpus_files
    with pytest.raises(LBSearchError, match="no column 'text'.*body"):
        file_corpus(str(root / "a.jsonl"))
    with pytest.raises(LBSearchError, match="mixes file types"):
        file_corpus(str(root))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LBSearchError, match="no .txt"):
        file_corpus(str(empty))


def test_splits_are_deterministic_and_disjoint(corpus_files, tokenizer):
    root, docs = corpus_files
    ds = load_corpus(DataConfig(source=str(root / "a.parquet")), tokenizer=tokenizer)
    cfg = DataConfig(seed=3)
    a, b = split_corpus(ds, cfg), split_corpus(ds, cfg)
    assert {k: v["text"] for k, v in a.items()} == {k: v["text"] for k, v in b.items()}
    parts = [set(v["text"]) for v in a.values()]
    assert sum(map(len, parts)) == len(docs) and set().union(*parts) == set(docs)
    other = split_corpus(ds, DataConfig(seed=4))
    assert other["heldout"]["text"] != a["heldout"]["text"]


def test_pack_blocks_joins_documents_with_eos(tokenizer, corpus_files):
    root, docs = corpus_files
    ds = file_corpus(str(root / "a.parquet"))
    blocks = pack_blocks(ds, tokenizer, seq_len=32)
    stream = []
    for d in docs:
        stream += tokenizer(d, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert blocks.shape == (len(stream) // 32, 32)
    assert blocks.flatten().tolist() == stream[: blocks.numel()]
    assert pack_blocks(ds, tokenizer, seq_len=32, max_tokens=70).shape == (2, 32)
    with pytest.raises(LBSearchError, match="not enough text"):
        pack_blocks(ds.select([0]), tokenizer, seq_len=4096)
    # cut again at another length: what packing at that length gives, less the remainder
    for length in (64, 16, 32):
        again = reblock(blocks, length)
        assert again.shape == (blocks.numel() // length, length)
        assert torch.equal(again.flatten(), pack_blocks(ds, tokenizer, seq_len=length).flatten()[: again.numel()])
    assert reblock(blocks, 32) is blocks
    with pytest.raises(LBSearchError, match="not enough text for one block of 100000"):
        reblock(blocks, 100_000)


def test_teacher_answers_split_by_prompt(tokenizer, cache_home):
    """No prompt has answers in two splits (held-out text shares no prompt with training text)."""
    model = tiny_model("llama", vocab=49152)
    ds = teacher_corpus(model, tokenizer, n_tokens=600, seed=3, max_new_tokens=8, batch_size=64)
    splits = split_corpus(ds, DataConfig(seed=0))
    groups = {name: set(part["group"]) for name, part in splits.items()}
    assert all(groups.values())
    assert not (groups["train"] & groups["heldout"]) and not (groups["train"] & groups["calibration"])
    assert not (groups["heldout"] & groups["calibration"])


def test_python_docs_is_evaluation_text_only(tmp_path):
    from lbsearch.data import check_training_source, eval_texts, stdlib_dir

    docs = eval_texts("python-docs")
    assert len(docs) > 100 and all(len(d) > 200 for d in docs)
    with pytest.raises(LBSearchError, match="evaluation text"):
        check_training_source(str(stdlib_dir() / "json"))
    with pytest.raises(LBSearchError, match="neither a local file"):
        eval_texts("wikitext-offline")
    check_training_source(str(tmp_path))  # anything else is fine
