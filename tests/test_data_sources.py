"""data.sources: a weighted mixture of teacher answers, unconditional teacher samples, local files and hub
datasets; checked before heavy work, split by group, keyed by everything that shapes it, named in the run."""
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import tiny_model, write_tiny_space

from lbsearch import LBSearchError
from lbsearch.corpus import teacher
from lbsearch.corpus.mixture import build_corpus, corpus_key, teacher_text
from lbsearch.corpus.splits import split_corpus, split_of
from lbsearch.data import stdlib_dir
from lbsearch.space import DataConfig, parse_space

SHORT = {"max_new_tokens": 12}  # tiny answers: the tiny model samples a few hundred tokens in seconds


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", vocab=49152)


def write_docs(path: Path, n: int, field: str = "text", tag: str = "doc") -> Path:
    path.write_text("\n".join(json.dumps({field: f"{tag} {i}: " + "words follow here " * (3 + i % 4)})
                              for i in range(n)))
    return path


def data(*sources, **kw) -> DataConfig:
    return DataConfig(sources=list(sources), **kw)


# -- unconditional samples --------------------------------------------------------------------------------
def test_unconditional_samples_start_from_the_start_token_at_temperature_one(model, tokenizer, cache_home,
                                                                           monkeypatch):
    calls = []
    make = teacher._engine_sampler

    def recording(*args, **kw):
        sample = make(*args, **kw)
        return lambda prompts, seed: calls.append((prompts, kw["sampling"])) or sample(prompts, seed)

    monkeypatch.setattr(teacher, "_engine_sampler", recording)
    corpus = build_corpus(data({"source": "teacher-unconditional", **SHORT}, corpus_tokens=60), model, tokenizer,
                          progress=False)
    bos = model.generation_config.bos_token_id
    assert bos is not None and calls
    assert all(p == [bos] for prompts, _ in calls for p in prompts)  # the start token alone: no chat template
    assert all(s == {"temperature": 1.0, "top_p": 1.0} for _, s in calls)
    groups = corpus.dataset["group"]
    assert len(set(groups)) == len(groups) and all(g.startswith("unconditional:") for g in groups)
    (draw,) = corpus.sources
    assert draw.kind == "teacher-unconditional" and draw.tokens >= 60 and draw.options["start"] == "bos"

    calls.clear()
    build_corpus(data({"source": "teacher-unconditional", "start": "<|endoftext|>", **SHORT}, corpus_tokens=30),
                 model, tokenizer, progress=False)
    assert calls and all(p == [0] for prompts, _ in calls for p in prompts)
    with pytest.raises(LBSearchError, match=r"^data.sources\[0\].start: 'no-such-token': not a token"):
        build_corpus(data({"source": "teacher-unconditional", "start": "no-such-token"}), model, tokenizer)


def test_unconditional_samples_through_hf_generate(model, tokenizer, cache_home, monkeypatch):
    """A student (not every layer original) samples through HF generate(): the same start token and settings."""
    monkeypatch.setattr(teacher, "is_teacher", lambda m: False)
    a = build_corpus(data({"source": "teacher-unconditional", **SHORT}, corpus_tokens=40), model, tokenizer,
                     progress=False)
    assert len(a.dataset) >= 2 and a.sources[0].tokens >= 40
    sample = teacher._hf_sampler(model, 6, tokenizer.eos_token_id, [tokenizer.eos_token_id],
                                 sampling=teacher.UNCONDITIONAL)
    one, two = sample([[1], [1]], 5), sample([[1], [1]], 5)
    assert one == two and all(1 <= len(r) <= 6 for r in one)


# -- mixtures ------------------------------------------------------------------------------------------------
def test_weights_are_shares_of_the_tokens(tokenizer, tmp_path):
    a, b = write_docs(tmp_path / "a.jsonl", 400, tag="alpha"), write_docs(tmp_path / "b.jsonl", 400, tag="beta")
    corpus = build_corpus(data({"source": str(a), "weight": 3}, {"source": str(b), "weight": 1}, corpus_tokens=4000),
                          tokenizer=tokenizer)
    first, second = corpus.sources
    assert (first.target_tokens, second.target_tokens) == (3000, 1000)
    longest = max(len(tokenizer(json.loads(line)["text"])["input_ids"]) + 1  # with its EOS
                  for f in (a, b) for line in f.read_text().splitlines())
    assert 3000 <= first.tokens < 3000 + longest and 1000 <= second.tokens < 1000 + longest
    assert first.share == pytest.approx(0.75) and corpus.tokens == first.tokens + second.tokens
    origin = corpus.dataset["source"]
    assert Counter(origin) == {0: first.documents, 1: second.documents}
    assert set(origin[:20]) == {0, 1}  # interleaved: every prefix mixes the sources


def test_teacher_mixture_respects_weights(model, tokenizer, cache_home):
    corpus = build_corpus(data({"source": "teacher-prompts", "weight": 0.6, **SHORT},
                               {"source": "teacher-unconditional", "weight": 0.4, **SHORT}, corpus_tokens=500),
                          model, tokenizer, progress=False)
    answers, unconditional = corpus.sources
    assert (answers.target_tokens, unconditional.target_tokens) == (300, 200)
    for draw in corpus.sources:  # at least the share, at most a quarter more and one answer (the last batch)
        assert draw.target_tokens <= draw.tokens <= 1.25 * draw.target_tokens + 12, draw
    share = answers.tokens / corpus.tokens
    assert share == pytest.approx(0.6, abs=0.08)


def test_split_keeps_every_prompt_in_one_split(model, tokenizer, cache_home, tmp_path):
    """Answers to one prompt (the 32-prompt set, answered several times each) never straddle splits; the
    healing corpus draws only train-split prompts and documents."""
    docs = write_docs(tmp_path / "d.jsonl", 200)
    cfg = data({"source": "teacher-prompts", "prompts": "seed", "max_new_tokens": 6},
               {"source": str(docs), "weight": 0.3}, corpus_tokens=900)
    corpus = build_corpus(cfg, model, tokenizer, progress=False)
    groups = Counter(corpus.dataset["group"])
    assert max(n for g, n in groups.items() if g.startswith("prompt:seed:")) > 1  # prompts answered repeatedly
    splits = split_corpus(corpus.dataset, cfg)
    owner = {}
    for name, part in splits.items():
        for g in part["group"]:
            assert owner.setdefault(g, name) == name, g
    healing = build_corpus(cfg, model, tokenizer, n_tokens=400, seed=cfg.seed + 1, train_only=True, progress=False)
    assert healing.train_only and len(healing.dataset) > 0
    assert all(split_of(g, cfg.seed, cfg.heldout_fraction, cfg.calibration_fraction) == "train"
               for g in healing.dataset["group"])
    assert not set(healing.dataset["group"]) & (set(splits["heldout"]["group"]) | set(splits["calibration"]["group"]))


def test_heldout_teacher_text_is_the_teachers_whatever_real_text_joins_the_mixture(model, tokenizer, cache_home,
                                                                                   tmp_path):
    """Real text in the mixture (package-docs, files) stays out of the held-out *teacher* text, so that its
    KL means the same with or without it; a mixture with no teacher source keeps its held-out split."""
    docs = write_docs(tmp_path / "real.jsonl", 120, tag="zebra")
    cfg = data({"source": "teacher-prompts", **SHORT}, {"source": str(docs), "weight": 0.5}, corpus_tokens=900)
    corpus = build_corpus(cfg, model, tokenizer, progress=False)
    held = split_corpus(corpus.dataset, cfg)["heldout"]
    assert set(held["source"]) == {0, 1}  # the split itself holds both
    kept = teacher_text(held, corpus)
    assert 0 < len(kept) < len(held) and set(kept["source"]) == {0}
    assert not any(t.startswith("zebra") for t in kept["text"])
    only_real = data({"source": str(docs)}, corpus_tokens=300)
    real = build_corpus(only_real, None, tokenizer, progress=False)
    real_held = split_corpus(real.dataset, only_real)["heldout"]
    assert len(teacher_text(real_held, real)) == len(real_held)


# -- bad sources: one line, before heavy work --------------------------------------------------------------
@pytest.fixture()
def tiny_space(tmp_path, tokenizer):
    return write_tiny_space(tmp_path, tokenizer)


def bad_cases(root: Path) -> list:
    write_docs(root / "body.jsonl", 10, field="body")
    return [
        ({"source": "./no/such/file.jsonl"},
         r"data.sources\[1\].source: './no/such/file.jsonl': no such file or folder; allowed: teacher-prompts"),
        ({"source": str(root / "body.jsonl")}, r"data.sources\[1\].source: .*body.jsonl: no field 'text' \(fields: body\)"),
        ({"source": str(stdlib_dir() / "json")}, r"data.sources\[1\].source: .*standard library is evaluation text"),
        ({"source": str(root / "corpus.jsonl"), "weight": 0.5}, r"overlaps the evaluation source"),
        ({"source": "someone/no-such-dataset"},
         r"data.sources\[1\].source: 'someone/no-such-dataset': not a local path and not loadable from the hub"),
    ]


def test_bad_sources_fail_in_one_line_before_the_teacher_loads(tiny_space, monkeypatch):
    import datasets
    import yaml

    from lbsearch import workspace

    def offline(*a, **kw):
        raise ConnectionError("Couldn't reach the Hub (offline)")

    def heavy(*a, **kw):
        raise AssertionError("the teacher loaded before the sources were checked")

    monkeypatch.setattr(datasets, "load_dataset_builder", offline)
    monkeypatch.setattr(workspace, "load_teacher", heavy)
    root = tiny_space.parent
    for source, message in bad_cases(root):
        space = yaml.safe_load(tiny_space.read_text())
        space["data"] = {"sources": [{"source": str(root / "corpus.jsonl")}, source], "seq_len": 32,
                         "eval_sources": [str(root / "corpus.jsonl")] if "overlaps" in message else []}
        if "overlaps" in message:
            space["data"]["sources"][0] = {"source": "teacher-prompts"}
        with pytest.raises(LBSearchError, match=message) as err:
            workspace.Workspace.open(parse_space(space, "s.yaml"), device="cpu", progress=False)
        assert "\n" not in str(err.value) and len(str(err.value)) < 400


@pytest.mark.parametrize("sources, message", [
    ([{"source": "teacher-prompts", "weight": 0}], r"s.yaml: data.sources\[0\].weight: Input should be greater than 0"),
    ([{"source": "teacher-prompts", "weight": "heavy"}], r"data.sources\[0\].weight: Input should be a valid number"),
    ([{"source": "teacher-prompts", "wieght": 1}], r"data.sources\[0\].wieght: unknown key; allowed: source, weight"),
    ([{"source": "teacher-prompts"}, {"source": "./a.jsonl", "prompts": "broad"}],
     r"data.sources\[1\]: 'prompts' does not apply to a file source .*; it takes: weight, text_field"),
    ([{"source": "teacher-prompts", "prompts": "narrow"}], r"unknown prompt set; allowed: broad, seed"),
    ([{"source": "teacher-unconditional", "top_p": 2}], r"data.sources\[0\].top_p: Input should be less than or"),
])
def test_bad_source_settings_are_one_line_space_errors(sources, message):
    with pytest.raises(LBSearchError, match=message) as err:
        parse_space({"data": {"sources": sources}}, "s.yaml")
    assert "\n" not in str(err.value)
    with pytest.raises(LBSearchError, match="give data.source .* or data.sources"):
        parse_space({"data": {"source": "teacher", "sources": [{"source": "teacher-prompts"}]}}, "s.yaml")


def test_source_shorthand_is_one_source(tmp_path):
    assert DataConfig(source="teacher").mixture[0].source == "teacher"
    assert [s.source for s in DataConfig().mixture] == ["teacher-prompts"]
    assert DataConfig(source="x.jsonl").source_keys() == ["data"]
    with pytest.raises(LBSearchError, match=r"^data.source: '.*missing.jsonl': no such file"):
        from lbsearch.data import check_sources

        check_sources(DataConfig(source=str(tmp_path / "missing.jsonl")))


# -- keys ----------------------------------------------------------------------------------------------------
def test_corpus_key_changes_with_weights_and_sampling_settings(model, tmp_path):
    docs = str(write_docs(tmp_path / "k.jsonl", 10))

    def key(prompts=None, uncond=None, weights=(0.8, 0.2), **kw):
        cfg = data({"source": "teacher-prompts", "weight": weights[0], **(prompts or {})},
                   {"source": "teacher-unconditional", "weight": weights[1], **(uncond or {})}, **kw)
        return corpus_key(cfg, model, "tiny", batch_size=16)

    base = key()
    assert key() == base and key(weights=(4, 1)) == base  # the same shares: the same corpus
    variants = [key(weights=(0.7, 0.3)), key(prompts={"temperature": 0.7}), key(prompts={"top_p": 0.9}),
                key(prompts={"max_new_tokens": 128}), key(prompts={"prompts": "seed"}), key(uncond={"start": "eos"}),
                key(uncond={"temperature": 0.9}), key(corpus_tokens=1000), key(seed=3)]
    assert len({base, *variants}) == len(variants) + 1
    with_file = corpus_key(data({"source": "teacher-prompts"}, {"source": docs}), model, "tiny", 16)
    Path(docs).write_text(Path(docs).read_text() + "\n" + json.dumps({"text": "one more"}))
    assert corpus_key(data({"source": "teacher-prompts"}, {"source": docs}), model, "tiny", 16) != with_file


def test_sample_cache_is_keyed_by_sampling_settings(model, tokenizer, cache_home):
    for temperature in (0.8, 0.7, 0.8):
        build_corpus(data({"source": "teacher-prompts", "temperature": temperature, **SHORT}, corpus_tokens=30),
                     model, tokenizer, progress=False)
    assert len(list((cache_home / "corpora").glob("teacher-*"))) == 2


# -- metadata ------------------------------------------------------------------------------------------------
def test_workspace_names_each_source_and_the_run_writes_them(tokenizer, tmp_path):
    from lbsearch.pipeline import run_params
    from lbsearch.run_config import RunConfig
    from lbsearch.run_steps import save_data_sources
    from lbsearch.tracking.names import flatten
    from lbsearch.workspace import DeviceDefaults, Workspace

    space_file = write_tiny_space(tmp_path, tokenizer)
    text = space_file.read_text().replace(
        f"data: {{source: {tmp_path / 'corpus.jsonl'}, seq_len: 32}}",
        f"data: {{sources: [{{source: {tmp_path / 'corpus.jsonl'}, weight: 0.75}}, "
        "{source: teacher-unconditional, weight: 0.25, max_new_tokens: 16}], corpus_tokens: 4000, seq_len: 32}")
    space_file.write_text(text)
    ws = Workspace.open(space_file, device="cpu", cache=tmp_path / "cache", progress=False,
                        defaults={"healing_corpus_tokens": 600})
    corpus = ws.data_sources()["corpus"]
    assert [(s["kind"], s["weight"]) for s in corpus["sources"]] == [("file", 0.75), ("teacher-unconditional", 0.25)]
    assert all(s["tokens"] >= s["target_tokens"] > 0 for s in corpus["sources"])
    assert ws.data_sources()["healing"] is None  # not drawn yet
    # held-out teacher text is the teacher's: none of the file's held-out documents is in it
    held_text = ws.tokenizer.decode(ws.blocks["heldout"].flatten())
    file_docs = [json.loads(line)["text"] for line in (tmp_path / "corpus.jsonl").read_text().splitlines()]
    held_docs = set(split_corpus(ws.corpus.dataset, ws.space.data)["heldout"]["text"])
    assert any(d in held_docs for d in file_docs)
    assert not any(" ".join(d.split()[:6]) in held_text for d in file_docs)
    assert ws.healing_blocks.shape[1] == 32
    healing = ws.data_sources()["healing"]
    assert healing["train_groups_only"] and healing["tokens"] >= 600 and healing["key"] != corpus["key"]

    (tmp_path / "run").mkdir()
    written = json.loads(save_data_sources(ws, tmp_path / "run").read_text())
    assert written == json.loads(json.dumps(ws.data_sources()))
    params = flatten(run_params(RunConfig(), ws.space, ws.data_sources()))
    assert params["data_sources.0.kind"] == "file" and params["data_sources.1.kind"] == "teacher-unconditional"
    assert int(params["data_sources.1.tokens"]) == corpus["sources"][1]["tokens"]
    # on a GPU every mixture heals on its own draw (not only teacher-generated corpora)
    assert DeviceDefaults.for_device(torch.device("cuda"), ws.space).healing_corpus_tokens == 2_500_000


def test_healing_corpus_is_written_by_the_teacher_even_when_a_heal_asks_first(tokenizer, tmp_path, monkeypatch):
    """A student session that heals first must not sample the healing corpus from the student."""
    import lbsearch.workspace as workspace
    from lbsearch.attention import ORIGINAL, kind_of_module
    from lbsearch.models import decoder_layers
    from lbsearch.plan import Plan
    from lbsearch.workspace import Workspace

    space_file = write_tiny_space(tmp_path, tokenizer)
    ws = Workspace.open(space_file, device="cpu", cache=tmp_path / "cache", progress=False,
                        defaults={"healing_corpus_tokens": 600})
    seen = []
    real = workspace.build_corpus

    def spy(data, model, *args, **kwargs):
        seen.append(all(kind_of_module(layer.self_attn).name == ORIGINAL for layer in decoder_layers(model)))
        return real(data, model, *args, **kwargs)

    monkeypatch.setattr(workspace, "build_corpus", spy)
    plan = Plan.parse("S" + "N" * (ws.n_layers - 1))
    with ws.student(plan, ws.heal_config(64, batch_size=1)):
        pass
    assert seen == [True]
    ws._busy = True
    with pytest.raises(RuntimeError, match="before the model becomes a student"):
        type(ws).healing_blocks.func(ws)
    ws._busy = False


def test_a_small_corpus_whose_hashes_leave_a_split_empty_is_split_by_rank(tmp_path):
    """Seven groups that all hash into held-out or calibration: split by hash rank instead (every split
    non-empty, groups kept whole), and those held-out groups are what the healing corpus must skip."""
    from types import SimpleNamespace

    from datasets import Dataset

    from lbsearch.corpus.splits import bucket, held_out_groups, split_corpus

    cfg = SimpleNamespace(seed=0, heldout_fraction=0.25, calibration_fraction=0.25)
    groups = [f"g{i}" for i in range(2000) if bucket(f"g{i}", 0) < 0.5][:7]
    ds = Dataset.from_dict({"text": [f"doc {g} {k}" for g in groups for k in range(2)],
                            "group": [g for g in groups for _ in range(2)]})
    splits = split_corpus(ds, cfg)
    sizes = {name: len(part) for name, part in splits.items()}
    assert sizes == {"heldout": 4, "calibration": 4, "train": 6}  # 2 + 2 + 3 groups of two documents
    seen = [set(part["group"]) for part in splits.values()]
    assert sum(map(len, seen)) == 7 and set.union(*seen) == set(groups)
    held = held_out_groups(ds, splits)
    assert held == set(splits["heldout"]["group"]) | set(splits["calibration"]["group"]) and len(held) == 4
    with pytest.raises(LBSearchError, match="corpus too small"):
        split_corpus(Dataset.from_dict({"text": ["a", "b"], "group": groups[:2]}), cfg)


def test_the_healing_draw_skips_excluded_groups(model, tokenizer, cache_home):
    drawn = build_corpus(data({"source": "teacher-prompts", **SHORT}, corpus_tokens=60), model, tokenizer,
                         train_only=True, progress=False)
    first = drawn.dataset["group"][0]  # a train group: only the exclusion can keep it out
    again = build_corpus(data({"source": "teacher-prompts", **SHORT}, corpus_tokens=60), model, tokenizer,
                         train_only=True, exclude_groups=frozenset({first}), progress=False)
    assert first not in set(again.dataset["group"])


def test_the_first_prompts_drawn_spread_over_every_split(tokenizer):
    """The prompts' drawing order is independent of the split: any prefix of it (what a small corpus
    draws) has its share of train, calibration and held-out prompts."""
    from collections import Counter

    from lbsearch.corpus.sources import DrawContext, answers_request, resolve
    from lbsearch.corpus.splits import split_of

    src = resolve(data({"source": "teacher-prompts"}).sources[0], "data.sources[0]")
    for seed in (0, 1):
        request = answers_request(src, DrawContext(None, tokenizer, seed=seed))
        first = Counter(split_of(g, seed, 0.25, 0.25) for g in request.groups[:200])
        assert 25 <= first["heldout"] <= 75 and 25 <= first["calibration"] <= 75 and first["train"] >= 70, first
